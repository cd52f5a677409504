"""The distances of the library, in one place: search, evaluation and maps all measure with these.

``cosine`` is 1 − cosine similarity, ``euclidean`` the L2 distance, ``dot`` the negative inner product (a
ranking score, not a distance). All are computed in float64 here; the scan's float32 stage lives in
:mod:`.nearest` and is always re-scored with :func:`pairwise_distances`.
"""

from __future__ import annotations

import numpy as np

from ..errors import SimilarPatientsError

METRICS = ("cosine", "euclidean", "dot")


def check_metric(metric: str, allowed: tuple = METRICS) -> str:
    """``metric`` if it is one of ``allowed``, else a clear error."""
    if metric not in allowed:
        raise SimilarPatientsError(f"Unknown metric '{metric}'; choose one of {', '.join(allowed)}.")
    return metric


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 length (all-zero rows stay zero), in the dtype given."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def pairwise_distances(vectors: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """Float64 distances (len(vectors), len(queries)) between the rows of two matrices."""
    check_metric(metric)
    vectors = np.asarray(vectors, dtype=np.float64)
    queries = np.asarray(queries, dtype=np.float64)
    products = vectors @ queries.T
    if metric == "dot":
        return -products
    if metric == "cosine":
        denominator = np.linalg.norm(vectors, axis=1)[:, None] * np.linalg.norm(queries, axis=1)[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            similarity = np.where(denominator > 0, products / denominator, 0.0)
        return 1.0 - similarity
    squared = (vectors * vectors).sum(1)[:, None] + (queries * queries).sum(1)[None, :] - 2.0 * products
    close = squared < 1e-6 * ((vectors * vectors).sum(1)[:, None] + 1.0)
    if close.any():  # cancellation: recompute near-duplicates directly
        for i, j in zip(*np.nonzero(close)):
            squared[i, j] = float(((vectors[i] - queries[j]) ** 2).sum())
    return np.sqrt(np.maximum(squared, 0.0))
