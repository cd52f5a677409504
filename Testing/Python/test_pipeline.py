"""Reference builds on Apache Beam (DirectRunner), end to end on synthetic DICOM CT series with SEG segments
and SR boxes written here: the rows equal the library's one-by-one embeddings, a damaged series lands in
the dead letters while the others are built, and a re-run adds nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
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

    table = pd.concat([pd.read_parquet(p) for p in shards.shard_files(out)], ignore_index=True)
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


@pytest.mark.slow
def test_the_cli_builds_from_a_manifest_with_beam_options_and_reports_dead_letters(collection, tmp_path, home, capsys):
    root, patients = collection
    manifest = tmp_path / "manifest.parquet"
    _manifest([patients[0], patients[-1]]).to_parquet(manifest)
    argv = ["index", "build", "--manifest", str(manifest), "--model", "TumorDescriptor", "--out", str(tmp_path / "o")]
    argv += ["--dicom-folder", str(root), "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 rows embedded" in printed and "1 dead letter(s)" in printed
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "0 rows embedded into 0 shard(s)" in again and "2 already there" in again


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
    argv = ["index", "build", "--manifest", str(manifest), "--model", "TumorDescriptor", "--bigquery", "p.d.t"]
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
    assert len(files) == len(list(folders[uid].iterdir())) and (tmp_path / "cache" / uid).is_dir()
    image, read_files = read_image(uid, True, source)
    assert image.GetSize()[2] == len(files) and read_files == files
    source.release(uid)
    assert not (tmp_path / "cache" / uid).exists()  # a worker's disk holds the series it is reading only
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
            got = remote.search("TumorDescriptor", patient=patient, k=2, method="exact")
            want = local.search("TumorDescriptor", patient=patient, k=2, method="exact")
            assert list(got.PatientID) == list(want.PatientID)
            np.testing.assert_allclose(got.distance, want.distance, rtol=1e-6, atol=1e-12)
        assert server.violations == []


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

    dead = {(d["PatientID"], d["model"], d["stage"]): d["reason"] for d in shards.read_dead_letters(out)}
    assert set(dead) == {("nan", "TumorDescriptor", "crop"), ("nan", "SUPREME", "crop"), ("good", "SUPREME", "embed")}
    assert all(
        "NaN or infinite voxel(s) where the tumor at LPS" in dead["nan", m, "crop"]
        for m in ("TumorDescriptor", "SUPREME")
    )
    assert "SUPREME gave NaN or infinite values for the tumor(s) at LPS" in dead["good", "SUPREME", "embed"]
    assert (result.embedded, result.dead) == (1, 3)
    table = pd.concat([pd.read_parquet(p) for p in shards.shard_files(out)], ignore_index=True)
    assert table[["PatientID", "model"]].values.tolist() == [["good", "TumorDescriptor"]]
    assert np.isfinite(np.stack(table.embedding)).all()
