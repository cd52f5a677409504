"""Query a reference with an image, in one call: read the CT, crop and embed the tumors as the reference's
model and recipe did, search, and say where the time went.

A reference model's embeddings are comparable with a query only if both were made with the same recipe
and have the same length; anything else is refused before any image is read or weight fetched.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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
from .progress import ProgressCallback, report
from .references.reference import Reference
from .references.store import ReferenceStore
from .search.filters import Filters
from .util.optional import IMAGING, require


@dataclass
class Timings:
    """Seconds per stage of one query (``load``: the model's weights, 0 when an Embedder was passed in)."""

    read: float = 0.0
    load: float = 0.0
    crop: float = 0.0
    embed: float = 0.0
    search: float = 0.0

    @property
    def total(self) -> float:
        return self.read + self.load + self.crop + self.embed + self.search


@dataclass
class ImageQuery:
    """The answer to one image query: the nearest patients and everything that produced them."""

    hits: pd.DataFrame  #: one row per reference patient, nearest first (see ``references.hits``)
    embeddings: list[Embedding]  #: one per query tumor
    crops: list[Crop]  #: the network inputs, one per query tumor
    reference: str
    model: str
    recipe: str
    metric: str
    seconds: Timings = field(default_factory=Timings)


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
) -> ImageQuery:
    """The ``k`` reference patients nearest to the query patient's tumor(s) in ``image``.

    Args:
        image: the CT: a path (DICOM series folder or file, NIfTI, NRRD) or a ``SimpleITK.Image`` in HU.
        tumors: one :class:`Tumor` or several of one patient (see ``imaging.tumor``); with several,
            patients are ranked by their nearest pair of (query tumor, reference lesion).
        model: a registry name, or an :class:`Embedder` already loaded (reused across queries).
        reference: a stored reference's name (in ``store``, default the data home's), a BigQuery table as
            ``bq://PROJECT.DATASET.TABLE``, or an opened one.
        k, metric, where, method: as :meth:`Reference.search`.
        recipe, weights, accept_licence, device: as :class:`Embedder`, when ``model`` is a name.
    """
    require("embed", IMAGING)
    reference = open_reference(reference, store)
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
    hits = reference.search(spec.name, embeddings=vectors, k=k, metric=metric, where=where, method=method)
    seconds.search = _lap(started)
    report(progress, 4, 4, "searching")
    return ImageQuery(hits, embeddings, crops, reference.name, spec.name, chosen.name, metric, seconds)


def _lap(started: float) -> float:
    return time.perf_counter() - started
