"""Importers: each source, each refusal, and the restricted unpickler."""

from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import synthetic_frame
from SimilarPatientsLib import ReferenceStore, SimilarPatientsError
from SimilarPatientsLib.references import schema
from SimilarPatientsLib.references.importers import read_source
from SimilarPatientsLib.references.nlst_sybil import read_reference
from SimilarPatientsLib.references.safe_pickle import RefusedPickle, restricted_loads

MODELS = ["CTClipVit", "CTFM", "Merlin", "PASTA", "SUPREME", "VISTA3D"]
DIMS = {"CTClipVit": 512, "CTFM": 512, "Merlin": 512, "PASTA": 1024, "SUPREME": 512, "VISTA3D": 768}


def test_nlst_reference_has_every_model_lesion_and_label(nlst):
    assert nlst.models == MODELS
    for model in MODELS:
        info = nlst.model_info(model)
        # 734 upstream rows hold one lesion listed twice for two patients: 732 distinct lesions
        assert (info.dim, info.lesions, info.patients) == (DIMS[model], 732, 464)
        assert info.recipe == "tumorimagingbench"
    assert nlst.display_fields == ["histology", "stage", "age", "sex", "smoking"]  # declared by the importer
    assert set(nlst.display_fields) < set(nlst.label_fields)
    lesions = nlst.lesions("CTFM")
    assert set(lesions["stage"].dropna()) <= {"IA", "IB", "IIA", "IIB", "IIIA", "IIIB", "IV"}
    assert (lesions["histology_code"] == 8140).sum() > 0
    assert lesions.loc[lesions.histology_code == 8070, "histology"].eq("Squamous cell carcinoma, NOS").all()
    # clinical fields of the 289 single-lesion patients ride along; IDC fields come from idc-index-data
    assert lesions.dropna(subset=["age"]).PatientID.nunique() == 289
    assert set(lesions["sex"].dropna()) == {"F", "M"}
    assert (lesions["collection_id"] == "nlst").all() and (lesions["Modality"] == "CT").all()
    assert lesions["StudyInstanceUID"].notna().all() and (lesions["instanceCount"] > 0).all()


def test_nlst_matrix_equals_upstream_features(nlst, nlst_dir):
    path = nlst_dir / "upstream" / "embeddings" / "PASTA_features.pkl"
    with open(path, "rb") as stream:
        upstream = pickle.load(stream)["all"]  # trusted here: the test compares against the plain loader
    first = upstream[0]
    lesions = nlst.lesions("PASTA")
    row = np.flatnonzero(
        (lesions.PatientID == str(first["row"]["PatientID"])) & np.isclose(lesions.center_x, first["row"]["coordX"])
    )[0]
    np.testing.assert_array_equal(nlst.space("PASTA").vectors[row], first["feature"][0])


def test_single_upstream_file_imports(home, nlst_dir):
    read = read_source(str(nlst_dir / "upstream" / "embeddings" / "Merlin_features.pkl"))
    table, notes = read.table, read.notes
    assert table.models == ["Merlin"] and table.embeddings["Merlin"].shape == (732, 512)
    assert "dropped 2" in notes[0]


def test_upstream_file_with_wrong_bytes_is_refused(tmp_path, nlst_dir):
    data = (nlst_dir / "upstream" / "embeddings" / "CTFM_features.pkl").read_bytes()
    broken = tmp_path / "CTFM_features.pkl"
    broken.write_bytes(data[:-1000])
    with pytest.raises(SimilarPatientsError, match="does not match its expected git-blob-sha1"):
        read_reference({"CTFM": broken})


def test_truncated_pickle_of_unknown_model_gives_clear_error(tmp_path, nlst_dir):
    data = (nlst_dir / "upstream" / "embeddings" / "CTFM_features.pkl").read_bytes()
    broken = tmp_path / "Mine_features.pkl"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(SimilarPatientsError, match="truncated or corrupt"):
        read_reference({"Mine": broken})


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_restricted_unpickler_refuses_code_and_runs_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({"all": [{"feature": np.zeros((1, 4)), "row": _Boom()}]})
    with pytest.raises(RefusedPickle, match=r"(posix|os|nt)\.system"):
        restricted_loads(payload)
    assert not (tmp_path / "pwned").exists()
    # the legitimate classes still load
    row = pd.Series([1, 2.0], index=pd.Index(["PatientID", "x"], dtype=object), dtype=object)
    good = {"all": [{"feature": np.ones((1, 3), np.float32), "row": row}]}
    loaded = restricted_loads(pickle.dumps(good))
    np.testing.assert_array_equal(loaded["all"][0]["feature"], good["all"][0]["feature"])
    assert loaded["all"][0]["row"]["PatientID"] == 1


def test_malicious_pkl_file_is_refused_by_the_importer(home, tmp_path):
    path = tmp_path / "Evil_features.pkl"
    path.write_bytes(pickle.dumps({"all": [_Boom()]}))
    with pytest.raises(RefusedPickle):
        ReferenceStore().import_reference("evil", str(path))
    assert "evil" not in ReferenceStore()


def test_parquet_import_round_trip(home, tmp_path):
    frame = synthetic_frame(models=("A", "B"))
    path = tmp_path / "mine.parquet"
    frame.to_parquet(path)
    reference = ReferenceStore().import_reference("mine", str(path))
    assert reference.models == ["A", "B"]
    lesions = reference.lesions("A")
    expected = frame[frame.model == "A"].sort_values(["PatientID", "lesion_id"])
    np.testing.assert_array_equal(reference.space("A").vectors, np.stack(expected.embedding))
    assert list(lesions.PatientID) == list(expected.PatientID)
    assert reference.label_fields == ["histology", "age"]
    assert reference.display_fields == ["histology", "age"]  # a table declares none: all label fields
    assert reference.model_info("A").recipe == "unspecified"
    # the stored Parquet is the canonical single table and imports again as it is
    again = read_source(str(reference.path / "reference.parquet")).table.load()
    np.testing.assert_array_equal(again.embeddings["B"], reference.space("B").vectors)


def test_csv_import_list_and_wide_columns(home, tmp_path):
    frame = synthetic_frame(n_patients=5, dim=4)
    listed = frame.assign(embedding=[" ".join(map(str, v)) for v in frame.embedding])
    listed.to_csv(tmp_path / "listed.csv", index=False)
    wide = frame.drop(columns="embedding").join(
        pd.DataFrame(np.stack(frame.embedding), columns=[f"embedding_{i}" for i in range(4)])
    )
    wide.to_csv(tmp_path / "wide.csv", index=False)
    a = read_source(str(tmp_path / "listed.csv")).table
    b = read_source(str(tmp_path / "wide.csv")).table
    np.testing.assert_allclose(a.embeddings["A"], b.embeddings["A"], rtol=1e-6)
    assert a.embeddings["A"].shape == (len(frame), 4)


def _refused(frame, match, tmp_path, home):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    with pytest.raises(SimilarPatientsError, match=match):
        ReferenceStore().import_reference("bad", str(path))
    assert "bad" not in ReferenceStore()


def test_refuses_missing_required_column(home, tmp_path):
    _refused(synthetic_frame().drop(columns="PatientID"), r"required column.*PatientID", tmp_path, home)
    _refused(synthetic_frame().drop(columns="embedding"), r"no 'embedding' column", tmp_path, home)


def test_refuses_two_lengths_for_one_model(home, tmp_path):
    frame = synthetic_frame()
    frame.at[3, "embedding"] = frame.at[3, "embedding"][:-1]
    _refused(
        frame, r"Model 'A' has embeddings of 2 lengths \(\d+ rows of length 16, 1 rows of length 15\)", tmp_path, home
    )


def test_refuses_non_finite_values(home, tmp_path):
    frame = synthetic_frame()
    vector = frame.at[5, "embedding"].copy()
    vector[2] = np.nan
    frame.at[5, "embedding"] = vector
    _refused(frame, r"1 embedding\(s\) hold NaN", tmp_path, home)


def test_refuses_duplicate_lesion_rows(home, tmp_path):
    frame = synthetic_frame()
    _refused(pd.concat([frame, frame.iloc[[2]]]), r"duplicate lesions \(the same lesion_id", tmp_path, home)
    # without ids or centres, the same vector twice for a patient is the duplicate
    same = pd.concat([frame, frame.iloc[[2]]]).drop(columns="lesion_id")
    _refused(same, r"duplicate lesions \(identical embeddings", tmp_path, home)


def test_refuses_mixed_recipes_and_empty_tables(home, tmp_path):
    frame = synthetic_frame().assign(recipe="r1")
    frame.loc[0, "recipe"] = "r2"
    _refused(frame, r"2 preprocessing recipes", tmp_path, home)
    _refused(synthetic_frame().iloc[:0], r"no rows", tmp_path, home)


def test_refuses_unknown_sources(home, tmp_path):
    with pytest.raises(SimilarPatientsError, match="No such file or folder"):
        read_source(str(tmp_path / "nothing.parquet"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SimilarPatientsError, match="Unsupported file type"):
        read_source(str(tmp_path / "notes.txt"))
    with pytest.raises(SimilarPatientsError, match="holds no"):
        read_source(str(tmp_path))
    with pytest.raises(SimilarPatientsError, match="not a usable reference name"):
        ReferenceStore().import_reference("../escape", str(tmp_path / "notes.txt"))


def test_schema_orders_rows_and_keeps_ids_as_text():
    frame = synthetic_frame(n_patients=4).assign(PatientID=lambda f: f.PatientID.str[1:].astype(int))
    table = schema.from_frame(frame.sample(frac=1, random_state=1))
    lesions = table.model_lesions("A")
    assert lesions.PatientID.tolist() == sorted(lesions.PatientID.tolist())
    assert lesions.PatientID.iloc[0] == "0"


def test_refuses_wide_embedding_columns_with_a_gap(home, tmp_path):
    frame = synthetic_frame(dim=6)
    wide = frame.drop(columns="embedding").join(
        pd.DataFrame(np.stack(frame.embedding), columns=[f"embedding_{i}" for i in range(6)])
    )
    wide = wide.drop(columns="embedding_3")  # one component lost in an export
    path = tmp_path / "wide.csv"
    wide.to_csv(path, index=False)
    with pytest.raises(SimilarPatientsError, match=r"embedding_0…embedding_5 but embedding_3 is missing"):
        ReferenceStore().import_reference("wide", str(path))
    assert "wide" not in ReferenceStore()


def test_refuses_an_all_zero_embedding_naming_its_row(home, tmp_path):
    frame = synthetic_frame()
    frame.at[4, "embedding"] = np.zeros(16, dtype=np.float32)
    _refused(frame, rf"1 embedding\(s\) are all zeros; first: row 4, patient {frame.PatientID[4]}", tmp_path, home)


def test_a_null_embedding_names_its_row(home, tmp_path):
    frame = synthetic_frame()
    table = pa.Table.from_pandas(frame.assign(embedding=[list(v) for v in frame.embedding]), preserve_index=False)
    embedding = table.column("embedding").to_pylist()
    embedding[6] = None
    table = table.set_column(
        table.column_names.index("embedding"), "embedding", pa.array(embedding, pa.list_(pa.float32()))
    )
    pq.write_table(table, tmp_path / "nulls.parquet")
    with pytest.raises(
        SimilarPatientsError, match=rf"1 row\(s\) have no embedding; first: row 6, patient {frame.PatientID[6]}"
    ):
        ReferenceStore().import_reference("nulls", str(tmp_path / "nulls.parquet"))


def test_a_folder_of_parquet_shards_imports_as_one_table_and_a_lesion_with_two_vectors_is_refused(tmp_path):
    def shard(name: str, patients: list, vector: float) -> None:
        rows = [
            {"model": "A", "recipe": "r", "PatientID": p, "lesion_id": "1", "kind": "x", "embedding": [vector, 1.0]}
            for p in patients
        ]
        pd.DataFrame(rows).to_parquet(tmp_path / "shards" / name)

    (tmp_path / "shards").mkdir()
    shard("embeddings-a.parquet", ["P1", "P2"], 0.5)
    shard("embeddings-b.parquet", ["P2", "P3"], 0.5)  # P2 again, same vector: a retried shard
    read = read_source(str(tmp_path / "shards")).table.load()
    assert read.model_lesions("A")[schema.PATIENT].tolist() == ["P1", "P2", "P3"]
    assert read.embeddings["A"].shape == (3, 2)
    shard("embeddings-c.parquet", ["P3"], 0.7)
    with pytest.raises(SimilarPatientsError, match=r"is in the shards of .* twice with different embeddings"):
        read_source(str(tmp_path / "shards")).table.load()


def test_a_lesion_in_two_shards_with_the_same_vector_but_different_labels_is_refused_naming_both(tmp_path):
    (tmp_path / "shards").mkdir()
    for name, stage in (("embeddings-a.parquet", "IA"), ("embeddings-b.parquet", "IV")):
        row = {
            "model": "A",
            "recipe": "r",
            "PatientID": "P1",
            "lesion_id": "1",
            "stage": stage,
            "embedding": [0.5, 1.0],
        }
        pd.DataFrame([row]).to_parquet(tmp_path / "shards" / name)
    with pytest.raises(
        SimilarPatientsError,
        match=r"twice with different 'stage': 'IA' in embeddings-a.parquet, 'IV' in embeddings-b.parquet",
    ):
        read_source(str(tmp_path / "shards")).table.load()


def test_shards_from_different_writers_unify_the_types_that_mean_the_same_and_refuse_the_rest(tmp_path):
    (tmp_path / "shards").mkdir()
    vectors = pa.array([[0.5, 1.0], [0.25, 1.0]], pa.list_(pa.float32()))
    pandas_written = pd.DataFrame(  # pandas: large_string text, integer PatientIDs, an int64 label
        {"model": ["A", "A"], "PatientID": [101, 102], "lesion_id": ["1", "1"], "size": [3, 4], "kind": ["x", "y"]}
    )
    table = pa.Table.from_pandas(pandas_written, preserve_index=False)
    table = table.set_column(table.column_names.index("kind"), "kind", table.column("kind").cast(pa.large_string()))
    pq.write_table(table.append_column("embedding", vectors), tmp_path / "shards" / "embeddings-a.parquet")
    arrow_written = pa.table(  # pyarrow: string text, text PatientIDs, a double label
        {
            "model": ["A"],
            "PatientID": ["P7"],
            "lesion_id": ["1"],
            "size": [2.5],
            "kind": ["z"],
            "embedding": vectors[:1],
        }
    )
    pq.write_table(arrow_written, tmp_path / "shards" / "embeddings-b.parquet")
    read = read_source(str(tmp_path / "shards")).table.load()
    lesions = read.model_lesions("A")
    assert sorted(lesions[schema.PATIENT]) == ["101", "102", "P7"]
    assert sorted(lesions["size"]) == [2.5, 3.0, 4.0] and sorted(lesions["kind"]) == ["x", "y", "z"]
    text = arrow_written.set_column(3, "size", pa.array(["large"]))  # a real conflict: numbers and text
    pq.write_table(text, tmp_path / "shards" / "embeddings-b.parquet")
    with pytest.raises(
        SimilarPatientsError, match=r"The column 'size' has types that do not go together .*int64 in embeddings-a"
    ):
        read_source(str(tmp_path / "shards")).table.load()


@pytest.mark.parametrize("name", [*schema.RESERVED, "Distance", "VIEWER_URL"])
def test_a_label_named_like_a_computed_hit_column_is_refused_naming_it_and_the_reserved_list(home, tmp_path, name):
    frame = synthetic_frame().assign(**{name: 222.0})
    _refused(frame, rf"'{name}' have the name of a value every search result computes", tmp_path, home)
    with pytest.raises(
        SimilarPatientsError, match=r"Reserved names, in any case: rank, distance, metric, .*viewer_url"
    ):
        schema.from_frame(frame)


def test_every_column_a_search_computes_is_reserved():
    from SimilarPatientsLib.cloud import corrected
    from SimilarPatientsLib.cloud.sql import ADDED_COLUMNS
    from SimilarPatientsLib.references.fused import FUSED_COLUMNS
    from SimilarPatientsLib.references.hits import HIT_COLUMNS

    computed = set(HIT_COLUMNS) - schema.STRUCTURAL
    table = {corrected.COLUMN, corrected.RADIUS}  # a pushed table's corrected space
    assert computed | set(ADDED_COLUMNS) | set(FUSED_COLUMNS) | {"closer_than"} | table == set(schema.RESERVED)


def test_labels_that_differ_between_one_patients_lesions_are_imported_and_said(home, tmp_path):
    frame = synthetic_frame(n_patients=6, lesions=(2, 2)).assign(sex="F")
    frame.loc[(frame.PatientID == "P001") & (frame.lesion_id == "L1"), "sex"] = "M"
    path = tmp_path / "mixed.parquet"
    frame.to_parquet(path)
    reference = ReferenceStore().import_reference("mixed", str(path))
    notes = [n for n in reference.manifest["notes"] if "differs" in n]
    assert notes == [
        "'sex' differs between the lesions of 1 patient(s) (e.g. P001: F, M); each lesion keeps its own value. "
        "If 'sex' belongs to the patient (sex, age, ...), correct those rows."
    ]
    lesions = reference.lesions("A")
    assert lesions.loc[lesions.PatientID == "P001", "sex"].tolist() == ["F", "M"]  # each lesion its own value


@pytest.mark.parametrize("model", ["all", "ALL", " All models (fused) ", "fused"])
def test_a_model_named_like_the_fused_search_is_refused_at_import(home, tmp_path, model):
    from SimilarPatientsLib.references import fused

    assert {fused.ALL, fused.FUSED_CHOICE, fused.FUSED_MODEL} == set(schema.RESERVED_MODELS)
    frame = synthetic_frame(n_patients=4, models=("A", model))
    said = rf"The model name '{re.escape(model.strip())}' is reserved: a search reads it as every model fused"
    _refused(frame, said, tmp_path, home)
