"""The label-aware search under nested cross-validation: does "similar with respect to stage" return more
neighbours of the query's stage than the visual search, without ever seeing the query's label?

Outer folds (``OUTER``, stratified on the label) hold out the queries: the label direction, its penalty and
the blend weight are chosen and fitted on the other folds' labelled patients only (the inner folds of
:func:`..search.label_direction.choose`, exactly the product's selection), then every held-out patient of the
task queries the whole reference as the search ranks it (visual ranks from the corrected search, label ranks
by score distance, each to ``DEPTH``, blended). Measured against the visual search on the same queries:

- class-balanced P@10 of the task (each class's mean P@10, averaged) with a row per class, and the paired
  difference with a 95% interval over queries resampled within each class;
- a permutation test that **refits**: the labels shuffled over patients, the whole nested procedure run
  again (selection included), its BP@10 the null (a null that keeps the fit would be anti-conservative);
- same-tumor R@1 (:mod:`.lookalike`): each lesion ranks the other lesions by the blend, with the fold's fit
  that never saw its patient's label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..references import label_aware
from ..search import label_direction as direction
from ..search.correction import CORRECTED
from ..search.distances import pairwise_distances
from . import lookalike, metrics, neighbourhoods
from .tasks import PRESETS

OUTER = 5
#: The labels evaluated on NLST-Sybil and the task each is scored by.
LABEL_TASKS = {"stage": "stage-iii-iv-vs-i-ii", "histology": "adeno-vs-squamous"}


@dataclass
class Prepared:
    """One model's data for the label-aware evaluation: everything that does not depend on the labels."""

    model: str
    patient_ids: np.ndarray  # (n,) sorted
    features: np.ndarray  # (n, D) mean z-scored vectors
    visual: np.ndarray  # (n, n) corrected patient distances as the search measures them, +inf to itself
    lesion_features: np.ndarray  # (m, D) z-scored lesion vectors
    lesion_patient: np.ndarray  # (m,) patient code of each lesion
    lesion_visual: np.ndarray  # (m, m) corrected lesion distances (as the search ranks lesions), +inf to itself
    pairs: lookalike.Pairs | None


def prepare(reference, model: str) -> Prepared:
    space = reference.space(model, space=CORRECTED, metric="cosine")
    patients = np.arange(len(space.patient_ids))
    lesions = space.correction.transformed(space.vectors)
    radii = np.asarray(space.row_radii)
    lesion_visual = pairwise_distances(lesions, lesions, "cosine") / np.sqrt(radii[:, None] * radii[None, :])
    np.fill_diagonal(lesion_visual, np.inf)
    return Prepared(
        model,
        space.patient_ids,
        label_aware.patient_features(space),
        label_aware.visual_distances(space, patients, "cosine"),
        lesions,
        space.patient_codes,
        lesion_visual,
        lookalike.Pairs.build(reference.lesions(model)),
    )


@dataclass
class Outcome:
    """Per-query P@10 of the label-aware search (task queries), what each outer fold chose, and per-lesion
    same-tumor R@1 (or None)."""

    precision: pd.Series
    choices: list
    same_tumor: np.ndarray | None


def _precision(top: np.ndarray, task: np.ndarray, place: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Share of each query's first neighbours (patient codes, −1 none) that share its task label."""
    return np.where(top >= 0, task[place[np.maximum(top, 0)]] == task[place[queries]][:, None], False).mean(axis=1)


def visual_precision(prepared: Prepared, task_labels: pd.Series) -> pd.Series:
    """Per-query P@10 of the visual search (the cohort as gallery), as :mod:`.neighbourhoods` measures it."""
    cohort, place, counted = _cohort(prepared, task_labels)
    top = direction.first(prepared.visual[cohort], direction.K, counted)
    return pd.Series(_precision(top, task_labels.to_numpy(), place, cohort), index=task_labels.index)


def _cohort(prepared: Prepared, task_labels: pd.Series):
    n = len(prepared.patient_ids)
    cohort = np.searchsorted(prepared.patient_ids, task_labels.index.to_numpy(dtype=object))
    place = np.full(n, -1, dtype=np.int64)
    place[cohort] = np.arange(len(cohort))
    return cohort, place, place >= 0


def nested(prepared: Prepared, labelled: np.ndarray, codes: direction.Codes, task_labels: pd.Series, seed: int = 0):
    """One nested cross-validation: for each outer fold, choose and fit on the other folds' labelled patients,
    then query with the fold's task patients. ``labelled`` (L,) patient codes with ``codes``; ``task_labels``
    PatientID -> 0/1 (the task's cohort, the gallery P@10 counts in)."""
    n = len(prepared.patient_ids)
    fold = np.full(n, -1)
    fold[labelled] = direction.fold_of(codes.groups, OUTER, seed)
    unlabelled = np.flatnonzero(fold < 0)
    fold[unlabelled] = np.arange(len(unlabelled)) % OUTER  # for their lesions' same-tumor queries only
    cohort, place, counted = _cohort(prepared, task_labels)
    task = task_labels.to_numpy()
    precision = np.full(len(cohort), np.nan)
    choices, lesion_scores, weights = [], {}, {}
    for f in range(OUTER):
        train = fold[labelled] != f
        inside = direction.Codes(codes.kind, codes.values[train], codes.groups[train])
        seen = prepared.visual[labelled[train]]
        tumor = _inner_tumor(prepared, fold, f)
        choice = direction.choose(prepared.features, labelled[train], inside, seen, seed=seed, tumor=tumor)
        fit = direction.RidgeFit(prepared.features[labelled[train]], inside.values)
        scores = fit.scores(prepared.features, choice.penalty)
        scale = direction.label_scale(scores)
        choices.append((choice.penalty, choice.weight))
        queries = cohort[fold[cohort] == f]
        label = direction.label_distances(scores[queries], scores) / scale
        top = direction.first(direction.blend(prepared.visual[queries], label, choice.weight), direction.K, counted)
        precision[place[queries]] = _precision(top, task, place, queries)
        weights[f] = choice.weight
        lesion_scores[f] = (fit.scores(prepared.lesion_features, choice.penalty), scale)
    same = _same_tumor(prepared, fold, lesion_scores, weights) if prepared.pairs is not None else None
    return Outcome(pd.Series(precision, index=task_labels.index), choices, same)


def _inner_tumor(prepared: Prepared, fold: np.ndarray, held: int) -> direction.SameTumor | None:
    """The same-tumor promise the selection keeps, on the lesions of patients outside the held-out fold."""
    if prepared.pairs is None:
        return None
    queries = np.flatnonzero(prepared.pairs.relevant.any(1) & (fold[prepared.lesion_patient] != held))
    relevant = prepared.pairs.relevant[queries]
    return direction.SameTumor(prepared.lesion_features, queries, prepared.lesion_visual[queries], relevant)


def _same_tumor(prepared: Prepared, fold: np.ndarray, lesion_scores: dict, weights: dict) -> np.ndarray:
    """Per query lesion, R@1 of the blended lesion ranking (each query with the fit of its patient's fold)."""
    relevant = prepared.pairs.relevant
    m = len(relevant)
    best = np.empty(m, dtype=np.int64)
    for f, (scores, scale) in lesion_scores.items():
        rows = np.flatnonzero(fold[prepared.lesion_patient] == f)
        label = direction.label_distances(scores[rows], scores) / scale
        best[rows] = direction.first(direction.blend(prepared.lesion_visual[rows], label, weights[f]), 1)[:, 0]
    queries = np.flatnonzero(relevant.any(1))
    return relevant[queries, best[queries]].astype(np.float64)


def visual_same_tumor(prepared: Prepared) -> np.ndarray | None:
    if prepared.pairs is None:
        return None
    relevant = prepared.pairs.relevant
    queries = np.flatnonzero(relevant.any(1))
    best = direction.first(prepared.lesion_visual[queries], 1)[:, 0]
    return relevant[queries, best].astype(np.float64)


@dataclass
class Result:
    """One (model, label)'s rows of the table."""

    model: str
    label: str
    task: str
    visual: float
    aware: float
    gain: tuple  # (point, low, high)
    per_class: dict  # {"visual +": .., "aware +": .., "visual -": .., "aware -": ..}
    chance_minority: float
    p_value: float
    shuffles: int
    same_tumor_visual: float
    same_tumor_aware: float
    choices: list


def evaluate(reference, prepared: Prepared, name: str, shuffles: int = 0, seed: int = 0) -> Result:
    """The label-aware search for label ``name`` against the visual search, on ``prepared``'s model."""
    lesions = reference.lesions(prepared.model)
    label = label_aware.resolve(reference, name, lesions)
    labelled, codes = label_aware.patient_codes(label, lesions, prepared.patient_ids)
    task = PRESETS[LABEL_TASKS[name]]
    task_labels = task.patient_labels(lesions)
    outcome = nested(prepared, labelled, codes, task_labels, seed)
    visual = visual_precision(prepared, task_labels)
    aware_bp = neighbourhoods.balanced(outcome.precision, task_labels)
    gain = neighbourhoods.paired_difference(outcome.precision, visual, task_labels, seed=seed)
    classes = task_labels.reindex(outcome.precision.index).to_numpy()
    per_class = {}
    for sign, value in (("+", 1), ("-", 0)):
        per_class[f"visual {sign}"] = float(visual[classes == value].mean())
        per_class[f"aware {sign}"] = float(outcome.precision[classes == value].mean())
    minority = 1 if (classes == 1).sum() <= (classes == 0).sum() else 0
    chance = ((classes == minority).sum() - 1) / (len(classes) - 1)
    p_value = np.nan
    if shuffles:
        null = permutation_null(prepared, labelled, codes, task_labels, shuffles, seed)
        p_value = metrics.permutation_p_value(aware_bp, null)
    same_visual = visual_same_tumor(prepared)
    return Result(
        prepared.model,
        name,
        task.name,
        neighbourhoods.balanced(visual, task_labels),
        aware_bp,
        gain,
        per_class,
        float(chance),
        p_value,
        shuffles,
        float(np.mean(same_visual)) if same_visual is not None else np.nan,
        float(np.mean(outcome.same_tumor)) if outcome.same_tumor is not None else np.nan,
        outcome.choices,
    )


def permutation_null(prepared, labelled, codes, task_labels: pd.Series, shuffles: int, seed: int) -> np.ndarray:
    """BP@10 of the whole nested procedure (selection and fit included) under ``shuffles`` label shuffles:
    the patients' labels (and with them their task labels) permuted among the labelled patients."""
    rng = np.random.default_rng(seed + 1)
    ids = prepared.patient_ids[labelled]
    task_of = task_labels.reindex(ids)
    null = np.empty(shuffles)
    for s in range(shuffles):
        permutation = rng.permutation(len(labelled))
        shuffled = direction.Codes(codes.kind, codes.values[permutation], codes.groups[permutation])
        moved = pd.Series(task_of.to_numpy()[permutation], index=ids).dropna().astype(int).sort_index()
        outcome = nested(without_same_tumor(prepared), labelled, shuffled, moved, seed)
        null[s] = neighbourhoods.balanced(outcome.precision, moved)
    return null


def without_same_tumor(prepared: Prepared) -> Prepared:
    """The same data without the same-tumor part (the null needs the precision only)."""
    return Prepared(**{**prepared.__dict__, "pairs": None})


def table(results: list) -> pd.DataFrame:
    """The measured table: one row per (model, label)."""
    rows = []
    for r in results:
        rows.append(
            {
                "model": r.model,
                "similar_by": r.label,
                "task": r.task,
                "BP@10 visual": r.visual,
                "BP@10 label-aware": r.aware,
                "gain": r.gain[0],
                "gain low": r.gain[1],
                "gain high": r.gain[2],
                "P@10 + visual": r.per_class["visual +"],
                "P@10 + aware": r.per_class["aware +"],
                "P@10 - visual": r.per_class["visual -"],
                "P@10 - aware": r.per_class["aware -"],
                "minority chance": r.chance_minority,
                "p (refit)": r.p_value,
                "shuffles": r.shuffles,
                "same-tumor R@1 visual": r.same_tumor_visual,
                "same-tumor R@1 aware": r.same_tumor_aware,
                "choices (penalty/weight)": " ".join(f"{p:g}/{w:g}" for p, w in r.choices),
            }
        )
    return pd.DataFrame(rows)
