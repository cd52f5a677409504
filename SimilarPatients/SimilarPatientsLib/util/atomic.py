"""Atomic file writes: write beside the target, then rename over it, so a reader never sees half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _default_mode(directory: bool) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextlib.contextmanager
def replacing(out: Path, directory: bool = False):
    """Yield a temporary path (file, or folder with ``directory``) that replaces ``out`` on success."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        temporary = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=out.suffix, dir=out.parent)
        os.close(handle)
        temporary = Path(name)
    os.chmod(temporary, _default_mode(directory))
    try:
        yield temporary
        if directory and out.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            os.replace(out, retired / out.name)
            os.replace(temporary, out)
            _remove(retired)
        else:
            os.replace(temporary, out)
    finally:
        _remove(temporary)


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
