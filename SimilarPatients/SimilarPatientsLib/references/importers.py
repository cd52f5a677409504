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

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SimilarPatientsError
from ..progress import ProgressCallback
from ..util.download import download
from ..util.home import downloads_dir
from . import nlst_sybil, schema

NLST_SYBIL = "nlst-sybil"
_TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".csv.gz", ".tsv")


@dataclass
class ImportedSource:
    """What an importer read: the validated table, notes for the user, and where it came from."""

    table: schema.ReferenceTable
    origin: str
    notes: list = field(default_factory=list)
    #: label fields a person should see first (None: all of them), in order
    display_fields: list | None = None


def read_source(source: str, progress: ProgressCallback | None = None) -> ImportedSource:
    """Read ``source`` into a validated table, with a note on each label field whose values differ between
    one patient's lesions (see :func:`schema.mixed_labels`)."""
    read = _read_source(source, progress)
    read.notes += schema.mixed_labels(read.table)
    return read


def _read_source(source: str, progress: ProgressCallback | None) -> ImportedSource:
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
        read = _read_source(str(path), progress)
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


def read_table_file(path: Path) -> schema.ReferenceTable:
    """A Parquet or CSV file in the canonical shape, validated."""
    name = path.name.lower()
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


def read_parquet_folder(folder: Path) -> schema.ReferenceTable:
    """A folder of Parquet shards in the canonical shape (as ``index build`` writes them), as one table.
    A lesion written twice with the same vector (a retried shard) is kept once; with two vectors, refused."""
    files = sorted(Path(folder).glob("*.parquet"))
    try:
        table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    except (OSError, ValueError, pa.ArrowInvalid) as error:
        raise SimilarPatientsError(f"Cannot read the Parquet shards in {folder} as one table: {error}") from error
    key = [c for c in (schema.MODEL, schema.RECIPE, schema.PATIENT, schema.LESION) if c in table.column_names]
    if schema.LESION in key:
        frame = table.select(key).to_pandas()
        repeated = frame.duplicated(keep="first").to_numpy()
        if repeated.any():
            vectors = table.column(schema.EMBEDDING).to_pylist()
            first = {tuple(r): i for i, r in reversed(list(enumerate(frame.itertuples(index=False))))}
            for i in np.flatnonzero(repeated):
                row = tuple(frame.iloc[i])
                if vectors[i] != vectors[first[row]]:
                    raise SimilarPatientsError(
                        f"Lesion {row} is in the shards of {folder} twice with different embeddings; remove the "
                        f"shards of one of the builds."
                    )
            table = table.filter(pa.array(~repeated))
    try:
        return schema.from_arrow(table)
    except SimilarPatientsError as error:
        raise SimilarPatientsError(f"{folder}: {error}") from None


def _read_nlst_folder(folder: Path, progress: ProgressCallback | None) -> ImportedSource:
    files = nlst_sybil.upstream_files_in(folder)
    clinical = folder / "clinical.parquet"
    read = nlst_sybil.read_reference(files, clinical if clinical.exists() else None, progress)
    return ImportedSource(read.table, str(Path(folder).resolve()), read.notes, list(nlst_sybil.DISPLAY_FIELDS))
