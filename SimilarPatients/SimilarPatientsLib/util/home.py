"""Where SimilarPatients keeps its data: references, downloads and caches, under one data home."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from ..errors import SimilarPatientsError

HOME_ENV = "SIMILARPATIENTS_HOME"
_NAME = "similarpatients"
log = logging.getLogger(__name__)
#: Errors that mean "this place cannot be written", as opposed to a bug.
_NOT_WRITABLE = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EFBIG,  # over a file size limit (ulimit -f, a FAT volume's 4 GiB)
    getattr(errno, "EDQUOT", errno.ENOSPC),
}


def data_home() -> Path:
    """The data home: ``$SIMILARPATIENTS_HOME`` if set, else this platform's per-user data folder (what
    ``platformdirs.user_data_dir`` names, as idc-index keeps its data): references a user built or imported
    are data, which cache cleaners must not wipe. A data home left in the cache folder by an earlier
    version is moved here on first use (a rename; where it cannot be moved it stays in use, and the log
    says so)."""
    explicit = os.environ.get(HOME_ENV)
    if explicit:
        return Path(explicit).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    home = base / _NAME
    old = _old_cache_home()
    if old is not None and old.is_dir() and not home.exists():
        try:
            home.parent.mkdir(parents=True, exist_ok=True)
            os.rename(old, home)
            log.warning("moved the SimilarPatients data home from the cache folder %s to %s", old, home)
        except OSError as error:
            log.warning("the data home stays in the cache folder %s (cannot move it to %s: %s)", old, home, error)
            return old
    return home


def _old_cache_home() -> Path | None:
    """Where versions before 0.2 kept the data home: the per-user cache folder (none on Windows, where it
    was the same folder as now)."""
    if sys.platform == "win32":
        return None
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / _NAME
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / _NAME


def downloads_dir() -> Path:
    """Verified downloads (upstream embedding files, later weights and images) are cached here."""
    return data_home() / "downloads"


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
    """Turn a write that the file system refuses (read-only, no permission, full) into our error, saying
    what could not be written and how to fix it; nothing half-written is kept by the callers."""
    try:
        yield
    except OSError as error:
        if error.errno not in _NOT_WRITABLE:
            raise
        raise SimilarPatientsError(
            f"Cannot write {what}: {error.strerror} ({error.filename}). The data home is {data_home()}: make it "
            f"writable, free some space, or set {HOME_ENV} to another folder."
        ) from error
