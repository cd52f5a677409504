"""The label-aware search of a stored reference: "similar with respect to" one of its labels.

Which labels: ``stage`` (AJCC, ordinal IA < IB < IIA < IIB < IIIA < IIIB < IV), ``histology`` (on a reference
with ICD-O-3 ``histology_code``: the adenocarcinoma family against the squamous family, the evaluation's
task; other histologies are scored but not fitted), or any other label field: numeric fields as numbers,
text fields as classes (classes with fewer than ``MIN_PER_CLASS`` patients are left out of the fit). A
field that is not a label of the reference, or too few labelled patients, is refused.

The fit (:mod:`..search.label_direction`: ridge in the z-scored space, penalty and blend weight chosen by
cross-validation on the labelled patients) is made on first use per (model, label, metric) and recorded in
the reference's version like the closeness distributions: its weights and every patient's label scores as
``models/<i>/label-<name>-<metric>{,-scores}.npy``, digested, and the choice in the manifest
(``models.<model>.label_aware``). No label of a query is ever used: a query's score comes from its vectors.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import SimilarPatientsError
from ..search import label_direction as direction
from ..search.correction import CORRECTED
from ..search.distances import pairwise_distances
from ..search.nearest import RowMask, nearest_patients
from . import schema
from .hits import hit_table
from .writer import save_array

#: A class needs this many labelled patients to be fitted; a numeric or ordinal label this many in all.
MIN_PER_CLASS = 10
MIN_LABELLED = 20
#: At most this many labelled patients are queries of the selection (a seeded sample on a large reference).
SELECTION_QUERIES = 1000
#: ... and at most this many (query, patient) distances are held at once by the selection.
SELECTION_CELLS = 50_000_000
#: Above this many rows the selection does not check the same-tumor promise (it compares lesions pairwise).
SAME_TUMOR_ROWS = 20_000
STAGE_ORDER = ("IA", "IB", "IIA", "IIB", "IIIA", "IIIB", "IV")
ADENOCARCINOMA_CODES = ("8140", "8250", "8252", "8253", "8254", "8255", "8323", "8480", "8481", "8490", "8550")
SQUAMOUS_CODES = ("8070", "8071", "8072")
#: The hit table's label-aware columns, after the search's own.
COLUMNS = ("similar_by", "visual_rank", "label_rank", "label_distance", "blend_weight")
#: Where the histology direction is offered, what the product must say (the demographic anchor does better).
HISTOLOGY_CAVEAT = (
    "on NLST-Sybil it does not beat retrieval by age, sex and smoking for any model, nor the look alone "
    "(docs/search.md): treat it as no more than a hint"
)
STAGE_MEASURED = (
    "On NLST-Sybil it raises stage III–IV vs I–II class-balanced P@10 by about 0.03 for CT-FM and Merlin "
    "(intervals above 0) and by less than 0.015 for the other models (docs/search.md)."
)


@dataclass(frozen=True)
class Label:
    """A label a search can be similar by: its name, the field it reads, and how its values are coded."""

    name: str
    field: str
    kind: str
    order: tuple = ()  # ordinal: the values, lowest first
    classes: tuple = ()  # categorical: (class name, value terms) pairs; empty: the field's own values

    @property
    def file_stem(self) -> str:
        """A file-name-safe, unambiguous name (a user's field may hold any character)."""
        slug = re.sub(r"[^A-Za-z0-9]+", "_", self.name).strip("_") or "label"
        return slug if slug == self.name else f"{slug}_{hashlib.sha1(self.name.encode()).hexdigest()[:8]}"


def presets(fields: Sequence[str]) -> dict:
    """The named labels a reference with ``fields`` offers beside its own fields."""
    offered = {}
    if "stage" in fields:
        offered["stage"] = Label("stage", "stage", direction.ORDINAL, STAGE_ORDER)
    if "histology_code" in fields:
        families = (("adenocarcinoma family", ADENOCARCINOMA_CODES), ("squamous family", SQUAMOUS_CODES))
        offered["histology"] = Label("histology", "histology_code", direction.CATEGORICAL, classes=families)
    return offered


def describe(name: str) -> str:
    """What a label-aware search by ``name`` is, and what it was measured to be worth (for tooltips and help)."""
    what = (
        f"The look, with patients nearer on a {name} direction fitted on this reference's own labels ranked "
        "first (one model)."
    )
    if name == "stage":
        return f"{what} {STAGE_MEASURED}"
    if name == "histology":
        return f"{what} Adenocarcinoma vs squamous family; {HISTOLOGY_CAVEAT}."
    return f"{what} Not evaluated on this reference."


def offered_labels(reference) -> list:
    """The names ``similar_by`` accepts on ``reference``."""
    fields = reference.label_fields
    named = presets(fields)
    return [*named, *(f for f in fields if f not in named)]


def resolve(reference, similar_by: str, lesions: pd.DataFrame) -> Label:
    """The label ``similar_by`` names on ``reference``, or a clear refusal."""
    fields = reference.label_fields
    named = presets(fields)
    if similar_by in named:
        label = named[similar_by]
        if label.kind == direction.ORDINAL and not set(lesions[label.field].dropna().astype(str)) <= set(label.order):
            return Label(label.name, label.field, direction.CATEGORICAL)  # a user's own stage values: as classes
        return label
    if similar_by not in fields:
        raise SimilarPatientsError(
            f"Reference '{reference.name}' has no label '{similar_by}' to search by; it offers: "
            f"{', '.join(offered_labels(reference)) or 'none'} (structural columns such as PatientID or "
            "SeriesInstanceUID are not labels)."
        )
    column = lesions[similar_by]
    numeric = pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
    return Label(similar_by, similar_by, direction.NUMERIC if numeric else direction.CATEGORICAL)


def patient_codes(label: Label, lesions: pd.DataFrame, patient_ids: np.ndarray) -> tuple[np.ndarray, direction.Codes]:
    """The labelled patients (codes into ``patient_ids``) and their targets; refused when too few."""
    from ..search.filters import value_mask

    column = lesions[label.field]
    if label.classes:
        value = np.full(len(column), None, dtype=object)
        for name, terms in label.classes:
            value[value_mask(column, terms)] = name
        column = pd.Series(value, index=column.index)
    per_patient = column.groupby(lesions[schema.PATIENT].to_numpy()).first().reindex(pd.Index(patient_ids))
    known = per_patient.notna().to_numpy()
    if label.kind == direction.CATEGORICAL:
        text = per_patient.astype(str).where(known)
        counts = text[known].value_counts()
        kept = sorted(counts[counts >= MIN_PER_CLASS].index)
        if len(kept) < 2:
            raise SimilarPatientsError(
                f"Cannot search by '{label.name}': it needs at least 2 classes with {MIN_PER_CLASS} or more labelled "
                f"patients each; this reference has {_counted(counts)}."
            )
        labelled = np.flatnonzero(text.isin(kept).to_numpy())
        groups = np.searchsorted(kept, text.to_numpy()[labelled].astype(str))
        values = np.eye(len(kept))[groups]
        return labelled, direction.Codes(label.kind, values, groups)
    if label.kind == direction.ORDINAL:
        code = per_patient.map({v: i for i, v in enumerate(label.order)}).to_numpy(dtype=np.float64)
    else:
        code = pd.to_numeric(per_patient, errors="coerce").to_numpy(dtype=np.float64)
    labelled = np.flatnonzero(np.isfinite(code))
    if len(labelled) < MIN_LABELLED or len(np.unique(code[labelled])) < 2:
        raise SimilarPatientsError(
            f"Cannot search by '{label.name}': it needs {MIN_LABELLED} or more labelled patients with at least two "
            f"values; this reference has {len(labelled)} labelled patient(s)."
        )
    code = code[labelled]
    if label.kind == direction.ORDINAL:
        groups = code.astype(np.int64)
    else:  # balanced and folded by quintile
        groups = np.searchsorted(np.quantile(code, [0.2, 0.4, 0.6, 0.8]), code, side="right")
    return labelled, direction.Codes(label.kind, code[:, None], groups)


def _counted(counts: pd.Series) -> str:
    if not len(counts):
        return "no labelled patient"
    return ", ".join(f"{name}: {n}" for name, n in counts.items())


def patient_features(space) -> np.ndarray:
    """(p, D) every patient's mean z-scored lesion vector in ``space`` (a corrected space)."""
    sums = np.zeros((len(space.patient_ids), space.dim))
    for begin in range(0, len(space.norms), schema.CHUNK_ROWS):
        end = min(len(space.norms), begin + schema.CHUNK_ROWS)
        np.add.at(sums, space.patient_codes[begin:end], space.correction.transformed(space.vectors[begin:end]))
    return sums / space.lesion_counts[:, None]


def visual_distances(space, codes: np.ndarray, metric: str) -> np.ndarray:
    """(q, p) the corrected distance of each patient in ``codes`` to every patient, as the search measures it
    (nearest lesion pair, over the square root of both radii), +inf to itself."""
    order, starts = space._rows_by_patient
    rows = space.correction.transformed(space.vectors[order])
    radii = space.correction.radii
    out = np.empty((len(codes), len(space.patient_ids)))
    for i, code in enumerate(codes):
        lesions = rows[starts[code] : starts[code + 1]]
        nearest = pairwise_distances(rows, lesions, metric).min(axis=1)
        out[i] = np.minimum.reduceat(nearest, starts[:-1]) / np.sqrt(radii * radii[code])
        out[i, code] = np.inf
    return out


def same_tumor(space, lesions: pd.DataFrame, metric: str, seed: int = 0) -> direction.SameTumor | None:
    """The lesions whose patient has lesions in another CT series (the same tumor scanned again), as queries of
    the selection's same-tumor promise; None without a series column, such lesions, or above
    ``SAME_TUMOR_ROWS`` rows (a lesion-by-lesion check would not fit; the manifest says it was skipped)."""
    if schema.SERIES not in lesions.columns or len(lesions) > SAME_TUMOR_ROWS:
        return None
    patient = np.asarray(space.patient_codes)
    series = pd.factorize(lesions[schema.SERIES].astype(str))[0]
    relevant_of = (patient[:, None] == patient[None, :]) & (series[:, None] != series[None, :])
    queries = np.flatnonzero(relevant_of.any(axis=1))
    if not len(queries):
        return None
    most = max(1, SELECTION_CELLS // len(patient))
    if len(queries) > most:
        queries = np.sort(np.random.default_rng(seed).choice(queries, most, replace=False))
    features = space.correction.transformed(space.vectors)
    radii = np.asarray(space.row_radii)
    visual = pairwise_distances(features, features[queries], metric).T / np.sqrt(radii[queries, None] * radii)
    visual[np.arange(len(queries)), queries] = np.inf
    return direction.SameTumor(features, queries, visual, relevant_of[queries])


@dataclass(frozen=True)
class LabelFit:
    """One (model, label, metric)'s fit: weights (D, c), intercept (c,), every patient's scores (p, c), and
    the choice (penalty, blend weight) with what the selection measured."""

    label: Label
    weights: np.ndarray
    intercept: np.ndarray
    scores: np.ndarray
    about: dict

    @property
    def blend_weight(self) -> float:
        return float(self.about["blend_weight"])

    @property
    def scale(self) -> float:
        return float(self.about["label_scale"])

    def query_scores(self, space, embeddings: np.ndarray) -> np.ndarray:
        """(c,) a new query's score: its rows' mean z-scored vector through the fit."""
        rows = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
        return space.correction.transformed(rows).mean(axis=0) @ self.weights + self.intercept


def fit(reference, model: str, label: Label, metric: str, seed: int = 0) -> LabelFit:
    """Fit ``label``'s direction for ``model`` on the whole reference (penalty and blend weight by
    cross-validation, see :func:`..search.label_direction.choose`)."""
    started = time.perf_counter()
    space = reference.space(model, space=CORRECTED, metric=metric)
    labelled, codes = patient_codes(label, reference.lesions(model), space.patient_ids)
    features = patient_features(space)
    queries = np.arange(len(labelled))
    most = max(1, min(SELECTION_QUERIES, SELECTION_CELLS // max(len(space.patient_ids), 1)))
    if len(queries) > most:
        queries = np.sort(np.random.default_rng(seed).choice(queries, most, replace=False))
    visual = visual_distances(space, labelled[queries], metric)
    tumor = same_tumor(space, reference.lesions(model), metric, seed)
    choice = direction.choose(features, labelled, codes, visual, queries, seed=seed, tumor=tumor)
    final = direction.RidgeFit(features[labelled], codes.values)
    weights, intercept = final.coefficients(choice.penalty)
    scores = features @ weights + intercept
    about = {
        "label": label.name,
        "field": label.field,
        "kind": label.kind,
        "classes": [name for name, _ in label.classes] or None,
        "labelled_patients": len(labelled),
        "selection_queries": len(queries),
        "penalty": choice.penalty,
        "blend_weight": choice.weight,
        "label_scale": direction.label_scale(scores),
        "selection": {f"{p:g}/{w:g}": round(v, 6) for (p, w), v in choice.table.items()},
        "same_tumor_queries": 0 if tumor is None else len(tumor.queries),
        "same_tumor_r1": {f"{p:g}/{w:g}": round(v, 6) for (p, w), v in choice.same_tumor.items()},
        "seconds": round(time.perf_counter() - started, 3),
    }
    return LabelFit(label, weights, intercept, scores, about)


def fitted(reference, model: str, label: Label, metric: str) -> LabelFit:
    """The fit for (model, label, metric): kept in memory, read from the version, or made now and recorded."""
    key = (model, label, metric)
    kept = reference._label_fits
    if key in kept:
        return kept[key]
    folder = f"models/{reference.model_info(model).folder}"
    stem = f"{folder}/label-{label.file_stem}-{metric}"
    names = [f"{stem}.npy", f"{stem}-scores.npy"]
    entry = f"{label.file_stem}-{metric}"
    about = reference.manifest["models"][model].get("label_aware", {}).get(entry)
    if about is not None and all(name in reference._files for name in names):
        stacked, scores = (np.load(reference.verified(name)) for name in names)
        result = LabelFit(label, stacked[:-1], stacked[-1], scores, about)
    else:
        result = fit(reference, model, label, metric)

        def save() -> dict:
            saved = save_array(reference.path, names[0], np.vstack([result.weights, result.intercept[None, :]]))
            saved.update(save_array(reference.path, names[1], result.scores))
            return saved

        def describe(content: dict) -> None:
            content["models"][model].setdefault("label_aware", {})[entry] = result.about

        reference._record(names, save, describe)
    kept[key] = result
    return result


def search(
    reference,
    model: str,
    similar_by: str,
    embeddings: np.ndarray | None,
    patient: str | None,
    k: int,
    metric: str,
    where,
    exclude: Sequence[str],
    method: str,
    progress,
    query_lesions,
    space: str,
) -> pd.DataFrame:
    """``Reference.search(..., similar_by=LABEL)``: the candidates (the visual search's first ``DEPTH``
    patients and the first ``DEPTH`` by label-score distance, under the same filters and exclusions) ranked
    by the blended distance of :mod:`..search.label_direction`; the hit table's ``distance`` stays the
    visual one, and :data:`COLUMNS` say how each hit was ranked."""
    if space != CORRECTED:
        raise SimilarPatientsError(
            f"similar_by blends the corrected space's distance with a label direction fitted there; it has no {space} "
            "form (search with space='corrected', CLI --space corrected, and a cosine or euclidean metric)."
        )
    label = resolve(reference, similar_by, reference.lesions(model))
    result = fitted(reference, model, label, metric)
    searched = reference.space(model, progress, space, metric)
    depth = min(direction.DEPTH, len(searched.patient_ids))
    options = {"metric": metric, "where": where, "exclude": exclude, "method": method, "space": space}
    visual_hits = reference.search(
        model, embeddings, patient, k=depth, progress=progress, query_lesions=query_lesions, **options
    )
    eligible = np.ones(len(searched.patient_ids), dtype=bool)
    if where:
        eligible[:] = False
        eligible[np.unique(searched.patient_codes[reference.row_mask(model, where).rows])] = True
    for excluded in exclude:
        code = searched.patient_code(str(excluded))
        if code is not None:
            eligible[code] = False
    if patient is not None:
        query = result.scores[searched.patient_code(str(patient))]
    else:
        query = result.query_scores(searched, embeddings)
    apart = direction.label_distances(query[None, :], result.scores)[0] / result.scale
    by_label = direction.listed(np.where(eligible, apart, np.inf)[None, :], depth)[0]
    hits = _candidates(
        reference, model, searched, visual_hits, np.flatnonzero(by_label), embeddings, patient, options, query_lesions
    )
    codes = np.searchsorted(searched.patient_ids, hits[schema.PATIENT].to_numpy(dtype=object))
    visual_rank = np.zeros(len(searched.patient_ids), dtype=np.int64)
    visual_rank[codes[: len(visual_hits)]] = visual_hits["rank"].to_numpy()
    label_rank = np.zeros(len(searched.patient_ids), dtype=np.int64)
    ranked = np.flatnonzero(by_label)
    label_rank[ranked[np.lexsort((ranked, apart[ranked]))]] = np.arange(1, len(ranked) + 1)
    blended = direction.blended_distance(hits["distance"].to_numpy(), apart[codes], result.blend_weight)
    chosen = np.lexsort((codes, blended))[:k]
    hits = hits.iloc[chosen].reset_index(drop=True)
    codes = codes[chosen]
    hits["rank"] = np.arange(1, len(hits) + 1)
    hits["similar_by"] = label.name
    hits["visual_rank"] = pd.array([visual_rank[c] or None for c in codes], dtype="Int64")
    hits["label_rank"] = pd.array([label_rank[c] or None for c in codes], dtype="Int64")
    hits["label_distance"] = apart[codes]
    hits["blend_weight"] = result.blend_weight
    return hits


def _candidates(
    reference, model, searched, visual_hits, by_label, embeddings, patient, options, query_lesions
) -> pd.DataFrame:
    """The visual hits, then the hit rows of the label's candidates they lack: each one's nearest lesion
    pair measured now, under the same filters."""
    from .reference import query_lesion_names

    listed = set(np.searchsorted(searched.patient_ids, visual_hits[schema.PATIENT].to_numpy(dtype=object)).tolist())
    extra = [int(c) for c in by_label if int(c) not in listed]
    if not extra:
        return visual_hits
    rows = np.isin(searched.patient_codes, extra)
    if options["where"]:
        allowed = np.zeros(len(rows), dtype=bool)
        allowed[reference.row_mask(model, options["where"]).rows] = True
        rows &= allowed
    radius = None
    if patient is not None:
        own = reference.patient_embeddings(model, str(patient))
        embeddings, query_lesions = own.vectors, own.lesion_ids
        if searched.scaled:
            radius = float(searched.correction.radii[searched.patient_code(str(patient))])
    else:
        query_lesions = query_lesion_names(embeddings, query_lesions)
    metric = options["metric"]
    matches = nearest_patients(searched, embeddings, len(extra), metric, RowMask(rows), None, None, radius)
    counts = {m.patient: int(searched.lesion_counts[searched.patient_codes[m.row]]) for m in matches}
    metadata = reference.lesion_rows(model, [m.row for m in matches])
    labels = reference.label_fields
    more = hit_table(matches, metadata, counts, metric, query_lesions, labels, None, CORRECTED)
    return pd.concat([visual_hits, more], ignore_index=True)
