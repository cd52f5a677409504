"""Metrics of evaluation: AUC, balanced accuracy, retrieval at k, bootstrap intervals, permutation p-values.

Every function takes replicates along the first axis where that makes the bootstrap and the permutation
test one array operation instead of a Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """ROC AUC of ``scores`` against 0/1 ``labels`` (n,), ties counted half (Mann–Whitney).

    ``scores`` is (n,) or (repeats, n); ``weights`` (B, n), e.g. bootstrap counts, weights the patients and
    adds a trailing axis of B. Scores are grouped into their distinct values once, so B weightings cost
    two matrix products instead of B sorts.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    single = scores.ndim == 1
    weight_rows = np.ones((1, len(labels))) if weights is None else np.asarray(weights, dtype=np.float64)
    out = np.empty((1 if single else len(scores), len(weight_rows)))
    for r, row in enumerate(np.atleast_2d(scores)):
        levels, level = np.unique(row, return_inverse=True)
        membership = np.zeros((len(row), len(levels)))
        membership[np.arange(len(row)), level] = 1.0
        positives = weight_rows @ (membership * labels[:, None])  # (B, levels)
        negatives = weight_rows @ (membership * (1.0 - labels)[:, None])
        below = np.cumsum(negatives, axis=1) - negatives
        with np.errstate(invalid="ignore", divide="ignore"):
            out[r] = (positives * (below + 0.5 * negatives)).sum(1) / (positives.sum(1) * negatives.sum(1))
    out = out[0] if single else out
    return out[..., 0] if weights is None else out


def balanced_accuracy(decisions: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Mean of sensitivity and specificity of 0/1 ``decisions`` (n,) or (repeats, n), optionally weighted
    by ``weights`` (B, n) as :func:`auc` is."""
    single = np.ndim(decisions) == 1
    decisions = np.atleast_2d(np.asarray(decisions, dtype=np.float64))
    labels = np.asarray(labels, dtype=np.float64)
    weight_rows = np.ones((1, len(labels))) if weights is None else np.asarray(weights, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = ((decisions * labels) @ weight_rows.T) / (weight_rows @ labels)
        specificity = (((1 - decisions) * (1 - labels)) @ weight_rows.T) / (weight_rows @ (1 - labels))
    out = (sensitivity + specificity) / 2  # (repeats, B)
    out = out[0] if single else out
    return out[..., 0] if weights is None else out


@dataclass
class Estimate:
    """A point estimate with its 95% bootstrap interval (and a permutation p-value where one was run)."""

    value: float
    low: float
    high: float
    p_value: float = float("nan")


def bootstrap_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, n): how often each of n patients is drawn in each resample with replacement."""
    draws = rng.integers(0, n, size=(resamples, n)) + n * np.arange(resamples)[:, None]
    return np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def classification_estimates(
    scores: np.ndarray, decisions: np.ndarray, labels: np.ndarray, counts: np.ndarray
) -> tuple:
    """(AUC, balanced accuracy, AUC bootstrap replicates) from out-of-fold ``scores``/``decisions`` (repeats, n).

    The point value is the mean over repeats; its interval comes from resampling patients (``counts``,
    from :func:`bootstrap_counts`) and recomputing that mean, so it covers the spread over patients
    that a new cohort of the same size would show.
    """
    point_auc = float(np.mean(auc(scores, labels)))
    point_bacc = float(np.mean(balanced_accuracy(decisions, labels)))
    boot_auc = np.nanmean(auc(scores, labels, counts), axis=0)
    boot_bacc = np.nanmean(balanced_accuracy(decisions, labels, counts), axis=0)
    return estimate(point_auc, boot_auc), estimate(point_bacc, boot_bacc), boot_auc


def mean_estimate(per_query: np.ndarray, counts: np.ndarray) -> Estimate:
    """Mean of a per-query value with its bootstrap interval over queries."""
    return estimate(float(np.mean(per_query)), counts @ per_query / counts.sum(1))


def estimate(point: float, replicates: np.ndarray) -> Estimate:
    """``point`` with the 2.5–97.5 percentile interval of its bootstrap ``replicates``."""
    low, high = np.nanpercentile(replicates, [2.5, 97.5])
    return Estimate(point, float(low), float(high))


def permutation_p_value(observed: float, null: np.ndarray) -> float:
    """One-sided p of ``observed`` against null replicates, counting the observed (Phipson & Smyth)."""
    null = np.asarray(null, dtype=np.float64)
    return float((1 + np.sum(null >= observed)) / (1 + len(null)))


def retrieval_at_k(order: np.ndarray, labels: np.ndarray, ks) -> dict:
    """Per-query precision@k, AP@k and Recall@k from ranked neighbour indices ``order`` (queries, ≥ max k).

    ``labels[q]`` is the query's own label; a neighbour is relevant when it shares it. AP@k divides by
    min(k, relevant patients in the collection) (so a perfect top k scores 1); Recall@k is the
    metric-learning one: 1 when at least one of the top k is relevant.
    """
    labels = np.asarray(labels)
    relevant = labels[order] == labels[:, None]  # (q, K)
    _, label_code, label_counts = np.unique(labels, return_inverse=True, return_counts=True)
    in_collection = label_counts[label_code.ravel()] - 1
    out = {}
    for k in ks:
        top = relevant[:, :k]
        hits = np.cumsum(top, axis=1)
        precision_at_i = hits / np.arange(1, k + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            average_precision = (precision_at_i * top).sum(axis=1) / np.minimum(k, in_collection)
        out[k] = {
            "precision": top.mean(axis=1),
            "ap": np.nan_to_num(average_precision),
            "recall": top.any(axis=1).astype(np.float64),
        }
    return out


def random_rankings(n: int, depth: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """(draws, n, depth) random neighbour orders that never rank a query as its own neighbour."""
    offsets = np.argsort(rng.random((draws, n, n - 1)), axis=2)[:, :, :depth] + 1
    return (np.arange(n)[None, :, None] + offsets) % n
