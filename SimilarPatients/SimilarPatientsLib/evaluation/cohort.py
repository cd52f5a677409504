"""One task's patients in one model's space, and the ways to make one patient out of several lesions.

Labels are per patient, but some patients have several lesions. Three aggregations, as in
multiple-instance work:

- ``mean``: the patient is the mean of its lesion vectors;
- ``max``: the element-wise maximum (max-pooling) of its lesion vectors;
- ``lesions``: every lesion is kept; the distance between two patients is that of their nearest lesion
  pair (what ``search`` does), and a classifier trained on lesions scores a patient by the mean of its
  lesions' scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import SimilarPatientsError
from ..references import schema
from ..search.distances import check_metric, pairwise_distances

AGGREGATIONS = ("mean", "max", "lesions")
DISTANCES = ("cosine", "euclidean")


@dataclass
class Instances:
    """What a classifier sees under one aggregation: rows, and the patient of each row (non-decreasing)."""

    rows: np.ndarray  # (r, D)
    row_patient: np.ndarray  # (r,)


@dataclass
class Cohort:
    """Lesion vectors (float64, grouped by patient) and one 0/1 label per patient."""

    patient_ids: np.ndarray  # (n,) sorted
    labels: np.ndarray  # (n,) 0/1
    lesion_vectors: np.ndarray  # (m, D), lesions of patient 0 first, then patient 1, ...
    lesion_patient: np.ndarray  # (m,) patient index of each lesion, non-decreasing

    @classmethod
    def build(cls, lesions: pd.DataFrame, vectors: np.ndarray, labels: pd.Series) -> Cohort:
        """The lesions of the patients in ``labels`` (PatientID -> 0/1), from a model's table and matrix."""
        code = pd.Index(labels.index).get_indexer(lesions[schema.PATIENT])
        keep = np.flatnonzero(code >= 0)
        keep = keep[np.argsort(code[keep], kind="stable")]
        return cls(
            patient_ids=np.asarray(labels.index, dtype=object),
            labels=labels.to_numpy(dtype=np.int64),
            lesion_vectors=np.asarray(vectors[keep], dtype=np.float64),
            lesion_patient=code[keep],
        )

    @property
    def starts(self) -> np.ndarray:
        """Index of each patient's first lesion row."""
        return np.searchsorted(self.lesion_patient, np.arange(len(self.patient_ids)))

    def instances(self, aggregation: str) -> Instances:
        """Patient vectors for mean/max, lesion vectors for lesions."""
        _check(aggregation)
        if aggregation == "lesions":
            return Instances(self.lesion_vectors, self.lesion_patient)
        reduce = np.add if aggregation == "mean" else np.maximum
        pooled = reduce.reduceat(self.lesion_vectors, self.starts, axis=0)
        if aggregation == "mean":
            pooled /= np.bincount(self.lesion_patient)[:, None]
        return Instances(pooled, np.arange(len(self.patient_ids)))

    def distances(self, aggregation: str, metric: str) -> np.ndarray:
        """(n, n) patient distance matrix, the diagonal set to +inf (a patient is not its own neighbour)."""
        rows = self.instances(aggregation).rows
        distance = pairwise_distances(rows, rows, check_metric(metric, DISTANCES))
        if aggregation == "lesions":
            distance = np.minimum.reduceat(np.minimum.reduceat(distance, self.starts, axis=0), self.starts, axis=1)
        np.fill_diagonal(distance, np.inf)
        return distance


def _check(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise SimilarPatientsError(f"Unknown aggregation '{aggregation}'; choose one of {', '.join(AGGREGATIONS)}.")
