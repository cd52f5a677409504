"""Cross-validation folds over patients: stratified by label, repeated, never splitting a patient.

Folds are drawn over patients; a patient's lesions always go where the patient goes, so no lesion of a
test patient is ever seen in training (the leak that makes several-lesion data look easier than it is).
"""

from __future__ import annotations

import numpy as np

from ..errors import SimilarPatientsError
from ..util.optional import optional_import


def patient_folds(labels: np.ndarray, folds: int, repeats: int, seed: int) -> list:
    """``repeats`` lists of ``folds`` test-patient index arrays; repeat r shuffles with ``seed + r``."""
    labels = np.asarray(labels)
    smallest = int(np.bincount(labels.astype(int)).min())
    if folds < 2 or folds > smallest:
        raise SimilarPatientsError(
            f"Cannot make {folds} stratified folds: the smaller class has {smallest} patients "
            f"(need 2 ≤ folds ≤ {smallest})."
        )
    splitter = optional_import("sklearn.model_selection", "analysis").StratifiedKFold
    placeholder = np.zeros(len(labels))
    return [
        [test for _, test in splitter(folds, shuffle=True, random_state=seed + r).split(placeholder, labels)]
        for r in range(repeats)
    ]
