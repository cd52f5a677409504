"""Query a reference with an image, in one call: read the CT, crop and embed the tumors as the reference's
model and recipe did, search, and say where the time went.

A reference model's embeddings are comparable with a query only if both were made with the same recipe
and have the same length; anything else is refused before any image is read or weight fetched.

Several models at once (a list, or ``"all"``): the tumors are cropped once per distinct recipe (models
sharing a recipe share the crops), embedded by each model (all tumors of a model in one batch), and the
models' rankings fused (``references/fused.py``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .cloud import open_reference
from .errors import SimilarPatientsError
from .imaging.crop import Crop
from .imaging.ct_image import read_ct
from .imaging.tumor import Tumor
from .models import registry
from .models.embedder import Embedder, Embedding
from .models.weights import require_acceptance
from .models.weights import status as weight_status
from .progress import ProgressCallback, report
from .references.fused import FUSED_MODEL, fused_models, is_fused
from .references.reference import Reference
from .references.store import ReferenceStore
from .search.correction import CORRECTED
from .search.filters import Filters
from .search.fusion import FUSION_DEPTH
from .util.optional import IMAGING, require


@dataclass
class Timings:
    """Seconds per stage of one query (``load``: the model's weights, 0 when an Embedder was passed in; in a
    fused query, each stage summed over the models, and ``per_model`` the crop + embed of each)."""

    read: float = 0.0
    load: float = 0.0
    crop: float = 0.0
    embed: float = 0.0
    search: float = 0.0
    per_model: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.read + self.load + self.crop + self.embed + self.search


@dataclass
class ImageQuery:
    """The answer to one image query: the nearest patients and everything that produced them."""

    hits: pd.DataFrame  #: one row per reference patient, nearest first (see ``references.hits``)
    embeddings: list[Embedding]  #: one per query tumor (and per model, models in order, when fused)
    crops: list[Crop]  #: the network inputs, one per query tumor (and per distinct recipe, when fused)
    reference: str
    model: str  #: the model, or "fused"
    recipe: str  #: its recipe ("MODEL: RECIPE, ..." when fused)
    metric: str
    seconds: Timings = field(default_factory=Timings)
    models: tuple = ()  #: the models fused (empty for a one-model query)
    fusion: str | None = None  #: how they were fused ("rrf", "percentile")


def check_compatible(reference: Reference, model: str, recipe: str, dimension: int) -> None:
    """Refuse a model/recipe the reference was not built with, naming the recipes it has."""
    have = ", ".join(f"{m} ({reference.model_info(m).recipe})" for m in reference.models)
    if model not in reference.models:
        raise SimilarPatientsError(
            f"Reference '{reference.name}' has no model '{model}'; it has: {have}. Query it with one of those "
            f"models (their weights can be given with --weights where they cannot be downloaded), or build a "
            f"reference with {model}: `similar-patients embed --model {model} --out rows.parquet` per tumor, then "
            f"`similar-patients references import NAME --source rows.parquet`."
        )
    info = reference.model_info(model)
    if info.recipe != recipe:
        raise SimilarPatientsError(
            f"Reference '{reference.name}' holds {model} embeddings made with recipe '{info.recipe}', but the "
            f"query would be made with '{recipe}': they are not comparable. Its models and recipes: {have}."
        )
    if info.dim != dimension:
        raise SimilarPatientsError(
            f"Reference '{reference.name}' holds {info.dim}-long {model} embeddings; the model makes {dimension}."
        )


def query_image(
    image,
    tumors: Tumor | Sequence[Tumor],
    model: str | Embedder,
    reference: str | Reference,
    k: int = 5,
    metric: str = "cosine",
    where: Filters = None,
    method: str = "auto",
    *,
    recipe: str | None = None,
    weights: Path | str | None = None,
    accept_licence: bool = False,
    device: str | None = None,
    store: ReferenceStore | None = None,
    progress: ProgressCallback | None = None,
    fusion: str = "rrf",
    depth: int = FUSION_DEPTH,
    space: str = CORRECTED,
    like: Sequence[str] = (),
    unlike: Sequence[str] = (),
    similar_by: str | None = None,
) -> ImageQuery:
    """The ``k`` reference patients nearest to the query patient's tumor(s) in ``image``.

    Args:
        image: the CT: a path (DICOM series folder or file, NIfTI, NRRD) or a ``SimpleITK.Image`` in HU.
        tumors: one :class:`Tumor` or several of one patient (see ``imaging.tumor``); with several,
            patients are ranked by their nearest pair of (query tumor, reference lesion).
        model: a registry name, or an :class:`Embedder` already loaded (reused across queries); or several
            (a list of either), or ``"all"`` (every model of the reference), fused.
        reference: a stored reference's name (in ``store``, default the data home's), a BigQuery table as
            ``bq://PROJECT.DATASET.TABLE``, or an opened one.
        k, metric, where, method: as :meth:`Reference.search`.
        recipe, weights, accept_licence, device: as :class:`Embedder`, when ``model`` is a name; when
            fused, ``recipe`` and ``weights`` are mappings model → value (each model's reference recipe and
            its cached weights where a model is not in them).
        fusion, depth: how several models are fused (:func:`references.fused.search_fused`).
        space: ``corrected`` (hub-free, the default) or ``raw``, as :meth:`Reference.search`.
        like, unlike: hit patients marked ("more like these"), as :meth:`Reference.search`.
        similar_by: a label to be similar with respect to, as :meth:`Reference.search` (one model).
    """
    require("embed", IMAGING)
    reference = open_reference(reference, store)
    if (like or unlike) and not hasattr(reference, "feedback_query"):
        raise SimilarPatientsError(
            f"More like these (like / unlike) reads the marked patients' vectors from a stored reference; "
            f"'{reference.name}' is a BigQuery table: give feedback on a stored reference."
        )
    label_aware = {"similar_by": similar_by} if similar_by is not None else {}
    if is_fused(model) and label_aware:
        raise SimilarPatientsError("similar_by searches with one model; name one model, not several or 'all'.")
    if label_aware and not isinstance(reference, Reference):
        raise SimilarPatientsError("similar_by needs a stored reference (its label fit is kept there), not BigQuery.")
    if is_fused(model):
        return _query_fused(
            image, tumors, model, reference, k, metric, where, method, recipe, weights, accept_licence, device,
            progress, fusion, depth, space, like, unlike,
        )  # fmt: skip
    if isinstance(model, Embedder):
        spec, chosen = model.spec, model.recipe
    else:
        spec = registry.get(model)
        chosen = spec.with_recipe(recipe)
    check_compatible(reference, spec.name, chosen.name, spec.dimension)
    seconds = Timings()
    report(progress, 0, 4, "reading the CT")
    started = time.perf_counter()
    image = read_ct(image)
    seconds.read = _lap(started)
    embedder = model
    if not isinstance(embedder, Embedder):
        started = time.perf_counter()
        embedder = Embedder(spec.name, chosen.name, weights, accept_licence, device, progress=progress)
        seconds.load = _lap(started)
    report(progress, 1, 4, "cropping the tumor")
    started = time.perf_counter()
    crops = embedder.crops(image, tumors)
    seconds.crop = _lap(started)
    report(progress, 2, 4, f"embedding with {spec.name}")
    started = time.perf_counter()
    embeddings = embedder.embed_prepared(crops)
    seconds.embed = _lap(started)
    report(progress, 3, 4, "searching")
    started = time.perf_counter()
    vectors = np.stack([e.vector for e in embeddings])
    options = {"metric": metric, "where": where, "method": method, "space": space, **label_aware}
    hits = reference.search(spec.name, embeddings=vectors, k=k, **options, **_marks(like, unlike))
    seconds.search = _lap(started)
    report(progress, 4, 4, "searching")
    return ImageQuery(hits, embeddings, crops, reference.name, spec.name, chosen.name, metric, seconds)


def _query_fused(
    image, tumors, model, reference, k, metric, where, method, recipe, weights, accept_licence, device, progress,
    fusion, depth, space, like=(), unlike=(),
) -> ImageQuery:  # fmt: skip
    """Crop once per recipe, embed with each model, fuse the models' rankings."""
    given = {} if isinstance(model, str) else {e.spec.name: e for e in model if isinstance(e, Embedder)}
    if not isinstance(model, str):  # names as the reference spells them (the registry's are case-insensitive)
        model = [e.spec.name if isinstance(e, Embedder) else _spelled(e, reference) for e in model]
    names = fused_models(reference, model)
    recipes, paths = _per_model(recipe, "recipe"), _per_model(weights, "weights")
    chosen = {}
    for name in names:
        spec = given[name].spec if name in given else _known(name, reference)
        chosen[name] = given[name].recipe if name in given else spec.with_recipe(recipes.get(name))
        check_compatible(reference, spec.name, chosen[name].name, spec.dimension)
    fetched = [name for name in names if name not in given and name not in paths]  # one licence question for all
    require_acceptance([weight_status(n, registry.get(n).weights) for n in fetched], accept_licence)
    seconds = Timings()
    steps = 2 + 2 * len(names)
    report(progress, 0, steps, "reading the CT")
    started = time.perf_counter()
    image = read_ct(image)
    seconds.read = _lap(started)
    crops, embeddings, vectors = {}, [], {}
    for i, name in enumerate(names):
        embedder = given.get(name)
        if embedder is None:
            started = time.perf_counter()
            embedder = Embedder(name, chosen[name].name, paths.get(name), accept_licence, device, progress=progress)
            seconds.load += _lap(started)
        report(progress, 1 + 2 * i, steps, f"cropping the tumor for {name}")
        started = time.perf_counter()
        if embedder.recipe not in crops:
            crops[embedder.recipe] = embedder.crops(image, tumors)
        crop_seconds = _lap(started)
        report(progress, 2 + 2 * i, steps, f"embedding with {name}")
        started = time.perf_counter()
        made = embedder.embed_prepared(crops[embedder.recipe])
        embed_seconds = _lap(started)
        seconds.crop, seconds.embed = seconds.crop + crop_seconds, seconds.embed + embed_seconds
        seconds.per_model[name] = crop_seconds + embed_seconds
        embeddings += made
        vectors[name] = np.stack([e.vector for e in made])
    report(progress, steps - 1, steps, "searching with each model")
    started = time.perf_counter()
    hits = reference.search_fused(
        vectors, k=k, metric=metric, where=where, method=method, fusion=fusion, depth=depth, space=space,
        **_marks(like, unlike),
    )  # fmt: skip
    seconds.search = _lap(started)
    report(progress, steps, steps, "searching with each model")
    recipe_names = ", ".join(f"{name}: {chosen[name].name}" for name in names)
    all_crops = [c for made in crops.values() for c in made]
    return ImageQuery(
        hits, embeddings, all_crops, reference.name, FUSED_MODEL, recipe_names, metric, seconds, tuple(names), fusion
    )


def _marks(like, unlike) -> dict:
    """The feedback arguments, only where given (a BigQuery reference's search takes none)."""
    return {"like": like, "unlike": unlike} if like or unlike else {}


def _spelled(name: str, reference) -> str:
    if name in reference.models:
        return name
    try:
        return registry.get(name).name
    except SimilarPatientsError:
        return name  # fused_models names what the reference has


def _known(name: str, reference) -> registry.ModelSpec:
    """The registry entry of a reference model an image query must run, or a clear error."""
    try:
        return registry.get(name)
    except SimilarPatientsError:
        raise SimilarPatientsError(
            f"Reference '{reference.name}' has model '{name}', which cannot embed an image here (it is not one of "
            f"{', '.join(registry.MODELS)}); fuse the models that can, by name."
        ) from None


def _per_model(value, what: str) -> dict:
    """A fused query's per-model ``recipe`` or ``weights``: a mapping, or nothing."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SimilarPatientsError(
            f"A query of several models takes {what} per model (a mapping of model to {what}), not one for all."
        )
    return {registry.get(m).name: v for m, v in value.items()}


def _lap(started: float) -> float:
    return time.perf_counter() - started
