"""The corrected space: similarity measured so that no reference patient is near everyone (hub-free).

Foundation-model embeddings of tumor crops share one dominant direction (SuPreM: 99.8% of its unit vectors'
energy), so by plain cosine a few patients are the nearest neighbour of nearly every query (hubs) and many
are never anyone's. The corrected space removes both, with two of the reference's own statistics:

1. **z-scoring**: vectors minus the reference's mean, divided by each dimension's standard deviation, per
   model (computed when the reference is written);
2. **local scaling** (Schnitzer et al., JMLR 2012): a distance divided by ``sqrt(r_q · r_p)``, where ``r`` is a
   patient's distance to its ``NEIGHBOURS``-th nearest other patient in the z-scored space. A reference
   patient's radius is computed when the reference is written; a new query's from its own search.

A patient's distance stays that of its nearest lesion pair. Chosen by evaluation (``benchmarks/hubness.py``,
docs/search.md): centring or z-scoring alone leaves SuPreM's top hub in 17% of all top-10 lists; with local
scaling every model's is about 5%, with no patient never listed; z-scoring rather than centring keeps the
same-tumor re-identification of CT-CLIP (centring cost it 0.04 R@1). ``raw`` is plain distance on the stored
vectors, exactly as the published lists were made.

The statistics are applied without a second copy of the matrix: with ``t = (q − μ)/σ`` and ``w = t/σ``,
``((v − μ)/σ)·t = v·w − μ·w``, so a scan costs one product per row, as before, plus a per-row factor
``1/sqrt(r_p)``; the float64 re-ranking uses the same products and the stored z-scored norms
(:func:`corrected_distances`).

For a fixed query ``r_q`` is common to every patient, so the ranking is by ``d(q, p)/sqrt(r_p)`` alone, and
that is an inner product: :func:`local_scaling_rows` and :func:`local_scaling_queries` make the vectors an
approximate index holds and asks with, so that its graph proposes candidates in the corrected order itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SimilarPatientsError
from .distances import check_metric

CORRECTED = "corrected"
RAW = "raw"
SPACES = (CORRECTED, RAW)
#: The neighbour whose distance is a patient's radius (Schnitzer et al. use 10 for the same purpose).
NEIGHBOURS = 10
#: Metrics a corrected space is defined for (the dot score is not a distance to scale).
METRICS = ("cosine", "euclidean")


def check_space(space: str, metric: str) -> str:
    """The space a search in ``space`` with ``metric`` runs in: ``space``, or a clear error."""
    check_metric(metric)
    if space not in SPACES:
        raise SimilarPatientsError(f"Unknown space '{space}'; choose one of {', '.join(SPACES)}.")
    if space == CORRECTED and metric not in METRICS:
        raise SimilarPatientsError(
            f"The corrected space measures {' or '.join(METRICS)} distance, not '{metric}': "
            f"search with space='raw' (CLI: --space raw) for the {metric} score."
        )
    return space


def resolved_space(space: str, metric: str) -> str:
    """The space a search runs in: ``space``, except that the dot score (no distance to correct) is raw."""
    return RAW if metric == "dot" and space == CORRECTED else check_space(space, metric)


@dataclass(frozen=True)
class Correction:
    """A model's corrected space: the reference mean ``centre`` and standard deviation ``scale`` (D,) per
    dimension, and per patient (in the space's sorted patient order) the ``radii`` of local scaling, or None
    for the z-scored space alone (what the radii are measured in). ``norm_ratio``: the largest
    ``(|v| + |μ|) / |T(v)|`` over the reference's rows (how much the float32 stage's rounding grows, see
    :mod:`.nearest`)."""

    centre: np.ndarray
    scale: np.ndarray
    radii: np.ndarray | None = None
    neighbours: int = NEIGHBOURS
    norm_ratio: float = 1.0

    def transformed(self, x: np.ndarray) -> np.ndarray:
        """Float64 rows z-scored: minus the centre, over the scale."""
        return (np.asarray(x, dtype=np.float64) - self.centre) / self.scale

    def without_radii(self) -> Correction:
        return Correction(self.centre, self.scale, None, self.neighbours, self.norm_ratio)


def corrected_distances(
    correction: Correction, vectors: np.ndarray, norms: np.ndarray, queries: np.ndarray, metric: str
) -> np.ndarray:
    """Float64 z-scored distances (len(vectors), q) of stored ``vectors`` (raw rows, with their stored
    z-scored ``norms``) to raw ``queries``, not yet locally scaled: the products ``v·w − μ·w`` as the scan
    forms them, so no row is z-scored; euclidean near-duplicates, where the expansion cancels, are
    recomputed directly."""
    transformed = correction.transformed(queries)
    weights = transformed / correction.scale
    products = np.asarray(vectors, dtype=np.float64) @ weights.T - (weights @ correction.centre)[None, :]
    query_norms = np.linalg.norm(transformed, axis=1)
    if metric == "cosine":  # a zero row, or a query at the reference mean, is at distance 1
        denominator = norms[:, None] * query_norms[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            return 1.0 - np.where(denominator > 0, products / denominator, 0.0)
    squares = (norms * norms)[:, None]
    squared = squares + (query_norms * query_norms)[None, :] - 2.0 * products
    for i, j in zip(*np.nonzero(squared < 1e-6 * (squares + 1.0))):
        squared[i, j] = float(((correction.transformed(vectors[i : i + 1])[0] - transformed[j]) ** 2).sum())
    return np.sqrt(np.maximum(squared, 0.0))


def local_scaling_rows(transformed: np.ndarray, radii: np.ndarray, metric: str) -> np.ndarray:
    """Z-scored rows (unit length for cosine) as an inner-product index holds them, given each row's
    patient's radius: their product with :func:`local_scaling_queries` falls as the locally scaled distance
    grows, so the largest products are the nearest patients in the corrected space (the query's own radius
    is common to all rows and changes no order).

    cosine: ``[v̂, −1]/sqrt(r)`` (product ``(t̂·v̂ − 1)/sqrt(r) = −d/sqrt(r)``); euclidean:
    ``[−1, 2v, −|v|²]/r`` (product ``−|t − v|²/r``)."""
    x = np.asarray(transformed, dtype=np.float64)
    radii = np.asarray(radii, dtype=np.float64)[:, None]
    ones = np.ones((len(x), 1))
    if metric == "cosine":
        return np.hstack([x, -ones]) / np.sqrt(radii)
    return np.hstack([-ones, 2.0 * x, -(x * x).sum(axis=1, keepdims=True)]) / radii


def local_scaling_queries(transformed: np.ndarray, metric: str) -> np.ndarray:
    """Z-scored queries (unit length for cosine) as an index over :func:`local_scaling_rows` is asked:
    cosine ``[t̂, 1]``, euclidean ``[|t|², t, 1]``."""
    t = np.asarray(transformed, dtype=np.float64)
    ones = np.ones((len(t), 1))
    if metric == "cosine":
        return np.hstack([t, ones])
    return np.hstack([(t * t).sum(axis=1, keepdims=True), t, ones])


def scale_of(variance: np.ndarray) -> np.ndarray:
    """Standard deviations from variances, a constant dimension given 1 (it is zero once centred anyway)."""
    sd = np.sqrt(np.maximum(np.asarray(variance, dtype=np.float64), 0.0))
    return np.where(sd > 1e-12 * max(float(sd.max(initial=0.0)), 1e-300), sd, 1.0)


def radius_of(distances: np.ndarray, neighbours: int = NEIGHBOURS) -> float:
    """A patient's radius from its sorted distances to other patients: the ``neighbours``-th (the last one
    where there are fewer); kept above zero so that a duplicate cannot divide by it."""
    if len(distances) == 0:
        return 1.0
    radius = float(distances[min(neighbours, len(distances)) - 1])
    return max(radius, 1e-12)


def floor_radii(radii: np.ndarray) -> np.ndarray:
    """Radii with none below a millionth of their median (duplicated patients would otherwise have a zero
    radius, and every distance to them would be infinite)."""
    radii = np.asarray(radii, dtype=np.float64)
    floor = max(float(np.median(radii)) * 1e-6, 1e-12) if len(radii) else 1e-12
    return np.maximum(radii, floor)
