"""Matched series onto this machine: their size first, then a download through ``idc-index`` into a cache,
verified and kept whole, or a local DICOM folder for sites without network.

A series is cached only when every instance the IDC index lists for it is there: a download is made in a
staging folder, its DICOM files counted against the index's ``instanceCount`` and only then renamed into
the cache, so a cut download is refused and fetched again, never loaded as a shorter volume. Each download
stages into a folder of its own, so two downloads of one series (a cancelled one whose process is still
ending, and the next) never mix their files; the first to finish fills the cache, the other's copy is
dropped. Progress is in bytes: the staging folder's size against the index's size of the series, measured
as idc-index measures its own (the folder, every half second). Loading a
patient twice reuses the cached series. Downloading sends the series' identifiers to IDC's public buckets:
the caller (the Slicer module) asks the user first.

Paths stay short, because Slicer on Windows is not long-path aware (260 characters): a series' folder is
named by a 16-character digest of its UID (the UID itself, 64 characters at most, is written inside it) and
holds its files flat as ``idc-index`` names them (``<uuid>.dcm``), not in its default
collection/patient/study/series tree (310-333 characters for an NLST series under Slicer's DICOM
database folder). ``idc-index`` starts ``s5cmd`` with plain ``subprocess`` calls and takes no creation
flags; from Slicer, a GUI program on Windows, each would open a console window, so those calls get
``CREATE_NO_WINDOW`` here; its progress bar and informational log lines are kept out of the Python console.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import SimilarPatientsError
from ..progress import ProgressCallback, report
from ..util.home import data_home, writing
from ..util.optional import optional_import
from .index import SERIES, IDCIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesFiles:
    """One series on this machine: its folder and DICOM files, and whether it was downloaded just now."""

    uid: str
    folder: Path
    files: tuple
    downloaded: bool


#: IDC's copies of its images (idc-index's ``source_bucket_location``): Amazon S3 and Google Cloud Storage.
BUCKETS = ("aws", "gcs")
#: The file in a cached series' folder that names its SeriesInstanceUID (the folder is named by a digest).
UID_FILE = "SeriesInstanceUID.txt"


def series_key(uid: str) -> str:
    """A cached series' folder name: 16 hex characters of the UID's SHA-256, whatever the UID's length."""
    return hashlib.sha256(uid.encode("utf-8")).hexdigest()[:16]


def cached_files(root: Path, uid: str) -> list[Path]:
    """The files of series ``uid`` in the cache at ``root`` (none when it is not cached)."""
    folder = Path(root) / series_key(uid)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != UID_FILE)


def cached_uids(root: Path) -> list[str]:
    """The SeriesInstanceUIDs cached at ``root`` (what Slicer's DICOM database is told to forget)."""
    root = Path(root)
    if not root.is_dir():
        return []
    named = (folder / UID_FILE for folder in root.iterdir() if folder.is_dir() and not folder.name.startswith("."))
    return sorted(path.read_text(encoding="utf-8").strip() for path in named if path.is_file())


class SeriesCache:
    """Series by SeriesInstanceUID in a folder of their own (default ``<data home>/series``; the Slicer module
    puts it inside its DICOM database folder).

    Args:
        root: the cache folder.
        index: the IDC index that says how many instances each series has (and its size).
        client: an ``idc_index.IDCClient`` (made on first download when not given).
        bucket: IDC's copy to download from: ``"aws"`` (idc-index's default) or ``"gcs"`` (Google Cloud
            Storage: what a worker on Google Cloud reads in its own region, without external IPs).
    """

    def __init__(self, root: Path | None = None, index: IDCIndex | None = None, client=None, bucket: str = "aws"):
        if bucket not in BUCKETS:
            raise SimilarPatientsError(f"IDC's images are in the buckets {' and '.join(BUCKETS)}, not '{bucket}'.")
        self.root = Path(root) if root is not None else data_home() / "series"
        self.index = index or IDCIndex()
        self._client = client
        self.bucket = bucket

    def expected(self, uids: Sequence[str]):
        """The index's rows (instanceCount, series_size_MB, ...) for ``uids``; unknown UIDs are refused."""
        rows = self.index.series(list(uids)).set_index(SERIES)
        unknown = [u for u in uids if u not in rows.index]
        if unknown:
            raise SimilarPatientsError(
                f"{len(unknown)} series are not in the IDC index ({self.index.version}), e.g. {unknown[0]}: "
                f"they cannot be downloaded from IDC. Give a local DICOM folder that holds them instead."
            )
        return rows

    def download_size_mb(self, uids: Sequence[str]) -> float:
        """Megabytes a download of ``uids`` would fetch (what is cached already costs nothing)."""
        missing = [u for u in dict.fromkeys(uids) if not self.folder(u).is_dir()]
        return float(self.expected(missing)["series_size_MB"].sum()) if missing else 0.0

    def fetch(self, uids: Sequence[str], progress: ProgressCallback | None = None) -> dict[str, SeriesFiles]:
        """Every series of ``uids`` from the cache, downloading what is not there yet; progress in bytes
        (``done`` and ``total`` of the series to download, the message saying MB)."""
        uids = list(dict.fromkeys(uids))
        rows = self.expected(uids)
        missing = [uid for uid in uids if not self.folder(uid).is_dir()]
        sizes = {uid: float(rows.loc[uid, "series_size_MB"]) * 1e6 for uid in missing}
        total, before = sum(sizes.values()), 0.0
        for number, uid in enumerate(missing, 1):

            def bytes_done(got, before=before, uid=uid, number=number):
                done = before + min(got, sizes[uid])
                stage = f"downloading series {number} of {len(missing)}"
                report(progress, done, total, f"{stage} ({done / 1e6:.1f} of {total / 1e6:.1f} MB)")

            self._download(uid, int(rows.loc[uid, "instanceCount"]), bytes_done)
            before += sizes[uid]
        found = {}
        for uid in uids:
            folder = self.folder(uid)
            found[uid] = SeriesFiles(uid, folder, tuple(cached_files(self.root, uid)), uid in sizes)
        report(progress, 1, 1, "series ready")
        return found

    def folder(self, uid: str) -> Path:
        """Where series ``uid`` is kept (whether or not it is there)."""
        return self.root / series_key(uid)

    def discard_partial(self, pid: int) -> None:
        """Remove the staging folders of process ``pid``'s downloads, which will not finish (it was ended)."""
        for staging in self.root.glob(f".*-p{pid}-*.part") if self.root.is_dir() else ():
            shutil.rmtree(staging, ignore_errors=True)

    def clear(self) -> float:
        """Delete the cache; returns the megabytes freed."""
        size = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file()) if self.root.is_dir() else 0
        shutil.rmtree(self.root, ignore_errors=True)
        return size / 1e6

    def _download(self, uid: str, instances: int, bytes_done: Callable[[int], None]) -> None:
        """One series into its own staging folder, checked, then renamed into the cache; ``bytes_done`` hears
        the staging folder's size every half second (from a thread: the download blocks this one)."""
        with writing(f"the series cache ({self.root})"):
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(
                tempfile.mkdtemp(prefix=f".{series_key(uid)}-p{os.getpid()}-", suffix=".part", dir=self.root)
            )
            stop, failed = threading.Event(), []
            watcher = threading.Thread(target=_watch, args=(staging, bytes_done, stop, failed), daemon=True)
            try:
                log.info("downloading series %s from IDC into %s", uid, self.folder(uid))
                watcher.start()
                with _tool_log_quiet():
                    self.client.download_from_selection(
                        seriesInstanceUID=[uid],
                        downloadDir=str(staging),
                        source_bucket_location=self.bucket,
                        dirTemplate=None,  # the files flat in the folder: short paths
                        quiet=True,  # s5cmd's own output not on the console
                        show_progress_bar=False,  # its bar would go to the console; the watcher measures
                    )
                stop.set()
                watcher.join()
                if failed:
                    raise failed[0]
                have = len(series_files(staging, [uid]).get(uid, ()))
                if have != instances:
                    raise SimilarPatientsError(
                        f"The download of series {uid} brought {have} of its {instances} images: it was cut "
                        f"short. Nothing was kept; try again."
                    )
                bytes_done(_folder_bytes(staging))
                (staging / UID_FILE).write_text(uid, encoding="utf-8")
                try:
                    os.replace(staging, self.folder(uid))
                except OSError:
                    if not self.folder(uid).is_dir():
                        raise
                    # another download of this series finished first: its verified copy is kept
            finally:
                stop.set()
                shutil.rmtree(staging, ignore_errors=True)

    @property
    def client(self):
        if self._client is None:
            self._client = idc_client()
        return self._client


def idc_client(os_name: str = os.name):
    """An ``idc_index.IDCClient`` whose s5cmd processes open no console window on Windows."""
    idc_index = optional_import("idc_index", "download")
    if os_name == "nt":  # before the client is made: it runs ``s5cmd --help`` to check the binary
        without_console_windows(importlib.import_module("idc_index.index"))
    return idc_index.IDCClient()


#: Windows' CREATE_NO_WINDOW process creation flag (only Windows' subprocess module defines it by name).
CREATE_NO_WINDOW = 0x08000000


class _Windowless:
    """A module's ``subprocess`` whose process-starting calls add ``CREATE_NO_WINDOW`` (everything else is
    ``subprocess``'s own)."""

    STARTS = ("Popen", "run", "call", "check_call", "check_output")

    def __init__(self, base):
        self._base = base

    def __getattr__(self, name):
        value = getattr(self._base, name)
        if name not in self.STARTS:
            return value

        def start(*args, **kwargs):
            kwargs["creationflags"] = kwargs.get("creationflags", 0) | CREATE_NO_WINDOW
            return value(*args, **kwargs)

        return start


def without_console_windows(module) -> None:
    """Make the processes ``module`` starts through its ``subprocess`` open no console window (Windows)."""
    if not isinstance(module.subprocess, _Windowless):
        module.subprocess = _Windowless(module.subprocess)


class _QuietThreads(logging.Filter):
    """Drops the informational records of the threads in :attr:`threads` (errors and warnings pass)."""

    def __init__(self):
        super().__init__()
        self.threads: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.thread not in self.threads


_QUIET = _QuietThreads()


@contextlib.contextmanager
def _tool_log_quiet():
    """While this thread downloads, idc-index's informational lines (sizes, commands, "successfully
    downloaded") stay out of the log, which Slicer shows in its Python console; its errors still show."""
    logger = logging.getLogger("idc_index.index")  # idc-index logs there (a logger's filters see only its own)
    if _QUIET not in logger.filters:
        logger.addFilter(_QUIET)
    _QUIET.threads.add(threading.get_ident())
    try:
        yield
    finally:
        _QUIET.threads.discard(threading.get_ident())


def _watch(folder: Path, bytes_done: Callable[[int], None], stop: threading.Event, failed: list) -> None:
    try:
        while not stop.wait(0.5):
            bytes_done(_folder_bytes(folder))
    except BaseException as error:  # Cancelled from the caller's callback: raised once the download returns
        failed.append(error)


def _folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):  # a file the download is renaming or has just removed
            total += path.stat().st_size if path.is_file() else 0
    return total


def series_files(folder: Path, uids: Sequence[str] | None = None) -> dict[str, list[Path]]:
    """The DICOM files under ``folder`` by SeriesInstanceUID (only ``uids`` when given): a local DICOM
    folder, for offline sites, or a download to check."""
    return DicomFolderIndex(folder).files(uids)


class DicomFolderIndex:
    """A DICOM folder's files by SeriesInstanceUID, each file read once: a later lookup reads only the files
    that are new or changed since (a site's folder holds thousands; looking up a query's matches must not
    read them all again), and forgets the ones that are gone."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self._known: dict[Path, tuple] = {}  # path -> (size, mtime_ns, SeriesInstanceUID or "")

    def files(self, uids: Sequence[str] | None = None) -> dict[str, list[Path]]:
        self._refresh()
        wanted = set(uids) if uids is not None else None
        found: dict[str, list[Path]] = {}
        for path, (_, _, uid) in sorted(self._known.items()):
            if uid and (wanted is None or uid in wanted):
                found.setdefault(uid, []).append(path)
        return found

    def _refresh(self) -> None:
        pydicom = optional_import("pydicom", "embed")
        present = set()
        for path in (p for p in self.folder.rglob("*") if p.is_file()):
            present.add(path)
            stat = path.stat()
            known = self._known.get(path)
            if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
                continue
            try:
                dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                uid = str(getattr(dataset, "SeriesInstanceUID", ""))
            except Exception:  # not DICOM, or not readable: not one of the series' images
                uid = ""
            self._known[path] = (stat.st_size, stat.st_mtime_ns, uid)
        for gone in set(self._known) - present:
            del self._known[gone]
