"""The look-alike benchmark: does a lesion find the same tumor in the patient's other CT series?

What "looks like this tumor" should mean at the very least: the same tumor, scanned again at another
screening round, ranks near the top. Each lesion of a patient with lesions in more than one CT series is a
query; the same patient's lesions in another series are its matches; the gallery is every other lesion of
the reference (lesion level, not patient level: the patient roll-up would hand the match over for free).
Reported: R@1 and R@10 (a match first; one in the first 10) and mAP, for all such queries and for the
cross-exam pairs (centres at least ``CROSS_EXAM_MM`` apart in the scanner frame: another exam, not another
reconstruction of one). Where the reference has a lesion-size field, also against a harder gallery: the
matches plus other patients' lesions of similar size (so a match cannot be found by size alone).
Intervals resample patients (a patient's queries are not independent).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np
import pandas as pd

from ..references import schema
from ..search.correction import CORRECTED, RAW
from ..search.distances import pairwise_distances
from ..search.fusion import fuse
from . import metrics

#: Two series' lesion centres at least this far apart (mm) are taken to be two exams.
CROSS_EXAM_MM = 20.0
#: "Similar size": within this fraction of the query's size.
SIZE_TOLERANCE = 0.25
KS = (1, 10)
COLUMNS = ["model", "space", "gallery", "queries", "count", "patients", "measure", "value", "low", "high", "chance"]
GALLERIES = {"all": "every other lesion", "size": "the matches + other patients' lesions of similar size"}
QUERIES = {"all": "all", "cross-exam": f"cross-exam (centres ≥ {CROSS_EXAM_MM:g} mm apart)"}


@dataclass
class Pairs:
    """Which lesion is whose match: ``relevant[q, j]`` = same patient, another series."""

    lesion_patient: np.ndarray  # (m,) patient code
    relevant: np.ndarray  # (m, m) bool
    cross: np.ndarray  # (m, m) bool: relevant and centres ≥ CROSS_EXAM_MM apart
    sizes: np.ndarray | None = None  # (m,) lesion size where the reference has a size field

    @classmethod
    def build(cls, lesions: pd.DataFrame, size_field: str | None = None) -> Pairs | None:
        """None when the reference has no series column or no patient has lesions in two series."""
        if schema.SERIES not in lesions.columns:
            return None
        patient = pd.factorize(lesions[schema.PATIENT])[0]
        series = pd.factorize(lesions[schema.SERIES].astype(str))[0]
        relevant = (patient[:, None] == patient[None, :]) & (series[:, None] != series[None, :])
        if not relevant.any():
            return None
        centres = (
            lesions[list(schema.CENTER)].to_numpy(dtype=np.float64) if set(schema.CENTER) <= set(lesions) else None
        )
        apart = (
            np.linalg.norm(centres[:, None] - centres[None, :], axis=2) >= CROSS_EXAM_MM
            if centres is not None
            else np.zeros_like(relevant)
        )
        sizes = None
        if size_field and size_field in lesions.columns:
            sizes = pd.to_numeric(lesions[size_field], errors="coerce").to_numpy(dtype=np.float64)
        return cls(patient, relevant, relevant & apart, sizes)

    def similar_size(self) -> np.ndarray | None:
        """(m, m) the harder gallery per query: its matches and other patients' lesions of similar size."""
        if self.sizes is None or np.isnan(self.sizes).all():
            return None
        close = np.abs(self.sizes[None, :] - self.sizes[:, None]) <= SIZE_TOLERANCE * self.sizes[:, None]
        others = self.lesion_patient[:, None] != self.lesion_patient[None, :]
        return self.relevant | (others & close)


def lesion_order(vectors: np.ndarray, metric: str = "cosine", radii: np.ndarray | None = None) -> np.ndarray:
    """(m, m - 1): each lesion's ranking of every other lesion, nearest first; with ``radii`` (m,), each
    gallery lesion's distance divided by the square root of its radius (local scaling)."""
    distances = pairwise_distances(vectors, vectors, metric)
    if radii is not None:
        distances = distances / np.sqrt(radii)[None, :]
    np.fill_diagonal(distances, np.inf)
    return np.argsort(distances, axis=1, kind="stable")[:, :-1]


def reference_order(reference, model: str, space: str = RAW) -> np.ndarray:
    """Each lesion's ranking of every other lesion of ``reference`` as the search ranks lesions in ``space``
    (corrected: z-scored, each gallery lesion's cosine distance over the square root of its patient's
    radius; the query's own radius changes no order)."""
    vectors = reference.space(model).vectors
    if space != CORRECTED:
        return lesion_order(np.asarray(vectors, dtype=np.float64))
    searched = reference.space(model, space=CORRECTED)
    return lesion_order(searched.correction.transformed(vectors), radii=np.asarray(searched.row_radii))


def fused_order(orders: list, depth: int) -> np.ndarray:
    """Reciprocal rank fusion of several models' lesion rankings, as the fused search fuses patients."""
    ranks = np.stack([metrics.ranks_of(order) for order in orders])
    order = fuse(ranks, None, "rrf", depth).order
    keep = order != np.arange(len(order))[:, None]
    return order[keep].reshape(len(order), -1)


def figures(order: np.ndarray, relevant: np.ndarray, allowed: np.ndarray | None = None) -> dict:
    """Per query (rows of ``relevant`` with a match): R@1, R@10 and AP within the ``allowed`` gallery."""
    queries = np.flatnonzero(relevant.any(1))
    ranked = order[queries]
    rows = queries[:, None]
    match = relevant[rows, ranked]
    inside = np.ones_like(match) if allowed is None else allowed[rows, ranked] | match
    place = np.cumsum(inside, axis=1)  # 1-based rank within the gallery
    match &= inside
    out = {"query": queries}
    for k in KS:
        out[f"R@{k}"] = (match & (place <= k)).any(1).astype(np.float64)
    hits = np.cumsum(match, axis=1)
    out["mAP"] = np.where(match, hits / np.maximum(place, 1), 0).sum(1) / match.sum(1)
    return out


def chance_recall(relevant: np.ndarray, allowed: np.ndarray | None, k: int) -> float:
    """Mean over queries of the chance that a random ranking of the gallery puts a match in the first k."""
    values = []
    for q in np.flatnonzero(relevant.any(1)):
        matches = int(relevant[q].sum())
        gallery = (relevant.shape[1] - 1) if allowed is None else int((allowed[q] | relevant[q]).sum() - allowed[q, q])
        values.append(1.0 - comb(gallery - matches, k) / comb(gallery, k) if gallery >= k else 1.0)
    return float(np.mean(values))


def rows(model: str, space: str, order: np.ndarray, pairs: Pairs, bootstrap: int, seed: int) -> list:
    """Table rows (:data:`COLUMNS`) of one model's (or the fused) lesion ranking in ``space``."""
    out = []
    galleries = {"all": None, "size": pairs.similar_size()}
    for gallery, allowed in galleries.items():
        if gallery != "all" and allowed is None:
            continue
        for queries, relevant in (("all", pairs.relevant), ("cross-exam", pairs.cross)):
            if not relevant.any():
                continue
            found = figures(order, relevant, allowed)
            patient = pairs.lesion_patient[found["query"]]
            codes, patient = np.unique(patient, return_inverse=True)
            counts = metrics.bootstrap_counts(len(codes), bootstrap, np.random.default_rng(seed))[:, patient]
            for measure in (*(f"R@{k}" for k in KS), "mAP"):
                value = metrics.mean_estimate(found[measure], counts)
                chance = chance_recall(relevant, allowed, int(measure[2:])) if measure.startswith("R@") else np.nan
                row = (
                    model,
                    space,
                    gallery,
                    queries,
                    len(patient),
                    len(codes),
                    measure,
                    value.value,
                    value.low,
                    value.high,
                )
                out.append(dict(zip(COLUMNS, (*row, chance))))
    return out
