"""A reference is written in chunks, and the chunks do not show: a table written whole, the same table from one
Parquet file and from a folder of shuffled Parquet shards give the same files, byte for byte, and the same
answers. What a first query needs (the nearest-match distribution, the approximate index of a large
reference) is made when it is written, and the distribution is the one the store measured before."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import synthetic_frame
from SimilarPatientsLib import ReferenceStore
from SimilarPatientsLib.references import closeness, schema
from SimilarPatientsLib.references.importers import read_source
from SimilarPatientsLib.search import approximate, nearest
from SimilarPatientsLib.search.nearest import EmbeddingSpace, nearest_patients, nearest_patients_many


def _files(reference) -> dict:
    """Every file of a version but its manifest, by path."""
    return {
        p.relative_to(reference.path).as_posix(): p.read_bytes()
        for p in reference.path.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }


def _shards(frame: pd.DataFrame, folder, count: int, row_group: int, seed: int) -> None:
    """``frame`` shuffled into ``count`` Parquet shards of ``row_group``-row row groups."""
    folder.mkdir()
    shuffled = frame.sample(frac=1, random_state=seed).reset_index(drop=True)
    for i, part in enumerate(np.array_split(np.arange(len(shuffled)), count)):
        shuffled.iloc[part].to_parquet(folder / f"embeddings-{i:03d}.parquet", row_group_size=row_group)


def test_a_chunked_write_equals_a_whole_write(home, tmp_path, monkeypatch):
    monkeypatch.setattr(schema, "CHUNK_ROWS", 16)  # several row groups and blocks even in a small table
    frame = synthetic_frame(n_patients=40, models=("A", "B"), dim=12)
    frame.to_parquet(tmp_path / "whole.parquet")
    _shards(frame, tmp_path / "shards", count=9, row_group=5, seed=1)
    store = ReferenceStore()
    written = {
        "memory": store.write("memory", schema.from_frame(pd.read_parquet(tmp_path / "whole.parquet")), "same"),
        "file": store.write("file", read_source(str(tmp_path / "whole.parquet")).table, "same"),
        "shards": store.import_reference("shards", str(tmp_path / "shards")),
    }
    chunks = list(read_source(str(tmp_path / "shards")).table.vector_chunks())
    assert len(chunks) > 10 and any(not (np.diff(positions) == 1).all() for _, positions, _ in chunks)  # out of order
    files = {name: _files(reference) for name, reference in written.items()}
    assert files["memory"].keys() == {
        "reference.parquet",
        *(
            f"models/{i}/{f}"
            for i in (0, 1)
            for f in (
                "vectors.npy",
                "norms.npy",
                "centre.npy",
                "scale.npy",
                "corrected-norms.npy",
                "radii-cosine.npy",
                "nearest-corrected-cosine.npy",
            )
        ),
    }
    assert files["file"] == files["memory"] and files["shards"] == files["memory"]
    records = {name: reference.manifest["files"] for name, reference in written.items()}
    assert records["file"] == records["memory"] == records["shards"]
    # the same answers
    for reference in written.values():
        for model in ("A", "B"):
            hits = reference.search(model, patient="P003", k=5, exclude=["P003"])
            expected = written["memory"].search(model, patient="P003", k=5, exclude=["P003"])
            pd.testing.assert_frame_equal(hits, expected)
            np.testing.assert_array_equal(
                reference.closeness(model, "cosine", hits.distance),
                written["memory"].closeness(model, "cosine", hits.distance),
            )
    # the stored vectors are the table's, and the file is what np.save writes
    table = schema.from_frame(frame)
    for i, model in enumerate(("A", "B")):
        np.testing.assert_array_equal(written["shards"].space(model).vectors, table.embeddings[model])
        saved = tmp_path / f"{model}.npy"
        np.save(saved, table.embeddings[model])
        assert saved.read_bytes() == files["shards"][f"models/{i}/vectors.npy"]


def test_a_streamed_import_refuses_what_a_whole_one_refuses(home, tmp_path):
    frame = synthetic_frame(n_patients=30)
    vector = frame.at[25, "embedding"].copy()
    vector[1] = np.inf
    frame.at[25, "embedding"] = vector
    _shards(frame, tmp_path / "shards", count=4, row_group=3, seed=2)
    with pytest.raises(Exception, match=r"1 embedding\(s\) hold NaN or infinite values") as streamed:
        ReferenceStore().import_reference("bad", str(tmp_path / "shards"))
    with pytest.raises(Exception, match=r"1 embedding\(s\) hold NaN or infinite values"):
        schema.from_frame(frame)
    assert "bad" not in ReferenceStore() and not list((home / "references" / "bad").iterdir())
    assert str(tmp_path / "shards") in str(streamed.value)


def test_the_first_closeness_reads_what_the_write_measured(home, monkeypatch):
    reference = ReferenceStore().write("mine", schema.from_frame(synthetic_frame(n_patients=50)), "test")
    assert reference.manifest["models"]["A"]["closeness"] == {"corrected-cosine": {"patients": 50, "search": "exact"}}
    assert reference.manifest["models"]["A"]["correction"] == {
        "cosine": {"patients": 50, "neighbours": 10, "search": "exact"}
    }

    def no_search(*args, **kwargs):
        raise AssertionError("the distribution was measured again")

    monkeypatch.setattr(closeness, "nearest_patients_many", no_search)
    monkeypatch.setattr(closeness, "nearest_patients", no_search)
    again = ReferenceStore().open("mine")
    hits = again.search("A", patient="P001", k=20, exclude=["P001"])
    placed = again.closeness("A", "cosine", hits.distance)
    assert placed[0] > placed[-1] and np.all(np.diff(placed) <= 0)


def test_a_large_reference_gets_its_index_and_distribution_at_write(home, monkeypatch):
    """From APPROXIMATE_FROM rows the index is built and checked before the version is swapped in, and the
    nearest-match distribution is measured with it, its recall recorded."""
    monkeypatch.setattr(approximate, "APPROXIMATE_FROM", 100)
    frame = synthetic_frame(n_patients=120, lesions=(1, 2), dim=16)
    reference = ReferenceStore().write("large", schema.from_frame(frame), "test")
    assert {"models/0/hnsw-corrected-cosine.faiss", "models/0/hnsw-corrected-cosine.json"} <= set(
        reference.manifest["files"]
    )
    how = reference.manifest["models"]["A"]["closeness"]["corrected-cosine"]
    calibration = reference.approximate_index("A", "cosine", None, "corrected").calibration
    if calibration.reached:
        assert how == {"patients": 120, "search": "approximate", "index_recall": calibration.recall}
    else:  # no effort reached the target: measured exactly, as `auto` searches it
        assert how == {"patients": 120, "search": "exact"}


def _closeness_before(reference, model: str, metric: str, distances) -> np.ndarray:
    """The store's closeness as it was measured before: one exact search per sampled patient."""
    space = reference.space(model)
    patients = len(space.patient_ids)
    sample = np.sort(np.random.default_rng(0).choice(patients, size=min(patients, 1000), replace=False))
    nearest = np.empty(len(sample))
    for i, code in enumerate(sample):
        match = nearest_patients(space, space.vectors[space.rows_of(code)], 2, metric)
        nearest[i] = next(m.distance for m in match if m.patient != space.patient_ids[code])
    nearest.sort()
    values = np.asarray(distances, dtype=np.float64)
    return 100.0 * (len(nearest) - np.searchsorted(nearest, values, side="right")) / len(nearest)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
def test_closeness_gives_the_percentages_it_gave_before_on_nlst(nlst, metric):
    for model in nlst.models:
        hits = nlst.search(model, patient="100242", k=30, exclude=["100242"], metric=metric, space="raw")
        others = nlst.search(model, patient="212718", k=30, metric=metric, space="raw")  # 9 lesions; its own 0 too
        spread = np.quantile(hits.distance, np.linspace(0, 1, 41))
        distances = np.concatenate([hits.distance, others.distance, spread])
        before = _closeness_before(nlst, model, metric, distances)
        np.testing.assert_array_equal(nlst.closeness(model, metric, distances, space="raw"), before)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
def test_many_groups_in_one_pass_answer_as_one_search_each(metric):
    rng = np.random.default_rng(4)
    vectors = (rng.standard_normal((3000, 24)) + 3 * rng.standard_normal((30, 24))[rng.integers(0, 30, 3000)]).astype(
        np.float32
    )
    codes, ids = pd.factorize(np.array([f"P{i // 3:04d}" for i in range(3000)]), sort=True)
    space = EmbeddingSpace(vectors, np.linalg.norm(vectors.astype(np.float64), axis=1), codes, np.asarray(ids, object))
    groups = [vectors[space.rows_of(c)] for c in range(0, 1000, 7)] + [vectors[r] for r in range(0, 3000, 101)]
    reports = []
    many = nearest_patients_many(space, groups, 4, metric, lambda *a: reports.append(a))
    one = [nearest_patients(space, group, 4, metric) for group in groups]
    assert [[(m.patient, m.distance, m.row) for m in answer] for answer in many] == [
        [(m.patient, m.distance, m.row) for m in answer] for answer in one
    ]
    assert reports and reports[-1][0] == reports[-1][1] == 3000


def test_a_large_scan_reports_its_progress_and_answers_the_same(monkeypatch):
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((1000, 8)).astype(np.float32)
    codes, ids = pd.factorize(np.array([f"P{i:04d}" for i in range(1000)]), sort=True)
    space = EmbeddingSpace(vectors, np.linalg.norm(vectors.astype(np.float64), axis=1), codes, np.asarray(ids, object))
    whole = nearest_patients(space, vectors[3], 5)
    monkeypatch.setattr(nearest, "SCAN_ROWS", 128)
    reports = []
    blocks = nearest_patients(space, vectors[3], 5, progress=lambda *a: reports.append(a))
    assert [(m.patient, m.distance) for m in blocks] == [(m.patient, m.distance) for m in whole]
    assert [r[0] for r in reports] == [*range(128, 1000, 128), 1000]
