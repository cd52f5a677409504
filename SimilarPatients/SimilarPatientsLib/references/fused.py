"""One query answered by several models of a reference together: each model ranks the reference's
patients, and the rankings are fused (``search/fusion.py``: reciprocal rank fusion, or the mean of the
models' "closer than N%" percentiles).

Each model contributes its first ``depth`` patients (its own search, exact or approximate as asked); the
fused hit table has one row per patient with the ``fused_score``, how many models list the patient
(``listed_by``) and, per model, its ``rank_<model>`` (empty beyond the depth or where the model lacks the
patient), ``distance_<model>`` (the nearest lesion pair in that model; for a stored reference measured
for every hit, also beyond the depth) and ``closer_than_<model>``. A hit's lesion columns (lesion, series,
centre, viewer link) are those of the match in the model that ranks it best (``lesion_model``); its
``distance`` is empty, since no single distance ranked it.

Works for any reference whose ``search`` has :meth:`Reference.search`'s signature: a stored one, and a
BigQuery table (reciprocal rank fusion only: BigQuery does not measure the closeness distribution that
percentile fusion needs, so it is refused there).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import SimilarPatientsError
from ..progress import ProgressCallback, report
from ..search import feedback, filters
from ..search.correction import CORRECTED, resolved_space
from ..search.fusion import FUSION_DEPTH, check_fusion, fuse, mean_closeness
from ..search.nearest import check_queries, exact_distances, own_radius
from . import schema
from .hits import HIT_COLUMNS

#: What a user picks (the CLI's ``--model all``; the Slicer module's model list) to fuse every model.
ALL = "all"
#: The Slicer module's model-list entry for a fused search of every model of the reference.
FUSED_CHOICE = "All models (fused)"
#: The ``model`` column of fused hits.
FUSED_MODEL = "fused"
RANK_PREFIX, DISTANCE_PREFIX, CLOSENESS_PREFIX = "rank_", "distance_", "closer_than_"
#: Columns a fused hit table adds after the hit columns (per-model columns follow them, labels last).
FUSED_COLUMNS = ("fusion", "fused_score", "listed_by", "lesion_model")
log = logging.getLogger(__name__)


def fused_models(reference, models: str | Sequence[str] | None) -> list[str]:
    """The models a fused search uses: every model of the reference for None, ``"all"`` or
    :data:`FUSED_CHOICE`; else the ones named (each checked, each once)."""
    if models is None or (isinstance(models, str) and models.strip().lower() in (ALL, FUSED_CHOICE.lower())):
        return list(reference.models)
    names = [models] if isinstance(models, str) else list(models)
    if any(str(m).strip().lower() in (ALL, FUSED_CHOICE.lower()) for m in names):
        raise SimilarPatientsError(f"Name models to fuse, or '{ALL}' alone, not both.")
    names = [reference.model_name(m) for m in names]
    if len(set(names)) != len(names):
        raise SimilarPatientsError(f"A model is named twice among {', '.join(names)}.")
    if not names:
        raise SimilarPatientsError("Name at least one model to fuse.")
    return names


def is_fused(model) -> bool:
    """Whether a model argument (a name, ``"all"``, the fused choice, or a list) asks for a fused search."""
    if isinstance(model, str):
        return model.strip().lower() in (ALL, FUSED_CHOICE.lower())
    return isinstance(model, (list, tuple))


def search_fused(
    reference,
    embeddings: Mapping[str, np.ndarray] | None = None,
    patient: str | None = None,
    models: str | Sequence[str] | None = None,
    k: int = 5,
    metric: str = "cosine",
    where: filters.Filters = None,
    exclude: Sequence[str] = (),
    method: str = "auto",
    fusion: str = "rrf",
    depth: int = FUSION_DEPTH,
    progress: ProgressCallback | None = None,
    query_lesions: Sequence[str] | None = None,
    space: str = CORRECTED,
    like: Sequence[str] = (),
    unlike: Sequence[str] = (),
) -> pd.DataFrame:
    """The ``k`` patients nearest by several models fused (see the module's docstring).

    ``embeddings`` maps each model to the query's embedding(s) in that model (its keys are the models
    when ``models`` is None); or ``patient`` names a reference patient, searched with its own lesions in
    each model. The other arguments are :meth:`Reference.search`'s; ``depth`` is how many patients each
    model contributes (at least ``k``). ``like`` / ``unlike`` move each model's query (:mod:`..search.feedback`)."""
    check_fusion(fusion, depth)
    marks = feedback.judged(like, unlike, patient)
    if (embeddings is None) == (patient is None):
        raise SimilarPatientsError("A fused search takes embeddings per model (embeddings={model: ...}) or a patient.")
    if embeddings is not None:
        models = fused_models(reference, list(embeddings) if models is None else models)
        missing = [m for m in models if m not in embeddings]
        if missing:
            raise SimilarPatientsError(f"No query embedding for {', '.join(missing)}: embed the tumor with each model.")
    else:
        models = fused_models(reference, models)
    local = hasattr(reference, "closeness")
    if fusion == "percentile" and not local:
        raise SimilarPatientsError(
            f"Percentile fusion needs each model's distribution of nearest-match distances, which "
            f"'{reference.name}' does not measure (a BigQuery table); fuse with --fusion rrf instead."
        )
    if marks:
        if not local:
            raise SimilarPatientsError(
                f"More like these (like / unlike) reads the marked patients' vectors from a stored reference; "
                f"'{reference.name}' is a BigQuery table: give feedback on a stored reference."
            )
        feedback.check_space(resolved_space(space, metric), metric)
    depth = checked_depth(reference, depth, k)
    lists = {}
    judged = {"like": marks.like, "unlike": marks.unlike} if marks else {}
    for i, model in enumerate(models):
        report(progress, i, len(models), f"searching with {model}")
        query = None if embeddings is None else embeddings[model]
        lists[model] = reference.search(
            model, query, patient, depth, metric, where, exclude, method, query_lesions=query_lesions, space=space,
            **judged,
        )  # fmt: skip
    report(progress, len(models), len(models), "fusing the models' rankings")
    candidates = np.array(sorted({str(p) for hits in lists.values() for p in hits[schema.PATIENT]}), dtype=object)
    ranks = np.zeros((len(models), len(candidates)), dtype=np.int64)
    distances = np.full((len(models), len(candidates)), np.nan)
    for m, model in enumerate(models):
        at = np.searchsorted(candidates, lists[model][schema.PATIENT].astype(str).to_numpy(dtype=object))
        ranks[m, at] = lists[model]["rank"].to_numpy()
        distances[m, at] = lists[model]["distance"].to_numpy(dtype=np.float64)
    closeness = None
    if local:  # the distances beyond each model's list, measured, and each distance's place in the model
        for m, model in enumerate(models):
            unlisted = np.flatnonzero(ranks[m] == 0)
            queries = _queries(reference, model, embeddings, patient)
            if marks:  # the moved query, a new one: its radius measured
                queries = reference.feedback_query(model, queries, marks)
            searched = reference.space(model, None, resolved_space(space, metric), metric)
            own = None if marks else patient
            radius = _query_radius(searched, queries, own, metric) if len(unlisted) else None
            unlisted_patients = candidates[unlisted]
            distances[m, unlisted] = _distances_of(
                reference, model, searched, queries, unlisted_patients, metric, where, radius
            )
        closeness = np.stack(
            [_closeness(reference, model, metric, distances[m], space) for m, model in enumerate(models)]
        )
    fused = fuse(ranks, closeness, fusion, depth)
    chosen = [i for i in fused.order[:k] if fused.listed[i] > 0]
    hits = _hit_table(reference, models, lists, candidates, chosen, ranks, distances, closeness, fused, fusion)
    return feedback.marked(hits.drop(columns=feedback.COLUMN, errors="ignore"), marks) if marks else hits


def checked_depth(reference, depth: int, k: int) -> int:
    """The patients each model's search asks for (``depth``, at least ``k``), refused by its own name where
    the reference caps one search (a BigQuery table)."""
    most = getattr(reference, "max_k", None)
    asked = max(int(depth), int(k))
    if most is not None and asked > most:
        raise SimilarPatientsError(
            f"The fusion depth (--depth, the patients each model's search asks for) is at most {most:,} on "
            f"{reference.name}; got {asked}."
        )
    return asked


def _queries(reference, model: str, embeddings, patient) -> np.ndarray:
    if embeddings is not None:
        return embeddings[model]
    return reference.patient_embeddings(model, str(patient)).vectors


def _query_radius(space, queries, patient, metric: str) -> float | None:
    """The query's own radius in a locally scaled space, as the search took it: a reference patient's
    stored one, else measured."""
    if not space.scaled:
        return None
    if patient is not None:
        return float(space.correction.radii[space.patient_code(str(patient))])
    return own_radius(space, check_queries(space.dim, queries, metric), metric)


def _distances_of(reference, model: str, space, queries, patients, metric: str, where, radius) -> np.ndarray:
    """Each patient's nearest-lesion-pair distance to the queries in the model's searched ``space`` (float64,
    as the search measures it: locally scaled with the query's ``radius`` there), NaN where the model lacks
    the patient or ``where`` drops all its lesions."""
    out = np.full(len(patients), np.inf)
    allowed = reference.row_mask(model, where).mask if where else None
    rows, owners = [], []
    for i, patient in enumerate(patients):
        code = space.patient_code(str(patient))
        if code is None:
            continue
        found = space.rows_of(code)
        if allowed is not None:
            found = found[allowed[found]]
        rows.append(found)
        owners.append(np.full(len(found), i))
    if rows:
        rows, owners = np.concatenate(rows), np.concatenate(owners)
        if len(rows):
            nearest = exact_distances(space, rows, check_queries(space.dim, queries, metric), metric).min(axis=1)
            if space.scaled:
                nearest = nearest / np.sqrt(space.row_radii[rows] * radius)
            np.minimum.at(out, owners, nearest)
    return np.where(np.isfinite(out), out, np.nan)


def _closeness(reference, model: str, metric: str, distances: np.ndarray, space: str) -> np.ndarray:
    out = np.full(len(distances), np.nan)
    known = np.isfinite(distances)
    if known.any():
        out[known] = reference.closeness(model, metric, distances[known], space=space)
    return out


def _hit_table(reference, models, lists, candidates, chosen, ranks, distances, closeness, fused, fusion):
    """The fused hits, each row taken from the list of the model that ranks it best, then re-labelled."""
    pieces, lesion_models = [], []
    for i in chosen:
        listing = [m for m in range(len(models)) if ranks[m, i] > 0]
        best = min(listing, key=lambda m: (ranks[m, i], m))
        lesion_models.append(models[best])
        pieces.append(lists[models[best]].iloc[[int(ranks[best, i]) - 1]])
    empty = next(iter(lists.values())).iloc[:0]
    hits = pd.concat(pieces, ignore_index=True) if pieces else empty.reset_index(drop=True)
    chosen = np.asarray(chosen, dtype=np.int64)
    hits["rank"] = np.arange(1, len(hits) + 1)
    hits["distance"] = np.nan
    hits[schema.MODEL] = FUSED_MODEL
    approximate = [h for h in lists.values() if len(h) and h["search"].iloc[0] == "approximate"]
    if approximate:
        hits["search"] = "approximate"
        hits["index_recall"] = min(float(h["index_recall"].iloc[0]) for h in approximate)
    added = {
        "fusion": [fusion] * len(hits),
        "fused_score": fused.scores[chosen],
        "listed_by": fused.listed[chosen].astype(np.int64),
        "lesion_model": lesion_models,
    }
    for m, model in enumerate(models):
        added[RANK_PREFIX + model] = pd.array([r if r > 0 else None for r in ranks[m, chosen]], dtype="Int64")
        added[DISTANCE_PREFIX + model] = distances[m, chosen]
        if closeness is not None:
            added[CLOSENESS_PREFIX + model] = closeness[m, chosen]
    for name, values in added.items():
        if name in hits.columns:  # a label of a reference stored before its name was reserved, or rank_<model>
            log.warning("the label '%s' has the name of a fused hit column; the computed value is shown", name)
        hits[name] = values
    leading = [c for c in HIT_COLUMNS if c in hits.columns] + list(added)
    hits = hits[leading + [c for c in hits.columns if c not in leading]]
    notes = [f"{model}: {note}" for model, h in lists.items() for note in h.attrs.get("notes", [])]
    if notes:
        hits.attrs["notes"] = notes
    return hits


def fused_rank_models(hits: pd.DataFrame) -> list[str]:
    """The models of a fused hit table (from its ``rank_<model>`` columns, in order)."""
    return [
        c[len(RANK_PREFIX) :]
        for c in hits.columns
        if c.startswith(RANK_PREFIX) and DISTANCE_PREFIX + c[len(RANK_PREFIX) :] in hits.columns
    ]


def rank_labels(hits: pd.DataFrame, depth: int = FUSION_DEPTH) -> pd.DataFrame:
    """Each model's rank of each fused hit as a person reads it, one column per model: the rank; ``>100``
    (the depth) when the model has the patient farther down (in an approximate search: not among the
    first 100 its index found); ``–`` when it does not list the patient at all (it lacks the patient, its
    filters drop it, or — for a BigQuery table, whose unlisted distances are not measured — it is farther
    than the depth)."""
    columns = {}
    for model in fused_rank_models(hits):
        ranks = pd.array(hits[RANK_PREFIX + model], dtype="Int64")
        measured = np.isfinite(pd.to_numeric(hits[DISTANCE_PREFIX + model], errors="coerce").to_numpy(dtype=float))
        columns[model] = [
            str(int(r)) if r is not pd.NA else (f">{depth}" if known else "–") for r, known in zip(ranks, measured)
        ]
    return pd.DataFrame(columns, index=hits.index)


def hit_closeness(reference, hits: pd.DataFrame, metric: str) -> np.ndarray:
    """The "closer than N%" a person reads beside each hit: the hit's distance placed on its model's
    distribution of nearest-match distances; for a fused hit, percentile fusion's score
    (:func:`~..search.fusion.mean_closeness`). NaN where no distribution was measured: a reference of one
    patient, or one that does not measure it (BigQuery)."""
    if not hasattr(reference, "closeness") or not len(hits):
        return np.full(len(hits), np.nan)
    models = fused_rank_models(hits)
    if models:
        columns = [CLOSENESS_PREFIX + m for m in models]
        measured = hits[columns].to_numpy(dtype=np.float64)
        unknown = np.isnan(measured).all(axis=1)  # no model measured it: a reference of one patient
        return np.where(unknown, np.nan, mean_closeness(measured, axis=1))
    space = str(hits["space"].iloc[0]) if "space" in hits.columns else CORRECTED
    distances = hits["distance"].to_numpy(dtype=np.float64)
    return reference.closeness(str(hits[schema.MODEL].iloc[0]), metric, distances, space=space)
