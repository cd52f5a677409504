"""k-nearest patients in one model's embedding space: candidates in float32, answers in float64.

A scan (or the approximate index) ranks lesions in float32; every lesion that could belong to the k
nearest patients, given a bound on float32 rounding, is then re-scored in float64. Reported distances are
therefore float64 distances, and the order is decided in float64 with ties broken by PatientID.
A patient's distance is that of their nearest pair of (query lesion, reference lesion).

A space may carry a :class:`~.correction.Correction` (the corrected space): the scan then scores z-scored
vectors through the stored matrix (``v·w − μ·w``) and multiplies each row's score by its patient's local-scaling
factor, with the rounding bound widened to match; the float64 stage ranks by the corrected distance, from
the same products and the stored z-scored norms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Optional

import numpy as np

from ..errors import SimilarPatientsError
from ..progress import ProgressCallback, report
from .correction import Correction, corrected_distances, radius_of
from .distances import check_metric, pairwise_distances

_EPS32 = float(np.finfo(np.float32).eps)
#: Rows a scan scores at a time: its memory stays bounded, and a large scan reports its progress.
SCAN_ROWS = 1 << 18
#: Scores held at a time when many queries are scored together (rows per block × queries).
_BATCH_CELLS = 1 << 23


@dataclass
class EmbeddingSpace:
    """One model's lesion vectors (rows may be a read-only memory map) and their patients; with a
    ``correction``, the corrected space over the same stored vectors."""

    vectors: np.ndarray  # (n, D) float32
    norms: np.ndarray  # (n,) float64 L2 norms of the rows (of the z-scored rows, with a correction)
    patient_codes: np.ndarray  # (n,) int, index into ``patient_ids``
    patient_ids: np.ndarray  # (p,) str, sorted
    correction: Correction | None = None

    lesion_counts: np.ndarray = field(init=False)  # (p,) lesions per patient

    def __post_init__(self):
        self.lesion_counts = np.bincount(self.patient_codes, minlength=len(self.patient_ids))

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @cached_property
    def _rows_by_patient(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows grouped by patient code (stable, so in table order) and where each patient's group starts."""
        starts = np.concatenate([[0], np.cumsum(self.lesion_counts)])
        return np.argsort(self.patient_codes, kind="stable"), starts

    @property
    def scaled(self) -> bool:
        """Whether distances are divided by the patients' radii (local scaling)."""
        return self.correction is not None and self.correction.radii is not None

    def unscaled(self) -> EmbeddingSpace:
        """The same space without local scaling (where radii are measured)."""
        if not self.scaled:
            return self
        plain = EmbeddingSpace(self.vectors, self.norms, self.patient_codes, self.patient_ids)
        plain.correction = self.correction.without_radii()
        return plain

    @cached_property
    def row_radii(self) -> np.ndarray:
        """Each row's patient's radius (float64), with local scaling."""
        return self.correction.radii[self.patient_codes]

    def row_factors(self, metric: str) -> np.ndarray:
        """What each row's float32 score is multiplied by under local scaling: ``1/sqrt(r)`` for a cosine
        distance, ``1/r`` for a squared euclidean one (the scan scores squares)."""
        key = f"_factors_{metric}"
        if key not in self.__dict__:
            radii = self.row_radii
            factors = 1.0 / radii if metric == "euclidean" else 1.0 / np.sqrt(radii)
            self.__dict__[key] = factors.astype(np.float32)
        return self.__dict__[key]

    def patient_code(self, patient: str) -> int | None:
        """The code of ``patient`` (``patient_ids`` is sorted), or None when the space has no such patient."""
        at = int(np.searchsorted(self.patient_ids, patient))
        return at if at < len(self.patient_ids) and self.patient_ids[at] == patient else None

    def rows_of(self, code: int) -> np.ndarray:
        """The rows of one patient, in table order: found by position, not by comparing every row."""
        order, starts = self._rows_by_patient
        return order[starts[code] : starts[code + 1]]


class RowMask:
    """The rows a filter lets through, with what every query derives from them (row numbers, count, the
    bitmap an approximate index reads), computed once: a reference keeps one per filter, so a query's
    cost does not grow with the reference."""

    def __init__(self, mask: np.ndarray):
        self.mask = np.asarray(mask, dtype=bool)

    @cached_property
    def rows(self) -> np.ndarray:
        return np.flatnonzero(self.mask)

    @cached_property
    def count(self) -> int:
        return len(self.rows)

    @cached_property
    def bits(self) -> np.ndarray:
        """The mask packed little-endian, 8 rows a byte (FAISS's ``IDSelectorBitmap`` layout)."""
        return np.packbits(self.mask.astype(np.uint8), bitorder="little")


@dataclass
class LesionMatch:
    """The nearest lesion pair of one hit patient."""

    patient: str
    distance: float
    row: int  # reference lesion row in the space
    query_row: int  # which query vector matched


#: ``candidates(queries32, m, allowed) -> rows``: the approximate index's m nearest rows per query, merged.
CandidateSource = Callable[[np.ndarray, int, Optional[RowMask]], np.ndarray]


def check_queries(dim: int, queries: np.ndarray, metric: str) -> np.ndarray:
    """Queries as a float64 (q, ``dim``) array, or a clear error."""
    check_metric(metric)
    queries = np.asarray(queries, dtype=np.float64)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2 or queries.shape[0] == 0:
        raise SimilarPatientsError("The query must be one embedding or a (lesions × length) array of them.")
    if queries.shape[1] != dim:
        raise SimilarPatientsError(
            f"The query embedding has {queries.shape[1]} values but this model's reference embeddings have "
            f"{dim}: it was made by another model, or another version of it."
        )
    if not np.isfinite(queries).all():
        raise SimilarPatientsError("The query embedding holds NaN or infinite values.")
    if metric == "cosine" and (np.linalg.norm(queries, axis=1) == 0).any():
        raise SimilarPatientsError("A query embedding is all zeros: its cosine distance to anything is undefined.")
    return queries


def exact_distances(space: EmbeddingSpace, rows: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """Float64 distances (len(rows), q) between reference ``rows`` and float64 ``queries`` (z-scored, in a
    corrected space, from the stored rows and z-scored norms as the scan scores them; not yet locally
    scaled)."""
    vectors = np.asarray(space.vectors[rows], dtype=np.float64)
    if space.correction is not None:
        return corrected_distances(space.correction, vectors, space.norms[rows], queries, metric)
    return pairwise_distances(vectors, queries, metric)


@dataclass
class _Queries:
    """Queries as the float32 stage scores them: ``vectors @ weights.T - offsets`` are the products (of
    z-scored rows and z-scored queries, in a corrected space), ``norms`` the queries' norms there."""

    weights: np.ndarray  # (q, D) float32
    offsets: np.ndarray | None  # (q,) float32, or None
    norms: np.ndarray  # (q,) float64
    #: (q,) how much float32 rounding of ``v·w − μ·w`` grows against ``|T(v)| |T(q)|``: the reference's
    #: largest ``(|v| + |μ|) / |T(v)|`` times the query's ``|w| / |T(q)|`` (1 in the raw space)
    amplification: np.ndarray

    def part(self, begin: int, end: int) -> _Queries:
        """Queries ``begin:end`` (one group's)."""
        offsets = None if self.offsets is None else self.offsets[begin:end]
        return _Queries(self.weights[begin:end], offsets, self.norms[begin:end], self.amplification[begin:end])


def _prepare(space: EmbeddingSpace, queries: np.ndarray) -> _Queries:
    if space.correction is None:
        return _Queries(queries.astype(np.float32), None, np.linalg.norm(queries, axis=1), np.ones(len(queries)))
    transformed = space.correction.transformed(queries)
    weights = transformed / space.correction.scale
    offsets = (weights @ space.correction.centre).astype(np.float32)
    norms = np.linalg.norm(transformed, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        amplification = space.correction.norm_ratio * np.linalg.norm(weights, axis=1) / norms
    amplification = np.where(np.isfinite(amplification), amplification, 1.0)
    return _Queries(weights.astype(np.float32), offsets, norms, amplification)


def _scores(vectors: np.ndarray, norms: np.ndarray, queries: _Queries, metric: str) -> np.ndarray:
    """Float32 scores (len(vectors), q), monotone in distance, of ``vectors`` to each query."""
    products = vectors @ queries.weights.T
    if queries.offsets is not None:
        products -= queries.offsets[None, :]
    query_norms = queries.norms
    if metric == "dot":
        return -products
    if metric == "cosine":  # a zero row, or a query at the reference mean (corrected), is at distance 1
        with np.errstate(invalid="ignore", divide="ignore"):
            inverse = np.where(norms > 0, 1.0 / norms, 0.0).astype(np.float32)
            query_inverse = np.where(query_norms > 0, 1.0 / query_norms, 0.0).astype(np.float32)
        return 1.0 - products * inverse[:, None] * query_inverse[None, :]
    scores = (norms * norms).astype(np.float32)[:, None] + (query_norms**2).astype(np.float32)[None, :]
    scores -= 2.0 * products
    return scores


def _bound(space: EmbeddingSpace, max_norm: float, queries: _Queries, metric: str) -> float:
    """How far float32 rounding can move a score of :func:`_scores` (a scaled score: this times the
    largest row factor)."""
    query_norms, amplification = queries.norms, float(queries.amplification.max())
    slack = 4.0 * space.dim * _EPS32 * amplification
    if metric == "dot":
        bound = slack * max_norm * float(query_norms.max())
    elif metric == "cosine":
        bound = 2.0 * slack
    else:
        bound = slack * (max_norm + float(query_norms.max())) ** 2
    return bound


def _scan_scores(
    space: EmbeddingSpace,
    queries: np.ndarray,
    metric: str,
    rows: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, float]:
    """Float32 scores (monotone in distance, not yet scaled) of all rows, or of ``rows``, to the nearest
    query, and the bound on their rounding error. A large matrix
    is read in blocks of ``SCAN_ROWS`` with a progress report after each (a memory-mapped matrix that is not
    in memory is then read from disk as it is scanned)."""
    prepared = _prepare(space, queries)
    norms = space.norms if rows is None else space.norms[rows]
    bound = _bound(space, float(norms.max()) if len(norms) else 0.0, prepared, metric)
    n = len(norms)
    best = np.empty(n, dtype=np.float32)
    for begin in range(0, n, SCAN_ROWS):
        end = min(n, begin + SCAN_ROWS)
        vectors = space.vectors[begin:end] if rows is None else space.vectors[rows[begin:end]]
        scores = _scores(vectors, norms[begin:end], prepared, metric)
        best[begin:end] = scores.min(axis=1) if scores.shape[1] > 1 else scores[:, 0]
        if n > SCAN_ROWS:
            report(progress, end, n, "scanning the reference")
    return best, bound


def nearest_patients(
    space: EmbeddingSpace,
    queries: np.ndarray,
    k: int,
    metric: str = "cosine",
    allowed: np.ndarray | RowMask | None = None,
    candidates: CandidateSource | None = None,
    progress: ProgressCallback | None = None,
    query_radius: float | None = None,
) -> list:
    """The ``k`` nearest patients as :class:`LesionMatch`, nearest first, ties by PatientID.

    ``allowed`` is a boolean row mask (filters, excluded patients), or a :class:`RowMask` kept between
    queries. ``candidates`` switches the float32 stage from a full scan to an approximate index.
    ``progress`` hears how far a scan of a large matrix is. With local scaling, ``query_radius`` is the
    query's own radius (a reference patient's is stored); None: measured in this search, over the whole
    reference (a second search where ``allowed`` restricts this one). It sets the distances reported, not
    the order.
    """
    if k < 1:
        raise SimilarPatientsError("k must be at least 1.")
    queries = check_queries(space.dim, queries, metric)
    if allowed is not None and not isinstance(allowed, RowMask):
        allowed = RowMask(allowed)
    allowed_rows = allowed.rows if allowed is not None else None
    if allowed_rows is not None and len(allowed_rows) == 0:
        return []
    if space.scaled and query_radius is None and allowed is not None:
        query_radius = own_radius(space, queries, metric, candidates, progress)
    radius_too = space.scaled and query_radius is None
    if candidates is None:
        rows = _scan_candidates(space, queries, k, metric, allowed_rows, progress, radius_too)
    else:
        neighbours = max(k, space.correction.neighbours) if radius_too else k
        rows = _index_candidates(space, queries, neighbours, allowed, candidates)
    return rank_exactly(space, rows, queries, k, metric, query_radius)


def own_radius(
    space: EmbeddingSpace,
    queries: np.ndarray,
    metric: str,
    candidates: CandidateSource | None = None,
    progress: ProgressCallback | None = None,
) -> float:
    """A query's radius in a space with local scaling: its distance to its ``neighbours``-th nearest
    patient in the z-scored space, over the whole reference (with an index, among the patients it
    proposes in the corrected order: at least the exact radius, and on most queries equal to it)."""
    plain = space.unscaled()
    matches = nearest_patients(plain, queries, space.correction.neighbours, metric, None, candidates, progress)
    return radius_of(np.array([m.distance for m in matches]), space.correction.neighbours)


def _kth_candidates(
    space: EmbeddingSpace, scores: np.ndarray, row_ids: np.ndarray, k: int, bound: float, masked: bool = True
):
    """Rows (positions in ``scores``) within ``bound`` of the k-th patient's best score (``masked``: some
    scores are infinite, rows a filter leaves out)."""
    n = int(np.isfinite(scores).sum()) if masked else len(scores)
    m = min(n, max(8 * k, 64))
    while True:
        top = np.argpartition(scores, m - 1)[:m] if m < len(scores) else np.arange(len(scores))
        top = top[np.isfinite(scores[top])]
        codes = space.patient_codes[row_ids[top]]
        if len(np.unique(codes)) >= k or m >= n:
            break
        m = min(n, m * 4)
    return np.flatnonzero(scores <= _kth_best(scores[top], codes, k) + bound)


def _kth_best(scores: np.ndarray, codes: np.ndarray, k: int) -> float:
    """The k-th smallest of each patient's best score (the largest there is, with fewer patients)."""
    order = np.argsort(scores, kind="stable")
    first = np.unique(codes[order], return_index=True)[1]
    return float(np.sort(scores[order][first])[:k][-1])


def _scan_candidates(
    space: EmbeddingSpace,
    queries: np.ndarray,
    k: int,
    metric: str,
    allowed_rows: np.ndarray | None,
    progress: ProgressCallback | None = None,
    radius_too: bool = False,
) -> np.ndarray:
    """Rows that can hold the k nearest patients: within the rounding bound of the k-th patient's score
    (with local scaling, of the scaled scores; ``radius_too``: and the rows that can hold the query's
    ``neighbours`` nearest patients in the z-scored space, from which its radius is measured)."""
    subset = allowed_rows is not None and len(allowed_rows) < 0.5 * len(space.norms)
    scores, bound = _scan_scores(space, queries, metric, allowed_rows if subset else None, progress)
    row_ids = allowed_rows if subset else np.arange(len(scores))
    masked = allowed_rows is not None and not subset
    if masked:
        mask = np.zeros(len(scores), dtype=bool)
        mask[allowed_rows] = True
        scores = np.where(mask, scores, np.inf)
    if not space.scaled:
        return row_ids[_kth_candidates(space, scores, row_ids, k, bound, masked)]
    factors = space.row_factors(metric)
    scaled = scores * (factors if not subset else factors[row_ids])
    if not radius_too:
        return row_ids[_kth_candidates(space, scaled, row_ids, k, bound * float(factors.max()), masked)]
    # the first max(k, neighbours) patients by scaled score are some of the query's patients, so the
    # neighbours-th of them, unscaled, is at least as far as the true neighbours-th nearest: every row of
    # the true ones scores below it (one comparison over the scores, not a second partition)
    neighbours = space.correction.neighbours
    found = _kth_candidates(space, scaled, row_ids, max(k, neighbours), bound * float(factors.max()), masked)
    farthest = _kth_best(scores[found], space.patient_codes[row_ids[found]], neighbours)
    return row_ids[np.union1d(found, np.flatnonzero(scores <= farthest + bound))]


def _index_candidates(
    space: EmbeddingSpace, queries: np.ndarray, k: int, allowed: RowMask | None, candidates: CandidateSource
) -> np.ndarray:
    """Ask the index for more neighbours until they span k patients (or the whole allowed set)."""
    q32 = np.ascontiguousarray(queries, dtype=np.float32)
    total = allowed.count if allowed is not None else len(space.norms)
    m = max(4 * k, 40)
    while True:
        rows = np.unique(candidates(q32, m, allowed))
        rows = rows[rows >= 0]
        if len(np.unique(space.patient_codes[rows])) >= k or m >= total:
            return rows
        m = min(total, m * 4)


def rank_exactly(
    space: EmbeddingSpace,
    rows: np.ndarray,
    queries: np.ndarray,
    k: int,
    metric: str,
    query_radius: float | None = None,
) -> list:
    distances = exact_distances(space, rows, queries, metric)
    best_query = distances.argmin(axis=1)
    best = distances[np.arange(len(rows)), best_query]
    codes = space.patient_codes[rows]
    # nearest lesion per patient: sort by (patient, distance, row) and keep each patient's first
    order = np.lexsort((rows, best, codes))
    first = np.ones(len(order), dtype=bool)
    first[1:] = codes[order][1:] != codes[order][:-1]
    keep = order[first]
    if space.scaled:  # local scaling: each patient's nearest pair over the two radii
        if query_radius is None:
            query_radius = radius_of(np.sort(best[keep]), space.correction.neighbours)
        best = best / np.sqrt(space.row_radii[rows] * query_radius)
    names = space.patient_ids[codes[keep]]
    ranked = keep[np.lexsort((names, best[keep]))][:k]
    return [
        LesionMatch(str(space.patient_ids[codes[i]]), float(best[i]), int(rows[i]), int(best_query[i])) for i in ranked
    ]


def nearest_patients_many(
    space: EmbeddingSpace,
    groups: list,
    k: int,
    metric: str = "cosine",
    progress: ProgressCallback | None = None,
    query_radii: Sequence[float] | None = None,
) -> list:
    """What :func:`nearest_patients` answers for each group of queries (one patient's lesions, or one lesion),
    from one pass over the matrix: the groups are scored together block by block, each keeps every row that
    scores below its ``8k``-th best so far, and the float64 ranking of those rows is the same. A reference's
    self-checks (its nearest-match distribution, its index's recall) ask a thousand such questions: reading
    the matrix once instead of a thousand times is what makes them take seconds instead of minutes.

    A group whose kept rows cannot prove its answer (too few patients among them, or its k-th patient
    within rounding of the last row kept) is answered by its own scan; so are all when the matrix is tiny.
    With local scaling, ``query_radii`` (one per group) are the groups' own radii; required there."""
    if k < 1:
        raise SimilarPatientsError("k must be at least 1.")
    if space.scaled and query_radii is None:
        raise ValueError("a space with local scaling needs the groups' own radii")
    radii = list(query_radii) if query_radii is not None else [None] * len(groups)
    checked = [check_queries(space.dim, group, metric) for group in groups]
    n = len(space.norms)
    m = max(8 * k, 64)
    if n < 4 * m or len(space.patient_ids) <= k:
        return [nearest_patients(space, q, k, metric, query_radius=r) for q, r in zip(checked, radii)]
    starts = np.concatenate([[0], np.cumsum([len(q) for q in checked])])
    queries = np.concatenate(checked)
    prepared = _prepare(space, queries)
    max_norm = float(space.norms.max())
    factors = space.row_factors(metric) if space.scaled else None
    widest = float(factors.max()) if factors is not None else 1.0
    spans = zip(starts[:-1], starts[1:])
    bounds = widest * np.array([_bound(space, max_norm, prepared.part(a, b), metric) for a, b in spans])
    kept = _BestRows(len(checked), m)
    block = max(4 * m, _BATCH_CELLS // len(queries))
    for begin in range(0, n, block):
        end = min(n, begin + block)
        scores = _scores(space.vectors[begin:end], space.norms[begin:end], prepared, metric)
        if len(checked) < len(queries):  # a group scores a row by its nearest query
            scores = np.minimum.reduceat(scores, starts[:-1], axis=1)
        if factors is not None:
            scores *= factors[begin:end, None]
        kept.add(begin, scores)
        report(progress, end, n, "scanning the reference once for all queries")
    answers = []
    for group, (rows, scores) in enumerate(kept.per_group()):
        order = np.argsort(scores, kind="stable")
        first = np.unique(space.patient_codes[rows[order]], return_index=True)[1]
        best = np.sort(scores[order][first])  # each patient's best score, ascending
        if len(best) < k or best[k - 1] + bounds[group] >= kept.threshold[group]:
            answers.append(nearest_patients(space, checked[group], k, metric, query_radius=radii[group]))
            continue
        chosen = np.sort(rows[scores <= best[k - 1] + bounds[group]])
        answers.append(rank_exactly(space, chosen, checked[group], k, metric, radii[group]))
    return answers


class _BestRows:
    """Per group, every row scoring below ``threshold`` (which only falls), holding about ``m`` rows each."""

    def __init__(self, groups: int, m: int):
        self.m = m
        self.threshold = np.full(groups, np.inf, dtype=np.float32)
        self._rows: list = []
        self._groups: list = []
        self._scores: list = []
        self._held = 0

    def add(self, first_row: int, scores: np.ndarray) -> None:
        """Take a block of scores (rows × groups) whose first row is ``first_row``."""
        if np.isinf(self.threshold).all():  # the first block sets each group's bar at its m-th best row
            self.threshold = np.partition(scores, self.m - 1, axis=0)[self.m - 1].astype(np.float32)
            rows, groups = np.nonzero(scores <= self.threshold[None, :])
        else:
            rows, groups = np.nonzero(scores < self.threshold[None, :])
        self._rows.append(rows + first_row)
        self._groups.append(groups)
        self._scores.append(scores[rows, groups])
        self._held += len(rows)
        if self._held > 4 * self.m * len(self.threshold):
            self._compact()

    def _compact(self) -> None:
        """Lower each group's bar to its m-th best row held and drop the rows above it."""
        rows, groups, scores = (np.concatenate(part) for part in (self._rows, self._groups, self._scores))
        order = np.lexsort((scores, groups))
        rows, groups, scores = rows[order], groups[order], scores[order]
        first = np.searchsorted(groups, np.arange(len(self.threshold)))
        rank = np.arange(len(groups)) - first[groups]
        at_m = rank == self.m - 1
        self.threshold[groups[at_m]] = scores[at_m]
        keep = scores <= self.threshold[groups]
        self._rows, self._groups, self._scores = [rows[keep]], [groups[keep]], [scores[keep]]
        self._held = int(keep.sum())

    def per_group(self):
        """(rows, scores) of each group, in group order."""
        self._compact()
        rows, groups, scores = self._rows[0], self._groups[0], self._scores[0]
        bounds = np.searchsorted(groups, np.arange(len(self.threshold) + 1))
        for a, b in zip(bounds, bounds[1:]):
            yield rows[a:b], scores[a:b]
