"""Reference databases: the canonical table, the local store of versioned references, importers
(NLST-Sybil's upstream files, Parquet/CSV, URLs), and the opened :class:`Reference` that searches."""

from .importers import ImportedSource, read_source
from .parquet_table import ParquetTable
from .reference import ModelInfo, PatientEmbeddings, Reference
from .schema import ReferenceTable
from .store import ReferenceStore

__all__ = [
    "ImportedSource",
    "ModelInfo",
    "ParquetTable",
    "PatientEmbeddings",
    "Reference",
    "ReferenceStore",
    "ReferenceTable",
    "read_source",
]
