"""End to end: a reference built from synthetic tumors with the weight-free model, queried from images
through the library and the CLI; recipe mismatches refused; embeddings written and imported."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import store_frame, synthetic_frame
from SimilarPatientsLib import ImageQuery, ReferenceStore, SimilarPatientsError, query_image
from SimilarPatientsLib.cli import main
from SimilarPatientsLib.imaging.ct_image import read_ct
from SimilarPatientsLib.imaging.tumor import from_binary_mask
from SimilarPatientsLib.models.embedder import Embedder
from SimilarPatientsLib.references import schema
from SimilarPatientsLib.references.hits import HIT_COLUMNS
from synthetic_ct import KINDS, add_tumor, tumor_ct, write_dicom_seg, write_dicom_series

PER_KIND = 8


@pytest.fixture(scope="module")
def tumor_reference(tmp_path_factory):
    """A data home with reference 'tumors': 8 patients per tumor kind, one tumor each, TumorDescriptor."""
    home = tmp_path_factory.mktemp("tumor-home")
    embedder = Embedder("TumorDescriptor")
    rng = np.random.default_rng(2026)
    rows = []
    for i in range(PER_KIND):
        for kind in KINDS:
            image, mask, _ = tumor_ct(kind, rng)
            embedding = embedder.embed(image, from_binary_mask(mask))[0]
            rows.append(
                {
                    schema.MODEL: embedding.model,
                    schema.RECIPE: embedding.recipe,
                    schema.PATIENT: f"{kind}-{i}",
                    "kind": kind,
                    **dict(zip(schema.CENTER, embedding.seed)),
                    schema.EMBEDDING: embedding.vector,
                }
            )
    store_frame(pd.DataFrame(rows), home, "tumors")
    return home


def test_new_tumors_find_their_own_kind(tumor_reference):
    reference = ReferenceStore(tumor_reference).open("tumors")
    embedder = Embedder("TumorDescriptor")
    rng = np.random.default_rng(7)
    precision = {}
    for kind in KINDS:
        scores = []
        for _ in range(3):
            image, mask, _ = tumor_ct(kind, rng)
            hits = query_image(image, from_binary_mask(mask), embedder, reference, k=5).hits
            assert list(hits.columns[: len(HIT_COLUMNS)]) == list(HIT_COLUMNS)
            scores.append(float((hits["kind"] == kind).mean()))
        precision[kind] = float(np.mean(scores))
    assert np.mean(list(precision.values())) >= 0.9, precision
    assert min(precision.values()) >= 0.7, precision


def test_query_cli_from_a_dicom_series_and_seg(tumor_reference, tmp_path, monkeypatch, capsys):
    pytest.importorskip(
        "highdicom", minversion="0.23", reason="DICOM SEG masks need highdicom >= 0.23 (Python >= 3.10)"
    )
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(tumor_reference))
    image, mask, centre = tumor_ct("cavitary", np.random.default_rng(99))
    datasets = write_dicom_series(image, tmp_path / "ct")
    write_dicom_seg(datasets, mask, tmp_path / "seg.dcm")
    base = ["query", "--image", str(tmp_path / "ct"), "--model", "TumorDescriptor", "--reference", "tumors"]
    assert main([*base, "--mask", str(tmp_path / "seg.dcm"), "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 5 and sum(h["kind"] == "cavitary" for h in hits) >= 4
    assert all(h["model"] == "TumorDescriptor" and h["metric"] == "cosine" for h in hits)

    assert main([*base, "--mask", str(tmp_path / "seg.dcm"), "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "Nearest 3 patients to the tumor at LPS" in out and "TumorDescriptor (descriptor-v1)" in out

    ras = f"{-centre[0]},{-centre[1]},{centre[2]}"
    assert main([*base, f"--point={ras}", "--ras", "--json"]) == 0
    by_point = json.loads(capsys.readouterr().out)
    assert sum(h["kind"] == "cavitary" for h in by_point) >= 4
    assert main([*base, "--point", f"{centre[0]}", f"{centre[1]}", f"{centre[2]}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == by_point  # LPS point = the same point given in RAS

    box = ",".join(f"{c + d:.2f}" for d in (-14, 14) for c in centre)
    assert main([*base, f"--box={box}", "--json"]) == 0  # the box bounds the mask grown from its centre
    assert sum(h["kind"] == "cavitary" for h in json.loads(capsys.readouterr().out)) >= 4

    assert main([*base, "--point=1,2"]) == 2
    assert "--point needs 3 numbers" in capsys.readouterr().err
    assert main([*base, "--point=900,0,0"]) == 2
    assert "outside the image" in capsys.readouterr().err


def test_a_model_or_recipe_the_reference_was_not_built_with_is_refused(nlst_home, tmp_path, monkeypatch, capsys):
    image, mask, _ = tumor_ct("smooth", np.random.default_rng(1))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nrrd"))
    base = ["query", "--image", str(tmp_path / "ct.nrrd"), "--mask", str(tmp_path / "mask.nrrd"), "--reference"]
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(nlst_home))
    assert main([*base, "nlst-sybil", "--model", "TumorDescriptor"]) == 2
    error = capsys.readouterr().err
    assert "has no model 'TumorDescriptor'" in error and "CTFM (tumorimagingbench)" in error

    home = tmp_path / "home"
    frame = synthetic_frame(n_patients=12, dim=512, models=("CTFM",))
    frame[schema.RECIPE] = "another-pipeline"
    store_frame(frame, home, "other")
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(home))
    assert main([*base, "other", "--model", "CTFM"]) == 2  # refused before any weights are looked for
    error = capsys.readouterr().err
    assert "CTFM embeddings made with recipe 'another-pipeline'" in error and "'tumorimagingbench'" in error
    assert "not comparable" in error


def test_embed_writes_an_importable_reference_row(tumor_reference, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(tmp_path / "home"))
    image, mask, _ = tumor_ct("part-solid", np.random.default_rng(5))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    base = ["embed", "--image", str(tmp_path / "ct.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz")]
    assert main([*base, "--model", "TumorDescriptor"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["model"] == "TumorDescriptor" and len(record["embedding"]) == 21
    for suffix in ("parquet", "csv"):
        out = tmp_path / f"row.{suffix}"
        assert main([*base, "--model", "TumorDescriptor", "--patient", "P1", "--out", str(out)]) == 0
        assert "TumorDescriptor (descriptor-v1), 21 values" in capsys.readouterr().out
        assert main(["references", "import", f"mine-{suffix}", "--source", str(out)]) == 0
        reference = ReferenceStore().open(f"mine-{suffix}")
        assert reference.model_info("TumorDescriptor").recipe == "descriptor-v1"
        vectors = reference.patient_embeddings("TumorDescriptor", "P1").vectors
        np.testing.assert_allclose(vectors[0], record["embedding"], rtol=1e-6, atol=1e-6)
    assert main([*base, "--model", "TumorDescriptor", "--out", str(tmp_path / "row.txt")]) == 2
    assert ".json, .parquet or .csv" in capsys.readouterr().err


def test_a_patient_with_two_tumors_queries_with_both(tumor_reference, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(tumor_reference))
    rng = np.random.default_rng(31)
    image, cavity_mask, cavity = tumor_ct("cavitary", rng, size=(128, 96, 64))
    shifted = np.asarray(cavity) - np.array([40.0, 0.0, 0.0])
    image, solid_mask = add_tumor(image, "part-solid", shifted, 9.0, rng)
    labels = sitk.Cast(cavity_mask, sitk.sitkUInt8) + sitk.Cast(solid_mask, sitk.sitkUInt8) * 2
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(labels, str(tmp_path / "labels.nrrd"))
    base = ["--image", str(tmp_path / "ct.nrrd"), "--model", "TumorDescriptor"]
    two = ["--mask", str(tmp_path / "labels.nrrd"), "--segment", "1", "--segment", "2"]
    assert main(["query", *base, *two, "--reference", "tumors", "-k", "6", "--json"]) == 0
    kinds = [h["kind"] for h in json.loads(capsys.readouterr().out)]
    assert set(kinds) <= {"cavitary", "part-solid"} and len(set(kinds)) == 2, kinds
    points = [f"--point={c[0]},{c[1]},{c[2]}" for c in (cavity, shifted)]
    assert main(["query", *base, *points, "--reference", "tumors", "-k", "3"]) == 0
    assert "Nearest 3 patients to the 2 tumors at LPS" in capsys.readouterr().out

    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(tmp_path / "home"))
    assert main(["embed", *base, *two, "--patient", "P2", "--out", str(tmp_path / "p2.parquet")]) == 0
    assert main(["references", "import", "mine", "--source", str(tmp_path / "p2.parquet")]) == 0
    own = ReferenceStore().open("mine").patient_embeddings("TumorDescriptor", "P2")
    vectors, lesions = own.vectors, own.lesion_ids
    assert vectors.shape == (2, 21) and lesions == ["1", "2"]
    capsys.readouterr()
    assert main(["embed", *base, points[0], "--segment", "1"]) == 2
    assert "--segment names a segment of --mask" in capsys.readouterr().err


def test_a_point_off_the_tumor_and_an_empty_mask_are_refused(tmp_path):
    image, mask, _ = tumor_ct("smooth", np.random.default_rng(8))
    embedder = Embedder("TumorDescriptor")
    corner = image.TransformIndexToPhysicalPoint([2, 2, 2])
    from SimilarPatientsLib.imaging.tumor import from_point

    with pytest.raises(SimilarPatientsError, match="No soft tissue"):
        embedder.embed(image, from_point(corner))
    with pytest.raises(SimilarPatientsError, match="mask is empty"):
        from_binary_mask(mask * 0)


def test_an_image_query_is_one_library_call(tumor_reference, tmp_path):
    image, mask, _ = tumor_ct("cavitary", np.random.default_rng(12))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    store = ReferenceStore(tumor_reference)
    result = query_image(tmp_path / "ct.nrrd", from_binary_mask(mask), "TumorDescriptor", "tumors", k=4, store=store)
    assert isinstance(result, ImageQuery) and len(result.hits) == 4
    assert (result.reference, result.model, result.recipe, result.metric) == (
        "tumors",
        "TumorDescriptor",
        "descriptor-v1",
        "cosine",
    )
    assert result.crops[0].image.shape == (64, 64, 64) and result.crops[0].mask.any()
    direct = Embedder("TumorDescriptor").embed(read_ct(image), from_binary_mask(mask))[0]  # read as a query reads it
    np.testing.assert_array_equal(result.embeddings[0].vector, direct.vector)
    seconds = result.seconds
    assert min(seconds.read, seconds.crop, seconds.embed, seconds.search) > 0
    assert seconds.total == pytest.approx(seconds.read + seconds.load + seconds.crop + seconds.embed + seconds.search)
    again = query_image(image, from_binary_mask(mask), Embedder("TumorDescriptor"), store.open("tumors"), k=4)
    assert again.hits.PatientID.tolist() == result.hits.PatientID.tolist() and again.seconds.load == 0.0


def test_an_incompatible_model_is_refused_before_the_image_is_read(tumor_reference, tmp_path):
    with pytest.raises(SimilarPatientsError, match="has no model 'CTFM'"):
        query_image(tmp_path / "missing.nrrd", [], "CTFM", "tumors", store=ReferenceStore(tumor_reference))


def test_tumor_marks_from_the_library(tmp_path):
    from SimilarPatientsLib.imaging import tumors_from

    boxes = tumors_from(boxes=[[0, 0, 0, 10, 10, 10]], ras=True)
    assert boxes[0].seed == (-5.0, -5.0, 5.0) and boxes[0].box == ((-10.0, -10.0, 0.0), (0.0, 0.0, 10.0))
    assert [t.seed for t in tumors_from(points=[[1, 2, 3], [4, 5, 6]])] == [(1.0, 2.0, 3.0), (4.0, 5.0, 6.0)]
    with pytest.raises(SimilarPatientsError, match="one of a mask, points or boxes"):
        tumors_from(points=[[1, 2, 3]], boxes=[[0, 0, 0, 1, 1, 1]])
    with pytest.raises(SimilarPatientsError, match="six numbers"):
        tumors_from(boxes=[[0, 0, 0, 1]])
    with pytest.raises(SimilarPatientsError, match="give the mask too"):
        tumors_from(points=[[1, 2, 3]], segments=["1"])
