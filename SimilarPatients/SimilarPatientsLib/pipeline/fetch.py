"""Where a worker finds a series: a local DICOM folder (listed once, at launch), or IDC through ``idc-index``
into a worker-local cache (``idc/download.py``: verified against the index's instance count, kept whole)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from ..errors import SimilarPatientsError
from ..idc.download import BUCKETS, SeriesCache, series_files
from ..idc.index import IDCIndex


class SeriesSource:
    """Series files by SeriesInstanceUID, on a worker.

    Args:
        files: a local folder's series, UID -> file paths (from :meth:`local`); None: fetch from IDC.
        cache: the worker-local cache folder for IDC downloads (default: the data home's ``series``).
        index: the IDC index Parquet that says each series' instance count (default: the shipped one).
        keep: keep downloaded series in the cache after use (off: a worker's disk holds one at a time).
        client: an ``idc_index.IDCClient`` to download with (default: one made on the worker).
        bucket: IDC's copy to read: ``"gcs"`` (default: a Dataflow worker reads Google Cloud Storage in its
            region, with no external IP or NAT) or ``"aws"``.
    """

    def __init__(
        self,
        files: dict[str, list[str]] | None = None,
        cache: str | None = None,
        index: str | None = None,
        keep: bool = False,
        client=None,
        bucket: str = "gcs",
    ):
        if bucket not in BUCKETS:
            raise SimilarPatientsError(f"IDC's images are in the buckets {' and '.join(BUCKETS)}, not '{bucket}'.")
        self.local_files = files
        self.cache, self.index, self.keep, self.client, self.bucket = cache, index, keep, client, bucket
        self._series_cache: SeriesCache | None = None

    @classmethod
    def local(cls, folder: Path, uids: Sequence[str] | None = None) -> SeriesSource:
        """The series under ``folder`` (only ``uids`` when given), listed once here, not on every worker."""
        folder = Path(folder)
        if not folder.is_dir():
            raise SimilarPatientsError(f"The DICOM folder {folder} does not exist.")
        found = series_files(folder, uids)
        return cls({uid: [str(p) for p in paths] for uid, paths in found.items()})

    def files(self, uid: str) -> list[Path]:
        """The files of series ``uid``; a clear error when it is not there or cannot be fetched."""
        if self.local_files is not None:
            if uid not in self.local_files:
                raise SimilarPatientsError(f"Series {uid} is not in the local DICOM folder.")
            return [Path(p) for p in self.local_files[uid]]
        return list(self._cache().fetch([uid])[uid].files)

    def release(self, uid: str) -> None:
        """Free a downloaded series once it is read (nothing for a local folder, or with ``keep``)."""
        if self.local_files is None and not self.keep:
            shutil.rmtree(self._cache().folder(uid), ignore_errors=True)

    def __getstate__(self):  # the cache and its IDC client are made on each worker, never shipped
        return {**self.__dict__, "_series_cache": None}

    def _cache(self) -> SeriesCache:
        if self._series_cache is None:
            index = IDCIndex(self.index) if self.index else IDCIndex()
            root = Path(self.cache) if self.cache else None
            self._series_cache = SeriesCache(root, index, self.client, self.bucket)
        return self._series_cache
