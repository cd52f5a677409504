"""The BigQuery statements, proven without BigQuery: every statement parses under sqlglot's BigQuery
dialect, and the exact-mode search, transpiled by sqlglot to DuckDB and run on the reference's own
Parquet, answers exactly as the local store's search (order, patients, lesions, distances to 1e-6) for
every NLST-Sybil model, with and without filters."""

from __future__ import annotations

import re

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlglot
from SimilarPatientsLib import SimilarPatientsError
from SimilarPatientsLib.cloud import sql
from SimilarPatientsLib.cloud.push import bigquery_types, write_upload
from SimilarPatientsLib.cloud.tables import parse_table
from sqlglot import exp

TABLE = parse_table("bq://my-project.embeddings.nlst_sybil")
FILTERS = [
    [],
    ["histology~adeno"],
    ["stage=IA,IB", "age>=60"],
    ["sex!=M", "histology_code=8140,8070"],
    ["race=White,Asian", "age<65"],
    ["smoking=Current"],
]


def _parses_as_bigquery_select(statement: sql.Statement) -> exp.Expression:
    tree = sqlglot.parse_one(statement.sql, read="bigquery", error_level=sqlglot.ErrorLevel.RAISE)
    assert isinstance(tree, exp.Select), type(tree)  # not an opaque Command fallback
    used = {p.name for p in tree.find_all(exp.Parameter)} | {p.name for p in tree.find_all(exp.Placeholder)}
    assert used == {p.name for p in statement.parameters}
    return tree


@pytest.fixture(scope="module")
def bigquery_table(nlst, tmp_path_factory):
    """The table a push loads (ARRAY<FLOAT64> embeddings), as DuckDB table p.d.t, and its column types."""
    path = tmp_path_factory.mktemp("bq") / "upload.parquet"
    write_upload(nlst, path)
    table = pq.read_table(path)
    connection = duckdb.connect()
    connection.execute("ATTACH ':memory:' AS p")
    connection.execute("CREATE SCHEMA p.d")
    connection.execute(f"CREATE TABLE p.d.nlst_sybil AS SELECT * FROM read_parquet('{path}')")
    yield connection, bigquery_types(table.schema)
    connection.close()


def _run_on_duckdb(connection, statement: sql.Statement):
    duck = sqlglot.transpile(statement.sql, read="bigquery", write="duckdb")[0]
    duck = duck.replace('"my-project"."embeddings"."nlst_sybil"', "p.d.nlst_sybil")
    return connection.execute(duck, {p.name: p.value for p in statement.parameters}).df()


def test_the_upload_holds_float64_embeddings_of_the_float32_values(nlst, tmp_path):
    assert write_upload(nlst, tmp_path / "ctfm.parquet", ["CTFM"])[0] == nlst.model_info("CTFM").lesions
    table = pq.read_table(tmp_path / "ctfm.parquet")
    assert set(table.column("model").to_pylist()) == {"CTFM"}
    assert table.schema.field("embedding").type == pa.list_(pa.float64())
    first = table.slice(0, 1).to_pylist()[0]
    model_rows = nlst.lesions(first["model"])
    row = int(np.flatnonzero((model_rows["lesion_id"] == first["lesion_id"]).to_numpy())[0])
    assert first["embedding"] == nlst.space(first["model"]).vectors[row].astype(np.float64).tolist()


def test_the_upload_holds_each_rows_corrected_space_from_the_references_statistics(nlst, tmp_path):
    """Each row's augmented vector is its unit z-scored vector over the square root of its patient's radius,
    with −1/√r appended, in the model's matrix order across models interleaved in the Parquet."""
    from SimilarPatientsLib.cloud import corrected

    rows, statistics = write_upload(nlst, tmp_path / "two.parquet", ["CTFM", "PASTA"])
    table = pq.read_table(tmp_path / "two.parquet").to_pandas()
    for model in ("CTFM", "PASTA"):
        space = nlst.space(model, space="corrected", metric="cosine")
        mine = table[table["model"] == model]
        augmented = np.stack(mine["corrected_embedding"].to_numpy())
        z = space.correction.transformed(np.asarray(space.vectors))
        np.testing.assert_allclose(corrected.unit_from_augmented(augmented), z / np.linalg.norm(z, axis=1)[:, None])
        np.testing.assert_allclose(mine["corrected_radius"], space.row_radii)
        np.testing.assert_allclose((augmented**2).sum(axis=1), 2 / space.row_radii)
        assert statistics[model]["digest"] == corrected.digest(space.correction.centre, space.correction.scale)
        assert set(statistics[model]["files"]) == {"centre.npy", "scale.npy", "radii-cosine.npy"}
    assert rows == len(table)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_mode_on_duckdb_returns_the_local_hits_for_every_model(nlst, bigquery_table, metric):
    connection, types = bigquery_table
    rng = np.random.default_rng(1)
    for model in nlst.models:
        patients = nlst.lesions(model)["PatientID"].unique()
        for where in FILTERS:
            patient = str(rng.choice(patients))
            local = nlst.search(
                model, patient=patient, k=10, metric=metric, where=where, exclude=[patient], space="raw"
            )
            # the patient's own lesions are read by the statement; a query vector is a parameter
            by_patient = sql.SearchSpec(model, None, 10, metric, where, (patient,), patient=patient)
            own = nlst.patient_embeddings(model, patient)
            by_vectors = sql.SearchSpec(model, own.vectors, 10, metric, where, (patient,))
            for spec in (by_patient, by_vectors):
                statement = sql.exact_search(TABLE, spec, types)
                _parses_as_bigquery_select(statement)
                remote = _run_on_duckdb(connection, statement)
                assert len(local) > 0 and list(remote["PatientID"]) == list(local["PatientID"]), (model, where)
                np.testing.assert_allclose(remote["distance"], local["distance"], rtol=0, atol=1e-6)
                assert list(remote["lesion_id"]) == list(local["lesion_id"])
                assert list(remote["patient_lesions"]) == list(local["lesions"])
                assert [own.lesion_ids[i] for i in remote["query_row"]] == list(local["query_lesion"])
            by_patient_rows = _run_on_duckdb(connection, sql.exact_search(TABLE, by_patient, types))
            assert list(by_patient_rows["query_lesion"]) == list(local["query_lesion"])


def test_a_single_query_vector_is_the_batch_query_table_of_one_parameter(nlst, bigquery_table):
    connection, types = bigquery_table
    vector = nlst.space("CTFM").vectors[5]
    statement = sql.exact_search(TABLE, sql.SearchSpec("CTFM", vector, 5), types)
    assert "(SELECT 0 AS query_row, @query AS `embedding`)" in statement.sql
    assert [p.type for p in statement.parameters if p.name == "query"] == ["ARRAY<FLOAT64>"]
    local = nlst.search("CTFM", embeddings=vector, k=5, space="raw")
    remote = _run_on_duckdb(connection, statement)
    assert list(remote["PatientID"]) == list(local["PatientID"])
    np.testing.assert_allclose(remote["distance"], local["distance"], atol=1e-6)


def test_vector_search_statement_parses_and_writes_only_checked_literals(nlst, bigquery_table):
    _, types = bigquery_table
    queries = nlst.patient_embeddings("CTFM", "100012").vectors
    spec = sql.SearchSpec("CTFM", queries, 7, "cosine", ["stage=IA", "histology~squam"], ("100012",))
    statement = sql.vector_search(
        TABLE, spec, types, stored={"model", "PatientID", "stage"}, max_lesions=3, fraction_lists_to_search=0.05
    )
    tree = _parses_as_bigquery_select(statement)
    assert "distance_type => 'COSINE'" in statement.sql
    assert "options => '{\"fraction_lists_to_search\": 0.05}'" in statement.sql
    assert re.search(r"top_k => (\d+)", statement.sql).group(1) == str((7 + 1) * 3 * sql.POST_FILTER_OVERFETCH)
    assert "ORDER BY distance" in statement.sql
    # the stored column filters the base table (pre-filter), the other one what the search found
    base = statement.sql.split("VECTOR_SEARCH(")[1].split("'embedding'")[0]
    assert "`stage`" in base and "`histology`" not in base
    assert statement.notes and "histology" in statement.notes[0] and "fewer than 7" in statement.notes[0]
    # no value a user gave is in the text: all are parameters
    assert "IA" not in statement.sql and "squam" not in statement.sql and "100012" not in statement.sql
    assert {p.name: p.type for p in statement.parameters}["filter_0"] == "ARRAY<STRING>"
    assert tree.find(exp.Limit) is not None
    everything_stored = sql.vector_search(
        TABLE, spec, types, stored=set(types), max_lesions=3, fraction_lists_to_search=None
    )
    assert not everything_stored.notes and "options =>" not in everything_stored.sql
    _parses_as_bigquery_select(everything_stored)


def test_euclidean_search_names_its_distance_type_and_dot_is_refused(nlst, bigquery_table):
    _, types = bigquery_table
    spec = sql.SearchSpec("CTFM", nlst.space("CTFM").vectors[0], 3, "euclidean")
    statement = sql.vector_search(TABLE, spec, types, stored=(), max_lesions=2)
    assert "distance_type => 'EUCLIDEAN'" in statement.sql and "EUCLIDEAN_DISTANCE(" not in statement.sql
    assert "query.* EXCEPT (`embedding`), distance\n" in statement.sql  # VECTOR_SEARCH's own distance
    with pytest.raises(SimilarPatientsError, match="cosine and euclidean"):
        sql.exact_search(TABLE, sql.SearchSpec("CTFM", nlst.space("CTFM").vectors[0], 3, "dot"), types)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"k": 0}, "k must be"),
        ({"k": 2.5}, "k must be"),
        ({"where": ["nosuchfield=1"]}, "No field 'nosuchfield'"),
        ({"where": ["age=old"]}, "holds numbers"),
        ({"where": ["age>=sixty"]}, "not a number"),
        ({"where": ["embedding=1"]}, "No field 'embedding'"),
    ],
)
def test_bad_searches_are_refused_before_any_sql(nlst, bigquery_table, change, message):
    _, types = bigquery_table
    arguments = {"model": "CTFM", "queries": nlst.space("CTFM").vectors[0], "k": 5, **change}
    with pytest.raises(SimilarPatientsError, match=message):
        sql.exact_search(TABLE, sql.SearchSpec(**arguments), types)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan"), "0.1; DROP TABLE x"])
def test_fraction_lists_to_search_is_a_checked_number(nlst, bigquery_table, fraction):
    _, types = bigquery_table
    spec = sql.SearchSpec("CTFM", nlst.space("CTFM").vectors[0], 5)
    with pytest.raises((SimilarPatientsError, ValueError)):
        sql.vector_search(TABLE, spec, types, stored=(), max_lesions=1, fraction_lists_to_search=fraction)


@pytest.mark.parametrize(
    "name",
    [
        "project.dataset",
        "my-project.data set.t",
        "my-project.d.t`; DROP TABLE x; --",
        "MyProject.d.t",
        "bq://",
        "a.b.c",
    ],
)
def test_table_names_are_validated(name):
    with pytest.raises(SimilarPatientsError, match=r"PROJECT\.DATASET\.TABLE"):
        parse_table(name)


def test_index_statement_is_cosine_and_stores_the_filter_columns():
    statement = sql.index_statement(TABLE, ["model", "PatientID", "stage"], "TREE_AH")
    # sqlglot has no grammar for CREATE VECTOR INDEX (it falls back to an opaque command): check its tokens
    # under the BigQuery dialect and its shape instead
    tokens = sqlglot.tokenize(statement.sql, read="bigquery")
    assert [t.text.upper() for t in tokens[:5]] == ["CREATE", "OR", "REPLACE", "VECTOR", "INDEX"]
    assert re.fullmatch(
        r"CREATE OR REPLACE VECTOR INDEX `similar_patients_embedding` ON `my-project\.embeddings\.nlst_sybil`"
        r"\(`embedding`\) STORING\(`model`, `PatientID`, `stage`\)\n"
        r"OPTIONS\(index_type = 'TREE_AH', distance_type = 'COSINE'\)",
        statement.sql,
    )
    storing = sqlglot.parse_one("SELECT " + statement.sql.split("STORING(")[1].split(")")[0], read="bigquery")
    assert [c.name for c in storing.expressions] == ["model", "PatientID", "stage"]
    with pytest.raises(SimilarPatientsError, match="IVF or TREE_AH"):
        sql.index_statement(TABLE, [], "HNSW")
    with pytest.raises(SimilarPatientsError, match="column name"):
        sql.index_statement(TABLE, ["bad name"], "IVF")


def test_a_push_refuses_columns_a_search_adds_and_names_sql_cannot_quote(tmp_path):
    from conftest import store_frame, synthetic_frame
    from SimilarPatientsLib import ReferenceStore
    from SimilarPatientsLib.references import schema

    # imports refuse such a label (schema.RESERVED); a reference stored before they did is refused at push
    table = schema.from_frame(synthetic_frame(n_patients=6, dim=8))
    stored = schema.ReferenceTable(table.lesions.assign(distance=1.0), table.embeddings)
    clashing = ReferenceStore(tmp_path).write("clash", stored, "test")
    with pytest.raises(SimilarPatientsError, match=r"column\(s\) \['distance'\], which BigQuery searches add"):
        write_upload(clashing, tmp_path / "upload.parquet")
    spaced = store_frame(synthetic_frame(n_patients=6, dim=8).assign(**{"tumor size": 1.0}), tmp_path, "spaced")
    with pytest.raises(SimilarPatientsError, match="The column name 'tumor size' cannot be used in BigQuery SQL"):
        write_upload(spaced, tmp_path / "upload.parquet")
