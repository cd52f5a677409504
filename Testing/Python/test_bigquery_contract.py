"""Contract test: the library's real google-cloud-bigquery client code against a loopback server that
checks every request against the BigQuery REST contract (``bigquery_contract.py``): the push's Parquet
load job (multipart and resumable upload), query jobs with typed parameters, dry runs, getQueryResults
paging, the index DDL, and BigQuery's error bodies turned into the library's clear errors. Searches run
on what the load uploaded and must give the local store's hits."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet
import pytest
from bigquery_contract import BigQueryContractServer
from SimilarPatientsLib import SimilarPatientsError
from SimilarPatientsLib.cloud import client as bq
from SimilarPatientsLib.cloud import open_reference, parse_table
from SimilarPatientsLib.cloud import sql as bq_sql
from SimilarPatientsLib.cloud.push import push
from SimilarPatientsLib.cloud.remote import BigQueryReference

bigquery = pytest.importorskip("google.cloud.bigquery")
PROJECT = "my-project"
ALL_MODELS = parse_table(f"{PROJECT}.embeddings.nlst_sybil")
INDEXED = parse_table(f"{PROJECT}.embeddings.indexed_a")


@pytest.fixture(scope="module")
def server():
    with BigQueryContractServer(PROJECT) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    from google.auth.credentials import AnonymousCredentials

    return bigquery.Client(
        project=PROJECT, credentials=AnonymousCredentials(), client_options={"api_endpoint": server.url}
    )


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """One model's reference of 12 MB in BigQuery (2,800 lesions × 512): large enough for a vector index."""
    from conftest import store_frame, synthetic_frame

    return store_frame(synthetic_frame(1400, dim=512, seed=3), tmp_path_factory.mktemp("large"), "large")


def _references(server) -> list:
    """The reference tables the server holds (not the statistics tables beside them)."""
    return [path for path in server.tables if "__space_" not in path]


def _reimported(reference):
    """The same reference as a later import makes it: another ``created`` in its manifest."""
    again = copy.copy(reference)
    again.manifest = {**reference.manifest, "created": "2031-01-01T00:00:00+00:00"}
    return again


@pytest.fixture(scope="module")
def pushed(nlst, large, server, client):
    """NLST-Sybil pushed, then again after a re-import (a new description); one model of 12 MB pushed with
    an index, then again (the description then names the index)."""
    first = push(nlst, ALL_MODELS, client)
    again = push(_reimported(nlst), ALL_MODELS, client)
    indexed = push(large, INDEXED, client, create_index=True, index_space="raw")
    indexed_again = push(_reimported(large), INDEXED, client, create_index=True, index_space="raw")
    return first, again, indexed, indexed_again


def test_contract_push_loads_a_staging_table_and_replaces_the_table_with_one_statement(nlst, server, pushed):
    first, again, indexed, indexed_again = pushed
    assert server.violations == []
    assert first.rows == again.rows == len(nlst.lesions()) and first.bytes == again.bytes > 20e6
    # the client uploads resumably; each push loaded its statistics table and its own staging table, gone now
    assert len(server.asked("POST", "upload")) == 8 and len(server.asked("PUT", "upload")) == 8
    assert sorted(_references(server)) == sorted([ALL_MODELS.path, INDEXED.path])
    assert server.tables[ALL_MODELS.path]["clustering"] == ["model", "PatientID"]
    assert server.tables[ALL_MODELS.path]["index"] is None
    manifest = json.loads(server.tables[ALL_MODELS.path]["description"])["similar_patients"]
    assert manifest["created"] == "2031-01-01T00:00:00+00:00"  # the re-push's own description
    fields = {f["name"]: (f["type"], f["mode"]) for f in server.tables[ALL_MODELS.path]["fields"]}
    assert fields["embedding"] == ("FLOAT", "REPEATED")
    assert indexed.index == indexed_again.index == "IVF"
    assert server.tables[INDEXED.path]["index"]["stored"][:3] == ["model", "PatientID", "lesion_id"]
    manifest = json.loads(server.tables[INDEXED.path]["description"])["similar_patients"]
    assert sorted(manifest["models"]) == ["A"] and manifest["index"]["type"] == "IVF"
    assert manifest["models"]["A"]["max_lesions"] >= 2 and manifest["created"].startswith("2031")


def test_contract_the_push_table_replace_is_a_billed_query_with_a_byte_limit(nlst, server, pushed):
    """CREATE TABLE … AS SELECT reads the staging table once, billed as a query: limited to that."""
    replaces = [j["resource"] for j in server.jobs.values() if "CREATE OR REPLACE TABLE" in str(j["resource"])]
    assert replaces
    for job in replaces:
        limit = int(job["configuration"]["query"]["maximumBytesBilled"])
        billed = int(job["statistics"]["query"]["totalBytesBilled"])
        assert billed == limit >= 10 * 2**20


def test_contract_a_load_job_cannot_change_an_existing_tables_description(server, client, pushed):
    """The rule that made every re-push fail while pushes were load jobs with a description."""
    from google.api_core.exceptions import GoogleAPICallError

    config = bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.PARQUET,
        write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
        destination_table_description="another description",
    )
    parquet = bigquery.ParquetOptions()
    parquet.enable_list_inference = True
    config.parquet_options = parquet
    sink = io.BytesIO()
    pa.parquet.write_table(pa.table({"model": ["A"], "embedding": [[1.0, 2.0]]}), sink)
    sink.seek(0)
    with pytest.raises(GoogleAPICallError, match="Cannot change the description"):
        client.load_table_from_file(sink, ALL_MODELS.path, job_config=config).result()
    assert "similar_patients" in server.tables[ALL_MODELS.path]["description"]  # the table is as it was


def test_contract_a_failed_push_leaves_the_previous_table_and_no_staging_table(nlst, server, client, pushed):
    before = dict(server.tables[ALL_MODELS.path])
    server.fail("POST jobs", 403, "quotaExceeded", "simulated quota during CREATE OR REPLACE TABLE")
    with pytest.raises(SimilarPatientsError, match="quota exceeded"):
        push(_reimported(nlst), ALL_MODELS, client)
    assert server.tables[ALL_MODELS.path]["etag"] == before["etag"] and not server.failures
    assert sorted(_references(server)) == sorted([ALL_MODELS.path, INDEXED.path])


def test_contract_small_table_gets_no_index_and_says_why(nlst, server, client):
    small = parse_table(f"{PROJECT}.embeddings.ctfm")
    result = push(nlst, small, client, models=["CTFM"], create_index=True)
    assert result.index is None and "never populates an index" in result.notes[0]
    assert len(server.asked("POST", "upload")) >= 1 and server.violations == []
    del server.tables[small.path]


def test_contract_a_push_refuses_one_index_over_several_models_before_loading(nlst, client, server):
    uploads = len(server.asked("POST", "upload"))
    with pytest.raises(SimilarPatientsError, match=r"A vector index is made per model.*own table: --model M"):
        push(nlst, ALL_MODELS, client, models=["CTFM", "Merlin"], create_index=True)  # one length, two spaces
    assert len(server.asked("POST", "upload")) == uploads


@pytest.mark.parametrize("space", ["corrected", "raw"])
@pytest.mark.parametrize("where", [[], ["histology~adeno"], ["stage=IA,IB", "age>=60"], ["sex!=M"]])
def test_contract_exact_search_gives_the_local_hits_through_typed_parameters_and_paging(
    nlst, server, client, pushed, where, space
):
    remote = BigQueryReference(ALL_MODELS, client)
    assert remote.models == nlst.models and remote.label_fields == nlst.label_fields
    pages = len([q for q in server.asked("GET", "queries") if q.get("pageToken")])
    for model in nlst.models:
        patient = nlst.lesions(model)["PatientID"].iloc[100]
        local = nlst.search(model, patient=patient, k=10, where=where, exclude=[patient], space=space)
        hits = remote.search(model, patient=patient, k=10, where=where, exclude=[patient], method="exact", space=space)
        assert list(hits["PatientID"]) == list(local["PatientID"])
        np.testing.assert_allclose(hits["distance"], local["distance"], atol=1e-6)
        for column in ("lesion_id", "query_lesion", "lesions", "SeriesInstanceUID", "viewer_url", "search", "space"):
            assert list(hits[column]) == list(local[column]), column
        assert list(hits.columns) == list(local.columns)
        assert "BigQuery billed" in hits.attrs["notes"][0]
    assert server.violations == []
    # 10 hits in pages of 4 rows: the client followed the page tokens
    assert len([q for q in server.asked("GET", "queries") if q.get("pageToken")]) > pages


def test_contract_vector_search_reports_an_unused_index_with_its_fix(large, server, client, pushed):
    remote = BigQueryReference(INDEXED, client, fraction_lists_to_search=0.1)
    vector = large.space("A").vectors[3]
    hits = remote.search("A", embeddings=vector, k=5, space="raw")  # auto: the table has an index, not yet populated
    local = large.search("A", embeddings=vector, k=5, method="exact", space="raw")
    assert list(hits["PatientID"]) == list(local["PatientID"])
    np.testing.assert_allclose(hits["distance"], local["distance"], atol=1e-6)
    notes = " ".join(hits.attrs["notes"])
    assert "the vector index was not used (The vector index is still being built.)" in notes
    assert "--create-index" in notes and set(hits["search"]) == {"exact"}
    assert server.violations == []


def test_contract_an_indexed_search_uses_vector_searchs_own_distance_and_stored_columns(large, client, pushed):
    remote = BigQueryReference(INDEXED, client)
    statement = remote.statement("A", patient="P007", k=5, space="raw")
    found = statement.sql.split("nearest AS")[0]
    assert "VECTOR_SEARCH(" in found and "COSINE_DISTANCE" not in found and "EUCLIDEAN_DISTANCE" not in found
    assert "SELECT base.* EXCEPT (`embedding`), query.* EXCEPT (`embedding`), distance" in found
    vectors = {"embedding", "corrected_embedding", "corrected_radius"}  # a raw index stores no corrected column
    assert set(remote.index["stored"]) == set(remote.column_types) - vectors  # base.* is all stored


def test_contract_a_populated_index_answers_approximately_and_says_so_with_its_measured_recall(
    large, server, client, pushed
):
    server.populate_index(INDEXED.path)
    try:
        rng = np.random.default_rng(0)
        recalls = []
        for row in rng.choice(len(large.space("A").vectors), 8, replace=False):
            vector = large.space("A").vectors[row] + 0.5 * rng.standard_normal(512)
            checked = BigQueryReference(INDEXED, client, fraction_lists_to_search=0.05, check_recall=True)
            hits = checked.search("A", embeddings=vector, k=10, space="raw")
            exact = large.search("A", embeddings=vector, k=10, method="exact", space="raw")
            assert set(hits["search"]) == {"approximate"} and hits["index_recall"].nunique() == 1
            recall = len(set(hits["PatientID"]) & set(exact["PatientID"])) / 10
            assert hits["index_recall"].iloc[0] == pytest.approx(recall)  # measured against use_brute_force
            assert any(n.startswith("search: approximate") and f"recall {recall:.3f}" in n for n in hits.attrs["notes"])
            recalls.append(recall)
        assert min(recalls) < 1.0  # an IVF search on 5% of its lists misses neighbours, and it is said
        unmeasured = BigQueryReference(INDEXED, client).search("A", embeddings=vector, k=10, space="raw")
        assert np.isnan(unmeasured["index_recall"]).all()
        assert any("recall not measured (--check-recall" in n for n in unmeasured.attrs["notes"])
        # a pre-filter leaves the probed lists too few lesions: fewer than k come back, and the notes say so
        few = BigQueryReference(INDEXED, client, fraction_lists_to_search=0.02).search(
            "A", embeddings=vector, k=10, where=["age<60"], space="raw"
        )
        assert len(few) < 10 and any("came back: an approximate search with filters" in n for n in few.attrs["notes"])
        assert len(large.search("A", embeddings=vector, k=10, where=["age<60"], method="exact")) == 10
    finally:
        server.tables[INDEXED.path]["index"]["populated"] = False
    assert server.violations == []


def test_contract_dry_run_reports_the_bytes_and_runs_nothing(nlst, server, client, pushed):
    remote = BigQueryReference(ALL_MODELS, client)
    statement = remote.statement("CTFM", nlst.space("CTFM").vectors[0], k=5, method="exact")
    jobs = len(server.jobs)
    scanned = remote.dry_run(statement)
    columns = server.tables[ALL_MODELS.path]["column_bytes"]  # every column but the raw embedding's
    assert scanned == server.tables[ALL_MODELS.path]["bytes"] - columns["embedding"] > 20e6
    assert len(server.jobs) == jobs + 1 and "result" not in list(server.jobs.values())[-1]
    inserted = server.asked("POST", "jobs")
    assert inserted and server.violations == []


def test_contract_maximum_bytes_billed_stops_the_query_with_what_to_do(nlst, server, client, pushed):
    remote = BigQueryReference(ALL_MODELS, client, maximum_bytes_billed=1_000_000)
    needed = server.tables[ALL_MODELS.path]["bytes"] - server.tables[ALL_MODELS.path]["column_bytes"]["embedding"]
    expected = rf"would bill more than 1,000,000 bytes.*{needed} or higher.*--dry-run.*--maximum-bytes-billed"
    with pytest.raises(SimilarPatientsError, match=expected):
        remote.search("CTFM", embeddings=nlst.space("CTFM").vectors[0], k=5, method="exact")


@pytest.mark.parametrize(
    "route, status, reason, expected",
    [
        ("GET tables", 404, "notFound", "push a reference there first"),
        ("GET tables", 403, "accessDenied", "Permission denied on my-project.embeddings.nlst_sybil.*Job User"),
        ("POST jobs", 403, "quotaExceeded", "quota exceeded.*--billing-project"),
        ("POST jobs", 403, "billingNotEnabled", "Billing is not enabled"),
    ],
)
def test_contract_error_bodies_become_clear_errors(nlst, server, client, pushed, route, status, reason, expected):
    server.fail(route, status, reason, f"simulated {reason}")
    with pytest.raises(SimilarPatientsError, match=expected):
        BigQueryReference(ALL_MODELS, client).search("CTFM", embeddings=nlst.space("CTFM").vectors[0], method="exact")
    assert not server.failures


def test_contract_a_table_not_pushed_by_the_library_is_refused(server, client, pushed):
    server.tables[f"{PROJECT}.embeddings.foreign"] = {**server.tables[ALL_MODELS.path], "description": "IDC table"}
    with pytest.raises(SimilarPatientsError, match="was not pushed by similar-patients"):
        BigQueryReference(f"bq://{PROJECT}.embeddings.foreign", client)


def test_missing_credentials_say_how_to_log_in(tmp_path, monkeypatch):
    for variable in ("GOOGLE_APPLICATION_CREDENTIALS", "BIGQUERY_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud login here
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # and not on a Google Cloud machine
    with pytest.raises(SimilarPatientsError, match="gcloud auth application-default login"):
        bq.connect(ALL_MODELS)


def test_a_bq_name_opens_a_bigquery_reference_and_others_the_local_store(nlst_home, server, pushed, monkeypatch):
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", server.url)
    from SimilarPatientsLib import ReferenceStore

    remote = open_reference(ALL_MODELS.url)
    assert isinstance(remote, BigQueryReference) and remote.name == "bq://my-project.embeddings.nlst_sybil"
    local = open_reference("nlst-sybil", ReferenceStore(nlst_home))
    assert local.name == "nlst-sybil" and open_reference(local) is local


def test_contract_cli_pushes_and_searches_a_bq_reference_as_a_stored_one(nlst_home, server, monkeypatch, capsys):
    from SimilarPatientsLib.cli import main

    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(nlst_home))
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", server.url)  # a test server: no credentials
    table = f"{PROJECT}.embeddings.cli_ctfm"
    assert main(["references", "push", "nlst-sybil", "--bigquery", table, "--model", "CTFM", "--create-index"]) == 0
    pushed = capsys.readouterr().out
    assert "never populates an index" in pushed and f"--reference bq://{table}" in pushed
    search = ["neighbors", "--model", "CTFM", "--patient", "100012", "-k", "6", "--where", "stage=IA,IB", "--json"]
    assert main([*search, "--reference", "nlst-sybil"]) == 0  # both in the corrected space
    local = json.loads(capsys.readouterr().out)
    assert main([*search, "--reference", f"bq://{table}"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert [h["PatientID"] for h in remote] == [h["PatientID"] for h in local]
    np.testing.assert_allclose([h["distance"] for h in remote], [h["distance"] for h in local], atol=1e-6)
    assert main([*search[:-1], "--reference", f"bq://{table}"]) == 0
    assert "note: BigQuery billed" in capsys.readouterr().out
    jobs = len(server.jobs)
    assert main([*search[:-1], "--reference", f"bq://{table}", "--print-sql", "--space", "raw"]) == 0
    printed = capsys.readouterr().out
    assert "COSINE_DISTANCE(" in printed and "--   @patient STRING = 100012" in printed and len(server.jobs) == jobs
    assert main([*search[:-1], "--reference", f"bq://{table}", "--dry-run"]) == 0
    columns = server.tables[table]["column_bytes"]  # the corrected search reads no raw embedding
    assert f"would process {server.tables[table]['bytes'] - columns['embedding']:,} bytes" in capsys.readouterr().out
    assert main([*search[:-1], "--reference", "nlst-sybil", "--print-sql"]) == 2
    assert "for BigQuery references" in capsys.readouterr().err
    assert main([*search[:-1], "--reference", "bq://my-project.embeddings.absent"]) == 2
    assert "push a reference there first" in capsys.readouterr().err
    assert server.violations == []


def test_contract_post_filters_apply_to_what_vector_search_returned(large, server, client, pushed):
    remote = BigQueryReference(INDEXED, client)
    remote.manifest["index"] = {**remote.index, "stored": ["model", "PatientID", "lesion_id"]}  # an older index
    vector = large.space("A").vectors[10]
    hits = remote.search("A", embeddings=vector, k=5, where=["histology~adeno"], method="approximate", space="raw")
    local = large.search("A", embeddings=vector, k=5, where=["histology~adeno"], method="exact", space="raw")
    assert list(hits["PatientID"]) == list(local["PatientID"])
    assert any("post-filter" in note and "histology" in note for note in hits.attrs["notes"])
    # a filter too narrow for the over-fetch returns fewer than k patients, and says so
    few = remote.search("A", embeddings=vector, k=5, where=["age<53"], method="approximate", space="raw")
    exact = remote.search("A", embeddings=vector, k=5, where=["age<53"], method="exact", space="raw")
    assert len(few) < len(exact) == 3
    assert any("passed the post-filters; --method exact finds all" in note for note in few.attrs["notes"])
    assert server.violations == []


def test_contract_an_image_query_of_a_bq_reference_gives_the_local_hits(tmp_path, server, monkeypatch, capsys):
    pytest.importorskip("SimpleITK")
    from conftest import descriptor_reference
    from SimilarPatientsLib.imaging.tumor import from_binary_mask
    from SimilarPatientsLib.query import query_image
    from synthetic_ct import tumor_ct

    rng = np.random.default_rng(4)
    stored = descriptor_reference(tmp_path / "home", 3, rng)
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", server.url)
    table = parse_table(f"{PROJECT}.embeddings.tumors")
    push(stored, table, bq.connect(table))
    image, mask, _ = tumor_ct("spiculated", rng)
    local = query_image(
        image, from_binary_mask(mask), "TumorDescriptor", stored, k=4, where=["kind!=cavitary"]
    )  # both in the corrected space: the query z-scored with the statistics table's centre and scale
    remote = query_image(image, from_binary_mask(mask), "TumorDescriptor", table.url, k=4, where=["kind!=cavitary"])
    assert list(remote.hits["PatientID"]) == list(local.hits["PatientID"]) and len(local.hits) == 4
    np.testing.assert_allclose(remote.hits["distance"], local.hits["distance"], atol=1e-6)
    assert remote.reference == table.url and server.violations == []
    # the command line: the statement of an image query, with its query vector as a typed parameter
    import SimpleITK as sitk
    from SimilarPatientsLib.cli import main

    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(tmp_path / "home"))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nrrd"))
    argv = ["query", "--image", str(tmp_path / "ct.nrrd"), "--mask", str(tmp_path / "mask.nrrd")]
    argv += [
        "--model",
        "TumorDescriptor",
        "--reference",
        table.url,
        "-k",
        "4",
        "--print-sql",
        "--dry-run",
        "--space",
        "raw",
    ]
    jobs = len(server.jobs)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "(SELECT 0 AS query_row, @query AS `embedding`)" in printed and "--   @query ARRAY<FLOAT64> = [" in printed
    assert "Dry run: the search would process" in printed and len(server.jobs) == jobs + 1


def test_contract_a_fused_search_of_a_bq_reference_fuses_as_the_local_one(nlst, server, client, pushed):
    """Reciprocal rank fusion from each model's BigQuery search gives the local fused hits; percentile
    fusion, which needs the closeness distributions BigQuery does not measure, is refused."""
    remote = BigQueryReference(ALL_MODELS, client)
    patient = nlst.lesions("CTFM")["PatientID"].iloc[50]
    options = dict(patient=patient, models=["CTFM", "Merlin", "PASTA"], k=8, exclude=[patient], depth=20)
    local = nlst.search_fused(**options)  # both in the corrected space
    hits = remote.search_fused(**options, method="exact")
    assert list(hits["PatientID"]) == list(local["PatientID"])
    np.testing.assert_allclose(hits["fused_score"], local["fused_score"])
    for model in options["models"]:
        assert hits[f"rank_{model}"].tolist() == local[f"rank_{model}"].tolist()
        listed = local[f"rank_{model}"].notna().to_numpy()
        np.testing.assert_allclose(hits[f"distance_{model}"][listed], local[f"distance_{model}"][listed], atol=1e-6)
        assert hits[f"distance_{model}"][~listed].isna().all()  # not measured beyond the depth in BigQuery
    for column in ("lesion_model", "lesion_id", "viewer_url", "listed_by"):
        assert list(hits[column]) == list(local[column]), column
    assert not [c for c in hits.columns if c.startswith("closer_than_")]
    assert hits.attrs["notes"][0].startswith("CTFM: BigQuery billed")
    with pytest.raises(SimilarPatientsError, match=r"Percentile fusion needs .* fuse with --fusion rrf"):
        remote.search_fused(**options, fusion="percentile")
    assert server.violations == []


def test_contract_cli_prints_each_models_statement_of_a_fused_search(nlst_home, server, pushed, monkeypatch, capsys):
    from SimilarPatientsLib.cli import main

    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(nlst_home))
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", server.url)
    jobs = len(server.jobs)
    # raw: in the corrected space a patient's lesions are read first, so --print-sql runs that read
    argv = [
        "neighbors",
        "--reference",
        ALL_MODELS.url,
        "--model",
        "CTFM",
        "Merlin",
        "--patient",
        "100012",
        "--space",
        "raw",
    ]
    assert main([*argv, "--print-sql", "--depth", "30"]) == 0
    printed = capsys.readouterr().out
    assert "-- CTFM" in printed and "-- Merlin" in printed and printed.count("LIMIT 30") == 2
    for asked in ([], ["--print-sql"]):  # the depth is refused by its own name, not as "k" (-k was 5)
        assert main([*argv, *asked, "--depth", "20000"]) == 2
        assert "The fusion depth (--depth, the patients each model's search asks for) is at most 10,000" in (
            capsys.readouterr().err
        )
    assert len(server.jobs) == jobs


def test_contract_an_unknown_patient_is_refused_before_the_embeddings_are_billed(nlst, server, client, pushed):
    remote = BigQueryReference(ALL_MODELS, client)
    jobs = len(server.jobs)
    with pytest.raises(SimilarPatientsError, match=r"Patient 999999 is not in reference 'bq://my-project.*CTFM"):
        remote.search("CTFM", patient="999999", k=5, method="exact", space="raw")
    (job,) = [j["resource"] for j in list(server.jobs.values())[jobs:]]  # one query, of two text columns
    read = int(job["statistics"]["query"]["totalBytesProcessed"])
    columns = server.tables[ALL_MODELS.path]["column_bytes"]
    assert read == columns["model"] + columns["PatientID"] < columns["embedding"] / 50
    # in the corrected space the patient's lesions are read first (its clustered blocks), and that is the check
    jobs = len(server.jobs)
    with pytest.raises(SimilarPatientsError, match=r"Patient 999999 is not in reference 'bq://my-project.*CTFM"):
        remote.search("CTFM", patient="999999", k=5, method="exact")
    (job,) = [j["resource"] for j in list(server.jobs.values())[jobs:]]
    assert "corrected_embedding" in job["configuration"]["query"]["query"]
    assert len(remote.search("CTFM", patient=str(nlst.lesions("CTFM")["PatientID"].iloc[0]), k=3)) == 3


@pytest.mark.parametrize("limit", [-1, 0, 2**63, 1.5, True])
def test_a_byte_limit_bigquery_cannot_hold_is_refused_before_connecting(limit):
    with pytest.raises(SimilarPatientsError, match="--maximum-bytes-billed must be a whole number of bytes from 1"):
        BigQueryReference(ALL_MODELS, client=object(), maximum_bytes_billed=limit)


@pytest.mark.parametrize("project", ["my-project/jobs/../../x", "My-Project", "a", "my project", "x" * 40])
def test_a_billing_project_is_checked_as_project_ids_are(project):
    with pytest.raises(SimilarPatientsError, match="is not a Google Cloud project id"):
        bq.connect(ALL_MODELS, project)


def test_cli_refuses_k_0_and_bad_byte_limits_the_same_for_local_and_bigquery_references(nlst_home, monkeypatch, capsys):
    from SimilarPatientsLib.cli import main

    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(nlst_home))
    for reference in ("nlst-sybil", "bq://my-project.embeddings.nlst_sybil"):
        base = ["neighbors", "--reference", reference, "--model", "CTFM", "--patient", "100012"]
        for extra, message in (
            (["-k", "0"], "argument -k: must be a whole number from 1 to 10,000, not '0'"),
            (["--maximum-bytes-billed", "-1"], "must be a whole number from 1 to 9,223,372,036,854,775,807"),
            (["--maximum-bytes-billed", str(2**63)], "must be a whole number from 1 to 9,223,372,036,854,775,807"),
        ):
            with pytest.raises(SystemExit) as stopped:
                main([*base, *extra])
            assert stopped.value.code == 2 and message in capsys.readouterr().err
    argv = ["neighbors", "--reference", "bq://my-project.embeddings.nlst_sybil", "--model", "CTFM", "--patient", "1"]
    assert main([*argv, "--billing-project", "my-project/jobs/../../x"]) == 2
    assert "is not a Google Cloud project id" in capsys.readouterr().err


@pytest.fixture
def populated(server, pushed):
    """INDEXED's index populated for one test (BigQuery has finished building it), then unpopulated again."""
    server.populate_index(INDEXED.path)
    yield server
    server.tables[INDEXED.path]["index"].update(populated=False, coverage=1.0)
    server.edition = "ENTERPRISE"


def _billing(server, project: str):
    from google.auth.credentials import AnonymousCredentials

    return bigquery.Client(
        project=project, credentials=AnonymousCredentials(), client_options={"api_endpoint": server.url}
    )


def test_contract_a_search_billed_to_another_project_is_exact_and_vector_search_is_refused_up_front(
    large, populated, client
):
    """VECTOR_SEARCH runs only in the table's project: ``auto`` falls back to the exact statement (and says
    why), ``approximate`` and ``--check-recall`` are refused before any job, with the fix."""
    other = _billing(populated, "billing-project")
    vector = large.space("A").vectors[3]
    jobs = len(populated.jobs)
    hits = BigQueryReference(INDEXED, other).search("A", embeddings=vector, k=5, space="raw")
    local = large.search("A", embeddings=vector, k=5, method="exact", space="raw")  # BigQuery searches the raw space
    assert list(hits["PatientID"]) == list(local["PatientID"]) and set(hits["search"]) == {"exact"}
    assert any("VECTOR_SEARCH only in the table's project (my-project)" in n for n in hits.attrs["notes"])
    assert {job["resource"]["jobReference"]["projectId"] for job in list(populated.jobs.values())[jobs:]} == {
        "billing-project"
    }
    jobs = len(populated.jobs)
    fix = r"only in the project that holds the table \(my-project\).*--billing-project my-project.*--method exact"
    with pytest.raises(SimilarPatientsError, match=fix):
        BigQueryReference(INDEXED, other).search("A", embeddings=vector, k=5, method="approximate", space="raw")
    with pytest.raises(SimilarPatientsError, match=fix):
        BigQueryReference(INDEXED, other, check_recall=True)
    assert len(populated.jobs) == jobs  # nothing ran
    # the same search in the table's project uses the index
    assert set(BigQueryReference(INDEXED, client).search("A", embeddings=vector, k=5, space="raw")["search"]) == {
        "approximate"
    }
    assert populated.violations == []


def test_contract_the_server_refuses_vector_search_from_another_project_and_runs_exact_queries(
    large, populated, client
):
    from google.api_core.exceptions import GoogleAPICallError

    other = _billing(populated, "billing-project")
    statement = BigQueryReference(INDEXED, client).statement("A", large.space("A").vectors[0], k=3, space="raw")
    with pytest.raises(GoogleAPICallError, match="must match the project that contains the base table"):
        other.query(statement.sql, job_config=bq.job_config(statement)).result()
    exact = BigQueryReference(INDEXED, client).statement(
        "A", large.space("A").vectors[0], k=3, method="exact", space="raw"
    )
    assert other.query(exact.sql, job_config=bq.job_config(exact)).result().total_rows == 3


def test_contract_a_repeated_approximate_search_is_never_a_cached_answer_labelled_exact(large, populated, client):
    """BigQuery answers a repeated query from its cache, which says nothing of the index (QUERY_CACHE_HIT):
    VECTOR_SEARCH asks for no cache; an exact search may be cached, and the notes say so."""
    remote = BigQueryReference(INDEXED, client)
    vector = large.space("A").vectors[7]
    first, second = (remote.search("A", embeddings=vector, k=5, space="raw") for _ in range(2))
    assert set(first["search"]) == set(second["search"]) == {"approximate"}
    asked = [job["resource"]["configuration"].get("query", {}) for job in populated.jobs.values()]
    searches = [q for q in asked if "VECTOR_SEARCH(" in q.get("query", "")]
    assert searches and all(q.get("useQueryCache") is False for q in searches)
    again = [remote.search("A", embeddings=vector, k=5, method="exact", space="raw") for _ in range(2)][1]
    assert any("answered from its query cache" in note and "nothing billed" in note for note in again.attrs["notes"])
    local = large.search("A", embeddings=vector, k=5, method="exact", space="raw")  # BigQuery's raw space
    assert list(again["PatientID"]) == list(local["PatientID"])


def test_contract_the_query_cache_says_cache_hit_and_that_the_index_was_not_used(large, populated, client):
    statement = BigQueryReference(INDEXED, client).statement("A", large.space("A").vectors[1], k=3, space="raw")
    config = bq.job_config(statement)
    config.use_query_cache = True  # what the library asked for before
    first, second = (client.query(statement.sql, job_config=config) for _ in range(2))
    first.result(), second.result()
    assert (first.cache_hit, second.cache_hit, second.total_bytes_billed) == (False, True, 0)
    reasons = second._properties["statistics"]["query"]["vectorSearchStatistics"]["indexUnusedReasons"]
    assert [r["code"] for r in reasons] == ["QUERY_CACHE_HIT"]


@pytest.mark.parametrize("fraction", [1, 1.0, 0, -0.5, float("nan"), "x"])
def test_fraction_lists_to_search_is_checked_as_bigquery_checks_it(fraction):
    with pytest.raises(SimilarPatientsError, match="between 0 and 1, both excluded"):
        BigQueryReference(ALL_MODELS, client=object(), fraction_lists_to_search=fraction)


def test_contract_the_server_holds_vector_searchs_option_range_and_base_table_query_rules(large, populated, client):
    from google.api_core.exceptions import GoogleAPICallError

    statement = BigQueryReference(INDEXED, client, fraction_lists_to_search=0.5).statement(
        "A", large.space("A").vectors[0], space="raw"
    )
    for broken, said in (
        (statement.sql.replace('"fraction_lists_to_search": 0.5', '"fraction_lists_to_search": 1.0'), "in \\(0, 1\\)"),
        (statement.sql.replace("WHERE `model` = @model),", "WHERE `model` = @model ORDER BY `age`),"), "order"),
    ):
        assert broken != statement.sql
        with pytest.raises(GoogleAPICallError, match=said):
            client.query(broken, job_config=bq.job_config(statement)).result()


def test_contract_a_table_patch_with_a_stale_etag_is_refused(server, client, pushed):
    from google.api_core.exceptions import PreconditionFailed

    stale = client.get_table(ALL_MODELS.path)
    fresh = client.get_table(ALL_MODELS.path)
    fresh.description = fresh.description  # a patch that changes nothing still gets a new etag here
    client.update_table(fresh, ["description"])
    with pytest.raises(PreconditionFailed):
        client.update_table(stale, ["description"])


def test_contract_a_re_push_without_an_index_leaves_none_whether_or_not_the_table_replace_kept_it(
    large, server, client
):
    table = parse_table(f"{PROJECT}.embeddings.indexed_b")
    try:
        for keeps in (False, True):
            server.replace_keeps_index = keeps
            assert push(large, table, client, create_index=True, index_space="raw").index == "IVF"
            assert server.tables[table.path]["index"] is not None
            assert push(_reimported(large), table, client).index is None
            assert server.tables[table.path]["index"] is None
            assert BigQueryReference(table, client).index is None
    finally:
        server.replace_keeps_index = False
        del server.tables[table.path]
    assert server.violations == []


def test_contract_an_index_on_a_table_under_10_mb_is_created_but_never_populated(nlst, server, client, pushed):
    """BigQuery accepts the DDL and leaves the index unpopulated; searches say BASE_TABLE_TOO_SMALL."""
    small = parse_table(f"{PROJECT}.embeddings.small")
    push(nlst, small, client, models=["CTFM"])
    try:
        client.query(bq_sql.index_statement(small, ["model", "PatientID"]).sql).result()
        server.populate_index(small.path)
        assert server.tables[small.path]["index"]["populated"] is False
        hits = BigQueryReference(small, client).search(
            "CTFM", embeddings=nlst.space("CTFM").vectors[0], k=3, method="approximate"
        )
        assert set(hits["search"]) == {"exact"}
        notes = " ".join(hits.attrs["notes"])
        assert "smaller than 10 MB" in notes and "never populates an index on a table under 10 MB" in notes
    finally:
        del server.tables[small.path]


def test_contract_a_standard_edition_project_cannot_use_the_index_and_the_notes_say_so(large, populated, client):
    populated.edition = "STANDARD"
    hits = BigQueryReference(INDEXED, client).search("A", embeddings=large.space("A").vectors[2], k=5, space="raw")
    assert set(hits["search"]) == {"exact"}
    notes = " ".join(hits.attrs["notes"])
    assert "not supported in the Standard edition" in notes and "Standard edition, which cannot use" in notes
    assert "--create-index" not in notes  # creating the index again would not help


def test_contract_stored_column_filters_that_became_post_filters_are_said(large, populated, client):
    populated.stored_columns_unused = {
        "code": "UNSUPPORTED_PREFILTER",
        "message": "The pre-filter is not supported.",
        "uncoveredColumns": ["age"],
    }
    hits = BigQueryReference(INDEXED, client).search(
        "A", embeddings=large.space("A").vectors[2], k=5, where=["age>=60"], space="raw"
    )
    assert set(hits["search"]) == {"approximate"}
    assert any(
        "did not apply the filters on the index's stored columns before the search (The pre-filter is not supported.)"
        in note
        for note in hits.attrs["notes"]
    )


def test_contract_a_partly_built_index_still_compares_the_unindexed_rows(large, populated, client):
    """BigQuery searches the rows not yet indexed by brute force: they are never missed."""
    populated.populate_index(INDEXED.path, coverage=0.5)
    vectors = large.space("A").vectors
    remote = BigQueryReference(INDEXED, client, fraction_lists_to_search=0.02)
    for row in (len(vectors) - 1, len(vectors) - 40):  # lesions past the indexed half of the table
        hits = remote.search("A", embeddings=vectors[row], k=1, space="raw")
        assert set(hits["search"]) == {"approximate"} and hits["distance"].iloc[0] == pytest.approx(0.0, abs=1e-9)


def test_contract_an_indexed_search_bills_the_base_table_and_the_index_it_scanned(large, populated, client):
    remote = BigQueryReference(INDEXED, client, fraction_lists_to_search=0.5)
    statement = remote.statement("A", large.space("A").vectors[4], k=3, space="raw")
    base = remote.dry_run(statement)  # what the dry run can know: the base table
    job = client.query(statement.sql, job_config=bq.job_config(statement))
    job.result()
    sizes = populated.tables[INDEXED.path]["column_bytes"]
    assert job.total_bytes_processed > base + sizes["embedding"] / 3 and job.total_bytes_billed >= 10 * 2**20


def test_contract_jobs_are_pending_until_polled_and_found_only_in_their_location(nlst, server, client, pushed):
    from google.api_core.exceptions import NotFound

    statement = BigQueryReference(ALL_MODELS, client).statement(
        "CTFM", nlst.space("CTFM").vectors[0], k=2, method="exact"
    )
    job = client.query(statement.sql, job_config=bq.job_config(statement))
    assert job.state == "PENDING"
    assert job.result().total_rows == 2 and job.state == "DONE"
    with pytest.raises(NotFound):
        client.get_job(job.job_id, location="EU")
    with pytest.raises(NotFound, match="was not found in location EU"):  # the datasets are in US
        client.query(statement.sql, job_config=bq.job_config(statement), location="EU").result()


def test_contract_ivf_lists_are_trained_with_euclidean_distance_whatever_the_search_distance():
    """Vectors of one direction and different lengths: one cosine cluster, two Euclidean ones."""
    with BigQueryContractServer("p-stand-in") as stand_in:
        stand_in.duck.execute('CREATE SCHEMA "p-stand-in"."d"')
        stand_in.duck.execute(
            'CREATE TABLE "p-stand-in"."d"."t" AS SELECT * FROM (VALUES ([1.0, 0.0]), ([1.1, 0.0]), ([10.0, 0.0]), '
            "([11.0, 0.0])) AS v(embedding)"
        )
        centroids = stand_in._lists("p-stand-in.d.t", {"column": "embedding", "distance": "COSINE"})
    np.testing.assert_allclose(sorted(centroids[:, 0]), [1.05, 10.5])


def test_the_notes_say_partially_used_as_bigquery_defines_it(large, server, client, pushed):
    remote = BigQueryReference(INDEXED, client)
    statement = remote.statement("A", large.space("A").vectors[0], k=3, method="approximate", space="raw")
    result = bq.QueryResult(None, 1, 1, "PARTIALLY_USED", ["The base table is being indexed."])
    notes = remote._notes(statement, result, 3, 3, None, approximate=True)
    assert any("used the vector index in some of the statement's searches, not all" in n for n in notes)
    assert not any("rows not yet indexed" in n for n in notes)


def test_contract_a_refused_vector_search_is_not_sent_to_another_billing_project(large, server, client, pushed):
    """Another billing project cannot run VECTOR_SEARCH: the advice for a refused one says what can."""
    server.fail("POST jobs", 403, "quotaExceeded", "simulated quota")
    with pytest.raises(SimilarPatientsError) as raised:
        BigQueryReference(INDEXED, client).search(
            "A", embeddings=large.space("A").vectors[0], k=3, method="approximate", space="raw"
        )
    said = str(raised.value)
    assert "runs only in the table's own project (my-project" in said and "bill another project with" not in said
    assert "--method exact can be billed to another project with --billing-project" in said


@pytest.mark.parametrize("query", ["patient", "embedding"])
def test_contract_vector_search_in_the_corrected_space_gives_the_local_corrected_hits(
    nlst, server, client, pushed, query
):
    """VECTOR_SEARCH with DOT_PRODUCT on the augmented column (brute force: the table is under 10 MB a model)
    ranks by the corrected distance itself; with the query's radius the hits are the local ones. Failed
    before: a bq:// reference answered in the raw space whatever was asked."""
    remote = BigQueryReference(ALL_MODELS, client)
    for model in ("CTFM", "SUPREME"):
        patient = nlst.lesions(model)["PatientID"].iloc[70]
        if query == "patient":
            ask = dict(patient=patient, exclude=[patient])
        else:
            vectors = np.asarray(nlst.space(model).vectors[[3, 40]], dtype=np.float64)  # two lesions, moved off
            noise = np.random.default_rng(1).standard_normal(vectors.shape) * vectors.std()  # the reference's own
            ask = dict(embeddings=vectors + 0.3 * noise, query_lesions=["a", "b"])  # (ties at 0 order by rounding)
        local = nlst.search(model, k=10, where=["stage=IA,IB"], **ask)
        hits = remote.search(model, k=10, where=["stage=IA,IB"], method="approximate", **ask)
        assert (
            "DOT_PRODUCT"
            in remote.statement(
                model, k=10, method="approximate", **{k: v for k, v in ask.items() if k != "query_lesions"}
            ).sql
        )
        assert list(hits["PatientID"]) == list(local["PatientID"]) and set(hits["space"]) == {"corrected"}
        np.testing.assert_allclose(hits["distance"], local["distance"], rtol=1e-9, atol=1e-9)
        assert list(hits["query_lesion"]) == list(local["query_lesion"])
    fused = dict(patient=patient, models=["CTFM", "Merlin", "SUPREME"], k=8, exclude=[patient], depth=20)
    local = nlst.search_fused(**fused)
    hits = remote.search_fused(**fused, method="approximate")
    assert list(hits["PatientID"]) == list(local["PatientID"])
    np.testing.assert_allclose(hits["fused_score"], local["fused_score"])
    assert server.violations == []


def test_contract_a_table_pushed_before_the_corrected_space_is_searched_raw_with_a_note(nlst, server, client, pushed):
    """A table whose description has no corrected space (pushed before) answers in raw, and says so."""
    remote = BigQueryReference(ALL_MODELS, client)
    remote.manifest = {**remote.manifest, "corrected": None}
    patient = nlst.lesions("CTFM")["PatientID"].iloc[10]
    hits = remote.search("CTFM", patient=patient, k=5, exclude=[patient], method="exact")
    local = nlst.search("CTFM", patient=patient, k=5, exclude=[patient], space="raw")
    assert list(hits["PatientID"]) == list(local["PatientID"]) and set(hits["space"]) == {"raw"}
    assert any("pushed before BigQuery tables carried the corrected space" in n for n in hits.attrs["notes"])
    euclidean = BigQueryReference(ALL_MODELS, client).search("CTFM", patient=patient, k=5, metric="euclidean")
    assert set(euclidean["space"]) == {"raw"} and any("cosine metric only" in n for n in euclidean.attrs["notes"])


def test_contract_the_corrected_space_costs_one_column_more_than_raw(nlst, server, client, pushed):
    """The dry runs of the same exact search in both spaces: the corrected one reads the augmented column
    (one value longer than the embedding) and the radius column instead of the embedding."""
    remote = BigQueryReference(ALL_MODELS, client)
    vector = nlst.space("CTFM").vectors[0]
    raw = remote.dry_run(remote.statement("CTFM", vector, k=5, method="exact", space="raw"))
    hub_free = remote.dry_run(remote.statement("CTFM", vector, k=5, method="exact"))
    columns = server.tables[ALL_MODELS.path]["column_bytes"]
    rows = server.tables[ALL_MODELS.path]["rows"]
    assert hub_free - raw == columns["corrected_embedding"] - columns["embedding"] + columns["corrected_radius"]
    assert hub_free - raw == 2 * 8 * rows  # one more value per vector and one radius per row


def test_contract_the_default_index_is_on_the_corrected_space_and_answers_approximately(large, server, client, pushed):
    """``--create-index`` indexes the augmented column with DOT_PRODUCT: a corrected search uses it (its
    recall measured against the same search with use_brute_force, which gives the local exact hits); a raw
    search on that table compares every row, and says why. Failed before: the index was on the raw embedding."""
    table = parse_table(f"{PROJECT}.embeddings.indexed_corrected")
    assert push(large, table, client, create_index=True).index == "IVF"
    manifest = json.loads(server.tables[table.path]["description"])["similar_patients"]
    assert manifest["index"]["column"] == "corrected_embedding" and manifest["index"]["distance"] == "DOT_PRODUCT"
    assert server.tables[table.path]["index"]["distance"] == "DOT_PRODUCT"
    server.populate_index(table.path)
    try:
        rng = np.random.default_rng(5)
        vector = large.space("A").vectors[11] + 0.5 * rng.standard_normal(512)
        checked = BigQueryReference(table, client, fraction_lists_to_search=0.3, check_recall=True)
        hits = checked.search("A", embeddings=vector, k=10)
        exact = large.search("A", embeddings=vector, k=10, method="exact")
        assert set(hits["search"]) == {"approximate"} and set(hits["space"]) == {"corrected"}
        recall = len(set(hits["PatientID"]) & set(exact["PatientID"])) / 10
        assert hits["index_recall"].iloc[0] == pytest.approx(recall)
        brute = checked.statement("A", vector, k=10, method="approximate", brute_force=True)
        rows = bq.run(client, table, brute, None).rows
        assert list(rows["PatientID"]) == list(exact["PatientID"])
        np.testing.assert_allclose(rows["distance"], exact["distance"], rtol=1e-9, atol=1e-9)
        raw = BigQueryReference(table, client).search("A", embeddings=vector, k=5, space="raw")
        assert set(raw["search"]) == {"exact"} and set(raw["space"]) == {"raw"}
        assert any("index is on the corrected space's vectors" in n for n in raw.attrs["notes"])
        assert server.violations == []
    finally:
        for path in [p for p in server.tables if p.startswith(table.path)]:
            del server.tables[path]


def test_contract_the_statistics_a_search_reads_must_be_the_ones_the_description_records(nlst, server, client, pushed):
    """A query embedding is z-scored with the statistics table's mean and deviation only when their digest is
    the one the table's description records (a push under way, or a changed table, is refused, not used)."""
    remote = BigQueryReference(ALL_MODELS, client)
    entry = remote.manifest["corrected"]["models"]["CTFM"]
    remote.manifest["corrected"]["models"]["CTFM"] = {**entry, "digest": "0" * 64}
    with pytest.raises(
        SimilarPatientsError, match=r"statistics of .*corrected space .* are not the ones its description"
    ):
        remote.search("CTFM", embeddings=nlst.space("CTFM").vectors[0], k=3)
    assert len(remote.search("CTFM", embeddings=nlst.space("CTFM").vectors[0], k=3, space="raw")) == 3


def test_contract_a_re_push_with_other_statistics_replaces_the_statistics_table(nlst, server, client):
    """The statistics table is named by its digest: a push of other models writes another and deletes the one
    the replaced table's description named."""
    table = parse_table(f"{PROJECT}.embeddings.restatistics")
    push(nlst, table, client, models=["CTFM"])
    first = [p for p in server.tables if p.startswith(f"{table.path}__space_")]
    push(nlst, table, client, models=["CTFM", "PASTA"])
    second = [p for p in server.tables if p.startswith(f"{table.path}__space_")]
    assert len(first) == len(second) == 1 and first != second
    manifest = json.loads(server.tables[table.path]["description"])["similar_patients"]
    assert second == [f"{PROJECT}.embeddings.{manifest['corrected']['table']}"]
    assert sorted(manifest["corrected"]["models"]) == ["CTFM", "PASTA"] and server.violations == []
    for path in [table.path, *second]:
        del server.tables[path]


def test_contract_a_failed_push_leaves_no_statistics_table_that_no_table_names(nlst, server, client):
    """The statistics load before the replace: when the replace fails, the statistics it wrote go too, and the
    table that stays keeps its own."""
    table = parse_table(f"{PROJECT}.embeddings.failedstatistics")
    push(nlst, table, client, models=["CTFM"])
    kept = [p for p in server.tables if p.startswith(f"{table.path}__space_")]
    server.fail("POST jobs", 403, "quotaExceeded", "simulated quota during CREATE OR REPLACE TABLE")
    with pytest.raises(SimilarPatientsError, match="quota exceeded"):
        push(nlst, table, client, models=["CTFM", "PASTA"])
    assert [p for p in server.tables if p.startswith(f"{table.path}__space_")] == kept and not server.failures
    manifest = json.loads(server.tables[table.path]["description"])["similar_patients"]
    assert kept == [f"{PROJECT}.embeddings.{manifest['corrected']['table']}"] and server.violations == []
    for path in [table.path, *kept]:
        del server.tables[path]
