"""2-D projections of embeddings for maps: PCA, t-SNE or UMAP, seeded so a map can be made again.

For the cosine metric the rows are scaled to unit length first, so that the projection sees the same
geometry the search does.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from ..errors import SimilarPatientsError
from ..search.distances import unit_rows
from ..util.home import data_home
from ..util.optional import optional_import

METHODS = ("umap", "tsne", "pca")


def cache_compilation() -> Path | None:
    """UMAP's first use compiles its numba functions (about 50 s on 2 cores, the progress bar at 0 meanwhile);
    numba caches them beside the package, where later maps find them, unless that folder is read-only (a
    system or Slicer install): then the cache goes to the data home. Returns the folder it set, if any."""
    found = importlib.util.find_spec("umap")
    if "NUMBA_CACHE_DIR" in os.environ or found is None or found.origin is None:
        return None
    if os.access(Path(found.origin).parent, os.W_OK):
        return None
    folder = data_home() / "numba"
    os.environ["NUMBA_CACHE_DIR"] = str(folder)  # read when numba is first imported
    return folder


def project(vectors: np.ndarray, method: str = "umap", metric: str = "cosine", seed: int = 0) -> np.ndarray:
    """(n, 2) float64 coordinates of the rows of ``vectors``."""
    if method not in METHODS:
        raise SimilarPatientsError(f"Unknown projection '{method}'; choose one of {', '.join(METHODS)}.")
    x = np.asarray(vectors, dtype=np.float64)
    if len(x) < 4:
        raise SimilarPatientsError(f"A map needs at least 4 lesions; this model has {len(x)}.")
    if metric == "cosine":
        x = unit_rows(x)
    if method == "pca":
        PCA = optional_import("sklearn.decomposition", "analysis").PCA
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        TSNE = optional_import("sklearn.manifold", "analysis").TSNE
        perplexity = float(min(30.0, (len(x) - 1) / 3))
        return TSNE(
            n_components=2, perplexity=perplexity, init="pca", metric="euclidean", random_state=seed
        ).fit_transform(x)
    import warnings

    cache_compilation()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")  # a seed makes UMAP single-threaded
        umap = optional_import("umap", "analysis")

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(x) - 1), metric="euclidean", random_state=seed)
        return np.asarray(reducer.fit_transform(x), dtype=np.float64)
