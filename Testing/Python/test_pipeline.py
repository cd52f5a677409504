"""Reference builds on Apache Beam (DirectRunner), end to end on synthetic DICOM CT series with SEG segments
and SR boxes written here: the rows equal the library's one-by-one embeddings, a damaged series lands in
the dead letters while the others are built, and a re-run adds nothing."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest

pytest.importorskip("apache_beam", reason="the pipeline extra (apache-beam, Python >= 3.10)")

from SimilarPatientsLib import ReferenceStore, SimilarPatientsError
from SimilarPatientsLib.cli import main
from SimilarPatientsLib.imaging.ct_image import read_ct
from SimilarPatientsLib.imaging.tumor import from_mask, from_point
from SimilarPatientsLib.models import registry
from SimilarPatientsLib.models.embedder import Embedder
from SimilarPatientsLib.pipeline import (
    SeriesSource,
    build_references,
    idc_lesions,
    lesions_from_frame,
    lesions_to_frame,
    read_manifest,
    shards,
)
from SimilarPatientsLib.pipeline.stages import read_image
from synthetic_ct import tumor_ct, write_dicom_seg, write_dicom_series, write_sr_boxes
from synthetic_weights import upstream_checkpoint

KINDS = ("smooth", "spiculated", "cavitary")


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """Three patients' CT series, each with a SEG of its tumor and an SR box on the slice through it; a
    fourth CT series with a cut slice file; and an IDC-style index listing the annotations."""
    root = tmp_path_factory.mktemp("collection")
    patients, index_rows = [], []
    for number, kind in enumerate(KINDS):
        patient = f"P{number}"
        image, mask, centre = tumor_ct(kind, np.random.default_rng(number), size=(64, 64, 40))
        datasets = write_dicom_series(image, root / patient / "ct", patient=patient)
        (root / patient / "seg").mkdir()
        (root / patient / "sr").mkdir()
        seg = write_dicom_seg(datasets, mask, root / patient / "seg" / "seg.dcm")
        column, row, k = image.TransformPhysicalPointToIndex(centre)
        box = [(column - 6, row - 5), (column + 7, row - 5), (column + 7, row + 6), (column - 6, row + 6)]
        polyline = [v + 0.5 for point in [*box, box[0]] for v in point]  # SCOORD: pixel (0, 0)'s centre is 0.5
        sr = write_sr_boxes(datasets, [(k, polyline)], root / patient / "sr" / "sr.dcm")
        box_centre = image.TransformContinuousIndexToPhysicalPoint([column + 0.5, row + 0.5, k])
        seg_uid = str(pydicom.dcmread(seg, stop_before_pixels=True).SeriesInstanceUID)
        sr_uid = str(pydicom.dcmread(sr, stop_before_pixels=True).SeriesInstanceUID)
        patients.append(
            {"patient": patient, "kind": kind, "series": str(datasets[0].SeriesInstanceUID), "seg": seg_uid}
            | {"centre": centre, "box_centre": box_centre, "folder": root / patient}
        )
        for uid, modality, analysis in ((seg_uid, "SEG", "synthetic_seg"), (sr_uid, "SR", "synthetic_sr")):
            index_rows.append(
                {"SeriesInstanceUID": uid, "PatientID": patient, "StudyInstanceUID": str(datasets[0].StudyInstanceUID)}
                | {"collection_id": "synthetic", "analysis_result_id": analysis, "Modality": modality}
                | {"PatientAge": "061Y", "PatientSex": "F", "instanceCount": 1, "series_size_MB": 0.1}
            )
    image, _, centre = tumor_ct("smooth", np.random.default_rng(9), size=(64, 64, 40))
    damaged = write_dicom_series(image, root / "P9" / "ct", patient="P9")
    cut = Path(damaged[20].filename)
    cut.write_bytes(cut.read_bytes()[:600])
    patients.append({"patient": "P9", "series": str(damaged[0].SeriesInstanceUID), "centre": centre})
    pd.DataFrame(index_rows).to_parquet(root / "index.parquet")
    return root, patients


def _manifest(patients: list, off_tumor: bool = False) -> pd.DataFrame:
    rows = []
    for p in patients:
        seed = dict(zip(("seed_x", "seed_y", "seed_z"), p["centre"]))
        rows.append({"SeriesInstanceUID": p["series"], "PatientID": p["patient"], "lesion_id": "seed"} | seed)
        if off_tumor and p["patient"] == "P0":  # in the lung, 24 mm from the tumor centre: nothing to describe
            away = dict(zip(("seed_x", "seed_y", "seed_z"), np.add(p["centre"], (17.0, 17.0, 0.0))))
            rows.append({"SeriesInstanceUID": p["series"], "PatientID": p["patient"], "lesion_id": "off"} | away)
        if "seg" in p:
            rows.append(
                {"SeriesInstanceUID": p["series"], "PatientID": p["patient"], "lesion_id": "seg"}
                | {"seg_series": p["seg"], "segment": "1", "kind": p["kind"]}
            )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def ct_fm_weights(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ctfm")
    return upstream_checkpoint("CTFM", registry.get("CTFM").build().eval().state_dict(), folder)


@pytest.mark.slow
def test_a_directrunner_build_equals_one_by_one_embeddings_and_reruns_add_nothing(
    collection, ct_fm_weights, tmp_path, home
):
    root, patients = collection
    manifest = tmp_path / "manifest.csv"
    _manifest(patients, off_tumor=True).to_csv(manifest, index=False)
    lesions = read_manifest(manifest)
    out = tmp_path / "out"
    models = ["TumorDescriptor", "CTFM"]
    weights = {"CTFM": ct_fm_weights}
    result = build_references(lesions, models, out, SeriesSource.local(root), weights=weights, batch_size=4)

    # 6 lesions x 2 models, and CT-FM on the seed off the tumor; the damaged series and the descriptor there fail
    assert (result.embedded, result.dead, result.skipped) == (2 * 6 + 1, 3, 0)
    dead = {(d["PatientID"], d["lesion_id"], d["model"], d["stage"]): d for d in shards.read_dead_letters(out)}
    assert set(dead) == {("P9", "seed", m, "read") for m in models} | {("P0", "off", "TumorDescriptor", "embed")}
    assert all("Fetch the whole series again" in dead["P9", "seed", m, "read"]["reason"] for m in models)
    assert "No soft tissue within 10 mm of the point" in dead["P0", "off", "TumorDescriptor", "embed"]["reason"]
    assert set(result.stage_seconds) == {"read", "crop", "embed", "write"}

    table = pd.concat([pd.read_parquet(p) for p in shards.shard_files(str(out))], ignore_index=True)
    for p in patients[:-1]:
        image = read_ct(p["folder"] / "ct")
        tumors = {"seed": from_point(p["centre"]), "seg": from_mask(p["folder"] / "seg" / "seg.dcm", 1)}
        for model in models:
            embedder = Embedder(model, weights=weights.get(model))
            for lesion, tumor in tumors.items():
                expected = embedder.embed(image, tumor)[0]
                got = table[(table.PatientID == p["patient"]) & (table.lesion_id == lesion) & (table.model == model)]
                assert len(got) == 1
                np.testing.assert_allclose(got.embedding.iloc[0], expected.vector, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(got[["center_x", "center_y", "center_z"]].iloc[0], expected.seed)
                assert got.recipe.iloc[0] == expected.recipe and got.SeriesInstanceUID.iloc[0] == p["series"]
    assert set(table[table.lesion_id == "seg"].kind) == set(KINDS)

    before = sorted(out.rglob("*"))
    again = build_references(lesions, models, out, SeriesSource.local(root), weights=weights)
    assert (again.embedded, again.skipped, again.dead) == (0, 13, 3) and again.shards == []
    assert sorted(p for p in out.rglob("*") if p.suffix == ".parquet") == [p for p in before if p.suffix == ".parquet"]

    reference = ReferenceStore().import_reference("built", str(out))
    assert sorted(reference.models) == sorted(models)
    assert reference.manifest["models"]["CTFM"]["lesions"] == 7


def test_idc_annotations_become_lesions_with_seg_segments_and_sr_box_centres(collection, tmp_path, home):
    from SimilarPatientsLib.idc import IDCIndex

    root, patients = collection
    index = IDCIndex(str(root / "index.parquet"))
    clinical = pd.DataFrame({"PatientID": ["P0", "P1", "P2"], "stage": ["IA", "IB", "IIA"]})
    lesions = idc_lesions(["synthetic_sr", "synthetic_seg"], SeriesSource.local(root), "Neoplasm", index, clinical)
    by_kind = {(x.patient, x.mark.kind): x for x in lesions}
    assert len(lesions) == 6 and len(by_kind) == 6
    for p in patients[:-1]:
        seg = by_kind[(p["patient"], "seg")]
        assert seg.series == p["series"] and seg.mark.series == p["seg"] and seg.mark.segment == "1"
        labels = dict(seg.labels)
        assert labels["segment_type"] == "Neoplasm" and labels["PatientAge"] == "061Y"
        assert labels["stage"] == {"P0": "IA", "P1": "IB", "P2": "IIA"}[p["patient"]]
        box = by_kind[(p["patient"], "slice_box")]
        assert box.series == p["series"]
    as_rows = lesions_from_frame(lesions_to_frame(lesions))  # a manifest to keep, edit and build from
    assert [(x.patient, x.lesion, x.series, x.mark) for x in as_rows] == [
        (x.patient, x.lesion, x.series, x.mark) for x in lesions
    ]
    assert idc_lesions(["synthetic_seg"], SeriesSource.local(root), "Liver", index) == []
    with pytest.raises(SimilarPatientsError, match="no SEG or SR annotations called nlst_sybl"):
        idc_lesions(["nlst_sybl"], SeriesSource.local(root), None, index)

    # the SR box's centre, built and embedded: the crop is centred on the box's centre in LPS mm
    out = tmp_path / "out"
    wanted = [x for x in lesions if x.mark.kind == "slice_box"]
    result = build_references(wanted, ["TumorDescriptor"], out, SeriesSource.local(root))
    assert result.embedded == 3 and result.dead == 0
    table = pd.concat([pd.read_parquet(p) for p in shards.shard_files(out)]).set_index("PatientID")
    for p in patients[:-1]:
        got = table.loc[p["patient"], ["center_x", "center_y", "center_z"]].to_numpy(dtype=float)
        np.testing.assert_allclose(got, p["box_centre"], atol=1e-6)


def test_a_build_counts_as_added_or_replaced_only_the_lesions_it_embedded_not_its_dead_letters(
    collection, tmp_path, home
):
    root, patients = collection
    out, source = tmp_path / "out", SeriesSource.local(root)
    frame = _manifest([patients[0], patients[-1]])  # P0's seed and SEG; P9's series is damaged: a dead letter
    result = build_references(lesions_from_frame(frame), ["TumorDescriptor"], out, source)
    assert (result.embedded, result.dead, result.added, result.replaced) == (2, 1, 2, 0)
    moved = frame.copy()
    at = moved.index[(moved.PatientID == "P0") & (moved.lesion_id == "seed")]
    moved.loc[at, ["seed_x", "seed_y"]] += 17.0  # the same lesion id, now off the tumor: rebuilt, and it fails
    again = build_references(lesions_from_frame(moved), ["TumorDescriptor"], out, source)
    assert (again.embedded, again.dead, again.added, again.replaced, again.kept) == (0, 2, 0, 0, 1)
    record = shards.read_record(str(out))
    assert (record["embedded"], record["dead"], record["added"], record["replaced"]) == (0, 2, 0, 0)


@pytest.mark.slow
def test_the_cli_builds_from_a_manifest_with_beam_options_and_reports_dead_letters(collection, tmp_path, home, capsys):
    root, patients = collection
    manifest = tmp_path / "manifest.parquet"
    _manifest([patients[0], patients[-1]]).to_parquet(manifest)
    argv = ["index", "build", "--manifest", str(manifest), "--model", "TumorDescriptor", "--out", str(tmp_path / "o")]
    argv += ["--dicom-folder", str(root), "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    assert main(argv) == 3  # finished, with dead letters: a distinct exit status
    printed = capsys.readouterr().out
    assert "2 rows embedded" in printed and "1 dead letter(s)" in printed and "exit status 3" in printed
    assert main(argv) == 3  # the dead letter is retried (and fails again); the rest is kept
    again = capsys.readouterr().out
    assert "0 rows embedded into 0 shard(s)" in again and "2 already there and kept" in again


def test_manifest_refusals_say_what_to_fix(tmp_path):
    good = {"SeriesInstanceUID": "1.2", "PatientID": "P", "seed_x": 1, "seed_y": 2, "seed_z": 3}
    cases = {
        "no PatientID": ({k: v for k, v in good.items() if k != "PatientID"}, "no PatientID column"),
        "two marks": (good | {"mask": "m.nii"}, "must mark its tumor one way"),
        "no mark": ({"SeriesInstanceUID": "1.2", "PatientID": "P"}, "got none"),
        "no CT": ({"PatientID": "P", "seed_x": 1, "seed_y": 2, "seed_z": 3}, "names no CT"),
        "bad seed": (good | {"seed_z": "x"}, "seed_z must be a finite number"),
        "a label named like a hit column": (good | {"viewer_url": "https://x"}, "name of a value every search"),
        "seg without segment": ({"SeriesInstanceUID": "1.2", "PatientID": "P", "seg_series": "1.3"}, "segment number"),
        "flat box": (
            {"SeriesInstanceUID": "1.2", "PatientID": "P"}
            | dict(zip(["box_x0", "box_y0", "box_z0"], [0, 0, 0]))
            | dict(zip(["box_x1", "box_y1", "box_z1"], [1, 1, 0])),
            "flat",
        ),
    }
    for name, (row, message) in cases.items():
        with pytest.raises(SimilarPatientsError, match=message):
            lesions_from_frame(pd.DataFrame([row]))
        assert name
    with pytest.raises(SimilarPatientsError, match="both lesion 'a' of patient P"):
        lesions_from_frame(pd.DataFrame([good | {"lesion_id": "a"}, good | {"lesion_id": "a", "seed_x": 5}]))
    with pytest.raises(SimilarPatientsError, match="does not exist"):
        read_manifest(tmp_path / "none.csv")
    with pytest.raises(SimilarPatientsError, match="Unknown runner"):
        build_references(lesions_from_frame(pd.DataFrame([good])), ["TumorDescriptor"], tmp_path, runner="Spark")


def test_the_cli_refuses_a_bigquery_build_without_a_staging_folder_and_unknown_options_elsewhere(tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    pd.DataFrame([{"image": "ct.nrrd", "PatientID": "P", "seed_x": 0, "seed_y": 0, "seed_z": 0}]).to_csv(
        manifest, index=False
    )
    argv = ["index", "build", "--manifest", str(manifest), "--model", "TumorDescriptor", "--bigquery", "my-project.d.t"]
    assert main(argv) == 2
    assert "--bigquery needs --staging DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # Beam's options are passed through by `index build` only
        main(["models", "list", "--direct_num_workers=2"])
    assert "unrecognized arguments: --direct_num_workers=2" in capsys.readouterr().err


def test_idc_series_are_fetched_into_the_worker_cache_checked_and_freed_after_use(served, tmp_path):
    from conftest import IDCBucket

    folders, index = served
    uid = next(iter(folders))
    source = SeriesSource(cache=str(tmp_path / "cache"), index=index.parquet_path, client=IDCBucket(folders))
    files = source.files(uid)
    assert len(files) == len(list(folders[uid].iterdir())) and source._cache().folder(uid).is_dir()
    image, read_files = read_image(uid, True, source)
    assert image.GetSize()[2] == len(files) and read_files == files
    source.release(uid)
    assert not source._cache().folder(uid).exists()  # a worker's disk holds the series it is reading only
    cut = SeriesSource(cache=str(tmp_path / "cut"), index=index.parquet_path, client=IDCBucket(folders, cut=1))
    with pytest.raises(SimilarPatientsError, match="was cut short"):  # in a build: that series' dead letter
        cut.files(uid)


def test_a_build_into_bigquery_loads_the_shards_as_a_push_does(collection, tmp_path, home, capsys, monkeypatch):
    """``index build --bigquery``: the shards in the staging folder become one BigQuery table through the
    cloud package's load job (contract server: the REST calls are checked), searchable as ``bq://``, with
    the same hits as the same shards imported locally."""
    pytest.importorskip("google.cloud.bigquery")
    from bigquery_contract import BigQueryContractServer
    from SimilarPatientsLib.cloud import open_reference

    root, patients = collection
    manifest = tmp_path / "manifest.csv"
    _manifest(patients[:-1]).to_csv(manifest, index=False)
    staging = tmp_path / "staging"
    with BigQueryContractServer("my-project") as server:
        monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", server.url)
        argv = ["index", "build", "--manifest", str(manifest), "--model", "TumorDescriptor", "--dicom-folder"]
        argv += [str(root), "--bigquery", "my-project.embeddings.built", "--staging", str(staging)]
        assert main(argv) == 0
        assert "6 rows embedded" in capsys.readouterr().out
        remote = open_reference("bq://my-project.embeddings.built")
        local = ReferenceStore().import_reference("built", str(staging))
        for patient in ("P0", "P1"):
            for space in ("corrected", "raw"):
                got = remote.search("TumorDescriptor", patient=patient, k=2, method="exact", space=space)
                want = local.search("TumorDescriptor", patient=patient, k=2, method="exact", space=space)
                assert set(got.space) == {space}
                assert list(got.PatientID) == list(want.PatientID)
                np.testing.assert_allclose(got.distance, want.distance, rtol=1e-6, atol=1e-12)
        assert server.violations == []


def _series_manifest(patients: list, **labels) -> pd.DataFrame:
    rows = []
    for p in patients:
        seed = dict(zip(("seed_x", "seed_y", "seed_z"), p["centre"]))
        rows.append({"SeriesInstanceUID": p["series"], "PatientID": p["patient"], "lesion_id": "seed"} | seed | labels)
    return pd.DataFrame(rows)


def test_a_build_into_gcs_imports_from_gcs_and_a_rerun_retries_a_failed_bigquery_load(
    collection, tmp_path, home, gcs, monkeypatch, capsys
):
    """gs:// for the manifest, the shards, the dead letters, the staging folder and the import, on a local
    Cloud Storage server; the BigQuery load of a build that failed is retried by a re-run with nothing
    left to embed."""
    pytest.importorskip("google.cloud.bigquery")
    from bigquery_contract import BigQueryContractServer
    from SimilarPatientsLib.util import files

    root, patients = collection
    manifest = f"{gcs}/manifests/lesions.csv"
    files.write(manifest, _series_manifest([patients[0], patients[1], patients[-1]]).to_csv(index=False).encode())
    staging = f"{gcs}/built/staging"
    with BigQueryContractServer("my-project") as server:
        monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", server.url)
        argv = ["index", "build", "--manifest", manifest, "--model", "TumorDescriptor", "--dicom-folder", str(root)]
        argv += ["--bigquery", "my-project.embeddings.built", "--staging", staging]
        server.fail("POST upload", 403, "accessDenied", "simulated: no permission to load yet")
        assert main(argv) == 2
        assert "Permission denied on my-project.embeddings.built" in capsys.readouterr().err
        assert len(shards.shard_files(staging)) == 1 and "my-project.embeddings.built" not in server.tables
        assert shards.read_record(staging)["status"] == "complete"  # the build itself is done
        assert [d["PatientID"] for d in shards.read_dead_letters(staging)] == ["P9"]
        assert main(argv) == 3  # nothing left to embed but the dead letter: the load is run again
        assert "2 already there and kept" in capsys.readouterr().out
        assert server.tables["my-project.embeddings.built"]["rows"] == 2 and server.violations == []
    reference = ReferenceStore().import_reference("from-gcs", staging)
    assert sorted(reference.lesions("TumorDescriptor")["PatientID"]) == ["P0", "P1"]
    assert any("failed in the build" in note for note in reference.manifest["notes"])


def test_a_gcs_build_folder_is_locked_while_a_build_writes_it(gcs):
    from SimilarPatientsLib.util import files

    folder = f"{gcs}/locked"
    with shards.BuildLock(folder, "one"):
        assert files.exists(f"{folder}/_build.lock")
        with pytest.raises(SimilarPatientsError, match=r"Another build is writing into gs://bucket/locked .*one"):
            shards.BuildLock(folder, "two")
    assert not files.exists(f"{folder}/_build.lock")
    shards.BuildLock(folder, "three").release()


def test_gzipped_files_on_gcs_are_gunzipped_once_a_csv_gz_manifest_read_and_plans_stored_as_one_gzip(gcs):
    """Beam's file systems gunzip (and gzip) ``*.gz`` names by extension unless told not to: a gzipped
    manifest put in the bucket by someone else reads as its rows, and a plan file's object is one gzip
    stream any reader can open."""
    import gzip
    import json

    from google.cloud import storage
    from SimilarPatientsLib.pipeline import build

    bucket = storage.Client.create_anonymous_client().bucket("bucket")
    frame = pd.DataFrame(
        [{"image": "gs://bucket/ct.nrrd", "PatientID": "P0", "seed_x": "1", "seed_y": "2", "seed_z": "3"}]
    )
    bucket.blob("gz/lesions.csv.gz").upload_from_string(gzip.compress(frame.to_csv(index=False).encode()))
    lesions = read_manifest(f"{gcs}/gz/lesions.csv.gz")
    assert [(lesion.patient, lesion.mark.values) for lesion in lesions] == [("P0", (1.0, 2.0, 3.0))]

    lesion = lesions[0]
    path = build.write_plan({lesion.source: [(lesion, ("TumorDescriptor",))]}, f"{gcs}/gz", "b1")
    stored = bucket.blob(path[len("gs://bucket/") :]).download_as_bytes(raw_download=True)
    line = json.loads(gzip.decompress(stored).decode())  # one gzip stream of JSON lines, not a gzip of a gzip
    assert line["models"] == ["TumorDescriptor"] and [item[1][0].patient for item in build.read_plan(path)] == ["P0"]


def test_weights_on_gcs_are_copied_once_into_the_worker_cache(gcs, home, monkeypatch):
    """``--weights MODEL=gs://…`` (a file, or a folder holding the upstream file name): what a Dataflow
    worker's model handler resolves, a local copy in its cache (not ``Path("gs://…")``, i.e. ``gs:/…``)."""
    from SimilarPatientsLib.models import weights
    from SimilarPatientsLib.util import files

    source = weights.WeightSource("https://example.org/w.pt", "w.pt", "CC-BY-4.0", False, size=3 * 2**20 + 5)
    data = np.random.default_rng(0).bytes(source.size)
    files.write(f"{gcs}/weights/w.pt", data)
    local = weights.resolve("CTFM", source, f"{gcs}/weights/w.pt")
    assert local.is_file() and str(home) in str(local) and local.read_bytes() == data
    monkeypatch.setattr(files, "copy_to_local", lambda *a, **k: pytest.fail("copied twice"))
    assert weights.resolve("CTFM", source, f"{gcs}/weights/w.pt") == local
    monkeypatch.undo()
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(home / "another-worker"))
    assert weights.resolve("CTFM", source, f"{gcs}/weights/").read_bytes() == data  # the folder form
    with pytest.raises(SimilarPatientsError, match=r"The weights gs://bucket/weights/absent.pt do not exist"):
        weights.resolve("CTFM", source, f"{gcs}/weights/absent.pt")


@pytest.mark.slow
def test_a_worker_loads_ct_fm_from_weights_on_gcs(gcs, ct_fm_weights, home):
    from SimilarPatientsLib.pipeline import stages
    from SimilarPatientsLib.util import files

    url = f"{gcs}/weights/{Path(ct_fm_weights).name}"
    files.write(url, Path(ct_fm_weights).read_bytes())
    model = stages.EmbedderHandler("CTFM", registry.get("CTFM").recipe.name, url).load_model()
    assert model.device == "cpu" and list((home / "weights" / "CTFM" / "from-bucket").glob("*/model.safetensors"))


def test_a_dataflow_build_refuses_paths_its_workers_cannot_read_and_a_job_without_the_container(
    collection, tmp_path, home, gcs, capsys
):
    """Before anything is submitted: an output folder, a DICOM folder, weights, images and masks on this
    machine, and a job on Beam's default image (no torch, no extras)."""
    root, patients = collection
    manifest = tmp_path / "m.csv"
    _series_manifest([patients[0]]).to_csv(manifest, index=False)
    image = tmp_path / "ct.nrrd"
    pd.DataFrame([{"image": str(image), "PatientID": "P0", "seed_x": 1, "seed_y": 2, "seed_z": 3}]).to_csv(
        tmp_path / "images.csv", index=False
    )
    container = ["--sdk_container_image=us-docker.pkg.dev/p/r/similar-patients:1", "--project=p", "--region=r"]
    base = ["index", "build", "--model", "TumorDescriptor", "--runner", "DataflowRunner"]
    for extra, said in (
        (["--manifest", str(manifest), "--out", str(tmp_path / "out"), *container], "the output folder"),
        (["--manifest", str(manifest), "--dicom-folder", str(root), "--out", f"{gcs}/o", *container], "--dicom-folder"),
        (["--manifest", str(tmp_path / "images.csv"), "--out", f"{gcs}/o", *container], f"e.g. {image}"),
        (["--manifest", str(manifest), "--weights", f"CTFM={manifest}", "--out", f"{gcs}/o", *container], "weights"),
        (["--manifest", str(manifest), "--out", f"{gcs}/o", "--project=p"], "needs --sdk_container_image"),
        (
            [
                "--manifest",
                str(manifest),
                "--out",
                f"{gcs}/o",
                *container,
                "--setup_file=./setup.py",
                "--no_use_public_ips",
            ],
            "fetches setuptools from PyPI",
        ),
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not files_under(gcs)


def files_under(bucket: str) -> list:
    from SimilarPatientsLib.util import files

    return files.listing(f"{bucket}/o")


def test_gpu_workers_embed_on_cuda_or_fail_never_silently_on_the_cpu(ct_fm_weights):
    """A ``worker_accelerator`` makes the device CUDA; asked for CUDA where it cannot run, the model handler
    fails with the fix (the driver), not a CPU model while the GPU is billed."""
    import torch
    from SimilarPatientsLib.pipeline import build, stages

    accelerated = [
        "--dataflow_service_options=worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver:5xx"
    ]
    assert build.worker_device(None, accelerated) == "cuda" and build.worker_device("cpu", accelerated) == "cpu"
    assert build.worker_device(None, ["--direct_num_workers=2"]) is None
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for one without")
    handler = stages.EmbedderHandler("CTFM", registry.get("CTFM").recipe.name, str(ct_fm_weights), device="cuda")
    with pytest.raises(
        SimilarPatientsError, match=r"--device cuda, but this machine has no usable CUDA.*install-nvidia-driver:5xx"
    ):
        handler.load_model()


def test_a_local_build_folder_is_locked_and_a_second_build_refused_before_embedding(collection, tmp_path, home):
    root, patients = collection
    lesions = lesions_from_frame(_series_manifest([patients[0]]))
    (tmp_path / "out").mkdir()
    with (
        shards.BuildLock(str(tmp_path / "out"), "first"),
        pytest.raises(SimilarPatientsError, match=r"Another build is writing into .*out now"),
    ):
        build_references(lesions, ["TumorDescriptor"], tmp_path / "out", SeriesSource.local(root))
    assert shards.shard_files(str(tmp_path / "out")) == []


def test_the_manifest_travels_as_a_file_and_a_100k_lesion_job_graph_stays_small(tmp_path):
    """Dataflow: "your job graph size must not exceed 10 MB" (Dataflow quotas and limits); the lesions
    are read inside the pipeline from a plan file, so the graph does not grow with them."""
    from SimilarPatientsLib.pipeline import build

    frame = pd.DataFrame(
        {
            "SeriesInstanceUID": [f"1.2.826.0.1.3680043.8.498.{i // 3}" for i in range(100_000)],
            "PatientID": [f"P{i // 3:06d}" for i in range(100_000)],
            "lesion_id": [f"L{i % 3}" for i in range(100_000)],
            "seed_x": 1.5,
            "seed_y": -20.25,
            "seed_z": -130.0,
            "histology": "Adenocarcinoma, NOS",
        }
    )
    frame.to_parquet(tmp_path / "manifest.parquet")
    lesions = read_manifest(tmp_path / "manifest.parquet")
    recipes = {"TumorDescriptor": registry.get("TumorDescriptor").recipe}
    planned = build.plan(lesions, recipes, str(tmp_path / "out"))
    assert (planned.added, planned.kept) == (100_000, 0)
    plan_path = build.write_plan(planned.todo, str(tmp_path / "out"), "b1")
    graph = build.pipeline_graph(
        plan_path,
        100_000,
        recipes,
        str(tmp_path / "out"),
        "b1",
        SeriesSource(),
        "DirectRunner",
        [],
        {},
        False,
        None,
        8,
        "fp32",
        shards.row_schema(lesions),
    )
    size = len(graph.to_runner_api().SerializeToString())
    assert size < 100_000 < 10 * 1000 * 1000  # bytes; the lesions (~800 B each) would be 80 MB
    assert sum(1 for _ in build.read_plan(plan_path)) == 100_000


def test_the_dataflow_job_request_of_a_20k_lesion_build_is_far_under_dataflows_limits(tmp_path, gcs):
    """What Dataflow counts: "The Dataflow service is currently limited to processing JSON job requests that
    are 20 MB in size or smaller" and the job graph's 10 MB (Dataflow quotas and limits). Beam's
    DataflowRunner builds the request (dry run, nothing submitted) and stages the pipeline on the Cloud
    Storage emulator; the request is measured as the JSON it would send."""
    from apache_beam.runners.dataflow.internal import apiclient
    from SimilarPatientsLib.pipeline import build

    count = 20_000  # beyond the 12,000 lesions a graph carrying them reached 10 MB at
    frame = pd.DataFrame(
        {
            "SeriesInstanceUID": [f"1.2.826.0.1.3680043.8.498.{i // 3}" for i in range(count)],
            "PatientID": [f"P{i // 3:06d}" for i in range(count)],
            "lesion_id": [f"L{i % 3}" for i in range(count)],
            "seed_x": 1.5,
            "seed_y": -20.25,
            "seed_z": -130.0,
        }
    )
    lesions = lesions_from_frame(frame)
    recipes = {"TumorDescriptor": registry.get("TumorDescriptor").recipe}
    plan_path = build.write_plan(build.plan(lesions, recipes, f"{gcs}/job").todo, f"{gcs}/job", "b1")
    options = ["--project=my-project", "--region=us-central1", f"--temp_location={gcs}/tmp", "--dry_run=True"]
    options += ["--sdk_container_image=us-docker.pkg.dev/p/r/similar-patients:1", "--no_auth"]
    graph = build.pipeline_graph(
        plan_path,
        count,
        recipes,
        f"{gcs}/job",
        "b1",
        SeriesSource(),
        "DataflowRunner",
        options,
        {},
        False,
        "cuda",
        8,
        "fp32",
        shards.row_schema(lesions),
    )
    job = graph.run().job  # the DataflowRunner's job, not submitted
    apiclient.DataflowApplicationClient(graph._options, job.root_staging_location).create_job_description(job)
    request = len(job.json().encode("utf-8"))
    pipeline = len(job.proto_pipeline.SerializeToString())
    print(f"Dataflow job request JSON: {request:,} bytes; staged pipeline proto: {pipeline:,} bytes")
    assert request < 200_000 < 20 * 1000 * 1000 and pipeline < 200_000 < 10 * 1000 * 1000


@pytest.mark.slow
def test_a_rerun_after_correcting_the_manifest_follows_it_and_says_what_it_added_replaced_kept_and_removed(
    collection, tmp_path, home
):
    root, patients = collection
    out, source = tmp_path / "out", SeriesSource.local(root)
    first = _series_manifest(patients[:3], stage="IA")
    first["lesion_id"] = None  # ids derived from the marks: a corrected seed is another lesion id
    result = build_references(lesions_from_frame(first), ["TumorDescriptor"], out, source)
    assert (result.added, result.replaced, result.kept, result.removed) == (3, 0, 0, 0)
    corrected = first.copy()
    corrected.loc[0, "seed_x"] += 1.0  # P0's seed corrected: its derived lesion id changes
    corrected.loc[1, "stage"] = "IIB"  # P1's label corrected
    corrected = corrected.drop(index=2)  # P2 no longer in the manifest
    again = build_references(lesions_from_frame(corrected), ["TumorDescriptor"], out, source)
    assert (again.embedded, again.added, again.replaced, again.kept, again.removed) == (2, 1, 1, 0, 2)
    table = ReferenceStore().import_reference("corrected", str(out)).lesions("TumorDescriptor")
    assert sorted(table["PatientID"]) == ["P0", "P1"]  # no phantom second lesion of P0, no P2
    assert table.set_index("PatientID").loc["P1", "stage"] == "IIB"
    np.testing.assert_allclose(table.set_index("PatientID").loc["P0", "center_x"], patients[0]["centre"][0] + 1.0)
    same = build_references(lesions_from_frame(corrected), ["TumorDescriptor"], out, source)
    assert (same.embedded, same.kept, same.removed) == (0, 2, 0)


def test_an_incomplete_build_is_refused_at_import_unless_asked_and_then_says_what_is_missing(tmp_path, home, capsys):
    folder = tmp_path / "built"
    frame = pd.DataFrame({"model": ["A"] * 3, "PatientID": ["1", "2", "3"], "lesion_id": ["a", "b", "c"]})
    frame["embedding"] = [np.ones(4, np.float32) * i for i in (1, 2, 3)]
    folder.mkdir()
    frame.to_parquet(folder / "embeddings-0.parquet")
    shards.write_record(str(folder), {"build": "b", "status": "running", "pairs": 90, "to_embed": 90})
    (folder / ".embeddings-1-x3yz.parquet").write_bytes(b"PAR1 half a shard")  # a killed writer's temporary
    argv = ["references", "import", "partial", "--source", str(folder)]
    assert main(argv) == 2
    assert "is an incomplete build: its build b did not complete" in capsys.readouterr().err
    assert main([*argv, "--allow-incomplete"]) == 0
    printed = capsys.readouterr().out
    assert "note: incomplete build" in printed and "the shards hold 3 rows, 87 missing" in printed


def test_a_rerun_removes_a_half_written_shard_temporary(collection, tmp_path, home):
    root, patients = collection
    out = tmp_path / "out"
    out.mkdir()
    (out / ".embeddings-abc-1234.parquet").write_bytes(b"PAR1 cut")
    build_references(
        lesions_from_frame(_series_manifest([patients[0]])), ["TumorDescriptor"], out, SeriesSource.local(root)
    )
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".build.lock") == []
    assert ReferenceStore().import_reference("clean", str(out)).model_info("TumorDescriptor").lesions == 1


def test_shards_are_named_by_their_lesions_and_a_retried_group_rewrites_the_same_file(tmp_path):
    lesions = lesions_from_frame(
        pd.DataFrame(
            [
                {"image": "ct.nrrd", "PatientID": f"P{i}", "lesion_id": "a", "seed_x": 0, "seed_y": 0, "seed_z": i}
                for i in range(4)
            ]
        )
    )
    columns = shards.row_schema(lesions)
    rows = [shards.row(x, "TumorDescriptor", "r", (0, 0, 0), np.ones(3)) for x in lesions]
    first = shards.write_shard(rows, str(tmp_path), columns, "b1")
    again = shards.write_shard(list(reversed(rows)), str(tmp_path), columns, "b1")  # a retry, another order
    assert first == again and shards.shard_files(str(tmp_path)) == [first]
    assert pq.read_schema(first).metadata[b"similar_patients.build"] == b"b1"
    (keys,) = shards.shard_keys(str(tmp_path)).values()
    assert sorted(k[2] for k in keys) == ["P0", "P1", "P2", "P3"] and all(len(k) == 5 for k in keys)


def test_plan_reads_the_key_files_not_the_shards(tmp_path, monkeypatch):
    from SimilarPatientsLib.pipeline import build
    from SimilarPatientsLib.util import files

    lesions = lesions_from_frame(
        pd.DataFrame([{"image": "ct.nrrd", "PatientID": "P", "lesion_id": "a", "seed_x": 0, "seed_y": 0, "seed_z": 0}])
    )
    recipe = registry.get("TumorDescriptor").recipe
    rows = [shards.row(lesions[0], "TumorDescriptor", recipe.name, (0, 0, 0), np.ones(2048))]
    shard = shards.write_shard(rows, str(tmp_path), shards.row_schema(lesions), "b1")
    read = []
    original = files.read
    monkeypatch.setattr(files, "read", lambda path: read.append(path) or original(path))
    planned = build.plan(lesions, {"TumorDescriptor": recipe}, str(tmp_path))
    assert planned.kept == 1 and not planned.todo and shard not in read and read[0].endswith(".json")


def test_a_series_split_across_sub_folders_is_read_from_all_its_files(collection, tmp_path):
    root, patients = collection
    folder = tmp_path / "dicom"
    source_files = sorted((root / "P1" / "ct").iterdir())
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    for number, path in enumerate(source_files):
        shutil.copy(path, folder / ("a" if number % 2 else "b") / path.name)
    split = SeriesSource.local(folder)
    image, files = read_image(patients[1]["series"], True, split)
    assert len(files) == len(source_files) and image.GetSize()[2] == len(source_files)


def test_workers_download_from_idcs_google_bucket_by_default(served, tmp_path):
    from conftest import IDCBucket

    folders, index = served
    bucket = IDCBucket(folders)
    uid = next(iter(folders))
    SeriesSource(cache=str(tmp_path / "c"), index=index.parquet_path, client=bucket).files(uid)
    SeriesSource(cache=str(tmp_path / "d"), index=index.parquet_path, client=bucket, bucket="aws").files(uid)
    assert bucket.locations == ["gcs", "aws"]
    with pytest.raises(SimilarPatientsError, match="buckets aws and gcs, not 's3'"):
        SeriesSource(bucket="s3")


def test_gpu_workers_share_one_model_across_processes():
    from SimilarPatientsLib.pipeline import stages

    assert stages.EmbedderHandler("TumorDescriptor", "r", share=True).share_model_across_processes()
    assert not stages.EmbedderHandler("TumorDescriptor", "r").share_model_across_processes()


def test_a_model_shared_across_processes_embeds_as_one_per_process(collection, tmp_path, home, monkeypatch):
    """GPU workers share one model across their SDK processes (Beam's MultiProcessShared: the model lives in
    a server process and every worker reaches it through a proxy): run here on the DirectRunner with two
    workers, the model served by that proxy, its rows equal an unshared build's."""
    from apache_beam.utils import multi_process_shared
    from SimilarPatientsLib.pipeline import stages

    root, patients = collection
    lesions = lesions_from_frame(_series_manifest(patients[:3]))
    source = SeriesSource.local(root)
    build_references(lesions, ["TumorDescriptor"], tmp_path / "alone", source)
    handler = stages.inference_handler
    monkeypatch.setattr(stages, "inference_handler", lambda *args: handler(*args[:7], True))
    served = []
    monkeypatch.setattr(
        multi_process_shared.MultiProcessShared,
        "acquire",
        lambda self, original=multi_process_shared.MultiProcessShared.acquire: served.append(self) or original(self),
    )
    options = ["--direct_num_workers=2", "--direct_running_mode=in_memory"]
    result = build_references(lesions, ["TumorDescriptor"], tmp_path / "shared", source, beam_args=options)
    assert result.embedded == 3 and served  # the model came through Beam's cross-process proxy

    def rows(folder):
        table = pd.concat([pd.read_parquet(p) for p in shards.shard_files(str(folder))]).sort_values("PatientID")
        return table["PatientID"].tolist(), np.stack(table["embedding"])

    (alone_ids, alone), (shared_ids, shared) = rows(tmp_path / "alone"), rows(tmp_path / "shared")
    assert alone_ids == shared_ids and np.array_equal(alone, shared)


def test_index_build_refusals_come_before_any_embedding(collection, tmp_path, home, capsys):
    root, patients = collection
    manifest = tmp_path / "m.csv"
    _series_manifest([patients[0]]).to_csv(manifest, index=False)
    base = ["index", "build", "--manifest", str(manifest), "--model", "TumorDescriptor", "--dicom-folder", str(root)]
    (tmp_path / "a-file").write_text("x")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    cases = [
        (["--out", str(tmp_path / "a-file")], "is a file; name a folder"),
        (["--out", ""], "--out is empty; name a folder"),
        (["--out", str(tmp_path / "x"), "--bigquery", "p.d.t"], "not allowed with argument"),
        (
            ["--bigquery", "my-project.d.t", "--staging", str(tmp_path / "s"), "--billing-project", "my-project/../x"],
            "is not a Google Cloud project id",
        ),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((["--out", str(read_only / "out")], "Cannot write into --out"))
    for extra, message in cases:
        try:
            status = main([*base, *extra])
        except SystemExit as stopped:
            status = stopped.code
        assert status == 2 and message in capsys.readouterr().err, extra
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "o"), "--batch-size", "0"])
    assert "argument --batch-size: must be a whole number of at least 1, not '0'" in capsys.readouterr().err
    with pytest.raises(SimilarPatientsError, match="--batch-size is the crops per forward pass"):
        build_references(
            lesions_from_frame(_series_manifest([patients[0]])), ["TumorDescriptor"], tmp_path, batch_size=0
        )
    assert not (tmp_path / "o").exists() and not list(tmp_path.rglob("embeddings-*.parquet"))


def test_weights_that_cannot_be_fetched_give_one_clean_line_before_beam_starts(collection, tmp_path, home, capsys):
    root, patients = collection
    manifest = tmp_path / "m.csv"
    _series_manifest([patients[0]]).to_csv(manifest, index=False)
    argv = ["index", "build", "--manifest", str(manifest), "--model", "CTFM", "--dicom-folder", str(root)]
    argv += ["--out", str(tmp_path / "o"), "--weights", f"CTFM={tmp_path / 'missing.pt'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The weights file for CTFM") and "Traceback" not in err


def test_a_full_disk_during_a_build_is_one_clear_error_and_a_rerun_finishes(collection, tmp_path, home, capsys, caplog):
    import subprocess

    root, patients = collection
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here")
    try:
        manifest = tmp_path / "m.csv"
        _series_manifest(patients[:3]).to_csv(manifest, index=False)
        with open(disk / "filler", "wb", buffering=0) as filler:  # fill the disk, then free two pages
            try:
                while True:
                    filler.write(b"\0" * 4096)

            except OSError:
                pass
        os.truncate(disk / "filler", max(0, (disk / "filler").stat().st_size - 8192))
        argv = [
            "index",
            "build",
            "--manifest",
            str(manifest),
            "--model",
            "TumorDescriptor",
            "--dicom-folder",
            str(root),
        ]
        with caplog.at_level(logging.WARNING):  # what a user's terminal shows of the libraries' logs
            assert main([*argv, "--out", str(disk / "out")]) == 2
        err = capsys.readouterr().err
        assert "The disk filled up during the build" in err and "RuntimeError" not in err and "Traceback" not in err
        assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert shards.read_record(str(disk / "out"))["status"] == "running"  # an import would refuse it
        (disk / "filler").unlink()
        assert main([*argv, "--out", str(disk / "out")]) == 0
        assert shards.read_record(str(disk / "out"))["status"] == "complete"
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_build_prints_no_beam_import_noise(tmp_path):
    import subprocess
    import sys

    code = "import SimilarPatientsLib.pipeline.stages, apache_beam.io.filesystems as f; f.FileSystems.get_filesystem('gs://b/x')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Failed to import GCSFileSystem" not in done.stderr and "apitools" not in done.stderr


@pytest.mark.slow
def test_the_package_dataflow_workers_install_runs_one_bundle_from_a_clean_venv(collection, tmp_path):
    """What a Dataflow worker has: the container of ``dataflow/Dockerfile`` (Beam's SDK, torch, the package
    with its embed and download extras, installed here as its RUN lines do), then the sdist Beam's stager
    builds for ``--setup_file``, installed as Beam's boot installs it (``pip install`` of the sdist, no extras:
    boot.go, installSetupPackages); a bundle's worker-side code runs there: read a series, crop, embed with
    the weight-free model, write a shard."""
    import re
    import subprocess
    import sys

    import apache_beam
    from apache_beam.runners.portability.stager import Stager

    repository = Path(__file__).resolve().parents[2]
    dockerfile = (repository / "dataflow" / "Dockerfile").read_text()
    extras = re.search(r'pip install --no-cache-dir "/tmp/similar-patients\[([\w,]+)\]"', dockerfile).group(1)
    torch = re.search(r"pip install --no-cache-dir (torch==\S+)", dockerfile).group(1)
    sdist = Stager._build_setup_package(str(repository / "setup.py"), str(tmp_path / "dist"))
    venv = tmp_path / "worker"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    cpu = ["--retries", "0", "--index-url", "https://download.pytorch.org/whl/cpu"]  # as scripts/test.sh
    subprocess.run([*pip, f"apache-beam[gcp]=={apache_beam.__version__}"], check=True, timeout=1200)  # the base image
    subprocess.run([*pip, torch, *cpu], check=True, timeout=900)  # a CPU machine gets the CPU build: the same API
    subprocess.run([*pip, f"{sdist}[{extras}]"], check=True, timeout=1200)  # the container's package
    subprocess.run([*pip, sdist], check=True, timeout=600)  # boot.go: the staged sdist, no extras
    root, patients = collection
    bundle = f"""
import os, sys
assert not any("issue" in p and "SimilarPatients" in p for p in sys.path)
import SimilarPatientsLib, pyarrow.parquet as pq
from SimilarPatientsLib.models import registry
from SimilarPatientsLib.pipeline import SeriesSource, lesions_from_frame, shards, stages
import pandas as pd
recipe = registry.get("TumorDescriptor").recipe
x, y, z = {tuple(float(v) for v in patients[0]["centre"])!r}
frame = pd.DataFrame([dict(SeriesInstanceUID={patients[0]["series"]!r}, PatientID="P0", lesion_id="seed",
                           seed_x=x, seed_y=y, seed_z=z)])
lesion = lesions_from_frame(frame)[0]
crops = list(stages.ReadAndCrop({{"TumorDescriptor": recipe}}, SeriesSource.local({str(root)!r})).process(
    (lesion.source, [(lesion, ("TumorDescriptor",))])))
handler = stages.EmbedderHandler("TumorDescriptor", recipe.name)
made = [c.value for c in crops]
results = handler.run_inference([c for _, c in made], handler.load_model())
rows = [shards.row(lesion, "TumorDescriptor", recipe.name, r.example.seed, r.inference) for r in results]
path = shards.write_shard(rows, {str(tmp_path / "out")!r}, shards.row_schema([lesion]), "worker")
print(SimilarPatientsLib.__file__, pq.read_table(path).num_rows)
"""
    worker = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a worker has no checkout on its path
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", bundle], capture_output=True, text=True, cwd=tmp_path, env=worker
    )
    assert done.returncode == 0, done.stderr[-3000:]
    installed, count = done.stdout.split()
    assert str(venv) in installed and count == "1"


@pytest.mark.slow
def test_a_lesion_whose_embedding_would_be_nan_is_a_dead_letter_not_a_row(tmp_path, home):
    """A NaN voxel at one tumor (refused at the crop) and weights whose activations overflow to NaN (refused
    at the embedding): each such lesion is a dead letter with its reason, never a row, and the rest is built."""
    import SimpleITK as sitk
    import torch
    from SimilarPatientsLib.models import networks

    image, _, centre = tumor_ct("smooth", np.random.default_rng(3), size=(64, 64, 40))
    sitk.WriteImage(image, str(tmp_path / "good.nii.gz"))
    spoilt = sitk.Cast(image, sitk.sitkFloat32)
    spoilt[spoilt.TransformPhysicalPointToIndex(centre)] = float("nan")
    sitk.WriteImage(spoilt, str(tmp_path / "nan.nrrd"))  # NRRD keeps the NaN (a NIfTI one is refused at reading)
    seed = dict(zip(("seed_x", "seed_y", "seed_z"), centre))
    manifest = pd.DataFrame(
        [
            {"image": str(tmp_path / file), "PatientID": file.split(".")[0], "lesion_id": "1"} | seed
            for file in ("good.nii.gz", "nan.nrrd")
        ]
    )
    torch.manual_seed(0)
    overflowing = {
        k: v * 1e25 if v.is_floating_point() else v for k, v in networks.UNet3DEncoder().state_dict().items()
    }
    (tmp_path / "w").mkdir()
    weights = {"SUPREME": upstream_checkpoint("SUPREME", overflowing, tmp_path / "w")}
    out = tmp_path / "out"
    result = build_references(lesions_from_frame(manifest), ["TumorDescriptor", "SUPREME"], out, weights=weights)

    dead = {(d["PatientID"], d["model"], d["stage"]): d["reason"] for d in shards.read_dead_letters(str(out))}
    assert set(dead) == {("nan", "TumorDescriptor", "crop"), ("nan", "SUPREME", "crop"), ("good", "SUPREME", "embed")}
    assert all(
        "NaN or infinite voxel(s) where the tumor at LPS" in dead["nan", m, "crop"]
        for m in ("TumorDescriptor", "SUPREME")
    )
    assert "SUPREME gave NaN or infinite values for the tumor(s) at LPS" in dead["good", "SUPREME", "embed"]
    assert (result.embedded, result.dead) == (1, 3)
    table = pd.concat([pd.read_parquet(p) for p in shards.shard_files(str(out))], ignore_index=True)
    assert table[["PatientID", "model"]].values.tolist() == [["good", "TumorDescriptor"]]
    assert np.isfinite(np.stack(table.embedding)).all()


def test_an_option_neither_the_build_nor_beam_knows_is_refused_naming_the_close_one(tmp_path, home, capsys):
    """Beam drops an option it does not know with a log line: a misspelt --dicom-folder would build
    without the folder, downloading from IDC instead."""
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"PatientID": ["P0"], "SeriesInstanceUID": ["1.2.3"], "seed_x": [0.0], "seed_y": [0.0]}).assign(
        seed_z=0.0
    ).to_csv(manifest, index=False)
    argv = ["index", "build", "--manifest", str(manifest), "--model", "TumorDescriptor", "--out", str(tmp_path / "o")]
    assert main([*argv, "--dicom-foldr", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "error: Unknown option --dicom-foldr; did you mean --dicom-folder?" in captured.err
    assert "Discarding unparseable args" not in captured.err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # refused before anything ran
    with pytest.raises(
        SimilarPatientsError, match=r"Unknown option --direct_num_worker; did you mean --direct_num_workers"
    ):
        build_references(
            read_manifest(manifest), ["TumorDescriptor"], tmp_path / "o", beam_args=["--direct_num_worker=2"]
        )
    from SimilarPatientsLib.pipeline.build import check_beam_options

    with pytest.raises(SimilarPatientsError, match=r"Beam cannot read its options \(--direct_num_workers=abc\)"):
        check_beam_options(["--direct_num_workers=abc"])  # argparse's exit, as our error


@pytest.fixture
def no_cloud(monkeypatch, tmp_path):
    """No Cloud Storage emulator, no credentials anywhere (no key file, no gcloud login, no metadata server)."""
    from SimilarPatientsLib.util import cloud_access

    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    cloud_access.check.cache_clear()
    yield cloud_access
    cloud_access.check.cache_clear()


def test_gs_without_credentials_or_offline_is_one_clear_error_at_once(no_cloud, tmp_path, home, capsys, monkeypatch):
    import time

    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"PatientID": ["P0"], "SeriesInstanceUID": ["1.2.3"], "seed_x": [0.0], "seed_y": [0.0]}).assign(
        seed_z=0.0
    ).to_csv(manifest, index=False)
    started = time.perf_counter()
    argv = ["index", "build", "--manifest", str(manifest), "--model", "TumorDescriptor", "--out", "gs://bucket/x"]
    assert main(argv) == 2
    assert "error: No Google Cloud credentials were found for Cloud Storage (gs://). Run `gcloud auth" in (
        capsys.readouterr().err
    )
    google_auth = pytest.importorskip("google.auth")
    monkeypatch.setattr(google_auth, "default", lambda *a, **k: (object(), "project"))  # credentials, but offline
    monkeypatch.setattr(no_cloud, "ENDPOINT", "https://127.0.0.1:9/")
    no_cloud.check.cache_clear()
    assert main(["references", "import", "x", "--source", "gs://bucket/x"]) == 2
    err = capsys.readouterr().err
    assert "error: Cannot reach Google Cloud Storage (https://127.0.0.1:9/) within 10 s: this machine is offline" in err
    assert "Traceback" not in err and time.perf_counter() - started < 20
