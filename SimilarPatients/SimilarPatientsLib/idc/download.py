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
"""

from __future__ import annotations

import contextlib
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
        missing = [u for u in dict.fromkeys(uids) if not (self.root / u).is_dir()]
        return float(self.expected(missing)["series_size_MB"].sum()) if missing else 0.0

    def fetch(self, uids: Sequence[str], progress: ProgressCallback | None = None) -> dict[str, SeriesFiles]:
        """Every series of ``uids`` from the cache, downloading what is not there yet; progress in bytes
        (``done`` and ``total`` of the series to download, the message saying MB)."""
        uids = list(dict.fromkeys(uids))
        rows = self.expected(uids)
        missing = [uid for uid in uids if not (self.root / uid).is_dir()]
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
            folder = self.root / uid
            files = tuple(sorted(p for p in folder.rglob("*") if p.is_file()))
            found[uid] = SeriesFiles(uid, folder, files, uid in sizes)
        report(progress, 1, 1, "series ready")
        return found

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
            staging = Path(tempfile.mkdtemp(prefix=f".{uid}-p{os.getpid()}-", suffix=".part", dir=self.root))
            stop, failed = threading.Event(), []
            watcher = threading.Thread(target=_watch, args=(staging, bytes_done, stop, failed), daemon=True)
            try:
                log.info("downloading series %s from IDC into %s", uid, staging)
                watcher.start()
                self.client.download_from_selection(
                    seriesInstanceUID=[uid],
                    downloadDir=str(staging),
                    source_bucket_location=self.bucket,
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
                try:
                    os.replace(staging, self.root / uid)
                except OSError:
                    if not (self.root / uid).is_dir():
                        raise
                    # another download of this series finished first: its verified copy is kept
            finally:
                stop.set()
                shutil.rmtree(staging, ignore_errors=True)

    @property
    def client(self):
        if self._client is None:
            idc_index = optional_import("idc_index", "download")
            self._client = idc_index.IDCClient()
        return self._client


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
