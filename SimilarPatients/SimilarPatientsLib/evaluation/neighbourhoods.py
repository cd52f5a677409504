"""What a space does to the product's own answers: the top-k lists ``neighbors`` returns for every reference
patient, read with the scoreboard's measures (:mod:`metrics`: hubness, class-balanced precision), so the
bounds and the report count alike; same-tumor re-identification is :mod:`lookalike`'s.

This is how the corrected space was chosen and how its bounds are checked (``benchmarks/hubness.py``, the
tests on NLST-Sybil): on the ranking a user gets, nearest lesion pair and all, not on a pooled stand-in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..references import schema
from . import metrics

K = 10


@dataclass(frozen=True)
class Rankings:
    """Every reference patient's ranking of all other patients (nearest first), in one model and space."""

    patients: np.ndarray  # (p,) sorted PatientIDs
    order: np.ndarray  # (p, p - 1) positions in ``patients``, nearest first
    lesion_counts: np.ndarray  # (p,)


def rankings(reference, model: str, space: str, metric: str = "cosine") -> Rankings:
    """Each patient's full ranking, as ``Reference.search(patient=..., exclude=[itself])`` returns it."""
    searched = reference.space(model, space=space, metric=metric)
    patients = searched.patient_ids
    order = np.empty((len(patients), len(patients) - 1), dtype=np.int64)
    for i, patient in enumerate(patients):
        hits = reference.search(model, patient=patient, k=len(patients) - 1, exclude=[patient], space=space)
        order[i] = np.searchsorted(patients, hits[schema.PATIENT].to_numpy(dtype=object))
    return Rankings(patients, order, searched.lesion_counts)


@dataclass(frozen=True)
class Hubness:
    """How the top-``k`` lists of all patients are shared out: the largest share of lists one patient is
    in, who that is, and the share of patients in no list."""

    largest: float
    hub: str
    never: float
    #: Spearman correlation of a patient's list count with its lesion count (the nearest-pair roll-up's bias)
    lesion_bias: float


def hubness(ranked: Rankings, k: int = K) -> Hubness:
    largest, never = metrics.hubness(ranked.order, k)
    counts = metrics.appearances(ranked.order, k)
    bias = pd.Series(counts).corr(pd.Series(ranked.lesion_counts), method="spearman")
    return Hubness(largest, str(ranked.patients[int(np.argmax(counts))]), never, bias)


def precision_per_query(ranked: Rankings, labels: pd.Series, k: int = K) -> pd.Series:
    """For each labelled patient, the share of its first ``k`` labelled neighbours with its label (the task's
    cohort is the gallery: unlabelled patients are skipped in the ranking)."""
    label_of = labels.reindex(ranked.patients).to_numpy(dtype=float)
    labelled = ~np.isnan(label_of)
    place = np.cumsum(labelled) - 1  # a labelled patient's position in the cohort
    order = ranked.order[labelled]
    order = place[order[labelled[order]].reshape(len(order), -1)]  # each query's ranking of the cohort
    precision = metrics.label_figures(order, label_of[labelled], (k,), ranked=False)[f"P@{k}"]
    return pd.Series(precision, index=ranked.patients[labelled])


def balanced(precisions: pd.Series, labels: pd.Series, k: int = K) -> float:
    """Class-balanced precision of a binary task (:func:`precision_per_query`'s): the mean of the two classes'
    mean per-query precision."""
    figures = {f"P@{k}": precisions.to_numpy()}
    return float(metrics.summarise(figures, labels.reindex(precisions.index).to_numpy())[f"BP@{k}"])


def paired_difference(
    treated: pd.Series, baseline: pd.Series, labels: pd.Series, draws: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Class-balanced precision of ``treated`` minus ``baseline`` (per-query, same queries), with a 95%
    bootstrap interval over queries resampled within each class (both measured on the same draws)."""
    queries = treated.index
    classes = labels.reindex(queries).to_numpy()
    a, b = treated.to_numpy(), baseline.reindex(queries).to_numpy()
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(classes == c) for c in np.unique(classes)]
    differences = np.empty(draws)
    for d in range(draws):
        picks = [rng.choice(g, size=len(g)) for g in groups]
        differences[d] = np.mean([a[p].mean() - b[p].mean() for p in picks])
    point = np.mean([a[g].mean() - b[g].mean() for g in groups])
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(point), float(low), float(high)
