"""Build references for whole collections on Apache Beam: manifests (a table of lesions, or IDC's SEG and
SR annotations), the stages (fetch, read, crop, batched embedding, Parquet shards, dead letters) and the run.

Beam comes with the ``pipeline`` extra (Python >= 3.10); manifests and shards need only the base install.
"""

from .annotations import idc_lesions
from .build import BuildResult, TableLoader, build_references
from .fetch import SeriesSource
from .manifest import Lesion, Mark, lesions_from_frame, lesions_to_frame, read_manifest

__all__ = [
    "BuildResult",
    "Lesion",
    "Mark",
    "SeriesSource",
    "TableLoader",
    "build_references",
    "idc_lesions",
    "lesions_from_frame",
    "lesions_to_frame",
    "read_manifest",
]
