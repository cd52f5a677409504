"""Downloads into the data home: resumable, verified, atomic, with progress, and a clear error offline.

A file is fetched to ``<dest>.part`` (resumed with an HTTP Range request if a part is there), verified
against its expected digest, and only then renamed to ``dest``: a cached file is always a whole one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import SimilarPatientsError
from ..progress import ProgressCallback, report
from .home import writing

_CHUNK = 1 << 20
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Digest:
    """An expected checksum: ``sha256`` of the bytes, or ``git-blob-sha1`` (the id git gives a file)."""

    algorithm: str
    hexdigest: str

    def of_file(self, path: Path) -> str:
        if self.algorithm == "sha256":
            hasher = hashlib.sha256()
        elif self.algorithm == "git-blob-sha1":
            hasher = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
        else:
            raise ValueError(f"unknown digest algorithm {self.algorithm!r}")
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(_CHUNK), b""):
                hasher.update(block)
        return hasher.hexdigest()

    def matches(self, path: Path) -> bool:
        return self.of_file(path) == self.hexdigest.lower()


def verify(path: Path, digest: Digest | None) -> None:
    """Raise if ``path`` does not have the expected digest."""
    if digest is not None and not digest.matches(path):
        raise SimilarPatientsError(
            f"{path} does not match its expected {digest.algorithm} {digest.hexdigest}: the file is corrupt, "
            f"partial or a different version. Delete it and fetch it again."
        )


def download(
    url: str,
    dest: Path,
    digest: Digest | None = None,
    progress: ProgressCallback | None = None,
    timeout: float = 30.0,
) -> Path:
    """Fetch ``url`` to ``dest`` unless a verified copy is already there; return ``dest``."""
    dest = Path(dest)
    if dest.exists() and (digest is None or digest.matches(dest)):
        return dest
    part = dest.with_name(dest.name + ".part")
    log.info("downloading %s to %s%s", url, dest, " (resuming)" if part.exists() else "")
    for attempt in (1, 2):
        with writing(f"the download of {url}"):
            dest.parent.mkdir(parents=True, exist_ok=True)
            _fetch_to(url, part, progress, timeout)
        if digest is None or digest.matches(part):
            os.replace(part, dest)
            return dest
        part.unlink()  # a resumed part that does not verify is started over once, then refused
        if attempt == 2:
            raise SimilarPatientsError(
                f"The file downloaded from {url} does not match its expected {digest.algorithm} "
                f"{digest.hexdigest}; the upstream file changed or the transfer was corrupted."
            )
    return dest


def _fetch_to(url: str, part: Path, progress: ProgressCallback | None, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "SimilarPatients"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # the part is already whole
            return
        raise SimilarPatientsError(f"Download of {url} failed: HTTP {error.code} {error.reason}.") from error
    except (urllib.error.URLError, OSError) as error:
        raise SimilarPatientsError(
            f"Cannot reach {url} ({getattr(error, 'reason', error)}). This machine looks offline: download "
            f"the file elsewhere and give its local path instead."
        ) from error
    with response:
        resumed = have and response.status == 206
        total = int(response.headers.get("Content-Length") or 0) + (have if resumed else 0)
        done = have if resumed else 0
        with open(part, "ab" if resumed else "wb") as stream:
            try:
                while True:
                    block = response.read(_CHUNK)
                    if not block:
                        break
                    stream.write(block)
                    done += len(block)
                    report(progress, done, total, f"downloading {part.name[:-5]}")
            except OSError as error:
                raise SimilarPatientsError(
                    f"The download of {url} broke off after {done} bytes ({error}); run the same command "
                    f"again to resume it."
                ) from error
    if total and done < total:
        raise SimilarPatientsError(
            f"The download of {url} stopped at {done} of {total} bytes; run the same command again to resume it."
        )
