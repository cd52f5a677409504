"""Metrics of evaluation: AUC, balanced accuracy, label retrieval (P@k, class-balanced P@k, mAP@R, R-precision,
nDCG), hubness, bootstrap intervals (queries, or queries and gallery), permutation p-values.

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


def relevance(order: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Whether each ranked neighbour shares its query's label: ``order`` (queries, depth) of patient indices,
    ``labels`` (n,) or (shuffles, n) -> (queries, depth) or (shuffles, queries, depth)."""
    labels = np.asarray(labels)
    return labels[..., order] == labels[..., :, None]


def label_figures(
    order: np.ndarray, labels: np.ndarray, ks, grades: np.ndarray | None = None, ranked: bool = True
) -> dict:
    """Per-query figures of a label ranking, ``{name: (..., queries)}``; ``labels`` (n,) or (shuffles, n).

    ``order`` holds each query's ranking of the other patients (queries, n - 1 with ``ranked``), best first.

    - ``P@k``: share of the first k that share the query's label;
    - with ``ranked``, ``mAP@R`` and ``R-precision`` (Musgrave et al. 2020): R = the query's own class size
      minus itself; mAP@R averages the precision at each relevant rank among the first R, R-precision is
      the share relevant among the first R (they need the whole ranking, so they cost most per shuffle);
    - ``nDCG@k`` when ``grades`` (n,) places each patient on an ordinal scale (0 .. levels - 1, e.g. AJCC
      stage): the gain of a neighbour is 1 - |grade difference| / (levels - 1), so a IIIA neighbour of a
      IIIB query counts more than a IA one. With ``labels`` shuffled, pass ``grades`` shuffled the same way.
    """
    labels = np.asarray(labels)
    figures = {}
    top = relevance(order[:, : max(ks)], labels)
    for k in ks:
        figures[f"P@{k}"] = top[..., :k].mean(axis=-1)
    if ranked:
        values, counts = np.unique(labels.reshape(-1, labels.shape[-1])[0], return_counts=True)  # a shuffle keeps them
        within = (counts[np.searchsorted(values, labels)] - 1).astype(np.float32)  # R per query
        depth = int(within.max())
        relevant = relevance(order[:, :depth], labels)
        first_r = np.arange(1, depth + 1, dtype=np.float32) <= within[..., None]
        relevant &= first_r
        precision_at = np.cumsum(relevant, axis=-1, dtype=np.float32) / np.arange(1, depth + 1, dtype=np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            figures["mAP@R"] = np.nan_to_num(np.where(relevant, precision_at, 0).sum(-1) / within).astype(np.float64)
            figures["R-precision"] = np.nan_to_num(relevant.sum(-1) / within).astype(np.float64)
    if grades is not None:
        figures[f"nDCG@{max(ks)}"] = ndcg(order, np.asarray(grades, dtype=np.float64), max(ks))
    return figures


def ndcg(order: np.ndarray, grades: np.ndarray, k: int) -> np.ndarray:
    """nDCG@k with graded gains 1 - |grade difference| / (levels - 1); ``grades`` (n,) or (shuffles, n).

    The ideal ranking of a query depends only on its own grade (the gallery is every other patient), so it
    is computed once per level, and a shuffle costs one gather of k neighbours per query.
    """
    levels = np.unique(grades)
    span = max(levels.max() - levels.min(), 1.0)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    gain = 1.0 - np.abs(grades[..., order[:, :k]] - grades[..., :, None]) / span
    ideal = {}
    values, counts = np.unique(grades, return_counts=True)  # the same multiset under any shuffle
    for level in values:
        others = np.repeat(values, counts - (values == level))
        best = np.sort(1.0 - np.abs(others - level) / span)[::-1][:k]
        ideal[level] = float(best @ discount[: len(best)])
    ideal_per_query = np.vectorize(ideal.get)(grades)
    return (gain @ discount) / ideal_per_query


def summarise(figures: dict, labels: np.ndarray, weights: np.ndarray | None = None, positive: int = 1) -> dict:
    """Query means of :func:`label_figures`, plus per class and class-balanced precision.

    ``BP@k`` is the mean over the two classes of the class's mean P@k (each class counts alike, so a
    majority class and a hub cannot carry it); ``P@k +`` / ``P@k -`` are the positive and negative
    queries' own means. ``weights`` (B, queries), e.g. bootstrap counts, gives (B,) replicates of each.
    """
    labels = np.asarray(labels)
    out = {}
    everyone = np.ones(labels.shape, dtype=bool)
    for name, values in figures.items():
        out[name] = _mean(values, everyone, weights)
        if name.startswith("P@"):
            k = name[2:]
            positives = _mean(values, labels == positive, weights)
            negatives = _mean(values, labels != positive, weights)
            out[f"BP@{k}"] = (positives + negatives) / 2
            out[f"P@{k} +"], out[f"P@{k} -"] = positives, negatives
    return out


def _mean(values: np.ndarray, mask: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    chosen = values * mask
    if weights is None:
        return chosen.sum(-1) / mask.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ chosen) / (weights @ mask)


def gallery_bootstrap(order: np.ndarray, labels: np.ndarray, counts: np.ndarray, k: int, positive: int = 1) -> dict:
    """(B,) replicates of P@k, BP@k and the per-class P@k with the gallery resampled as well as the queries.

    ``counts`` (B, n) are the patient bootstrap draws. In resample b a patient drawn c times is c queries
    and c tied entries of every other query's list; a query never meets its own copies. Walking each query's
    ``order`` (queries, n - 1) with the multiplicities gives the resampled top k without re-ranking: the
    claim "a new cohort, queried against itself", not "this reference". The walk looks at the first
    ``_GALLERY_DEPTH`` neighbours and goes on through the whole list only for the rare query whose first
    ones were too seldom drawn to fill k places.
    """
    labels = np.asarray(labels)
    counts = np.asarray(counts)
    relevant = relevance(order, labels)
    depth = min(order.shape[1], max(_GALLERY_DEPTH, 4 * k))
    replicates = {name: np.empty(len(counts)) for name in (f"P@{k}", f"BP@{k}", f"P@{k} +", f"P@{k} -")}
    for start in range(0, len(counts), _GALLERY_CHUNK):
        drawn = counts[start : start + _GALLERY_CHUNK].astype(np.int32)
        precision = _resampled_precision(drawn, order[:, :depth], relevant[:, :depth], k)
        short = np.argwhere(np.isnan(precision))
        for b, q in short:  # a query whose first neighbours were too seldom drawn: its whole list
            precision[b, q] = _resampled_precision(drawn[b : b + 1], order[q : q + 1], relevant[q : q + 1], k)[0, 0]
        weights = drawn.astype(np.float64)
        positives = (weights * (labels == positive) * precision).sum(1) / (weights * (labels == positive)).sum(1)
        negatives = (weights * (labels != positive) * precision).sum(1) / (weights * (labels != positive)).sum(1)
        chunk = slice(start, start + len(drawn))
        replicates[f"P@{k}"][chunk] = (weights * precision).sum(1) / weights.sum(1)
        replicates[f"P@{k} +"][chunk], replicates[f"P@{k} -"][chunk] = positives, negatives
        replicates[f"BP@{k}"][chunk] = (positives + negatives) / 2
    return replicates


#: Neighbours the gallery bootstrap walks before falling back to a query's whole list, and resamples at a time.
_GALLERY_DEPTH = 64
_GALLERY_CHUNK = 50


def _resampled_precision(drawn: np.ndarray, order: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """(resamples, queries) precision@k over the resampled lists; NaN where ``order`` held fewer than k
    drawn neighbours but the full list was not given (the caller walks further), 0/0 where it was."""
    copies = drawn[:, order]  # (resamples, queries, depth)
    before = np.cumsum(copies, axis=2) - copies
    taken = np.clip(k - before, 0, copies)
    filled = taken.sum(2)
    complete = order.shape[1] == len(drawn[0]) - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = (taken * relevant[None]).sum(2) / (k if not complete else np.maximum(filled, 1))
    return np.where((filled < k) & (not complete), np.nan, precision)


def appearances(order: np.ndarray, k: int) -> np.ndarray:
    """(n,) how many of the n patients' top-k lists each patient is in (``order``: every patient's ranking)."""
    return np.bincount(order[:, :k].ravel(), minlength=len(order))


def hubness(order: np.ndarray, k: int) -> tuple:
    """(largest share of the top-k lists one patient appears in, share of patients in no top-k list)."""
    counts = appearances(order, k)
    return float(counts.max() / len(order)), float(np.mean(counts == 0))


def ranks_of(order: np.ndarray) -> np.ndarray:
    """(queries, n) 1-based rank of each item in each query's ``order`` (queries, n - 1, the query left
    out); 0 for the query itself, i.e. unlisted, as :func:`~SimilarPatientsLib.search.fusion.fuse` reads it."""
    ranks = np.zeros((len(order), order.shape[1] + 1), dtype=np.int64)
    ranks[np.arange(len(order))[:, None], order] = np.arange(1, order.shape[1] + 1)[None, :]
    return ranks


def random_rankings(n: int, depth: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """(draws, n, depth) random neighbour orders that never rank a query as its own neighbour."""
    offsets = np.argsort(rng.random((draws, n, n - 1)), axis=2)[:, :, :depth] + 1
    return (np.arange(n)[None, :, None] + offsets) % n
