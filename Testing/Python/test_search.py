"""Search: float64 brute force on every real model file, filters, roll-up, ties, exclusion, the HNSW path."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import synthetic_frame
from SimilarPatientsLib import ReferenceStore, SimilarPatientsError
from SimilarPatientsLib.references import schema
from SimilarPatientsLib.search import METRICS, approximate, filters


def brute_force(vectors, patients, queries, metric, allowed=None):
    """Float64 patient distances: nearest pair of (query lesion, reference lesion), as a sorted Series."""
    x = np.asarray(vectors, dtype=np.float64)
    q = np.asarray(queries, dtype=np.float64)
    if metric == "cosine":
        d = 1 - (x @ q.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(q, axis=1))
    elif metric == "dot":
        d = -(x @ q.T)
    else:
        d = np.sqrt(((x[:, None, :] - q[None, :, :]) ** 2).sum(-1))
    frame = pd.DataFrame({"PatientID": patients, "d": d.min(axis=1)})
    if allowed is not None:
        frame = frame[allowed]
    best = frame.groupby("PatientID")["d"].min().reset_index()
    return best.sort_values(["d", "PatientID"]).set_index("PatientID")["d"]


def brute_force_corrected(vectors, patients, queries, metric, allowed, own):
    """The corrected space from its definition: z-scored by the mean and standard deviation of all rows;
    every patient's radius its distance to its 10th nearest other patient there; a patient's distance its
    nearest pair over the square root of the two radii (the query's own radius: the reference patient's)."""
    x = np.asarray(vectors, dtype=np.float64)
    mean, sd = x.mean(axis=0), x.std(axis=0)
    z = (x - mean) / sd
    radii = {}
    for patient in pd.unique(patients):
        mine = (patients == patient).to_numpy()
        radii[patient] = brute_force(z, patients, z[mine], metric, ~mine).iloc[9]
    plain = brute_force(z, patients, (np.asarray(queries) - mean) / sd, metric, allowed)
    scaled = plain / np.sqrt(plain.index.map(radii).to_numpy() * radii[own])
    frame = scaled.rename("d").reset_index()
    return frame.sort_values(["d", "PatientID"]).set_index("PatientID")["d"]


@pytest.mark.parametrize("model", ["CTClipVit", "CTFM", "Merlin", "PASTA", "SUPREME", "VISTA3D"])
@pytest.mark.parametrize("metric", METRICS)
def test_matches_float64_brute_force_on_every_model(nlst, model, metric):
    lesions = nlst.lesions(model)
    vectors = np.asarray(nlst.space(model).vectors)
    counts = lesions.PatientID.value_counts()
    queries = [counts.index[0], counts[counts == 1].index[0], counts[counts == 2].index[0]]  # 9, 1 and 2 lesions
    for patient in queries:
        hits = nlst.search(model, patient=patient, k=10, metric=metric, exclude=[patient], space="raw")
        mine = lesions.PatientID == patient
        expected = brute_force(vectors, lesions.PatientID, vectors[mine.to_numpy()], metric, ~mine.to_numpy())
        assert hits.PatientID.tolist() == expected.index[:10].tolist()
        np.testing.assert_allclose(hits.distance, expected.iloc[:10], rtol=0, atol=1e-6)
        assert hits["rank"].tolist() == list(range(1, 11))


@pytest.mark.parametrize("model", ["CTFM", "SUPREME", "PASTA"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_the_corrected_space_matches_its_definition(nlst, model, metric):
    """Z-scoring and local scaling applied through the stored matrix (and the float32 bound widened for
    them) rank and measure exactly as the definition computed in float64 from scratch."""
    lesions = nlst.lesions(model)
    vectors = np.asarray(nlst.space(model).vectors)
    counts = lesions.PatientID.value_counts()
    for patient in [counts.index[0], counts[counts == 1].index[0]]:
        hits = nlst.search(model, patient=patient, k=10, metric=metric, exclude=[patient])
        assert set(hits.space) == {"corrected"}
        mine = (lesions.PatientID == patient).to_numpy()
        expected = brute_force_corrected(vectors, lesions.PatientID, vectors[mine], metric, ~mine, patient)
        assert hits.PatientID.tolist() == expected.index[:10].tolist()
        np.testing.assert_allclose(hits.distance, expected.iloc[:10], rtol=1e-9, atol=1e-9)


def test_an_outside_query_measures_its_own_radius(nlst):
    """A query that is not a reference patient gets its radius from its own search: the same answer and
    distances as the reference patient it copies (whose radius is stored)."""
    own = nlst.patient_embeddings("SUPREME", "100242")
    by_patient = nlst.search("SUPREME", patient="100242", k=10, exclude=["100242"])
    by_vectors = nlst.search("SUPREME", embeddings=own.vectors, k=10, exclude=["100242"])
    assert by_vectors.PatientID.tolist() == by_patient.PatientID.tolist()
    # the copy's 10th patient is the reference patient itself at distance 0: one place nearer than its own
    assert (by_vectors.distance >= by_patient.distance - 1e-12).all()
    filtered = nlst.search("SUPREME", embeddings=own.vectors, k=5, exclude=["100242"], where=["stage=IA"])
    unfiltered = nlst.search("SUPREME", embeddings=own.vectors, k=200, exclude=["100242"])
    expected = unfiltered[unfiltered.stage == "IA"].head(5)
    assert filtered.PatientID.tolist() == expected.PatientID.tolist()
    np.testing.assert_allclose(filtered.distance, expected.distance, rtol=1e-9)


def test_external_embedding_query_and_self_match(nlst):
    own = nlst.patient_embeddings("CTFM", "100242")
    vectors, lesion_ids = own.vectors, own.lesion_ids
    hits = nlst.search("CTFM", embeddings=vectors[0], k=3)
    assert hits.PatientID.iloc[0] == "100242" and abs(hits.distance.iloc[0]) < 1e-6
    assert hits.query_lesion.isna().all()  # an external query has no lesion ids
    by_patient = nlst.search("CTFM", patient="100242", k=1, exclude=[], space="raw")
    assert by_patient.query_lesion.iloc[0] == lesion_ids[0]


def test_multi_lesion_query_rolls_up_to_nearest_pair(nlst):
    lesions = nlst.lesions("VISTA3D")
    patient = lesions.PatientID.value_counts().index[0]
    vectors = nlst.patient_embeddings("VISTA3D", patient).vectors
    together = nlst.search("VISTA3D", patient=patient, k=5, exclude=[patient], space="raw")
    # each hit's distance is the best over the query patient's single-lesion searches (in the raw space: in
    # the corrected one a single lesion has a radius of its own)
    singles = [nlst.search("VISTA3D", embeddings=v, k=len(lesions), exclude=[patient], space="raw") for v in vectors]
    for _, hit in together.iterrows():
        best = min(s.set_index("PatientID").distance[hit.PatientID] for s in singles)
        assert hit.distance == pytest.approx(best, abs=1e-12)
        assert hit.lesions == (lesions.PatientID == hit.PatientID).sum()


def test_filters_restrict_to_matching_lesions(nlst):
    hits = nlst.search("CTFM", patient="100242", k=20, exclude=["100242"], where=["stage=IIIA,IIIB,IV", "age>=65"])
    assert len(hits) == 20
    assert set(hits.stage) <= {"IIIA", "IIIB", "IV"} and (hits.age >= 65).all()
    squamous = nlst.search("CTFM", patient="100242", k=5, where={"histology_code": 8070})
    assert (squamous.histology == "Squamous cell carcinoma, NOS").all()
    adeno = nlst.search("CTFM", patient="100242", k=5, where=["histology~ADENO"])
    assert adeno.histology.str.contains("denocarcinoma").all()
    with pytest.raises(SimilarPatientsError, match=r"No lesion has collection_id = 'lidc-idri'.*holds: nlst"):
        nlst.search("CTFM", patient="100242", k=5, where=["collection_id=lidc-idri"])  # never an empty answer
    with pytest.raises(SimilarPatientsError, match="No field 'grade'"):
        nlst.search("CTFM", patient="100242", where=["grade=3"])
    with pytest.raises(SimilarPatientsError, match="Cannot read the filter"):
        nlst.search("CTFM", patient="100242", where=["stage"])


def test_viewer_url_and_idc_fields(nlst):
    hit = nlst.search("Merlin", patient="100242", k=1, exclude=["100242"]).iloc[0]
    assert hit.viewer_url == (
        "https://viewer.imaging.datacommons.cancer.gov/v3/viewer/?StudyInstanceUIDs="
        f"{hit.StudyInstanceUID}&SeriesInstanceUIDs={hit.SeriesInstanceUID}"
    )
    assert hit.collection_id == "nlst" and hit.Modality == "CT" and hit.series_size_MB > 1


def _store_with(frame, home):
    store = ReferenceStore(home)
    table = schema.from_frame(frame)
    return store.write("synthetic", table, "test")


def test_ties_are_ordered_by_patient_id(tmp_path):
    base = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)
    same = np.array([0.0, 1.0, 0.0, 0.0], dtype=np.float32)
    frame = pd.DataFrame(
        {
            "model": "A",
            "PatientID": ["Q", "P9", "P2", "P5", "P1"],
            "embedding": [base, same, same * 2, same * 3, base + same],
        }
    )
    reference = _store_with(frame, tmp_path)
    hits = reference.search("A", patient="Q", k=4, exclude=["Q"], space="raw")
    assert hits.PatientID.tolist() == ["P1", "P2", "P5", "P9"]
    assert hits.distance.iloc[1:].tolist() == [1.0, 1.0, 1.0]


def test_bad_queries_are_refused(nlst):
    with pytest.raises(SimilarPatientsError, match="has 100 values but this model's reference embeddings have 512"):
        nlst.search("CTFM", embeddings=np.ones(100))
    with pytest.raises(SimilarPatientsError, match="NaN"):
        nlst.search("CTFM", embeddings=np.full(512, np.nan))
    with pytest.raises(SimilarPatientsError, match="all zeros"):
        nlst.search("CTFM", embeddings=np.zeros(512))
    with pytest.raises(SimilarPatientsError, match="Patient 999 is not in reference"):
        nlst.search("CTFM", patient="999")
    with pytest.raises(SimilarPatientsError, match="has no model 'FMCIB'"):
        nlst.search("FMCIB", patient="100242")
    with pytest.raises(SimilarPatientsError, match="Unknown metric"):
        nlst.search("CTFM", patient="100242", metric="manhattan")
    with pytest.raises(SimilarPatientsError, match=r"an embedding \(embeddings=...\) or a reference patient.*neither"):
        nlst.search("CTFM")
    with pytest.raises(SimilarPatientsError, match="got both"):
        nlst.search("CTFM", embeddings=np.ones(512), patient="100242")


def test_approximate_index_path_agrees_with_exact(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((20, 32))
    rows = []
    for p in range(600):
        for lesion in range(1 + p % 2):
            vector = centres[p % 20] + 0.3 * rng.standard_normal(32)
            rows.append(
                {
                    "model": "A",
                    "PatientID": f"P{p:04d}",
                    "lesion_id": str(lesion),
                    "embedding": vector.astype(np.float32),
                    "group": p % 3,
                }
            )
    monkeypatch.setattr(approximate, "APPROXIMATE_FROM", 500)
    reference = _store_with(pd.DataFrame(rows), tmp_path)
    assert (reference.path / "models" / "0" / "hnsw-corrected-cosine.faiss").exists()  # built at write
    for metric, space in [(m, "raw") for m in METRICS] + [("cosine", "corrected"), ("euclidean", "corrected")]:
        for patient in ["P0001", "P0100", "P0555"]:
            kwargs = dict(patient=patient, k=10, metric=metric, exclude=[patient], where=["group=0,1"], space=space)
            approximated = reference.search("A", method="approximate", **kwargs)
            exact = reference.search("A", method="exact", **kwargs)
            assert approximated.PatientID.tolist() == exact.PatientID.tolist()
            np.testing.assert_allclose(approximated.distance, exact.distance, atol=1e-12)  # both float64
            assert set(approximated.group) <= {0, 1}
    auto = reference.search("A", patient="P0001", k=10)
    assert auto.PatientID.tolist() == reference.search("A", patient="P0001", k=10, method="exact").PatientID.tolist()


def test_k_larger_than_reference_returns_everyone(tmp_path):
    reference = _store_with(synthetic_frame(n_patients=7), tmp_path)
    hits = reference.search("A", patient="P000", k=50, exclude=["P000"])
    assert sorted(hits.PatientID) == [f"P{i:03d}" for i in range(1, 7)]
    assert hits.distance.is_monotonic_increasing


def test_numeric_fields_compare_as_numbers(nlst):
    ages = nlst.lesions("CTFM").drop_duplicates("PatientID").set_index("PatientID").age
    sixty_five = set(ages[ages == 65].index)
    for where in (["age=65"], ["age=65.0"], {"age": 65.0}, {"age": 65}, "age=65"):
        hits = nlst.search("CTFM", patient="100242", k=500, where=where)
        assert set(hits.PatientID) == sixty_five, where
    codes = nlst.search("CTFM", patient="100242", k=500, where=["histology_code=8140.0"])
    assert (codes.histology_code == 8140).all() and len(codes) > 100
    others = nlst.search("CTFM", patient="100242", k=500, where=["age!=65.0"])
    assert not set(others.PatientID) & sixty_five and len(others) == len(ages) - len(sixty_five)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("stage=XYZ", r"No lesion has stage = 'XYZ'. 'stage' holds: IA, IB, IIA, IIB, IIIA, IIIB, IV"),
        ("stage=ia", r"Did you mean 'IA'\?"),
        ("stage=IA,XYZ", r"No lesion has stage = 'XYZ'"),
        ("age=200", r"No lesion has age = 200; 'age' holds numbers from \d+ to \d+"),
        ("age=old", r"'age' holds numbers; 'old' is not one"),
        ("stage==IA", r"'==' is not an operator; write stage=IA"),
        ("age=>65", r"'=>' is not an operator; write age>=65"),
        ("age=<65", r"'=<' is not an operator; write age<=65"),
    ],
)
def test_a_filter_that_cannot_match_is_refused_with_what_the_field_holds(nlst, where, message):
    with pytest.raises(SimilarPatientsError, match=message):
        nlst.search("CTFM", patient="100242", where=[where])


def test_several_query_embeddings_say_which_one_each_hit_matched(nlst):
    vectors = np.stack([nlst.patient_embeddings("CTFM", p).vectors[0] for p in ("100242", "100158")])
    hits = nlst.search("CTFM", embeddings=vectors, k=2)
    assert dict(zip(hits.PatientID, hits.query_lesion)) == {"100242": "1", "100158": "2"}
    named = nlst.search("CTFM", embeddings=vectors, k=2, query_lesions=["left", "right"])
    assert set(named.query_lesion) == {"left", "right"}


def _unstructured(n_patients: int, dim: int, seed: int = 5) -> pd.DataFrame:
    """Gaussian vectors with no cluster structure: where HNSW at its default effort recalls least."""
    vectors = np.random.default_rng(seed).standard_normal((n_patients, dim)).astype(np.float32)
    return pd.DataFrame(
        {"model": "A", "PatientID": [f"P{i:05d}" for i in range(n_patients)], "embedding": list(vectors)}
    )


def test_the_index_proves_its_recall_on_the_data_it_serves(tmp_path, monkeypatch):
    monkeypatch.setattr(approximate, "APPROXIMATE_FROM", 1000)
    monkeypatch.setattr(approximate, "SEARCH_BREADTHS", (16, 64, 512))  # a low first effort, as on large data
    reference = _store_with(_unstructured(6000, 128), tmp_path)
    index = reference.approximate_index("A", "cosine")
    calibration = index.calibration
    assert calibration.queries == approximate.CHECK_QUERIES and calibration.k == 10
    assert calibration.breadth > 16  # the first effort did not reach the target on unstructured vectors
    assert calibration.reached and calibration.recall >= 0.99
    stored = json.loads((reference.path / "models" / "0" / "hnsw-cosine.json").read_text(encoding="utf-8"))
    assert stored["recall"] == calibration.recall and stored["breadth"] == calibration.breadth
    again = ReferenceStore(tmp_path).open("synthetic").approximate_index("A", "cosine")
    assert again.breadth == calibration.breadth  # the tuned effort is what later searches use
    hits = reference.search("A", patient="P00001", k=10)
    assert set(hits.search) == {"approximate"} and (hits.index_recall == calibration.recall).all()


def test_an_index_that_cannot_reach_the_target_falls_back_to_exact(tmp_path, monkeypatch, capsys):
    from SimilarPatientsLib.cli import main

    monkeypatch.setattr(approximate, "APPROXIMATE_FROM", 1000)
    monkeypatch.setattr(approximate, "SEARCH_BREADTHS", (4,))  # no effort that can reach 0.99 here
    reference = _store_with(_unstructured(6000, 128), tmp_path)
    calibration = reference.approximate_index("A", "cosine", None, "corrected").calibration
    assert not calibration.reached and calibration.recall < 0.99
    auto = reference.search("A", patient="P00001", k=10)
    exact = reference.search("A", patient="P00001", k=10, method="exact")
    assert set(auto.search) == {"exact"} and auto.index_recall.isna().all()
    assert auto.PatientID.tolist() == exact.PatientID.tolist()
    asked = reference.search("A", patient="P00001", k=10, method="approximate")  # asked for: given, and labelled
    assert set(asked.search) == {"approximate"} and (asked.index_recall == calibration.recall).all()
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(tmp_path))
    argv = ["neighbors", "--reference", "synthetic", "--model", "A", "--patient", "P00001", "--method"]
    assert main([*argv, "approximate"]) == 0
    footer = capsys.readouterr().out.strip().splitlines()[-1]
    assert footer.startswith("search: approximate, index recall@10 ") and "measured on 300" in footer
    assert main([*argv, "approximate", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    assert record["search"] == "approximate" and record["index_recall"] == pytest.approx(calibration.recall)


def test_closeness_places_a_distance_on_the_references_nearest_matches(nlst, tmp_path):
    hits = nlst.search("CTFM", patient="100242", k=20, exclude=["100242"])
    closeness = nlst.closeness("CTFM", "cosine", hits.distance)
    assert np.all(np.diff(closeness) <= 0) and closeness[0] > closeness[-1]  # farther is less similar
    assert nlst.closeness("CTFM", "cosine", [0.0])[0] == 100.0 and nlst.closeness("CTFM", "cosine", [1e9])[0] == 0.0
    for space, name in (("corrected", "nearest-corrected-cosine.npy"), ("raw", "nearest-cosine.npy")):
        nearest_of = nlst.closeness("CTFM", "cosine", [0.5], space=space)  # the raw one is measured on first use
        assert 0 <= nearest_of[0] <= 100
        nearest = np.load(nlst.path / "models" / "1" / name)  # kept with the version
        assert len(nearest) == 464 and np.all(np.diff(nearest) >= 0)
        # by hand: each patient's nearest other patient, the median of those is "closer than about half"
        assert nlst.closeness("CTFM", "cosine", [np.median(nearest)], space=space)[0] == pytest.approx(50, abs=0.5)
    assert nlst.closeness("CTFM", "cosine", [2.0], space="raw")[0] == 0.0


def test_series_that_idc_does_not_hold_have_no_viewer_link_and_search_works(tmp_path):
    frame = synthetic_frame(n_patients=6).assign(SeriesInstanceUID=lambda f: [f"1.2.3.{i}" for i in range(len(f))])
    reference = _store_with(frame, tmp_path)
    hits = reference.search("A", patient="P001", k=3, exclude=["P001"])
    assert len(hits) == 3 and hits.viewer_url.isna().all() and hits.collection_id.isna().all()


def test_the_idc_index_is_found_whatever_the_locale(tmp_path):
    """Slicer's process runs with a C locale, in which importing idc_index_data fails to read its files."""
    import os
    import subprocess
    import sys

    code = "from SimilarPatientsLib.idc import IDCIndex; print(IDCIndex().version)"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", env=env)
    assert done.returncode == 0 and done.stdout.startswith("idc-index-data "), done.stderr


def test_closeness_works_on_a_reference_that_cannot_be_written(tmp_path, monkeypatch):
    import errno

    from SimilarPatientsLib.references import writer as writer_module

    opened = _store_with(synthetic_frame(n_patients=12), tmp_path)

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(writer_module, "replacing", read_only)  # where a reference's arrays are saved
    hits = opened.search("A", patient="P001", k=3, exclude=["P001"], metric="euclidean")
    closeness = opened.closeness("A", "euclidean", hits.distance)  # cosine's was made when it was written
    assert len(closeness) == 3 and np.all(np.diff(closeness) <= 0)
    assert not (opened.path / "models" / "0" / "nearest-euclidean.npy").exists()
    assert "models/0/nearest-euclidean.npy" not in opened.manifest["files"]


def test_a_label_never_replaces_a_computed_hit_column(home, capsys):
    """A reference stored before the hit table's names were reserved at import, whose labels are called
    rank, distance and viewer_url: the hits keep the computed values, the plain table prints."""
    from SimilarPatientsLib.cli import main

    table = schema.from_frame(synthetic_frame(n_patients=12, lesions=(1, 1), dim=8))
    forged = table.lesions.assign(rank=9, distance=222.0, viewer_url="https://example.org/anything")
    reference = ReferenceStore().write("old", schema.ReferenceTable(forged, table.embeddings), "test")
    assert {"rank", "distance", "viewer_url"} <= set(reference.label_fields)
    assert main(["neighbors", "--reference", "old", "--model", "A", "--patient", "P000", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    expected = reference.search("A", patient="P000", k=3, exclude=["P000"])
    assert [h["distance"] for h in hits] == pytest.approx(expected.distance.tolist())
    assert all(h["distance"] < 2.0 for h in hits) and all(h["viewer_url"] is None for h in hits)  # no UIDs: no link
    assert main(["neighbors", "--reference", "old", "--model", "A", "--patient", "P000", "-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert "222" not in printed and "example.org" not in printed


@pytest.mark.parametrize(
    ("field", "term", "message"),
    [
        ("age", ">=nan", r"not a finite number: it would match nothing"),
        ("age", "<inf", r"not a finite number"),
        ("histology", "~", r"has no text: it would match every lesion"),
        ("histology", "~  ", r"has no text"),
    ],
)
def test_a_filter_that_would_match_nothing_or_everything_is_refused_before_the_search(nlst, field, term, message):
    with pytest.raises(SimilarPatientsError, match=message):
        filters.parse(field + term)
    with pytest.raises(SimilarPatientsError, match=message):
        nlst.search("CTFM", patient="100242", where=[field + term])
    with pytest.raises(SimilarPatientsError, match=message):  # the terms an evaluation task is made of
        filters.value_mask(nlst.lesions("CTFM")[field], [term])


def test_a_query_at_the_reference_mean_is_answered_not_nan(tmp_path):
    """In the corrected space a query equal to the reference mean has no direction: its cosine distance to
    every row is 1 (as a zero row's is), scaled, never NaN (the write's radii ask exactly that of the middle
    patient here)."""
    frame = pd.DataFrame({"model": ["A"] * 3, "PatientID": ["1", "2", "3"], "lesion_id": ["a", "b", "c"]})
    frame["embedding"] = [np.ones(4, np.float32) * i for i in (1, 2, 3)]
    reference = _store_with(frame, tmp_path)
    hits = reference.search("A", embeddings=np.full(4, 2.0), k=3)
    assert np.isfinite(hits.distance).all() and len(hits) == 3
