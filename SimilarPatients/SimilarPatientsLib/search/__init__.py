"""Nearest patients in one model's embedding space: distances, the exact scan, the approximate index,
and metadata filters. Plain numpy; knows nothing of how references are stored."""

from .distances import METRICS, pairwise_distances, unit_rows
from .filters import Filters, FilterTerm, row_mask
from .nearest import EmbeddingSpace, LesionMatch, nearest_patients

__all__ = [
    "METRICS",
    "EmbeddingSpace",
    "FilterTerm",
    "Filters",
    "LesionMatch",
    "nearest_patients",
    "pairwise_distances",
    "row_mask",
    "unit_rows",
]
