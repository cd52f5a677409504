"""The statistics of a model's corrected space (see :mod:`..search.correction`), measured from the reference
itself: its mean and per-dimension standard deviation, each row's norm once z-scored, and each patient's
radius (its distance to its ``NEIGHBOURS``-th nearest other patient in the z-scored space).

They are measured when a reference is written (mean and deviation in the pass that writes the table, in the
stored order so that the bytes do not depend on the source's; the norms in one more pass; the radii for
cosine like the nearest-match distribution), and, for a
reference written before or another metric, on first use, then recorded in the version like every other file.
No label is used: the statistics are unsupervised, so measuring them on the whole reference leaks nothing
into an evaluation.
"""

from __future__ import annotations

import numpy as np

from ..progress import ProgressCallback, report
from ..search import approximate
from ..search.correction import NEIGHBOURS, Correction, floor_radii, scale_of
from ..search.nearest import EmbeddingSpace, nearest_patients, nearest_patients_many, rank_exactly
from . import schema

CENTRE = "centre.npy"
SCALE = "scale.npy"
NORMS = "corrected-norms.npy"


#: From this many rows the radii are measured with a graph over the z-scored vectors: exactly, every patient
#: against every row is quadratic (20,000 rows took 200 s on the 2-core build machine; docs/benchmarks.md).
RADII_APPROXIMATE_FROM = 10_000
#: Patients whose lesions one graph call proposes neighbours for.
RADII_BLOCK = 4096


def radii_file(metric: str) -> str:
    return f"radii-{metric}.npy"


class Moments:
    """The running mean and standard deviation of rows handed over in blocks (float64 sums)."""

    def __init__(self):
        self.total = None
        self.squares = None
        self.count = 0

    def add(self, block: np.ndarray) -> None:
        wide = np.asarray(block, dtype=np.float64)
        sums, squares = wide.sum(axis=0), (wide * wide).sum(axis=0)
        self.total = sums if self.total is None else self.total + sums
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += len(block)

    def correction(self) -> Correction:
        """The z-scoring these rows define (no local scaling yet)."""
        mean = self.total / max(self.count, 1)
        return Correction(mean, scale_of(self.squares / max(self.count, 1) - mean * mean))


def moments_of(matrix: np.ndarray, progress: ProgressCallback | None = None) -> Correction:
    """The z-scoring of ``matrix``'s rows, read in blocks."""
    moments = Moments()
    for begin in range(0, len(matrix), schema.CHUNK_ROWS):
        moments.add(matrix[begin : begin + schema.CHUNK_ROWS])
        report(progress, min(len(matrix), begin + schema.CHUNK_ROWS), len(matrix), "measuring the reference mean")
    return moments.correction()


def corrected_norms(matrix: np.ndarray, correction: Correction, progress: ProgressCallback | None = None):
    """Float64 norms of the rows of ``matrix`` z-scored, read in blocks."""
    norms = np.empty(len(matrix))
    for begin in range(0, len(matrix), schema.CHUNK_ROWS):
        end = min(len(matrix), begin + schema.CHUNK_ROWS)
        norms[begin:end] = np.linalg.norm(correction.transformed(matrix[begin:end]), axis=1)
        report(progress, end, len(matrix), "measuring the z-scored norms")
    return norms


def unscaled_space(space: EmbeddingSpace, correction: Correction, norms: np.ndarray) -> EmbeddingSpace:
    """The z-scored space over the raw ``space``'s stored vectors (no local scaling yet)."""
    shift = float(np.linalg.norm(correction.centre))  # the float32 stage subtracts μ·w too
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = np.where(norms > 0, (space.norms + shift) / norms, 1.0)
    ratio = float(ratios.max()) if len(ratios) else 1.0
    plain = Correction(correction.centre, correction.scale, None, NEIGHBOURS, ratio)
    return EmbeddingSpace(space.vectors, norms, space.patient_codes, space.patient_ids, plain)


def with_radii(unscaled: EmbeddingSpace, radii: np.ndarray) -> EmbeddingSpace:
    """The corrected space: ``unscaled`` with local scaling by ``radii``."""
    given = unscaled.correction
    correction = Correction(given.centre, given.scale, radii, NEIGHBOURS, given.norm_ratio)
    return EmbeddingSpace(unscaled.vectors, unscaled.norms, unscaled.patient_codes, unscaled.patient_ids, correction)


def patient_radii(
    unscaled: EmbeddingSpace, metric: str, progress: ProgressCallback | None = None
) -> tuple[np.ndarray, dict, approximate.ApproximateIndex | None]:
    """Every patient's radius in ``unscaled`` (z-scored), how it was measured, and, for a large reference,
    the graph over the z-scored vectors that measured it (whose links the corrected space's index reuses)."""
    patients = len(unscaled.patient_ids)
    k = min(NEIGHBOURS, patients - 1) + 1  # the patient itself comes first
    groups = [unscaled.vectors[unscaled.rows_of(code)] for code in range(patients)]
    message = "measuring each patient's neighbourhood radius"
    graph = None
    if len(unscaled.norms) < RADII_APPROXIMATE_FROM:
        answers = nearest_patients_many(unscaled, groups, k, metric, progress)
        how = {"patients": patients, "neighbours": NEIGHBOURS, "search": "exact"}
    else:  # the graph proposes each lesion's neighbours, a block of patients per call; exact re-ranking
        graph = approximate.ApproximateIndex.graph(unscaled, metric, progress)
        answers = []
        for first in range(0, patients, RADII_BLOCK):
            codes = range(first, min(patients, first + RADII_BLOCK))
            rows = [unscaled.rows_of(code) for code in codes]
            proposed = graph.proposals(np.asarray(unscaled.vectors[np.concatenate(rows)]), max(4 * k, 40))
            start = 0
            for code, own in zip(codes, rows):
                found = np.unique(proposed[start : start + len(own)])
                found = found[found >= 0]
                start += len(own)
                group = np.asarray(groups[code], dtype=np.float64)
                if len(np.unique(unscaled.patient_codes[found])) >= k:
                    answers.append(rank_exactly(unscaled, found, group, k, metric))
                else:  # too few patients proposed: ask again, as a search does
                    answers.append(nearest_patients(unscaled, group, k, metric, None, graph.candidates))
            report(progress, codes[-1] + 1, patients, message)
        how = {"patients": patients, "neighbours": NEIGHBOURS, "search": "approximate"}
    report(progress, 1, 1, message)
    radii = np.ones(patients)
    for code, answer in enumerate(answers):
        others = [m.distance for m in answer if m.patient != unscaled.patient_ids[code]]
        if others:
            radii[code] = others[min(NEIGHBOURS, len(others)) - 1]
    return floor_radii(radii), how, graph
