"""What a space does to the product's own answers: the top-k lists ``neighbors`` returns for every reference
patient, how often each patient appears in them (hubness), class-balanced precision of those lists for a
task, and whether a lesion's nearest other lesion is the same tumor on another CT series (re-identification).

This is how the corrected space was chosen and how its bounds are checked (``benchmarks/hubness.py``, the
tests on NLST-Sybil): on the ranking a user gets, nearest lesion pair and all, not on a pooled stand-in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..references import schema
from ..search.nearest import exact_distances

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
    counts = np.bincount(ranked.order[:, :k].ravel(), minlength=len(ranked.patients))
    top = int(np.argmax(counts))
    bias = pd.Series(counts).corr(pd.Series(ranked.lesion_counts), method="spearman")
    return Hubness(counts[top] / len(ranked.patients), str(ranked.patients[top]), float(np.mean(counts == 0)), bias)


def precision_per_query(ranked: Rankings, labels: pd.Series, k: int = K) -> pd.Series:
    """For each labelled patient, the share of its first ``k`` labelled neighbours with its label (the task's
    cohort is the gallery: unlabelled patients are skipped in the ranking)."""
    label_of = labels.reindex(ranked.patients).to_numpy(dtype=float)
    out = {}
    for i, patient in enumerate(ranked.patients):
        if np.isnan(label_of[i]):
            continue
        listed = label_of[ranked.order[i]]
        listed = listed[~np.isnan(listed)][:k]
        out[patient] = float(np.mean(listed == label_of[i]))
    return pd.Series(out)


def balanced(precisions: pd.Series, labels: pd.Series) -> float:
    """Class-balanced precision: the mean over classes of each class's mean per-query precision."""
    return float(precisions.groupby(labels.reindex(precisions.index)).mean().mean())


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


def same_tumor_recall(reference, model: str, space: str, metric: str = "cosine") -> float:
    """R@1 of same-tumor re-identification: each lesion of a patient with lesions in more than one CT series
    is a query; a hit is relevant when it is the same patient's lesion in another series; the gallery is
    every other lesion, ranked as the search ranks lesions in ``space`` (locally scaled by each lesion's
    patient's radius there; the query's own radius changes no order)."""
    searched = reference.space(model, space=space, metric=metric)
    lesions = reference.lesions(model)
    patients = lesions[schema.PATIENT].to_numpy(dtype=object)
    series = lesions[schema.SERIES].to_numpy(dtype=object)
    several = pd.Series(series).groupby(patients).nunique()
    queries = np.flatnonzero(np.isin(patients, several[several > 1].index.to_numpy()))
    everything = np.arange(len(lesions))
    found = []
    for row in queries:
        distances = exact_distances(searched, everything, np.asarray(searched.vectors[row])[None, :], metric)[:, 0]
        if searched.scaled:
            distances = distances / np.sqrt(searched.row_radii)
        distances[row] = np.inf
        nearest = int(np.argmin(distances))
        found.append(patients[nearest] == patients[row] and series[nearest] != series[row])
    return float(np.mean(found))
