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

In the corrected space the graph holds each row augmented with its patient's local-scaling radius
(:func:`~.correction.local_scaling_rows`) and is searched by inner product, so it proposes candidates in
the corrected order itself: a graph over the z-scored rows alone proposed them by z-scored distance, and
missed wide-radius patients whatever its effort (recall 0.987 at 1M rows, docs/benchmarks.md). The
sidecar names the index's ``geometry``; one built before (a z-scored graph, no geometry named) is never
searched as a corrected index: :meth:`ApproximateIndex.load` refuses it and the reference rebuilds it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import SimilarPatientsError
from ..progress import ProgressCallback, report
from ..util.atomic import replacing
from ..util.digests import HashingWriter
from .correction import Correction, local_scaling_queries, local_scaling_rows
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


#: What the graph holds: the stored (or z-scored) vectors, or in a corrected space with local scaling those
#: vectors augmented with their patient's radius (an inner-product graph in the corrected order).
PLAIN = "plain"
LOCAL_SCALING = "local-scaling-inner-product"


def _prepared(
    vectors: np.ndarray, metric: str, correction: Correction | None = None, radii: np.ndarray | None = None
) -> np.ndarray:
    """Rows (or, without ``radii``, queries) as the graph holds them: z-scored in a corrected space, unit
    length for cosine; with local scaling (a ``correction`` with radii) augmented for the inner product."""
    if correction is not None:
        vectors = correction.transformed(vectors)
    if metric == "cosine":
        vectors = unit_rows(np.asarray(vectors, dtype=np.float64 if correction is not None else np.float32))
    if correction is not None and correction.radii is not None:
        dim = vectors.shape[1]
        vectors = (
            local_scaling_rows(vectors, radii, metric) if radii is not None else local_scaling_queries(vectors, metric)
        )
        padded = np.zeros((len(vectors), _graph_dim(dim, metric, True)), dtype=np.float32)
        padded[:, : vectors.shape[1]] = vectors
        return padded
    return np.ascontiguousarray(vectors, dtype=np.float32)


@dataclass(frozen=True)
class Calibration:
    """What the self-check measured: patient recall@``k`` of the approximate path against exact search,
    over ``queries`` of the reference's own lesions, at search effort ``breadth``."""

    recall: float
    k: int
    queries: int
    breadth: int
    target: float
    #: what the graph holds (``PLAIN``, ``LOCAL_SCALING``); a sidecar written before it was named is PLAIN
    geometry: str = PLAIN

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
    (``correction``: the reference's statistics) the graph holds the z-scored vectors, augmented with the
    patients' radii where the space is locally scaled: it then proposes candidates by inner product in the
    corrected order, and the exact stage ranks them by the locally scaled distance."""

    def __init__(
        self, index, metric: str, calibration: Calibration | None = None, correction: Correction | None = None
    ):
        self.index = index
        self.metric = metric
        self.calibration = calibration
        self.correction = correction
        self.geometry = LOCAL_SCALING if correction is not None and correction.radii is not None else PLAIN
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
    def graph(
        cls,
        space: EmbeddingSpace,
        metric: str,
        progress: ProgressCallback | None = None,
        links: ApproximateIndex | None = None,
    ) -> ApproximateIndex:
        """The graph over ``space``'s vectors, not yet checked (what building the index alone costs). With
        local scaling, the links are those of a graph over the z-scored vectors (``links``, where one was
        built to measure the radii, else built now) and the rows it scores are the augmented ones: a graph
        linked by its own inner product would link every row to the tightest patients (the largest
        augmented rows) and strand the wide ones."""
        faiss = _faiss()
        if not space.scaled:
            kind = faiss.METRIC_L2 if metric == "euclidean" else faiss.METRIC_INNER_PRODUCT
            index = faiss.IndexHNSWSQ(space.dim, faiss.ScalarQuantizer.QT_8bit, GRAPH_DEGREE, kind)
            index.hnsw.efConstruction = BUILD_BREADTH
            _fill(index, space, metric, progress)
            return cls(index, metric, correction=space.correction)
        if links is None:
            links = cls.graph(space.unscaled(), metric, progress)
        dim = _graph_dim(space.dim, metric, True)
        index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, GRAPH_DEGREE, faiss.METRIC_INNER_PRODUCT)
        _fill(index.storage, space, metric, progress)  # the rows alone: no links are made from them
        index.hnsw = links.index.hnsw  # a copy of the z-scored graph's links and levels
        index.hnsw.is_similarity = True  # searched by inner product, whatever the links were made with
        index.ntotal, index.is_trained = index.storage.ntotal, True
        return cls(index, metric, correction=space.correction)

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
            self.calibration = Calibration(recall, k, len(rows), breadth, target, self.geometry)
            log.info("approximate %s index: recall@%d %.4f at effort %d", self.metric, k, recall, breadth)
            if recall >= target:
                break
        report(progress, len(rows), len(rows), "checking the approximate index against exact search")
        if not self.calibration.reached:
            log.warning("approximate index below target: %s; exact search will be used", self.calibration.describe())
        return self.calibration

    @classmethod
    def load(cls, path: Path, metric: str, correction: Correction | None = None) -> ApproximateIndex:
        """The index saved at ``path``; ``correction``: the statistics it was built with (corrected space).
        An index of another geometry than the space's (a corrected index built before the graph held the
        radii) is refused with :class:`StaleIndex`, never searched."""
        sidecar = calibration_path(path)
        calibration = Calibration(**json.loads(sidecar.read_text(encoding="utf-8"))) if sidecar.is_file() else None
        loaded = cls(None, metric, calibration, correction)
        held = calibration.geometry if calibration is not None else PLAIN
        if held != loaded.geometry:
            raise StaleIndex(f"{path.name} holds a graph of geometry '{held}', not '{loaded.geometry}'")
        loaded.index = _faiss().read_index(str(path))
        expected = _graph_dim(
            len(correction.centre) if correction is not None else loaded.index.d,
            metric,
            loaded.geometry == LOCAL_SCALING,
        )
        if loaded.index.d != expected:
            raise StaleIndex(f"{path.name} holds vectors of {loaded.index.d} values, not {expected}")
        return loaded

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
        return self.proposals(queries32, m, allowed).reshape(-1)

    def proposals(self, queries32: np.ndarray, m: int, allowed: RowMask | None = None) -> np.ndarray:
        """Up to ``m`` proposed rows for each query, (q, m), -1 where the graph has fewer: many queries in
        one call, which FAISS answers on all cores."""
        faiss = _faiss()
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.breadth, m)
        if allowed is not None:  # the bitmap is packed once per filter (RowMask), not per query
            params.sel = faiss.IDSelectorBitmap(len(allowed.mask), faiss.swig_ptr(allowed.bits))
        prepared = _prepared(queries32, self.metric, self.correction)
        _, rows = self.index.search(prepared, min(m, self.index.ntotal), params=params)
        return rows


def _fill(index, space: EmbeddingSpace, metric: str, progress: ProgressCallback | None) -> None:
    """Train ``index`` on a seeded sample of ``space``'s rows, then add them all, prepared as the graph
    holds them."""
    n = space.vectors.shape[0]
    radii = space.row_radii if space.scaled else None

    def rows(at) -> np.ndarray:
        return _prepared(space.vectors[at], metric, space.correction, radii[at] if radii is not None else None)

    sample = np.sort(np.random.default_rng(0).choice(n, size=min(n, _TRAIN_ROWS), replace=False))
    index.train(rows(sample))
    for start in range(0, n, _ADD_CHUNK):
        report(progress, start, n, "building the approximate index")
        index.add(rows(slice(start, min(n, start + _ADD_CHUNK))))
    report(progress, n, n, "building the approximate index")


class StaleIndex(SimilarPatientsError):
    """An index file whose geometry is not the one its space searches with (written by an older version)."""


def _graph_dim(dim: int, metric: str, scaled: bool) -> int:
    """How many values a graph row holds: the vector's; with local scaling, plus the radius terms and zeros
    up to a multiple of 8 (FAISS scores 8-bit codes with SIMD only for such lengths: 513 values searched
    14 times slower than 520)."""
    return -(-(dim + (1 if metric == "cosine" else 2)) // 8) * 8 if scaled else dim


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
