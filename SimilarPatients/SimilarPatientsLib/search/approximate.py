"""The approximate index for large references: FAISS HNSW over 8-bit scalar-quantised vectors, which
proves its recall on the data it serves.

The graph only proposes candidates; :mod:`.nearest` re-scores them in float64 from the reference's own
matrix, so quantisation costs no accuracy in the reported distances, only recall, and the index needs a
quarter of the memory of a float copy. How much recall depends on the data: clustered embeddings reach
0.997 at the default effort, unstructured vectors of the same size 0.31. So every index is checked when it
is built: a sample of the reference's own lesions is searched both ways, the search effort is raised until
recall@k reaches the target, and if no effort does, the index says so and ``auto`` search scans exactly.
The measured recall is stored beside the index and reported with every approximate result.
Why FAISS: see docs/search.md.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..progress import ProgressCallback, report
from ..util.atomic import replacing
from ..util.digests import HashingWriter
from .correction import Correction
from .distances import unit_rows
from .nearest import EmbeddingSpace, RowMask, nearest_patients, nearest_patients_many

#: Above this many lesion rows of one model, "auto" search uses the approximate index (docs/benchmarks.md).
APPROXIMATE_FROM = 200_000
GRAPH_DEGREE = 32
BUILD_BREADTH = 80
#: Search efforts tried in turn until the measured recall reaches the target.
SEARCH_BREADTHS = (128, 256, 512, 1024, 2048)
TARGET_RECALL = 0.99
CHECK_QUERIES = 300
CHECK_K = 10
_TRAIN_ROWS = 100_000
_ADD_CHUNK = 50_000
log = logging.getLogger(__name__)


def _faiss():
    import faiss  # imported on first use: it is heavy and only large references need it

    return faiss


def _prepared(vectors: np.ndarray, metric: str, correction: Correction | None = None) -> np.ndarray:
    """Rows as the graph holds them: z-scored in a corrected space, unit length for cosine."""
    if correction is not None:
        vectors = correction.transformed(vectors)
    block = np.ascontiguousarray(vectors, dtype=np.float32)
    return unit_rows(block) if metric == "cosine" else block


@dataclass(frozen=True)
class Calibration:
    """What the self-check measured: patient recall@``k`` of the approximate path against exact search,
    over ``queries`` of the reference's own lesions, at search effort ``breadth``."""

    recall: float
    k: int
    queries: int
    breadth: int
    target: float

    @property
    def reached(self) -> bool:
        """False: no effort reached the target, so ``auto`` search scans exactly instead."""
        return self.recall >= self.target

    def describe(self) -> str:
        return (
            f"index recall@{self.k} {self.recall:.3f}, measured on {self.queries} of the reference's own lesions "
            f"(effort {self.breadth}; target {self.target:.2f})"
        )


class ApproximateIndex:
    """An HNSW graph over one model's vectors for one metric, with its measured recall. In a corrected space
    the graph holds the z-scored vectors (``correction``: the reference's statistics) and proposes
    candidates by z-scored distance; the exact stage ranks them by the locally scaled one, and the
    calibration measures the recall of that ranking."""

    def __init__(
        self, index, metric: str, calibration: Calibration | None = None, correction: Correction | None = None
    ):
        self.index = index
        self.metric = metric
        self.calibration = calibration
        self.correction = correction
        #: the search effort (HNSW efSearch) every query uses: the one the calibration settled on
        self.breadth = calibration.breadth if calibration else SEARCH_BREADTHS[0]

    @classmethod
    def build(
        cls,
        space: EmbeddingSpace,
        metric: str,
        progress: ProgressCallback | None = None,
        target: float = TARGET_RECALL,
    ) -> ApproximateIndex:
        """Build the graph, then measure and tune it on ``space`` (see :meth:`calibrate`)."""
        built = cls.graph(space, metric, progress)
        built.calibrate(space, target, progress)
        return built

    @classmethod
    def graph(cls, space: EmbeddingSpace, metric: str, progress: ProgressCallback | None = None) -> ApproximateIndex:
        """The graph over ``space``'s vectors, not yet checked (what building the index alone costs)."""
        faiss = _faiss()
        kind = faiss.METRIC_L2 if metric == "euclidean" else faiss.METRIC_INNER_PRODUCT
        correction = space.correction
        index = faiss.IndexHNSWSQ(space.dim, faiss.ScalarQuantizer.QT_8bit, GRAPH_DEGREE, kind)
        index.hnsw.efConstruction = BUILD_BREADTH
        n = space.vectors.shape[0]
        sample = np.random.default_rng(0).choice(n, size=min(n, _TRAIN_ROWS), replace=False)
        index.train(_prepared(space.vectors[np.sort(sample)], metric, correction))
        for start in range(0, n, _ADD_CHUNK):
            report(progress, start, n, "building the approximate index")
            index.add(_prepared(space.vectors[start : start + _ADD_CHUNK], metric, correction))
        report(progress, n, n, "building the approximate index")
        return cls(index, metric, correction=correction)

    def calibrate(
        self, space: EmbeddingSpace, target: float = TARGET_RECALL, progress: ProgressCallback | None = None
    ) -> Calibration:
        """Measure patient recall@k on a seeded sample of the reference's own lesions (each query's own
        patient left out of both answers), raising the search effort until ``target`` is reached."""
        n = len(space.norms)
        rows = np.sort(np.random.default_rng(1).choice(n, size=min(n, CHECK_QUERIES), replace=False))
        k = min(CHECK_K, max(len(space.patient_ids) - 1, 1))
        report(progress, 0, 1, "checking the approximate index against exact search")
        radii = np.ones(len(rows))  # a query's own radius sets its distances, not its order
        queries = [space.vectors[row] for row in rows]
        truths = nearest_patients_many(space, queries, k + 1, self.metric, progress, radii if space.scaled else None)
        exact = [_others(truth, space, row, k) for truth, row in zip(truths, rows)]
        for breadth in SEARCH_BREADTHS:
            self.breadth = breadth
            found = [
                _others(
                    nearest_patients(space, space.vectors[row], k + 1, self.metric, None, self.candidates, None, 1.0),
                    space,
                    row,
                    k,
                )
                for row in rows
            ]
            recall = float(np.mean([len(a & e) / max(len(e), 1) for a, e in zip(found, exact)]))
            self.calibration = Calibration(recall, k, len(rows), breadth, target)
            log.info("approximate %s index: recall@%d %.4f at effort %d", self.metric, k, recall, breadth)
            if recall >= target:
                break
        report(progress, len(rows), len(rows), "checking the approximate index against exact search")
        if not self.calibration.reached:
            log.warning("approximate index below target: %s; exact search will be used", self.calibration.describe())
        return self.calibration

    @classmethod
    def load(cls, path: Path, metric: str, correction: Correction | None = None) -> ApproximateIndex:
        """The index saved at ``path``; ``correction``: the statistics it was built with (corrected space)."""
        sidecar = calibration_path(path)
        calibration = Calibration(**json.loads(sidecar.read_text(encoding="utf-8"))) if sidecar.is_file() else None
        return cls(_faiss().read_index(str(path)), metric, calibration, correction)

    def save(self, path: Path) -> dict:
        """Write the index and its calibration atomically under names of their own (a crash, or another
        process saving the same index, leaves no half file behind), each digested as it is written: returns
        each file's name and :class:`~..util.digests.FileRecord`."""
        faiss = _faiss()
        path = Path(path)
        records = {}
        with replacing(path) as temporary, HashingWriter(temporary) as out:
            faiss.write_index(self.index, faiss.PyCallbackIOWriter(out.write))
        records[path.name] = out.record()
        if self.calibration is not None:
            sidecar = calibration_path(path)
            with replacing(sidecar) as temporary, HashingWriter(temporary) as out:
                out.write(json.dumps(asdict(self.calibration)).encode("utf-8"))
            records[sidecar.name] = out.record()
        return records

    def candidates(self, queries32: np.ndarray, m: int, allowed: RowMask | None) -> np.ndarray:
        """Up to ``m`` proposed rows per query (``allowed`` restricts them), merged."""
        faiss = _faiss()
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.breadth, m)
        if allowed is not None:  # the bitmap is packed once per filter (RowMask), not per query
            params.sel = faiss.IDSelectorBitmap(len(allowed.mask), faiss.swig_ptr(allowed.bits))
        prepared = _prepared(queries32, self.metric, self.correction)
        _, rows = self.index.search(prepared, min(m, self.index.ntotal), params=params)
        return rows.reshape(-1)


def file_name(metric: str, space: str = "raw") -> str:
    """The index's file in a model's folder (one per metric and space)."""
    return f"hnsw-{metric}.faiss" if space == "raw" else f"hnsw-{space}-{metric}.faiss"


def calibration_path(path: Path) -> Path:
    """Where the calibration of the index at ``path`` is kept."""
    return Path(path).with_suffix(".json")


def _others(matches: list, space: EmbeddingSpace, row: int, k: int) -> set:
    """The first ``k`` patients of ``matches`` other than the query lesion's own."""
    own = space.patient_ids[space.patient_codes[row]]
    return set([m.patient for m in matches if m.patient != own][:k])
