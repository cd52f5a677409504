"""Several models' patient rankings made into one: reciprocal rank fusion, or the mean of the models'
"closer than N%" percentiles.

The one rule the search (``references/fused.py``) and the evaluation (``evaluation/run.py``) both use, so
that what the evaluation measures is what a fused search returns:

- **rrf** (reciprocal rank fusion, Cormack, Clarke & Büttcher 2009): a patient scores
  ``sum over models of 1 / (RRF_CONSTANT + rank)``, counting only the models that list it within
  their first ``depth`` patients;
- **percentile** (:func:`mean_closeness`): a patient scores the mean, over *all* fused models, of the
  percentage of the model's nearest-match distances its distance beats (:meth:`Reference.closeness`).
  Each model's percentile is measured, whether or not the model lists the patient within its first
  ``depth`` (a patient beyond the depth keeps its measured percentile, not 0); only a model that lacks
  the patient, or whose filters drop all its lesions, counts 0. The "closer than N%" shown beside a
  fused hit is this same mean.

Who can be a hit: only patients that at least one model lists within its first ``depth``; a patient no
model lists is never fused in, whatever its percentiles. In rrf, a patient missing from one model's list
(not in the model, filtered out, or beyond its ``depth``) gets nothing from that model, so it needs the
others' agreement to rise. Ties are broken, in order, by more models listing the patient, then by its best rank
in any model, then by PatientID (the order of the candidates given), so a fusion of one model is that
model's ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SimilarPatientsError

FUSIONS = ("rrf", "percentile")
#: The k of reciprocal rank fusion: how flat the rank weights are (60, as in Cormack et al. 2009).
RRF_CONSTANT = 60
#: How many patients each model contributes to a fusion: its first ``FUSION_DEPTH``.
FUSION_DEPTH = 100


@dataclass
class FusedRanking:
    """Fused rankings of candidates for each query: ``order`` best first; ``scores`` and ``listed`` (how
    many models list each candidate within the depth) in candidate order."""

    order: np.ndarray  # (queries, candidates) candidate indices
    scores: np.ndarray  # (queries, candidates)
    listed: np.ndarray  # (queries, candidates)


def check_fusion(fusion: str, depth: int) -> None:
    if fusion not in FUSIONS:
        raise SimilarPatientsError(f"Unknown fusion '{fusion}'; choose one of {', '.join(FUSIONS)}.")
    if int(depth) < 1:
        raise SimilarPatientsError("The fusion depth (patients per model) must be at least 1.")


def fuse(
    ranks: np.ndarray,
    closeness: np.ndarray | None = None,
    fusion: str = "rrf",
    depth: int = FUSION_DEPTH,
    constant: float = RRF_CONSTANT,
) -> FusedRanking:
    """Fuse per-model ranks of the same candidates.

    Args:
        ranks: (models, queries, candidates) or (models, candidates): each candidate's 1-based rank in
            each model's list, 0 where the model does not list it; ranks beyond ``depth`` count as 0.
        closeness: same shape, each candidate's "closer than N%" in each model, measured also beyond
            the depth (NaN where the model lacks it): needed by ``percentile``.
        fusion: ``rrf`` or ``percentile``.
        depth: the patients each model contributes.
        constant: the RRF constant.
    """
    check_fusion(fusion, depth)
    ranks = np.asarray(ranks)
    single = ranks.ndim == 2
    if single:
        ranks = ranks[:, None, :]
    ranks = np.where((ranks >= 1) & (ranks <= depth), ranks, 0)
    listed_by = ranks > 0
    listed = listed_by.sum(axis=0)
    if fusion == "rrf":
        scores = np.where(listed_by, 1.0 / (constant + np.maximum(ranks, 1)), 0.0).sum(axis=0)
    else:
        if closeness is None:
            raise SimilarPatientsError("Percentile fusion needs each model's closeness of the candidates.")
        scores = mean_closeness(np.asarray(closeness, dtype=np.float64).reshape(ranks.shape), axis=0)
    best_rank = np.where(listed_by, ranks, depth + 1).min(axis=0)
    sortable = np.where(listed > 0, scores, -np.inf)
    index = np.broadcast_to(np.arange(ranks.shape[2]), sortable.shape)
    order = np.lexsort((index, best_rank, -listed, -sortable), axis=-1)
    if single:
        return FusedRanking(order[0], scores[0], listed[0])
    return FusedRanking(order, scores, listed)


def mean_closeness(closeness, axis: int = 0) -> np.ndarray:
    """The percentile fusion's score: the mean over the models (``axis``) of each candidate's measured
    "closer than N%", a model that lacks the candidate (NaN) counting 0; see the module's docstring."""
    return np.nan_to_num(np.asarray(closeness, dtype=np.float64), nan=0.0).mean(axis=axis)


def closeness_percent(nearest_sorted: np.ndarray, distances) -> np.ndarray:
    """The percentage of ``nearest_sorted`` (a sorted distribution of nearest-match distances) larger than
    each distance: the "closer than N%" of :meth:`Reference.closeness`, for distributions the evaluation
    measures on its own cohorts."""
    nearest_sorted = np.asarray(nearest_sorted, dtype=np.float64)
    values = np.asarray(distances, dtype=np.float64)
    larger = len(nearest_sorted) - np.searchsorted(nearest_sorted, values, side="right")
    return np.where(np.isfinite(values), 100.0 * larger / len(nearest_sorted), np.nan)
