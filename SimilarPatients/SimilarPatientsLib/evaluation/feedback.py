"""Does "more like these" (relevance feedback, :mod:`..search.feedback`) find better patients? Measured by the
**residual-collection protocol** (Salton & Buckley 1990; Ruthven & Lalmas 2003), the standard way to judge
feedback without counting twice what the user already saw.

For each query patient of a task, in the product's ranking (corrected space, cosine, nearest lesion pair):

1. its first ``n`` labelled neighbours are *judged* by the label, as a user with the answer would: the same
   class is liked, the other unliked;
2. the *residual collection* is the task's patients less the query and every judged patient;
3. the initial ranking restricted to the residual collection, and the feedback query's ranking of it, are
   each read at P@k (the share of the first ``k`` with the query's label). The judged patients are never
   counted, in either: a feedback query that only brought its liked patients back to the top gains nothing.

The gain is the class-balanced P@k of the feedback rankings minus that of the initial ones, on the same
queries and the same residual collections, with a paired bootstrap interval (queries resampled within each
class). The weights (α fixed at 1; β, γ on :data:`GRID`) are chosen by cross-validation over query folds:
the weights that gain most on the other folds' queries, averaged over every model and task, are applied to
a fold's queries, so no reported query chose its own weights. ``(β, γ) = (0, 0)`` (no move) is on the grid,
so the choice can be "no feedback".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..search import feedback
from ..search.correction import CORRECTED
from . import neighbourhoods

#: Judged neighbours per query (a results page) and the depth read in the residual collection.
JUDGED = 10
K = 10
#: The (α, β, γ) tried: α = 1 (a cosine query moves by the ratios only); the first, (1, 0, 0), moves nothing.
BETAS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
GAMMAS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
GRID = tuple((1.0, beta, gamma) for beta in BETAS for gamma in GAMMAS)
FOLDS = 5


@dataclass(frozen=True)
class UnitSpace:
    """One model's lesions z-scored and at unit length, grouped by patient (sorted PatientIDs), and each
    patient's local-scaling factor ``1/sqrt(r)``: what the corrected cosine search ranks by."""

    patients: np.ndarray
    lesions: np.ndarray  # (n, D) grouped by patient
    starts: np.ndarray  # (p + 1,) where each patient's lesions start
    factors: np.ndarray  # (p,)

    def of(self, i: int) -> np.ndarray:
        return self.lesions[self.starts[i] : self.starts[i + 1]]

    def orders(self, queries: np.ndarray) -> np.ndarray:
        """Every patient ranked for each of ``queries`` ((c, n, D) unit rows; c alternative queries of n
        lesions): nearest lesion pair, scaled by the patient's radius, ties by PatientID. (c, p)."""
        distances = 1.0 - np.einsum("cnd,ld->cnl", queries, self.lesions).max(axis=1)
        per_patient = np.minimum.reduceat(distances, self.starts[:-1], axis=1) * self.factors
        return np.argsort(per_patient, axis=1, kind="stable")


def unit_space(reference, model: str) -> UnitSpace:
    searched = reference.space(model, space=CORRECTED, metric="cosine")
    order = np.argsort(searched.patient_codes, kind="stable")
    lesions = feedback.unit(searched.correction.transformed(np.asarray(searched.vectors)[order]))
    starts = np.concatenate([[0], np.cumsum(searched.lesion_counts)])
    return UnitSpace(searched.patient_ids, lesions, starts, 1.0 / np.sqrt(searched.correction.radii))


@dataclass(frozen=True)
class Residual:
    """One model and task: per query (PatientID), P@k on its residual collection of the initial ranking
    (``initial``) and of the feedback ranking for each weight of ``grid`` (``moved``, queries × weights), and
    how many of its judged neighbours were liked."""

    initial: pd.Series
    moved: pd.DataFrame
    liked: pd.Series


def residual(space: UnitSpace, labels: pd.Series, grid=GRID, judged: int = JUDGED, k: int = K) -> Residual:
    """The residual-collection protocol (module docstring) for every labelled patient as a query."""
    label_of = labels.reindex(space.patients).to_numpy(dtype=float)
    labelled = ~np.isnan(label_of)
    queries = np.flatnonzero(labelled)
    initial, moved, liked = np.empty(len(queries)), np.empty((len(queries), len(grid))), np.empty(len(queries))
    for at, i in enumerate(queries):
        q = space.of(i)
        order = space.orders(q[None])[0]
        order = order[(order != i) & labelled[order]]
        seen = order[:judged]
        same = label_of[seen] == label_of[i]
        left = labelled.copy()
        left[seen] = left[i] = False
        initial[at] = _precision(order[None], left, label_of, label_of[i], k)[0]
        directions = feedback.directions(q, [space.of(j) for j in seen[same]], [space.of(j) for j in seen[~same]])
        queries_moved = np.stack([feedback.combine(*directions, w) for w in grid])
        moved[at] = _precision(space.orders(queries_moved), left, label_of, label_of[i], k)
        liked[at] = same.sum()
    ids = space.patients[queries]
    return Residual(
        pd.Series(initial, index=ids), pd.DataFrame(moved, index=ids, columns=range(len(grid))), pd.Series(liked, ids)
    )


def _precision(orders: np.ndarray, allowed: np.ndarray, label_of: np.ndarray, label: float, k: int) -> np.ndarray:
    """P@k of each ranking (rows of ``orders``) over the ``allowed`` patients only."""
    kept = allowed[orders]
    first = kept & (np.cumsum(kept, axis=1) <= k)
    return (first & (label_of[orders] == label)).sum(axis=1) / k


def balanced(precisions: pd.Series | pd.DataFrame, labels: pd.Series):
    """Class-balanced mean of per-query precisions (columns each, for a frame)."""
    classes = labels.reindex(precisions.index).to_numpy()
    return sum(precisions[classes == c].mean() for c in np.unique(classes)) / len(np.unique(classes))


def fold_of(patients, folds: int = FOLDS, seed: int = 0) -> pd.Series:
    """Each query patient's fold (seeded; a patient is in the same fold for every model and task)."""
    patients = np.sort(np.asarray(list(patients), dtype=object))
    rng = np.random.default_rng(seed)
    return pd.Series(rng.permutation(len(patients)) % folds, index=patients)


def choose(results: dict, labels: dict, queries=None) -> int:
    """The weight (index in the grid) with the largest mean class-balanced gain over every (model, task) of
    ``results``, on ``queries`` (all where None); ties to the smaller move (the earlier in the grid)."""
    gains = []
    for (_, task), result in results.items():
        keep = result.initial.index if queries is None else result.initial.index.intersection(queries)
        moved = np.asarray(balanced(result.moved.loc[keep], labels[task]), dtype=float)
        gains.append(moved - balanced(result.initial.loc[keep], labels[task]))
    return int(np.argmax(np.mean(gains, axis=0)))


@dataclass(frozen=True)
class CrossValidated:
    """Out-of-fold feedback precision per (model, task), the weight each fold chose, and the one all
    queries choose (the product's)."""

    moved: dict  # (model, task) -> pd.Series of per-query P@k with its fold's weights
    chosen: list  # per fold, an index in the grid
    overall: int


def cross_validate(results: dict, labels: dict, folds: int = FOLDS, seed: int = 0) -> CrossValidated:
    everyone = set().union(*(r.initial.index for r in results.values()))
    fold = fold_of(everyone, folds, seed)
    chosen = [choose(results, labels, fold.index[fold != f]) for f in range(folds)]
    moved = {}
    for key, result in results.items():
        picks = np.array(chosen)[fold.reindex(result.moved.index).to_numpy()]
        values = result.moved.to_numpy()[np.arange(len(picks)), picks]
        moved[key] = pd.Series(values, index=result.moved.index)
    return CrossValidated(moved, chosen, choose(results, labels))


def table(results: dict, labels: dict, validated: CrossValidated, draws: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (model, task): queries, liked share of the judged, class-balanced P@k of the initial and
    the feedback ranking on the residual collection, the gain with its paired 95% interval, the minority
    class's P@k before and after, and the verdict (gain / loss only where the interval excludes 0)."""
    rows = []
    for (model, task), result in results.items():
        task_labels = labels[task].reindex(result.initial.index)
        moved = validated.moved[(model, task)]
        point, low, high = neighbourhoods.paired_difference(moved, result.initial, task_labels, draws, seed)
        minority = task_labels.value_counts().idxmin()
        few = task_labels == minority
        verdict = "gain" if low > 0 else "loss" if high < 0 else "no difference shown"
        rows.append(
            {
                "model": model,
                "task": task,
                "queries": len(result.initial),
                "liked": result.liked.mean() / JUDGED,
                "initial": balanced(result.initial, task_labels),
                "feedback": balanced(moved, task_labels),
                "gain": point,
                "low": low,
                "high": high,
                "minority initial": result.initial[few].mean(),
                "minority feedback": moved[few].mean(),
                "verdict": verdict,
            }
        )
    return pd.DataFrame(rows)


def same_tumor(reference, model: str, weights: tuple = feedback.WEIGHTS, judged: int = JUDGED) -> pd.DataFrame:
    """The residual-collection protocol on the look-alike task (:mod:`.lookalike`): each lesion with the same
    tumor in another CT series is a query over every other lesion (the corrected lesion ranking); its first
    ``judged`` lesions are judged (the same tumor liked, every other lesion unliked); a query counts only
    where a match is left once they are removed (a patient with three or more series). Per such query: its
    patient, and R@1 / R@10 of a remaining match on the residual collection, initial and after feedback.
    The weights are the product's, chosen on the class tasks, so this task never chose them."""
    from .lookalike import Pairs

    searched = reference.space(model, space=CORRECTED, metric="cosine")
    pairs = Pairs.build(reference.lesions(model))
    lesions = feedback.unit(searched.correction.transformed(np.asarray(searched.vectors)))
    factors = 1.0 / np.sqrt(np.asarray(searched.row_radii))
    rows = []
    for q in np.flatnonzero(pairs.relevant.any(1)):
        distances = (1.0 - lesions @ lesions[q]) * factors
        distances[q] = np.inf
        seen = np.argsort(distances, kind="stable")[:judged]
        left = np.ones(len(lesions), dtype=bool)
        left[seen] = left[q] = False
        if not (pairs.relevant[q] & left).any():
            continue
        same = pairs.relevant[q, seen]
        moved = feedback.rocchio(
            lesions[q : q + 1], [lesions[[j]] for j in seen[same]], [lesions[[j]] for j in seen[~same]], weights
        )
        row = {"patient": pairs.lesion_patient[q], "liked": int(same.sum())}
        for name, scores in (("initial", distances), ("feedback", (1.0 - lesions @ moved[0]) * factors)):
            order = np.argsort(np.where(left, scores, np.inf), kind="stable")[: int(left.sum())]
            first = int(np.flatnonzero(pairs.relevant[q, order])[0])
            row[f"{name} R@1"], row[f"{name} R@10"] = float(first < 1), float(first < 10)
        rows.append(row)
    return pd.DataFrame(rows)


def clustered_difference(table: pd.DataFrame, measure: str, draws: int = 1000, seed: int = 0) -> tuple:
    """Mean feedback minus initial ``measure`` over queries, with a 95% bootstrap interval resampling patients
    (a patient's queries are not independent)."""
    difference = (table[f"feedback {measure}"] - table[f"initial {measure}"]).groupby(table["patient"])
    sums, counts = difference.sum().to_numpy(), difference.size().to_numpy()
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sums), size=(draws, len(sums)))
    replicates = sums[picks].sum(1) / counts[picks].sum(1)
    low, high = np.percentile(replicates, [2.5, 97.5])
    return float(sums.sum() / counts.sum()), float(low), float(high)
