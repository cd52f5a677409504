"""Non-image anchors: what a task's label is predicted from without the image, on the same patients and folds.

A model's AUC or precision means little alone: 0.6 is good if nothing else reaches it and poor if age and
sex do. Two anchors, each as a feature table (for the linear probe) and a patient ranking (for retrieval):

- ``demographic``: age, sex and smoking, where the reference carries them (NLST-Sybil: its single-lesion
  patients); ranked by same sex, then same smoking status, then nearest age;
- ``size``: a numeric lesion-size field (a patient's largest lesion), where the reference has one;
  ranked by nearest size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..references import schema

#: The demographic fields, categorical first (the ranking matches them in this order), then numeric.
DEMOGRAPHIC_FIELDS = ("sex", "smoking", "age")


@dataclass
class Anchor:
    """Features and a ranking of the ``patients`` (indices into the task's patients) that have them."""

    name: str
    description: str
    patients: np.ndarray  # (a,) indices into the task's patients, ascending
    features: np.ndarray  # (a, f) standardised numeric / one-hot categorical
    distances: np.ndarray  # (a, a) the anchor's ranking distance, diagonal +inf


def demographic(lesions: pd.DataFrame, patient_ids) -> Anchor | None:
    """Age, sex and smoking of the patients that have all three; None when the reference lacks a field."""
    if not set(DEMOGRAPHIC_FIELDS) <= set(lesions.columns):
        return None
    table = _per_patient(lesions, patient_ids, DEMOGRAPHIC_FIELDS)
    known = np.flatnonzero(table.notna().all(axis=1).to_numpy())
    if not len(known):
        return None
    table = table.iloc[known]
    age = pd.to_numeric(table["age"], errors="coerce").to_numpy(dtype=np.float64)
    categorical = [table[f].astype(str).to_numpy() for f in DEMOGRAPHIC_FIELDS[:-1]]
    # lexicographic: a sex mismatch outweighs any smoking mismatch, which outweighs any age gap (< 1)
    span = max(np.ptp(age), 1.0) * 1.01
    distances = np.abs(age[:, None] - age[None, :]) / span
    for weight, values in zip((4.0, 2.0), categorical):
        distances = distances + weight * (values[:, None] != values[None, :])
    features = np.column_stack([_standardise(age)] + [_one_hot(values) for values in categorical])
    np.fill_diagonal(distances, np.inf)
    return Anchor(
        "age, sex, smoking", "same sex, then same smoking status, then nearest age", known, features, distances
    )


def size(lesions: pd.DataFrame, patient_ids, field: str | None) -> Anchor | None:
    """A patient's largest lesion by ``field``; None without the field or values."""
    if not field or field not in lesions.columns:
        return None
    values = pd.to_numeric(lesions[field], errors="coerce")
    largest = values.groupby(lesions[schema.PATIENT].to_numpy()).max().reindex(pd.Index(patient_ids))
    known = np.flatnonzero(largest.notna().to_numpy())
    if not len(known):
        return None
    extent = largest.to_numpy(dtype=np.float64)[known]
    distances = np.abs(extent[:, None] - extent[None, :])
    np.fill_diagonal(distances, np.inf)
    return Anchor(f"size ({field})", "nearest lesion size", known, _standardise(extent)[:, None], distances)


def _per_patient(lesions: pd.DataFrame, patient_ids, fields) -> pd.DataFrame:
    return lesions.groupby(schema.PATIENT, sort=False)[list(fields)].first().reindex(pd.Index(patient_ids))


def _standardise(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / (values.std() or 1.0)


def _one_hot(values: np.ndarray) -> np.ndarray:
    """One column per value but the first (a constant column would carry nothing)."""
    levels = np.unique(values)
    return (values[:, None] == levels[None, 1:]).astype(np.float64)
