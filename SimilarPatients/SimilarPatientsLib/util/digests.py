"""Digests of stored files: taken while a file is written, checked once per process before it is read.

Files that are written once and never changed (a reference version's matrices, table and index) carry a
record of their size and digest. A changed byte (a disk fault, a file copied over from elsewhere, an edit)
then shows as a digest that differs, before any answer is computed from the file.

The digest is SHA-256 over the SHA-256 digests of the file's 16 MiB blocks: a writer feeds the blocks as
its bytes go out (one pass, no second read), and a reader hashes the blocks on all cores at once (SHA-256
runs at about 1.8 GB/s per core on these x86 cores). A file checked in full is remembered for the life of the
process with its size, modification time and inode, so that a later check of the same file costs one
``stat``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from ..progress import ProgressCallback, report

ALGORITHM = "sha256 of 16 MiB blocks"
BLOCK = 16 << 20
_WORKERS = max(1, min(8, os.cpu_count() or 1))
_checked: dict = {}  # (path, digest) -> (size, mtime_ns, inode) of a file found whole in this process
_checked_lock = threading.Lock()


@dataclass(frozen=True)
class FileRecord:
    """What a file was when it was written: its size in bytes and its digest (hex)."""

    bytes: int
    digest: str

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> FileRecord:
        return cls(int(record["bytes"]), str(record["digest"]))


class BlockDigest:
    """The digest of a stream of bytes, fed in pieces of any size."""

    def __init__(self):
        self._outer = hashlib.sha256()
        self._block = hashlib.sha256()
        self._filled = 0
        self.size = 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(BLOCK - self._filled, len(view))
            self._block.update(view[:take])
            self._filled += take
            self.size += take
            view = view[take:]
            if self._filled == BLOCK:
                self._outer.update(self._block.digest())
                self._block = hashlib.sha256()
                self._filled = 0

    def record(self) -> FileRecord:
        outer = self._outer.copy()
        if self._filled or self.size == 0:  # the last, short block (an empty file is one empty block)
            outer.update(self._block.digest())
        return FileRecord(self.size, outer.hexdigest())


class HashingWriter:
    """A file opened for writing whose bytes are digested on their way out (for ``np.save``, Parquet writers,
    or plain writes). A short write by the file system is an ``OSError`` with its errno, never a count."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close() / the context manager
        self._digest = BlockDigest()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            self._file.write(view)
        except OSError as error:  # a full disk says so with its errno, and with the file's name
            raise OSError(error.errno, error.strerror or str(error), str(self.path)) from error
        self._digest.update(view)
        return len(view)

    def tell(self) -> int:
        return self._digest.size

    def flush(self) -> None:
        self._file.flush()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def record(self) -> FileRecord:
        """The written file's size and digest (after :meth:`close`)."""
        return self._digest.record()

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def file_record(path: Path, progress: ProgressCallback | None = None) -> FileRecord:
    """The size and digest of ``path`` as it is now, its blocks hashed in parallel."""
    path = Path(path)
    size = path.stat().st_size
    count = max(1, -(-size // BLOCK))

    def block(i: int) -> bytes:
        with open(path, "rb") as stream:
            stream.seek(i * BLOCK)
            return hashlib.sha256(stream.read(BLOCK)).digest()

    outer = hashlib.sha256()
    with ThreadPoolExecutor(min(_WORKERS, count)) as pool:
        for i, digest in enumerate(pool.map(block, range(count))):
            outer.update(digest)
            if i % 16 == 0:
                report(progress, i, count, f"checking {path.name}")
    return FileRecord(size, outer.hexdigest())


def check(path: Path, expected: FileRecord, progress: ProgressCallback | None = None) -> str | None:
    """None when ``path`` is the file ``expected`` records, else what is wrong with it (missing, another size,
    other bytes). Read in full the first time in this process; after that, while its size, modification time
    and inode stay as they were, checked by one ``stat``."""
    path = Path(path)
    try:
        status = path.stat()
    except FileNotFoundError:
        return "is missing"
    if status.st_size != expected.bytes:
        return f"holds {status.st_size:,} bytes where {expected.bytes:,} were written"
    key = (str(path.resolve()), expected.digest)
    seen = (status.st_size, status.st_mtime_ns, status.st_ino)
    with _checked_lock:
        if _checked.get(key) == seen:
            return None
    found = file_record(path, progress)
    if found != expected:
        return "has changed since it was written (its bytes no longer match the digest recorded then)"
    with _checked_lock:
        _checked[key] = seen
    return None


def size_check(path: Path, expected: FileRecord) -> str | None:
    """What a ``stat`` can tell: None when ``path`` is there with the recorded size."""
    try:
        size = Path(path).stat().st_size
    except FileNotFoundError:
        return "is missing"
    return None if size == expected.bytes else f"holds {size:,} bytes where {expected.bytes:,} were written"
