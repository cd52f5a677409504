"""Sources a reference can be imported from, each read into the canonical :class:`ReferenceTable`.

- ``nlst-sybil`` (or the upstream repository's URL): the published NLST-Sybil embeddings, from a local
  copy if one is found, else downloaded and verified;
- a folder or a single file of upstream ``<Model>_features.pkl`` pickles (restricted unpickler);
- a Parquet or CSV file (local path or http(s) URL) in the canonical shape: bring your own embeddings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pyarrow.parquet as pq

from ..errors import SimilarPatientsError
from ..progress import ProgressCallback
from ..util import files as stored_files
from ..util.download import download
from ..util.home import downloads_dir, writing
from . import nlst_sybil, schema
from .parquet_table import ParquetTable, streamable

NLST_SYBIL = "nlst-sybil"
#: The record ``index build`` keeps in its output folder: which build, and whether it completed.
BUILD_RECORD = "_build.json"
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


def read_source(
    source: str, progress: ProgressCallback | None = None, allow_incomplete: bool = False
) -> ImportedSource:
    """Read ``source`` into a validated table, with a note on each label field whose values differ between
    one patient's lesions (see :func:`schema.mixed_labels`). A build folder (``index build``'s output, local
    or ``gs://``) whose build did not complete is refused unless ``allow_incomplete``."""
    read = _read_source(source, progress, allow_incomplete)
    read.notes += schema.mixed_labels(read.table)
    return read


def _read_source(source: str, progress: ProgressCallback | None, allow_incomplete: bool) -> ImportedSource:
    text = str(source).strip()
    if stored_files.is_url(text) and not text.startswith(("http://", "https://")):
        return read_build_folder(text, allow_incomplete)
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
        read = _read_source(str(path), progress, allow_incomplete)
        read.origin = text
        return read
    path = Path(text).expanduser()
    if not path.exists():
        raise SimilarPatientsError(
            f"No such file or folder: {path}. Give a Parquet/CSV file, a folder of upstream *_features.pkl "
            f"files, or '{NLST_SYBIL}'."
        )
    if path.is_dir():
        if not nlst_sybil.upstream_files_in(path) and stored_files.listing(str(path), "*.parquet"):
            return read_build_folder(str(path.resolve()), allow_incomplete)
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


def read_build_folder(folder: str, allow_incomplete: bool = False) -> ImportedSource:
    """A folder of Parquet shards, checked against its build record (``_build.json``, written by ``index
    build``) when it has one: a build that did not complete is refused unless ``allow_incomplete``, and
    then the notes say how much is missing."""
    notes = []
    record_path = stored_files.join(folder, BUILD_RECORD)
    if stored_files.exists(record_path):
        try:
            record = json.loads(stored_files.read(record_path))
        except ValueError:
            record = {"status": "damaged"}
        if record.get("status") != "complete":
            said = (
                f"its build {record.get('build', '?')} did not complete (status '{record.get('status')}': it was "
                f"interrupted or failed, or is still running); {record.get('to_embed', '?')} lesion-model pairs were "
                f"to be embedded of {record.get('pairs', '?')}"
            )
            if not allow_incomplete:
                raise SimilarPatientsError(
                    f"{folder} is an incomplete build: {said}. Run the same `index build` again to finish it, or "
                    f"import what is there with --allow-incomplete."
                )
            notes.append(f"incomplete build: {said}")
        elif record.get("dead"):
            notes.append(f"{record['dead']} lesion-model pairs failed in the build (see {folder}/dead-letters/)")
    table = read_parquet_folder(folder)
    if notes and notes[0].startswith("incomplete"):
        have = len(table.lesions)
        notes[0] += f"; the shards hold {have} rows, {max(0, int(record.get('pairs', have)) - have)} missing"
    return ImportedSource(table, folder, notes)


def read_parquet_folder(folder: Path | str) -> ParquetTable:
    """A folder of Parquet shards in the canonical shape (as ``index build`` writes them), as one table whose
    vectors are read shard by shard. Hidden files (a writer's temporaries) are not shards. A lesion written
    twice with the same vector (a retried shard) is kept once; with two vectors, refused. The shards of a
    ``gs://`` folder are copied into the download cache first, then streamed as a local folder's are."""
    files = stored_files.listing(str(folder), "*.parquet")
    if stored_files.is_url(str(folder)):
        files = _local_copies(str(folder), files)
    unstreamable = [stored_files.name(str(f)) for f in files if not streamable(Path(f))]
    if unstreamable:
        raise SimilarPatientsError(
            f"The Parquet shards in {folder} must hold their vectors as an '{schema.EMBEDDING}' list column; "
            f"{', '.join(unstreamable[:5])} do{'es' if len(unstreamable) == 1 else ''} not (or cannot be read)."
        )
    return ParquetTable(files, str(folder), shards=True)


def _local_copies(folder: str, files: list) -> list:
    """The shards of a cloud folder copied (each atomically) into the download cache, which keeps only them."""
    cache = downloads_dir() / "builds" / hashlib.sha256(folder.encode()).hexdigest()[:16]
    copies = []
    with writing(f"the download cache ({cache})"):
        cache.mkdir(parents=True, exist_ok=True)
        for file in files:
            copies.append(cache / stored_files.name(file))
            stored_files.write(str(copies[-1]), stored_files.read(file))
        for stale in set(cache.glob("*.parquet")) - set(copies):
            stale.unlink()
    return copies


def _read_nlst_folder(folder: Path, progress: ProgressCallback | None) -> ImportedSource:
    files = nlst_sybil.upstream_files_in(folder)
    clinical = folder / "clinical.parquet"
    read = nlst_sybil.read_reference(files, clinical if clinical.exists() else None, progress)
    return ImportedSource(read.table, str(Path(folder).resolve()), read.notes, list(nlst_sybil.DISPLAY_FIELDS))
