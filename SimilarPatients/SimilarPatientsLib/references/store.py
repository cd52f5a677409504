"""The local reference store: named reference databases as Parquet under the data home.

Every write builds a complete new version folder (streamed, every file digested as it is written: see
:mod:`.writer`) and then swaps a one-line ``CURRENT`` pointer with an atomic rename, so a crash at any point
leaves the previous version whole and in use. Writers of one name
swap and clean up one at a time (a lock per reference); an opened reference holds a shared lock on its
version, and a version is deleted only when no reader or writer holds it, so concurrent imports and
searches of one name each see a whole version, and the last write wins.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import pandas as pd

from ..errors import SimilarPatientsError
from ..idc.index import COLLECTION, SERIES, IDCIndex
from ..progress import ProgressCallback, report
from ..util.home import data_home, writing
from ..util.locks import FileLock, fcntl, try_exclusive
from . import schema
from .importers import read_source
from .parquet_table import ParquetTable
from .reference import Reference, damaged
from .writer import write_version

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_VERSION = re.compile(r"^\.?(v\d{8}T\d{6}-[0-9a-f]{8})(\.part|\.lock)?$")
_OPEN_ATTEMPTS = 20
log = logging.getLogger(__name__)


class ReferenceStore:
    """Reference databases kept under ``<data home>/references``: list, import, open, delete."""

    def __init__(self, home: Path | None = None):
        self.root = Path(home or data_home()) / "references"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "CURRENT").is_file())

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def summary(self) -> pd.DataFrame:
        """One row per reference and model: lesions, patients, embedding length, recipe, source, and its
        ``status``: "ok", or why the reference cannot be used (a damaged one is listed, never in the way)."""
        rows = []
        for name in self.names():
            try:
                reference = self.open(name)
            except SimilarPatientsError as error:
                rows.append({"reference": name, "status": str(error)})
                continue
            for model in reference.models:
                info = reference.model_info(model)
                rows.append(
                    {
                        "reference": name,
                        "model": model,
                        "dim": info.dim,
                        "lesions": info.lesions,
                        "patients": info.patients,
                        "recipe": info.recipe,
                        "source": reference.manifest["source"],
                        "created": reference.manifest["created"],
                        "status": "ok",
                    }
                )
            reference.close()
        columns = ["reference", "model", "dim", "lesions", "patients", "recipe", "source", "created", "status"]
        return pd.DataFrame(rows, columns=columns)

    def open(self, name: str) -> Reference:
        """The current version of ``name``, held (shared) so that no writer deletes it while it is open."""
        folder = self.root / _checked(name)
        for _ in range(_OPEN_ATTEMPTS):
            pointer = folder / "CURRENT"
            if not pointer.is_file():
                known = ", ".join(self.names()) or "none yet"
                raise SimilarPatientsError(
                    f"No reference named '{name}' (have: {known}). Import one with "
                    f"`similar-patients references import {name} --source PATH_OR_URL`."
                )
            version = _pointed(pointer)
            if not _VERSION.match(version) or version.startswith("."):
                raise damaged(name, "its CURRENT file does not name a version (it was edited or is damaged)")
            lock = _hold(folder, version, shared=True)
            if (folder / version).is_dir():
                try:
                    return Reference(folder / version, lock)
                except BaseException:
                    lock.release()
                    raise
            lock.release()  # replaced and removed between reading the pointer and holding it: read it again
            if pointer.is_file() and _pointed(pointer) == version:  # no writer moved it: the version is gone
                raise damaged(name, f"its CURRENT file names version {version}, which is not there")
        raise SimilarPatientsError(f"Reference '{name}' kept changing while it was opened; try again.")

    def delete(self, name: str) -> None:
        folder = self.root / _checked(name)
        if not (folder / "CURRENT").is_file():
            raise SimilarPatientsError(f"No reference named '{name}' to delete.")
        with writing(f"reference '{name}'"), FileLock(folder / ".writer.lock"):
            (folder / "CURRENT").unlink()
            _remove_unused(folder, keep=None)
        if fcntl is None:  # no shared locks to respect (Windows): what is open stays, the rest goes
            shutil.rmtree(folder, ignore_errors=True)
        log.info("deleted reference '%s'", name)

    def import_reference(
        self, name: str, source: str, progress: ProgressCallback | None = None, allow_incomplete: bool = False
    ) -> Reference:
        """Read ``source`` (see :func:`importers.read_source`; ``allow_incomplete``: a build folder whose
        build did not complete), stamp IDC metadata, and store it as ``name``."""
        _checked(name)
        read = read_source(source, progress, allow_incomplete)
        return self.write(name, read.table, read.origin, read.notes, progress, read.display_fields)

    def write(
        self,
        name: str,
        table: schema.ReferenceTable | ParquetTable,
        source: str,
        notes: list[str] | None = None,
        progress: ProgressCallback | None = None,
        display_fields: list[str] | None = None,
    ) -> Reference:
        """Store ``table`` (in memory, or a :class:`ParquetTable` read chunk by chunk) as the new version of
        ``name``, atomically, with IDC fields filled in, its files' digests recorded, and the approximate
        index and nearest-match distribution a first query needs already made (see :mod:`.writer`).
        ``display_fields``: the label fields a person should see first (default: all)."""
        folder = self.root / _checked(name)
        version = f"v{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        staging = folder / f".{version}.part"
        with writing(f"reference '{name}'"):
            folder.mkdir(parents=True, exist_ok=True)
            own = _hold(folder, version, shared=False)  # no one removes our staging or new version
            try:
                idc = IDCIndex()
                report(progress, 0, 1, "adding IDC metadata")
                lesions = idc.enrich(table.lesions)
                label_fields = [c for c in lesions.columns if c not in schema.STRUCTURAL]
                content = {
                    "name": name,
                    "source": source,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "label_fields": label_fields,
                    "display_fields": [f for f in display_fields or label_fields if f in label_fields],
                    "idc_index": idc.version,
                    "notes": list(notes or []) + _idc_notes(lesions),
                }
                write_version(staging, lesions, table, content, progress)
                os.replace(staging, folder / version)
                with FileLock(folder / ".writer.lock"):  # one writer at a time swaps the pointer and cleans up
                    pointer = folder / f"CURRENT.{uuid.uuid4().hex[:8]}.part"
                    pointer.write_text(version + "\n", encoding="utf-8")
                    os.replace(pointer, folder / "CURRENT")
                    _remove_unused(folder, keep=version)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                own.release()
                own.path.unlink(missing_ok=True)
                raise
        own.release()
        log.info("stored reference '%s' version %s from %s", name, version, source)
        reference = self.open(name)
        if reference.path.name != version:
            log.warning("reference '%s' was replaced by another write at the same moment", name)
        return reference


def _pointed(pointer: Path) -> str:
    """The version a CURRENT file names ("" when it cannot be read as text)."""
    try:
        return pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _hold(folder: Path, version: str, shared: bool) -> FileLock:
    return FileLock(folder / f".{version}.lock", shared=shared)


def _remove_unused(folder: Path, keep: str | None) -> None:
    """Delete the versions, staging folders and stale pointer files of one reference that no reader or
    writer holds, except version ``keep``. Called with the reference's writer lock held."""
    versions = set()
    for entry in folder.iterdir():
        if entry.name.startswith("CURRENT.") and entry.name.endswith(".part"):
            entry.unlink(missing_ok=True)  # a writer died before swapping: writers hold the lock to swap
        elif _VERSION.match(entry.name):
            versions.add(_VERSION.match(entry.name).group(1))
    for version in sorted(versions - {keep}):
        lock = folder / f".{version}.lock"
        with try_exclusive(lock) as free:
            if not free:
                continue
            for path in (folder / version, folder / f".{version}.part"):
                shutil.rmtree(path, ignore_errors=True)
            lock.unlink(missing_ok=True)


def _checked(name: str) -> str:
    if not _NAME.match(name or ""):
        raise SimilarPatientsError(
            f"'{name}' is not a usable reference name: use letters, digits, '.', '_' or '-' (up to 100)."
        )
    return name


def _idc_notes(lesions: pd.DataFrame) -> list[str]:
    if SERIES not in lesions.columns:
        return ["no SeriesInstanceUID column: IDC fields and viewer links are unavailable"]
    missing = lesions.loc[lesions[COLLECTION].isna(), SERIES].nunique()
    return [f"{missing} series not found in the IDC index: their IDC fields are empty"] if missing else []
