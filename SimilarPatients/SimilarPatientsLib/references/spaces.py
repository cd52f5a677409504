"""The statistics of a model's corrected space (see :mod:`..search.correction`), measured from the reference
itself: its mean, each row's norm once centred, and each patient's radius (its distance to its
``NEIGHBOURS``-th nearest other patient in the centred space).

They are measured when a reference is written (the mean in the pass that writes the vectors, the norms in
the pass that writes the table, the radii for cosine like the nearest-match distribution), and, for a
reference written before or another metric, on first use, then recorded in the version like every other file.
No label is used: the statistics are unsupervised, so measuring them on the whole reference leaks nothing
into an evaluation.
"""

from __future__ import annotations

import numpy as np

from ..progress import ProgressCallback, report
from ..search import approximate
from ..search.correction import NEIGHBOURS, Correction, floor_radii
from ..search.nearest import EmbeddingSpace, nearest_patients, nearest_patients_many
from . import schema

CENTRE = "centre.npy"
NORMS = "centred-norms.npy"


def radii_file(metric: str) -> str:
    return f"radii-{metric}.npy"


class MeanOfRows:
    """The running mean of rows handed over in blocks (float64 sums)."""

    def __init__(self):
        self.total = None
        self.count = 0

    def add(self, block: np.ndarray) -> None:
        sums = np.asarray(block, dtype=np.float64).sum(axis=0)
        self.total = sums if self.total is None else self.total + sums
        self.count += len(block)

    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)


def centre_of(matrix: np.ndarray, progress: ProgressCallback | None = None) -> np.ndarray:
    """The mean row of ``matrix``, read in blocks."""
    mean = MeanOfRows()
    for begin in range(0, len(matrix), schema.CHUNK_ROWS):
        mean.add(matrix[begin : begin + schema.CHUNK_ROWS])
        report(progress, min(len(matrix), begin + schema.CHUNK_ROWS), len(matrix), "measuring the reference mean")
    return mean.mean()


def centred_norms(matrix: np.ndarray, centre: np.ndarray, progress: ProgressCallback | None = None) -> np.ndarray:
    """Float64 norms of the rows of ``matrix`` minus ``centre``, read in blocks."""
    norms = np.empty(len(matrix))
    for begin in range(0, len(matrix), schema.CHUNK_ROWS):
        end = min(len(matrix), begin + schema.CHUNK_ROWS)
        norms[begin:end] = np.linalg.norm(np.asarray(matrix[begin:end], dtype=np.float64) - centre, axis=1)
        report(progress, end, len(matrix), "measuring the centred norms")
    return norms


def centred_space(space: EmbeddingSpace, centre: np.ndarray, norms: np.ndarray) -> EmbeddingSpace:
    """The centred space over the raw ``space``'s stored vectors (no local scaling yet)."""
    return EmbeddingSpace(space.vectors, norms, space.patient_codes, space.patient_ids, Correction(centre))


def with_radii(centred: EmbeddingSpace, radii: np.ndarray) -> EmbeddingSpace:
    """The corrected space: ``centred`` with local scaling by ``radii``."""
    correction = Correction(centred.correction.centre, radii, NEIGHBOURS)
    return EmbeddingSpace(centred.vectors, centred.norms, centred.patient_codes, centred.patient_ids, correction)


def patient_radii(
    centred: EmbeddingSpace, metric: str, progress: ProgressCallback | None = None
) -> tuple[np.ndarray, dict, approximate.ApproximateIndex | None]:
    """Every patient's radius in ``centred``, how it was measured, and, for a large reference, the graph
    over the centred vectors that measured it (the corrected space's index, once calibrated on it)."""
    patients = len(centred.patient_ids)
    k = min(NEIGHBOURS, patients - 1) + 1  # the patient itself comes first
    groups = [centred.vectors[centred.rows_of(code)] for code in range(patients)]
    message = "measuring each patient's neighbourhood radius"
    graph = None
    if len(centred.norms) < approximate.APPROXIMATE_FROM:
        answers = nearest_patients_many(centred, groups, k, metric, progress)
        how = {"patients": patients, "neighbours": NEIGHBOURS, "search": "exact"}
    else:
        graph = approximate.ApproximateIndex.graph(centred, metric, progress)
        answers = []
        for code, group in enumerate(groups):
            if code % 1000 == 0:
                report(progress, code, patients, message)
            answers.append(nearest_patients(centred, group, k, metric, None, graph.candidates))
        how = {"patients": patients, "neighbours": NEIGHBOURS, "search": "approximate"}
    report(progress, 1, 1, message)
    radii = np.ones(patients)
    for code, answer in enumerate(answers):
        others = [m.distance for m in answer if m.patient != centred.patient_ids[code]]
        if others:
            radii[code] = others[min(NEIGHBOURS, len(others)) - 1]
    return floor_radii(radii), how, graph
