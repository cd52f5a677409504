"""Where SimilarPatients keeps its data: references, downloads and caches, under one data home."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HOME_ENV = "SIMILARPATIENTS_HOME"


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
