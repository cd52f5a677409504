"""Reference databases: the canonical table, the local store of versioned references, importers
(NLST-Sybil's upstream files, Parquet/CSV, URLs), and the opened :class:`Reference` that searches."""

from .fused import FUSED_CHOICE, fused_models, hit_closeness, rank_labels, search_fused
from .fusion_verdict import FusionAdvice, fusion_default
from .importers import ImportedSource, read_source
from .parquet_table import ParquetTable
from .reference import ModelInfo, PatientEmbeddings, Reference
from .schema import ReferenceTable
from .store import ReferenceStore

__all__ = [
    "FUSED_CHOICE",
    "FusionAdvice",
    "ImportedSource",
    "ModelInfo",
    "ParquetTable",
    "PatientEmbeddings",
    "Reference",
    "ReferenceStore",
    "ReferenceTable",
    "fused_models",
    "fusion_default",
    "hit_closeness",
    "rank_labels",
    "read_source",
    "search_fused",
]
