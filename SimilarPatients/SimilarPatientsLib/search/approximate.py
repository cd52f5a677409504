"""The approximate index for large references: FAISS HNSW over 8-bit scalar-quantised vectors.

The graph only proposes candidates; :mod:`search` re-scores them in float64 from the reference's own
matrix, so quantisation costs no accuracy in the reported distances, only (measured) recall, and the
index needs a quarter of the memory of a float copy. Why FAISS: see docs/search.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..progress import ProgressCallback, report
from .distances import unit_rows
from .nearest import EmbeddingSpace

#: Above this many lesion rows of one model, "auto" search uses the approximate index (docs/benchmarks.md).
APPROXIMATE_FROM = 200_000
GRAPH_DEGREE = 32
BUILD_BREADTH = 80
MIN_SEARCH_BREADTH = 128
_TRAIN_ROWS = 100_000
_ADD_CHUNK = 50_000


def _faiss():
    import faiss  # imported on first use: it is heavy and only large references need it

    return faiss


def _prepared(vectors: np.ndarray, metric: str) -> np.ndarray:
    block = np.ascontiguousarray(vectors, dtype=np.float32)
    return unit_rows(block) if metric == "cosine" else block


class ApproximateIndex:
    """An HNSW graph over one model's vectors for one metric."""

    def __init__(self, index, metric: str):
        self.index = index
        self.metric = metric

    @classmethod
    def build(cls, space: EmbeddingSpace, metric: str, progress: ProgressCallback | None = None) -> ApproximateIndex:
        faiss = _faiss()
        kind = faiss.METRIC_L2 if metric == "euclidean" else faiss.METRIC_INNER_PRODUCT
        index = faiss.IndexHNSWSQ(space.dim, faiss.ScalarQuantizer.QT_8bit, GRAPH_DEGREE, kind)
        index.hnsw.efConstruction = BUILD_BREADTH
        n = space.vectors.shape[0]
        sample = np.random.default_rng(0).choice(n, size=min(n, _TRAIN_ROWS), replace=False)
        index.train(_prepared(space.vectors[np.sort(sample)], metric))
        for start in range(0, n, _ADD_CHUNK):
            report(progress, start, n, "building the approximate index")
            index.add(_prepared(space.vectors[start : start + _ADD_CHUNK], metric))
        report(progress, n, n, "building the approximate index")
        return cls(index, metric)

    @classmethod
    def load(cls, path: Path, metric: str) -> ApproximateIndex:
        return cls(_faiss().read_index(str(path)), metric)

    def save(self, path: Path) -> None:
        """Write atomically: a crash leaves no half index behind."""
        part = Path(str(path) + ".part")
        _faiss().write_index(self.index, str(part))
        os.replace(part, path)

    def candidates(self, queries32: np.ndarray, m: int, allowed: np.ndarray | None) -> np.ndarray:
        """Up to ``m`` proposed rows per query (``allowed`` restricts them), merged."""
        faiss = _faiss()
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(MIN_SEARCH_BREADTH, m)
        if allowed is not None:
            bits = np.packbits(allowed.astype(np.uint8), bitorder="little")
            params.sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))  # reads ``bits``
        _, rows = self.index.search(_prepared(queries32, self.metric), min(m, self.index.ntotal), params=params)
        return rows.reshape(-1)
