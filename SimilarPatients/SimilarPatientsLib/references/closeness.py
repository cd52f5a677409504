"""The distribution a reference's closeness reads: each (sampled) patient's distance to its nearest other
patient. A match's distance placed on it says how close the match is compared with how close the
reference's own patients are to each other ("closer than 97% of nearest matches in this reference").

In the corrected space the distances are locally scaled, each sampled patient's by its own stored radius,
as a new query's are by its own. It is measured when a reference is written (for the cosine metric; others
on first use), so no query waits for it: with the search that answers ``auto`` queries, so that a query's
distance and the distribution are measured alike. Below the approximate index's size, or where the index
missed its recall target, that is the exact search, all sampled patients in one pass over the matrix;
above it, the index, whose recall on the reference's own lesions is known and recorded with the distribution.
"""

from __future__ import annotations

import numpy as np

from ..errors import SimilarPatientsError
from ..progress import ProgressCallback, report
from ..search.approximate import ApproximateIndex
from ..search.correction import RAW
from ..search.nearest import EmbeddingSpace, nearest_patients, nearest_patients_many

#: Patients whose nearest-match distance makes the distribution (seeded sample when there are more).
SAMPLE = 1000


def file_name(metric: str, space: str = RAW) -> str:
    """The distribution's file in a model's folder (one per metric and space)."""
    return f"nearest-{metric}.npy" if space == RAW else f"nearest-{space}-{metric}.npy"


def nearest_match_distances(
    space: EmbeddingSpace,
    metric: str,
    index: ApproximateIndex | None = None,
    progress: ProgressCallback | None = None,
    name: str = "this reference",
) -> tuple[np.ndarray, dict]:
    """Sorted distances from (a sample of) the patients of ``space`` to their nearest other patient, and how
    they were measured (patients, search, the index's recall). ``index``: search with it (its calibration
    must have reached its target), else exactly."""
    patients = len(space.patient_ids)
    if patients < 2:
        raise SimilarPatientsError(f"{name} has one patient: there is no other to be near to.")
    sample = np.sort(np.random.default_rng(0).choice(patients, size=min(patients, SAMPLE), replace=False))
    groups = [space.vectors[space.rows_of(code)] for code in sample]
    radii = space.correction.radii[sample] if space.scaled else [None] * len(sample)
    message = "measuring this reference's nearest-match distances"
    if index is None:
        report(progress, 0, 1, message)
        answers = nearest_patients_many(space, groups, 2, metric, progress, radii if space.scaled else None)
        how = {"patients": len(sample), "search": "exact"}
    else:
        answers = []
        for i, group in enumerate(groups):
            if i % 50 == 0:
                report(progress, i, len(groups), message)
            answers.append(nearest_patients(space, group, 2, metric, None, index.candidates, None, radii[i]))
        how = {"patients": len(sample), "search": "approximate", "index_recall": index.calibration.recall}
    report(progress, 1, 1, message)
    nearest = np.array(
        [
            next(m.distance for m in answer if m.patient != space.patient_ids[code])
            for answer, code in zip(answers, sample)
        ]
    )
    nearest.sort()
    return nearest, how


def percent_farther(nearest: np.ndarray, distances) -> np.ndarray:
    """For each distance, the percentage of ``nearest`` (sorted) that is larger."""
    values = np.asarray(distances, dtype=np.float64)
    return 100.0 * (len(nearest) - np.searchsorted(nearest, values, side="right")) / len(nearest)
