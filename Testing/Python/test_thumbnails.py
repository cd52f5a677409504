"""Tumor thumbnails for the results table: drawn in LPS whatever the CT's orientation (patient's right on
the left, anterior at the top, as Slicer's axial view), windowed, written whole as PNG; the worker draws
the query's and the local matches' and names a series it cannot read."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
from SimilarPatientsLib import SimilarPatientsError
from SimilarPatientsLib.imaging.thumbnail import axial_thumbnail, write_png
from SimilarPatientsLib.scene.worker import WorkerClient
from synthetic_ct import SOLID_HU, blank_ct, physical_grid, write_dicom_series


def marked_ct(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), origin=(-38.0, -38.0, -40.0)):
    """A CT with a solid ball 12 mm to the patient's left (+x) and one 12 mm anterior (-y) of (0, 0, 0)."""
    image = blank_ct(direction=direction, origin=origin)
    points = physical_grid(image)
    values = sitk.GetArrayFromImage(image)
    for centre in ((12.0, 0.0, 0.0), (0.0, -12.0, 0.0)):
        values[np.linalg.norm(points - centre, axis=-1) < 4.0] = SOLID_HU
    marked = sitk.GetImageFromArray(values)
    marked.CopyInformation(image)
    return marked


def test_the_picture_is_in_lps_as_slicer_shows_an_axial_view():
    picture = axial_thumbnail(marked_ct(), (0.0, 0.0, 0.0), field_mm=48.0, pixels=48)
    assert picture.shape == (48, 48) and picture.dtype == np.uint8
    rows, columns = np.nonzero(picture > 200)
    left = columns > 30  # the patient's left ball is on the picture's right (columns run right → left)
    assert left.any() and np.allclose(rows[left].mean(), 23.5, atol=1.5)
    assert np.allclose(columns[left].mean(), 24 + 12, atol=1.5)
    anterior = rows < 18  # the anterior ball at the top
    assert anterior.any() and np.allclose(rows[anterior].mean(), 24 - 12, atol=1.5)
    assert abs(int(picture[0, 0]) - 85) <= 1  # lung (-850 HU) a third of the way up the window (-1350…150)


def test_an_oblique_or_flipped_ct_gives_the_same_picture():
    straight = axial_thumbnail(marked_ct(), (0.0, 0.0, 0.0))
    flipped = marked_ct(direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1), origin=(38.0, 38.0, -40.0))
    assert np.abs(axial_thumbnail(flipped, (0.0, 0.0, 0.0)).astype(int) - straight).max() <= 2


def test_a_centre_outside_the_image_is_refused():
    with pytest.raises(SimilarPatientsError, match=r"tumor centre .* outside the image"):
        axial_thumbnail(marked_ct(), (500.0, 0.0, 0.0))


def test_the_png_is_written_whole_and_reads_back(tmp_path):
    picture = axial_thumbnail(marked_ct(), (0.0, 0.0, 0.0))
    path = write_png(picture, tmp_path / "t.png")
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), picture)
    assert sorted(os.listdir(tmp_path)) == ["t.png"]  # nothing left beside it
    with pytest.raises(ValueError, match=r"written as \.png"):
        write_png(picture, tmp_path / "t.jpg")


@pytest.mark.skipif(os.name != "posix", reason="process groups as on Linux and macOS")
def test_the_worker_draws_the_local_matches_and_names_the_one_it_cannot_read(tmp_path):
    good = write_dicom_series(marked_ct(), tmp_path / "good")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "0001.dcm").write_bytes(b"not DICOM")
    client = WorkerClient()
    try:
        result = client.thumbnails(
            tmp_path / "pictures",
            [
                {"uid": "1.2.3", "file": str(good[0].filename), "centre": [0.0, 0.0, 0.0]},
                {"uid": "9.9.9", "file": str(broken / "0001.dcm"), "centre": [0.0, 0.0, 0.0]},
            ],
        )
    finally:
        client.stop()
    assert list(result["thumbnails"]) == ["1.2.3"] and os.path.isfile(result["thumbnails"]["1.2.3"])
    assert list(result["failed"]) == ["9.9.9"] and result["failed"]["9.9.9"]
