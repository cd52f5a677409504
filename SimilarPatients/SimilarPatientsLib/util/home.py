"""Where SimilarPatients keeps its data: references, downloads and caches, under one data home."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from ..errors import SimilarPatientsError

HOME_ENV = "SIMILARPATIENTS_HOME"
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
    """The data home: ``$SIMILARPATIENTS_HOME`` if set, else the per-user cache folder of this platform."""
    explicit = os.environ.get(HOME_ENV)
    if explicit:
        return Path(explicit).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "similarpatients"


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
