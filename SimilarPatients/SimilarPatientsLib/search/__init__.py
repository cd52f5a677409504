"""Nearest patients in one model's embedding space: distances, the exact scan, the approximate index,
and metadata filters. Plain numpy; knows nothing of how references are stored."""

from .distances import METRICS, pairwise_distances, unit_rows
from .filters import Filters, FilterTerm, row_mask
from .fusion import FUSION_DEPTH, FUSIONS, FusedRanking, fuse
from .nearest import EmbeddingSpace, LesionMatch, nearest_patients

__all__ = [
    "FUSIONS",
    "FUSION_DEPTH",
    "METRICS",
    "EmbeddingSpace",
    "FilterTerm",
    "Filters",
    "FusedRanking",
    "LesionMatch",
    "fuse",
    "nearest_patients",
    "pairwise_distances",
    "row_mask",
    "unit_rows",
]
