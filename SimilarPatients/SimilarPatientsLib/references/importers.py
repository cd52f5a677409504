"""Sources a reference can be imported from, each read into the canonical :class:`ReferenceTable`.

- ``nlst-sybil`` (or the upstream repository's URL): the published NLST-Sybil embeddings, from a local
  copy if one is found, else downloaded and verified;
- a folder or a single file of upstream ``<Model>_features.pkl`` pickles (restricted unpickler);
- a Parquet or CSV file (local path or http(s) URL) in the canonical shape: bring your own embeddings.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pyarrow.parquet as pq

from ..errors import SimilarPatientsError
from ..progress import ProgressCallback
from ..util.download import download
from ..util.home import downloads_dir
from . import nlst_sybil, schema
from .parquet_table import ParquetTable, streamable

NLST_SYBIL = "nlst-sybil"
_TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".csv.gz", ".tsv")


@dataclass
class ImportedSource:
    """What an importer read: the validated table (in memory, or a Parquet table whose vectors are read
    chunk by chunk as it is stored), notes for the user, and where it came from."""

    table: schema.ReferenceTable | ParquetTable
    origin: str
    notes: list = field(default_factory=list)
    #: label fields a person should see first (None: all of them), in order
    display_fields: list | None = None


def read_source(source: str, progress: ProgressCallback | None = None) -> ImportedSource:
    """Read ``source`` into a validated table."""
    text = str(source).strip()
    if text.lower() == NLST_SYBIL or nlst_sybil.REPOSITORY.lower() in text.lower():
        local = nlst_sybil.find_local_copy()
        if local is not None:
            return _read_nlst_folder(local, progress)
        files = nlst_sybil.download_upstream(progress=progress)
        read = nlst_sybil.read_reference(files, progress=progress)
        notes = [*read.notes, "no clinical table with this download: age, sex, race and smoking are absent"]
        origin = f"{nlst_sybil.REPOSITORY}@{nlst_sybil.COMMIT[:12]} (downloaded)"
        return ImportedSource(read.table, origin, notes, list(nlst_sybil.DISPLAY_FIELDS))
    if urlparse(text).scheme in ("http", "https"):
        name = Path(urlparse(text).path).name
        if not name.lower().endswith(_TABLE_SUFFIXES):
            raise SimilarPatientsError(
                f"Cannot tell what {text} holds: a URL source must end in one of {', '.join(_TABLE_SUFFIXES)}, "
                f"or be '{NLST_SYBIL}'."
            )
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        path = download(text, downloads_dir() / "tables" / digest / name, progress=progress)
        read = read_source(str(path), progress)
        read.origin = text
        return read
    path = Path(text).expanduser()
    if not path.exists():
        raise SimilarPatientsError(
            f"No such file or folder: {path}. Give a Parquet/CSV file, a folder of upstream *_features.pkl "
            f"files, or '{NLST_SYBIL}'."
        )
    if path.is_dir():
        if not nlst_sybil.upstream_files_in(path) and sorted(path.glob("*.parquet")):
            return ImportedSource(read_parquet_folder(path), str(path.resolve()))
        if not nlst_sybil.upstream_files_in(path):
            raise SimilarPatientsError(
                f"{path} holds no *_features.pkl embedding files and no Parquet shards (*.parquet) to import."
            )
        return _read_nlst_folder(path, progress)
    if path.name.endswith("_features.pkl"):
        read = nlst_sybil.read_reference({path.name[: -len("_features.pkl")]: path}, progress=progress)
        return ImportedSource(read.table, str(path.resolve()), read.notes, list(nlst_sybil.DISPLAY_FIELDS))
    return ImportedSource(read_table_file(path), str(path.resolve()))


def read_table_file(path: Path) -> schema.ReferenceTable | ParquetTable:
    """A Parquet or CSV file in the canonical shape, validated (a Parquet file with an embedding list column
    as a :class:`ParquetTable`, whose vectors are checked as they are read)."""
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")) and streamable(path):
        return ParquetTable([path], path.name)
    try:
        if name.endswith((".parquet", ".pq")):
            return schema.from_arrow(pq.read_table(path))
        if name.endswith((".csv", ".csv.gz", ".tsv")):
            frame = pd.read_csv(path, sep="\t" if name.endswith(".tsv") else ",", dtype={schema.PATIENT: str})
            return schema.from_frame(frame)
    except SimilarPatientsError as error:
        raise SimilarPatientsError(f"{path.name}: {error}") from None
    except (OSError, ValueError) as error:
        raise SimilarPatientsError(f"Cannot read {path}: {error}") from error
    raise SimilarPatientsError(
        f"Unsupported file type: {path.name}. Import a Parquet or CSV table, or upstream *_features.pkl files."
    )


def read_parquet_folder(folder: Path) -> ParquetTable:
    """A folder of Parquet shards in the canonical shape (as ``index build`` writes them), as one table whose
    vectors are read shard by shard. A lesion written twice with the same vector (a retried shard) is kept
    once; with two vectors, refused."""
    files = sorted(Path(folder).glob("*.parquet"))
    unstreamable = [f.name for f in files if not streamable(f)]
    if unstreamable:
        raise SimilarPatientsError(
            f"The Parquet shards in {folder} must hold their vectors as an '{schema.EMBEDDING}' list column; "
            f"{', '.join(unstreamable[:5])} do{'es' if len(unstreamable) == 1 else ''} not (or cannot be read)."
        )
    return ParquetTable(files, str(folder), shards=True)


def _read_nlst_folder(folder: Path, progress: ProgressCallback | None) -> ImportedSource:
    files = nlst_sybil.upstream_files_in(folder)
    clinical = folder / "clinical.parquet"
    read = nlst_sybil.read_reference(files, clinical if clinical.exists() else None, progress)
    return ImportedSource(read.table, str(Path(folder).resolve()), read.notes, list(nlst_sybil.DISPLAY_FIELDS))
