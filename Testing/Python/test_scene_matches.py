"""Matched patients into a real MRML scene (slicer-core): their DICOM series read by Slicer's reader into
the same image the library reads, then shown beside the query, each view centred on its own tumor."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from SimilarPatientsLib import SimilarPatientsError
from SimilarPatientsLib.imaging import ct_image
from SimilarPatientsLib.scene import matches, nodes
from synthetic_ct import tumor_ct, write_dicom_series


def test_matches_are_loaded_and_shown_each_centred_on_its_tumor(scene, tmp_path):
    rng = np.random.default_rng(9)
    query_image, _, query_centre = tumor_ct("smooth", rng, size=(48, 48, 24))
    sitk.WriteImage(query_image, str(tmp_path / "query.nrrd"))
    query = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Query CT")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "query.nrrd"))
    assert storage.ReadData(query)
    rows, volumes = [], {}
    for rank, kind in enumerate(("cavitary", "spiculated"), 1):
        image, _, centre = tumor_ct(kind, rng, size=(48, 48, 24))
        datasets = write_dicom_series(image, tmp_path / kind)
        uid = str(datasets[0].SeriesInstanceUID)
        files = sorted((tmp_path / kind).glob("*.dcm"))
        volume = matches.load_series(scene, files, f"match {rank}")
        read = ct_image.read_ct(tmp_path / kind)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(nodes.volume_image(volume)), sitk.GetArrayFromImage(read))
        volumes[uid] = volume
        rows.append({"rank": rank, "PatientID": f"P{rank}", "distance": 0.1 * rank, "closer_than": 90.0 - rank})
        rows[-1] |= {"SeriesInstanceUID": uid, "center_x": centre[0], "center_y": centre[1], "center_z": centre[2]}
    hits = pd.DataFrame(rows)
    comparison = matches.show_matches(scene, scene.layout_logic.GetLayoutNode(), query, query_centre, hits, volumes)
    assert len(comparison.slice_nodes) == 3
    for slice_node, centre in zip(
        comparison.slice_nodes, [query_centre, *hits[["center_x", "center_y", "center_z"]].values]
    ):
        at = [slice_node.GetSliceToRAS().GetElement(r, 3) for r in range(3)]
        assert np.allclose(at, (-centre[0], -centre[1], centre[2]), atol=0.8)  # within a voxel, in RAS
    assert volumes[rows[0]["SeriesInstanceUID"]].GetName() == "#1 P1 (closer than 89% of nearest matches)"


def test_matches_that_cannot_be_shown_are_refused(scene):
    hit = {"rank": 1, "PatientID": "P1", "distance": 0.2, "SeriesInstanceUID": "1.2", "center_x": None}
    with pytest.raises(SimilarPatientsError, match="no tumor centre for patient P1"):
        matches.centre_ras(hit)
    assert matches.label(hit) == "#1 P1 (distance 0.2)"
    with pytest.raises(SimilarPatientsError, match="None of the matches has a loaded series"):
        matches.show_matches(scene, scene.layout_logic.GetLayoutNode(), None, (0, 0, 0), pd.DataFrame([hit]), {})
    with pytest.raises(SimilarPatientsError, match="No image files"):
        matches.load_series(scene, [], "nothing")


def test_a_series_whose_file_names_are_not_in_slice_order_is_read_as_written(scene, tmp_path):
    """IDC's files are named by random UUIDs: read in name order, the archetype reader made a volume with a
    wrong slice spacing (0.11 mm for 1.25); sorted along the slices' normal it is the image written."""
    import shutil
    import uuid

    image, _, _ = tumor_ct("smooth", np.random.default_rng(4), size=(32, 32, 16))
    write_dicom_series(image, tmp_path / "written")
    (tmp_path / "idc").mkdir()
    for path in sorted((tmp_path / "written").iterdir()):
        shutil.copyfile(path, tmp_path / "idc" / f"{uuid.uuid4()}.dcm")
    volume = matches.load_series(scene, sorted((tmp_path / "idc").iterdir()), "match")
    read = nodes.volume_image(volume)
    np.testing.assert_allclose(read.GetSpacing(), image.GetSpacing(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image).astype(np.int16))
