"""The approximate index in the corrected space: it proposes candidates in the corrected (locally scaled)
order, so its answers are the exact search's, wide-radius patients included; an index of the older
geometry is never searched."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from SimilarPatientsLib import ReferenceStore
from SimilarPatientsLib.references import schema
from SimilarPatientsLib.search import approximate
from SimilarPatientsLib.search.correction import local_scaling_queries, local_scaling_rows
from SimilarPatientsLib.search.nearest import nearest_patients
from SimilarPatientsLib.util.digests import file_record


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_local_scaling_rows_rank_by_the_corrected_distance(metric):
    """The inner product of the augmented rows and query falls exactly as d/sqrt(r) (cosine) or d²/r
    (euclidean) grows."""
    rng = np.random.default_rng(0)
    rows, query = rng.standard_normal((50, 8)), rng.standard_normal((1, 8))
    radii = rng.uniform(0.1, 3.0, 50)
    if metric == "cosine":
        rows, query = rows / np.linalg.norm(rows, axis=1, keepdims=True), query / np.linalg.norm(query)
        key = (1 - rows @ query[0]) / np.sqrt(radii)
    else:
        key = ((rows - query) ** 2).sum(axis=1) / radii
    products = local_scaling_rows(rows, radii, metric) @ local_scaling_queries(query, metric)[0]
    np.testing.assert_allclose(-products, key, rtol=1e-12, atol=1e-12)


def _in_memory_index(space, metric="cosine"):
    return approximate.ApproximateIndex.build(space, metric)


@pytest.mark.parametrize("model", ["SUPREME", "CTFM"])
def test_approximate_corrected_answers_equal_exact_on_nlst(nlst, model):
    """Every NLST-Sybil patient's corrected top 10 through the index (built in memory, its effort as
    calibrated): the exact scan's patients at the index's target recall over all 464 lists (an approximate
    graph may miss one; FAISS 1.8, pyproject's lowest, builds another graph than the latest and missed one
    patient of one list), and every patient it returns at the exact distance."""
    space = nlst.space(model, space="corrected")
    index = _in_memory_index(space)
    assert index.geometry == approximate.LOCAL_SCALING and index.calibration.reached
    found = 0
    for code, patient in enumerate(space.patient_ids):
        queries = space.vectors[space.rows_of(code)]
        radius = float(space.correction.radii[code])
        exact = {m.patient: m.distance for m in nearest_patients(space, queries, 11, "cosine", query_radius=radius)}
        approximated = nearest_patients(space, queries, 11, "cosine", None, index.candidates, None, radius)
        found += sum(m.patient in exact for m in approximated)
        for m in approximated:
            if m.patient in exact:
                assert abs(m.distance - exact[m.patient]) <= 1e-12 * max(1.0, exact[m.patient]), patient
    recall = found / (11 * len(space.patient_ids))
    assert recall >= approximate.TARGET_RECALL, f"{model}: recall {recall:.4f}"


def _wide_radius_frame(dim: int = 24, groups: int = 60, wide: int = 5, seed: int = 4) -> pd.DataFrame:
    """A query patient; ``groups`` groups of 11 close patients around it (each member's 10th neighbour is
    in its own group: a small radius); ``wide`` patients alone, each far from everyone (a radius about 4
    times the others', as the widest of a real reference's). In the corrected order some wide patients are
    among the query's nearest; by z-scored distance they come after hundreds of group members."""
    rng = np.random.default_rng(seed)
    axis = np.zeros(dim)
    axis[0] = 1.0
    vectors, names = [axis], ["Q"]
    for g in range(groups):
        centre = axis + 0.5 * _orthogonal(rng, dim)
        for member in range(11):
            vectors.append(centre + 0.15 * _orthogonal(rng, dim))
            names.append(f"G{g:02d}-{member:02d}")
    for w in range(wide):
        vectors.append(axis + 0.7 * _orthogonal(rng, dim))
        names.append(f"W{w}")
    return pd.DataFrame({"model": "A", "PatientID": names, "embedding": [v.astype(np.float32) for v in vectors]})


def _orthogonal(rng, dim: int) -> np.ndarray:
    """A random unit direction orthogonal to the first axis."""
    v = rng.standard_normal(dim)
    v[0] = 0.0
    return v / np.linalg.norm(v)


def test_wide_radius_patients_are_proposed(tmp_path, monkeypatch):
    """The old graph proposed candidates by z-scored distance (40 rows for k = 10) and so never reached the
    wide-radius patients that lead the corrected ranking; the augmented graph proposes them first."""
    monkeypatch.setattr(approximate, "APPROXIMATE_FROM", 500)
    frame = _wide_radius_frame()
    reference = ReferenceStore(tmp_path).write("wide", schema.from_frame(frame), "test")
    space = reference.space("A", space="corrected")
    radii = pd.Series(space.correction.radii, index=space.patient_ids)
    assert radii.filter(like="W").min() > 3 * radii.filter(like="G").median()  # the premise: wide radii ...
    exact = reference.search("A", patient="Q", k=10, exclude=["Q"], method="exact")
    wide = [p for p in exact.PatientID if p.startswith("W")]
    assert len(wide) >= 2  # ... that bring wide patients into the corrected top 10 ...
    own = space.vectors[space.rows_of(space.patient_code("Q"))]
    by_zscore = [m.patient for m in nearest_patients(space.unscaled(), own, len(space.patient_ids), "cosine")]
    assert min(by_zscore.index(p) for p in wide) > 200  # ... from far down the z-scored order
    approximated = reference.search("A", patient="Q", k=10, exclude=["Q"], method="approximate")
    assert approximated.PatientID.tolist() == exact.PatientID.tolist()
    np.testing.assert_allclose(approximated.distance, exact.distance, rtol=1e-12)
    outside = reference.search("A", embeddings=frame.embedding[0], k=11, method="approximate")
    assert outside.PatientID.tolist()[1:] == exact.PatientID.tolist()  # the copy of Q first, at distance 0


def test_an_index_of_the_old_geometry_is_refused_and_rebuilt(tmp_path, monkeypatch, caplog):
    """A corrected index written before the graph held the radii (a z-scored graph, its sidecar naming no
    geometry) is never searched: loading it raises, and the reference rebuilds and records it."""
    monkeypatch.setattr(approximate, "APPROXIMATE_FROM", 500)
    frame = _wide_radius_frame()
    ReferenceStore(tmp_path).write("wide", schema.from_frame(frame), "test")
    reference = ReferenceStore(tmp_path).open("wide")
    space = reference.space("A", space="corrected")
    relative = "models/0/" + approximate.file_name("cosine", "corrected")
    path = reference.path / relative
    # what the older version wrote: a graph over the z-scored rows, a sidecar without a geometry
    old = approximate.ApproximateIndex.graph(space.unscaled(), "cosine")
    old.calibration = approximate.Calibration(0.99, 10, 300, 128, 0.99)

    def save() -> dict:
        old.save(path)
        sidecar = approximate.calibration_path(path)
        fields = json.loads(sidecar.read_text(encoding="utf-8"))
        del fields["geometry"]
        sidecar.write_text(json.dumps(fields), encoding="utf-8")
        return {f"models/0/{p.name}": file_record(p) for p in (path, sidecar)}

    reference._record([relative, relative.replace(".faiss", ".json")], save, replace=True)
    with pytest.raises(approximate.StaleIndex, match="geometry 'plain'"):
        approximate.ApproximateIndex.load(path, "cosine", space.correction)

    reopened = ReferenceStore(tmp_path).open("wide")
    with caplog.at_level(logging.WARNING):
        hits = reopened.search("A", patient="Q", k=10, exclude=["Q"], method="approximate")
    assert "rebuilding it" in caplog.text
    exact = reopened.search("A", patient="Q", k=10, exclude=["Q"], method="exact")
    assert hits.PatientID.tolist() == exact.PatientID.tolist()
    stored = json.loads(approximate.calibration_path(path).read_text(encoding="utf-8"))
    assert stored["geometry"] == approximate.LOCAL_SCALING
    again = ReferenceStore(tmp_path).open("wide")  # the rebuilt file is recorded: it verifies and loads
    assert again.approximate_index("A", "cosine", None, "corrected").geometry == approximate.LOCAL_SCALING
