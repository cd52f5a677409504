"""Slicer nodes → the library's LPS image and tumors, on a real MRML scene (slicer-core): the same image
and tumors the CLI reads from the equivalent files, oblique and transformed volumes included, and the
user's nodes and storage untouched."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import SimpleITK as sitk
from SimilarPatientsLib import SimilarPatientsError
from SimilarPatientsLib.imaging import ct_image, tumor
from SimilarPatientsLib.scene import nodes
from synthetic_ct import tumor_ct

slicer = pytest.importorskip("slicer", reason="slicer-core (Python >= 3.10) provides the MRML scene")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here is not slicer-core's", allow_module_level=True)

OBLIQUE = (0.94, -0.2, 0.28, 0.26, 0.95, -0.17, -0.23, 0.23, 0.95)


def _orthonormal(direction):
    u, _, vt = np.linalg.svd(np.asarray(direction, dtype=float).reshape(3, 3))
    return tuple((u @ vt).reshape(-1))


def _load(scene, path, class_name="vtkMRMLScalarVolumeNode"):
    """Read a file into a new node the way Slicer does: through its archetype storage node."""
    node = scene.AddNewNodeByClass(class_name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def _same_image(got, expected):
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(expected))
    np.testing.assert_allclose(got.GetSpacing(), expected.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(got.GetOrigin(), expected.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(got.GetDirection(), expected.GetDirection(), atol=1e-5)


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), _orthonormal(OBLIQUE)], ids=["axial", "oblique"])
def test_a_volume_node_is_the_image_the_cli_reads_from_its_file(scene, tmp_path, direction):
    image, _mask, _ = tumor_ct("lobulated", np.random.default_rng(2), direction=direction)
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    volume = _load(scene, tmp_path / "ct.nrrd")
    _same_image(nodes.volume_image(volume), ct_image.read_ct(tmp_path / "ct.nrrd"))


def test_a_linear_parent_transform_moves_the_image_not_the_node(scene, tmp_path):
    import vtk

    image, _, _ = tumor_ct("smooth", np.random.default_rng(3))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    volume = _load(scene, tmp_path / "ct.nrrd")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 10.0)  # 10 mm toward R: -10 mm in LPS x
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    moved = nodes.volume_image(volume)
    np.testing.assert_allclose(np.subtract(moved.GetOrigin(), image.GetOrigin()), (-10.0, 0.0, 0.0), atol=1e-5)
    assert volume.GetParentTransformNode() is transform  # not hardened


def test_segments_points_and_rois_are_the_tumors_the_cli_reads(scene, tmp_path):
    _image, mask, centre = tumor_ct("spiculated", np.random.default_rng(4), direction=_orthonormal(OBLIQUE))
    sitk.WriteImage(mask, str(tmp_path / "mask.nrrd"))
    labelmap = _load(scene, tmp_path / "mask.nrrd", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    segment_id = segmentation.GetSegmentation().GetNthSegmentID(0)
    from_node = nodes.segment_tumors(segmentation, [segment_id])[0]
    from_file = tumor.from_mask(tmp_path / "mask.nrrd")
    np.testing.assert_allclose(from_node.seed, from_file.seed, atol=1e-4)
    stats = sitk.StatisticsImageFilter()
    stats.Execute(from_node.mask)
    assert stats.GetSum() == sitk.GetArrayViewFromImage(mask).sum()

    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPoint(-centre[0], -centre[1], centre[2])  # Slicer's RAS
    assert nodes.point_tumors(points)[0].seed == pytest.approx(tumor.from_point(centre).seed)

    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(-centre[0], -centre[1], centre[2])
    roi.SetSize(20.0, 30.0, 10.0)
    boxed = nodes.roi_tumor(roi)
    assert boxed.seed == pytest.approx(centre) and np.allclose(np.subtract(*boxed.box[::-1]), (20, 30, 10))


def test_two_segments_sharing_one_layer_are_two_tumors(scene, tmp_path):
    _, first, _ = tumor_ct("smooth", np.random.default_rng(5), size=(128, 96, 64))
    voxels = sitk.GetArrayFromImage(first).astype(np.uint8)
    labels = sitk.GetImageFromArray(voxels + 2 * np.roll(voxels, 40, axis=2))  # a second tumor 32 mm away
    labels.CopyInformation(first)
    sitk.WriteImage(labels, str(tmp_path / "labels.nrrd"))
    labelmap = _load(scene, tmp_path / "labels.nrrd", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    ids = [segmentation.GetSegmentation().GetNthSegmentID(i) for i in range(2)]
    got = nodes.segment_tumors(segmentation, ids)
    expected = [tumor.from_mask(tmp_path / "labels.nrrd", label) for label in (1, 2)]
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.seed, b.seed, atol=1e-4)


def test_the_users_nodes_and_storage_are_untouched_and_the_scene_saves(scene, tmp_path):
    image, _mask, _ = tumor_ct("cavitary", np.random.default_rng(6))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    before = (tmp_path / "ct.nrrd").read_bytes()
    volume = _load(scene, tmp_path / "ct.nrrd")
    count = scene.GetNumberOfNodes()
    nodes.volume_image(volume)
    assert scene.GetNumberOfNodes() == count  # no helper node left behind
    assert volume.GetStorageNode().GetFileName() == str(tmp_path / "ct.nrrd")
    assert (tmp_path / "ct.nrrd").read_bytes() == before
    scene.SetRootDirectory(str(tmp_path))
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    reloaded = slicer.vtkMRMLScene()
    reloaded.SetURL(str(tmp_path / "scene.mrml"))
    assert reloaded.Import()
    again = reloaded.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
    again.GetStorageNode().ReadData(again)
    _same_image(nodes.volume_image(again), ct_image.read_ct(tmp_path / "ct.nrrd"))


def test_nodes_that_cannot_be_used_are_refused(scene):
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    with pytest.raises(SimilarPatientsError, match="holds no image"):
        nodes.volume_image(empty)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    with pytest.raises(SimilarPatientsError, match="has no point"):
        nodes.point_tumors(points)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    blank = segmentation.GetSegmentation().AddEmptySegment("", "Tumor")
    with pytest.raises(SimilarPatientsError, match="is empty"):
        nodes.segment_tumors(segmentation, [blank])
    with pytest.raises(SimilarPatientsError, match="has no segment 'nope'; it has: Tumor"):
        nodes.segment_tumors(segmentation, ["nope"])
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetSize(10.0, 0.0, 10.0)
    with pytest.raises(SimilarPatientsError, match="empty or flat"):
        nodes.roi_tumor(roi)


def test_a_tumor_drawn_as_a_closed_surface_is_turned_into_voxels_on_the_ct_grid(scene, tmp_path):
    """A segment held as a closed surface (as RTSTRUCT contours or a model come in): the mask is made on the
    CT's grid from a copy of the segment, centred on the sphere, and the user's segmentation gains nothing."""
    import vtk

    image, _, _ = tumor_ct("smooth", np.random.default_rng(7))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    volume = _load(scene, tmp_path / "ct.nrrd")
    centre_lps = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(-centre_lps[0], -centre_lps[1], centre_lps[2])  # RAS
    sphere.SetRadius(8.0)
    sphere.SetThetaResolution(48)
    sphere.SetPhiResolution(48)
    sphere.Update()
    surface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    labelmap = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.GetSegmentation().SetSourceRepresentationName(surface)  # as an RTSTRUCT import makes it
    segment = slicer.vtkSegment()
    segment.SetName("contoured nodule")
    segment.AddRepresentation(surface, sphere.GetOutput())
    segment_id = "nodule"
    segmentation.GetSegmentation().AddSegment(segment, segment_id)

    mask = nodes.segment_mask(segmentation, segment_id, volume)
    drawn = tumor.from_binary_mask(mask)
    np.testing.assert_allclose(drawn.seed, centre_lps, atol=1.0)
    volume_mm3 = sitk.GetArrayViewFromImage(mask).sum() * np.prod(mask.GetSpacing())
    assert volume_mm3 == pytest.approx(4 / 3 * np.pi * 8.0**3, rel=0.15)
    assert np.allclose(mask.GetSpacing(), image.GetSpacing())  # the CT's grid
    assert not segmentation.GetSegmentation().ContainsRepresentation(labelmap)  # the user's node is as it was
    with pytest.raises(SimilarPatientsError, match="choose the CT volume"):
        nodes.segment_mask(segmentation, segment_id)


def _resident_mb() -> float:
    """This process's resident memory now (not its peak), in MB (Linux's /proc)."""
    import os

    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory read from /proc")
def test_ten_queries_from_a_closed_surface_keep_no_copy_of_the_ct(scene):
    """Each closed-surface query makes the CT's grid through the Segmentations logic, which hands over a copy
    of the CT's voxels for the caller to release: on a 52 MB CT, ten queries grew memory by 520 MB before it
    was released, and must now grow it by less than 50 MB."""
    import vtk
    from vtk.util import numpy_support

    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    voxels = vtk.vtkImageData()
    voxels.SetDimensions(512, 512, 100)  # int16: 52 MB, a chest CT's slice size
    voxels.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.zeros(512 * 512 * 100, np.int16), deep=True))
    volume.SetAndObserveImageData(voxels)
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(100.0, 100.0, 50.0)
    sphere.SetRadius(8.0)
    sphere.Update()
    surface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.GetSegmentation().SetSourceRepresentationName(surface)
    segment = slicer.vtkSegment()
    segment.AddRepresentation(surface, sphere.GetOutput())
    segmentation.GetSegmentation().AddSegment(segment, "nodule")
    nodes.segment_mask(segmentation, "nodule", volume)  # the first query's one-off allocations
    before = _resident_mb()
    for _ in range(10):
        assert sitk.GetArrayViewFromImage(nodes.segment_mask(segmentation, "nodule", volume)).any()
    assert _resident_mb() - before < 50
