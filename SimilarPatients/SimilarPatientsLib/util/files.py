"""Files that may live on this machine or in a bucket (``gs://bucket/path``): one small API for both.

A local path is read and written with the standard library, each write beside its name then renamed
(``util/atomic.py``). A URL goes through Apache Beam's file systems (the ``pipeline`` extra, which brings
Google Cloud Storage): an object appears whole or not at all, so a write is one upload. Bytes travel as
they are: Beam's file systems would otherwise gunzip (and gzip) ``*.gz`` names by their extension
(``CompressionTypes.AUTO``), and the readers here gunzip themselves, once. Hidden names (``.x``) are
temporaries and are never listed.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from ..errors import SimilarPatientsError
from . import cloud_access
from .atomic import replacing
from .optional import optional_import


def is_url(path: str) -> bool:
    """Whether ``path`` names an object in a bucket (``gs://…``) rather than a local file."""
    return "://" in str(path)


def join(folder: str, *parts: str) -> str:
    if is_url(folder):
        return "/".join([str(folder).rstrip("/"), *parts])
    return str(Path(folder, *parts))


def name(path: str) -> str:
    return str(path).rstrip("/").rpartition("/")[2] if is_url(path) else Path(path).name


def _systems():
    cloud_access.check()  # no credentials, or offline: said now, not after minutes of retries
    return optional_import("apache_beam.io.filesystems", "pipeline").FileSystems


def _as_is():
    """Beam's "no compression": bytes stored and read exactly as given, whatever the name's extension."""
    return optional_import("apache_beam.io.filesystem", "pipeline").CompressionTypes.UNCOMPRESSED


def write(path: str, data: bytes) -> str:
    """``data`` at ``path``, whole or not at all."""
    if not is_url(path):
        with replacing(Path(path)) as temporary:
            temporary.write_bytes(data)
        return path
    with _systems().create(
        path, compression_type=_as_is()
    ) as stream:  # an object is visible only once its upload is complete
        stream.write(data)
    return path


def read(path: str) -> bytes:
    if not is_url(path):
        return Path(path).read_bytes()
    with _systems().open(path, compression_type=_as_is()) as stream:
        return stream.read()


def copy_to_local(url: str, local: Path, chunk: int = 16 * 2**20) -> Path:
    """The object ``url`` (``gs://…``) copied to the local file ``local`` in chunks (weights may exceed
    memory), whole or not at all."""
    source = _systems().open(url, compression_type=_as_is())
    with source, replacing(Path(local)) as temporary, open(temporary, "wb") as sink:
        while True:
            block = source.read(chunk)
            if not block:
                break
            sink.write(block)
    return Path(local)


def exists(path: str) -> bool:
    return Path(path).exists() if not is_url(path) else _systems().exists(path)


def delete(paths: list[str]) -> None:
    """Remove files (missing ones are no error)."""
    local = [p for p in paths if not is_url(p)]
    for path in local:
        Path(path).unlink(missing_ok=True)
    remote = [p for p in paths if is_url(p) and _systems().exists(p)]
    if remote:
        _systems().delete(remote)


def listing(folder: str, pattern: str = "*", hidden: bool = False) -> list[str]:
    """The files directly in ``folder`` whose names match ``pattern``, sorted; hidden ones only if asked."""
    if not is_url(folder):
        found = sorted(str(p) for p in Path(folder).glob(pattern) if p.is_file()) if Path(folder).is_dir() else []
    else:
        prefix = str(folder).rstrip("/") + "/"
        matched = _systems().match([prefix + "*"])[0].metadata_list
        found = sorted(m.path for m in matched if "/" not in m.path[len(prefix) :])
        found = [p for p in found if fnmatch.fnmatchcase(name(p), pattern)]
    return [p for p in found if hidden or not name(p).startswith(".")]


def check_folder(folder: str, what: str) -> str:
    """A folder to write into: not empty text, not an existing file, and (locally) writable now."""
    text = str(folder).strip()
    if not text:
        raise SimilarPatientsError(f"{what} is empty; name a folder (or gs://bucket/path) to write into.")
    if is_url(text):
        if not text.startswith("gs://") or len(text) <= len("gs://"):
            raise SimilarPatientsError(f"{what} '{text}' is not a folder here or a gs://bucket/path.")
        cloud_access.check()  # before anything is read or embedded
        return text.rstrip("/")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise SimilarPatientsError(f"{what} {path} is a file; name a folder (new or holding an earlier build).")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with replacing(path / ".write-check") as probe:
            probe.write_bytes(b"")
        (path / ".write-check").unlink()
    except OSError as error:
        raise SimilarPatientsError(
            f"Cannot write into {what} {path}: {error.strerror or error}. Choose a folder you can write to."
        ) from None
    return str(path)
