"""Advisory file locks between processes: writers of one reference take turns, and a version a reader
holds open is never deleted under it.

POSIX ``flock``: shared locks for readers, exclusive for writers and for whoever wants to delete. On
Windows (no shared locks in the standard library) readers take none and ``try_exclusive`` always
reports the file busy, so old versions are kept rather than risk deleting one in use.

Not the ``filelock`` package: its ``FileLock`` is exclusive only (readers would queue behind each other);
its ``ReadWriteLock`` is an SQLite transaction that needs a writable folder (a reader of a read-only data
home takes its shared lock read-only here) and is per thread; its soft locks are marker files that a
crashed process leaves behind. ``flock`` is shared or exclusive, and the kernel drops it when its holder
dies.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class FileLock:
    """A lock held on ``path`` (created if missing) until :meth:`release`; also a context manager.

    A shared lock in a folder that cannot be written (a read-only data home) is taken read-only, or not at
    all when the lock file is not there: where nothing can be written, nothing can be deleted either."""

    def __init__(self, path: Path, shared: bool = False):
        self.path = Path(path)
        self._fd: int | None = None
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            if not shared or error.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            if not self.path.exists():
                return
            self._fd = os.open(self.path, os.O_RDONLY)
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        elif not shared:
            import msvcrt

            msvcrt.locking(self._fd, msvcrt.LK_LOCK, 1)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()


@contextlib.contextmanager
def try_exclusive(path: Path) -> Iterator[bool]:
    """Yield True while holding ``path`` exclusively if no one else holds it now, else yield False."""
    if fcntl is None:
        yield False
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def try_lock(path: Path) -> FileLock | None:
    """An exclusive lock on ``path`` if no one holds it now (held until released or the process ends),
    else None. Where there are no POSIX locks, always the lock (a blocking one)."""
    if fcntl is None:
        return FileLock(path)
    lock = FileLock.__new__(FileLock)
    lock.path = Path(path)
    lock._fd = os.open(lock.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(lock._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.release()
        return None
    return lock
