"""Slicer nodes in, the library's inputs out: a volume node as a SimpleITK image in LPS, segments,
markup points and an ROI as tumors in LPS mm. This is the one place where RAS meets LPS.

Nothing here writes to the user's nodes or their storage: voxels are copied out of the node in memory
(a parent transform, if linear, is applied to the geometry, never hardened into the node). Plain Python
over MRML nodes, so it runs on Slicer's own scene and, in the tests, on ``slicer-core``'s; vtk and the
MRML classes are imported only inside the functions that need them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import SimilarPatientsError
from ..util.optional import optional_import

#: RAS (Slicer's world) to LPS (DICOM's and ITK's): x and y change sign.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def volume_image(volume):
    """A scalar volume node's voxels and geometry as a ``SimpleITK.Image`` in LPS (a copy)."""
    sitk = optional_import("SimpleITK", "embed")
    image_data = volume.GetImageData() if volume is not None else None
    if image_data is None or min(image_data.GetDimensions()) < 1:
        name = volume.GetName() if volume is not None else "(none)"
        raise SimilarPatientsError(f"The volume '{name}' holds no image: load the CT first.")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise SimilarPatientsError(
            f"'{volume.GetName()}' has {image_data.GetNumberOfScalarComponents()} values per voxel; a CT has 1."
        )
    ijk_to_world = _to_world(volume) @ _matrix(volume.GetIJKToRASMatrix)
    return _image(sitk, _voxels(image_data), ijk_to_world)


def segment_mask(segmentation, segment_id: str, reference_volume=None):
    """One segment as a binary ``SimpleITK.Image`` (1 = tumor) in LPS: its labelmap as drawn, or, for a
    segment held as contours or a closed surface (RTSTRUCT, a model), one made on the CT's grid
    (``reference_volume``) from a copy of the segment (the user's node gains no representation)."""
    sitk = optional_import("SimpleITK", "embed")
    segment = segmentation.GetSegmentation().GetSegment(segment_id) if segment_id else None
    if segment is None:
        names = [
            segmentation.GetSegmentation().GetNthSegment(i).GetName()
            for i in range(segmentation.GetSegmentation().GetNumberOfSegments())
        ]
        raise SimilarPatientsError(
            f"'{segmentation.GetName()}' has no segment '{segment_id}'; it has: {', '.join(names) or 'none'}."
        )
    labelmap = _binary_labelmap(segmentation, segment_id, reference_volume)
    voxels = _voxels(labelmap) if min(labelmap.GetDimensions()) > 0 else np.zeros((0, 0, 0), np.uint8)
    if not voxels.size or not voxels.any():
        raise SimilarPatientsError(
            f"The segment '{segment.GetName()}' is empty: no voxel is marked. Draw the tumor first."
        )
    image_to_world = _matrix(labelmap.GetImageToWorldMatrix)
    extent = labelmap.GetExtent()  # the labelmap's voxels may start at a non-zero index
    start = np.eye(4)
    start[:3, 3] = [extent[0], extent[2], extent[4]]
    mask = _image(sitk, (voxels > 0).astype(np.uint8), _to_world(segmentation) @ image_to_world @ start)
    return around_tumor(mask)


def _binary_labelmap(segmentation, segment_id: str, reference_volume):
    """The segment's binary labelmap (an ``vtkOrientedImageData`` in the segmentation's frame)."""
    import slicer  # the MRML classes (in Slicer, and from slicer-core outside it)

    labelmap = slicer.vtkOrientedImageData()
    converter = slicer.vtkSegmentationConverter
    source = segmentation.GetSegmentation()
    name = converter.GetSegmentationBinaryLabelmapRepresentationName()
    # asked only when there is one: the node logs an error for a segment without it (an RTSTRUCT's)
    if source.ContainsRepresentation(name) and segmentation.GetBinaryLabelmapRepresentation(segment_id, labelmap):
        return labelmap
    if reference_volume is None:
        raise SimilarPatientsError(
            f"'{segmentation.GetName()}' holds its segments as {source.GetSourceRepresentationName()}: choose the CT "
            f"volume, on whose grid they are turned into voxels."
        )
    copy = slicer.vtkSegmentation()
    copy.SetSourceRepresentationName(source.GetSourceRepresentationName())
    copy.CopySegmentFromSegmentation(source, segment_id)
    grid = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(
        reference_volume, segmentation.GetParentTransformNode()
    )
    # The logic hands over a new object that the caller owns ("Need to take ownership of the created object",
    # vtkSlicerSegmentationsModuleLogic.h): Python's reference comes on top, so without this release each
    # query would keep a full copy of the CT's voxels (Slicer's own Python releases it the same way).
    grid.UnRegister(None)
    copy.SetConversionParameter(
        converter.GetReferenceImageGeometryParameterName(), converter.SerializeImageGeometry(grid)
    )
    if not copy.CreateRepresentation(name) or not copy.GetSegment(segment_id).GetRepresentation(name):
        raise SimilarPatientsError(
            f"The segment '{source.GetSegment(segment_id).GetName()}' ({source.GetSourceRepresentationName()}) could "
            f"not be turned into voxels; in the Segmentations module, create its binary labelmap representation."
        )
    labelmap.DeepCopy(copy.GetSegment(segment_id).GetRepresentation(name))
    return labelmap


def around_tumor(mask, margin: int = 2):
    """The part of a binary mask image that holds the tumor, plus ``margin`` voxels: the same tumor in
    physical space (its seed and voxels are unchanged), a fraction of the bytes to hand to the worker."""
    sitk = optional_import("SimpleITK", "embed")
    voxels = sitk.GetArrayViewFromImage(mask)
    marked = np.argwhere(voxels > 0)
    if not len(marked):
        return mask
    low = np.maximum(marked.min(axis=0) - margin, 0)[::-1]  # x, y, z
    high = np.minimum(marked.max(axis=0) + margin + 1, voxels.shape)[::-1]
    return sitk.Cast(
        mask[int(low[0]) : int(high[0]), int(low[1]) : int(high[1]), int(low[2]) : int(high[2])], sitk.sitkUInt8
    )


def segment_tumors(segmentation, segment_ids: Sequence[str]) -> list:
    """One tumor per segment, in LPS (see :func:`segment_mask`)."""
    from ..imaging.tumor import from_binary_mask

    if not segment_ids:
        raise SimilarPatientsError(f"Choose the tumor's segment in '{segmentation.GetName()}'.")
    return [from_binary_mask(segment_mask(segmentation, segment_id)) for segment_id in segment_ids]


def point_tumors(markups, indices: Sequence[int] | None = None) -> list:
    """One tumor per control point of a markups node (all, or those at ``indices``), world RAS → LPS."""
    from ..imaging.tumor import from_point

    count = markups.GetNumberOfControlPoints()
    if count < 1:
        raise SimilarPatientsError(f"The point list '{markups.GetName()}' has no point: place one on the tumor.")
    tumors = []
    for index in range(count) if indices is None else indices:
        if not 0 <= index < count:
            raise SimilarPatientsError(f"'{markups.GetName()}' has no point {index + 1} (it has {count}).")
        position = [0.0, 0.0, 0.0]
        markups.GetNthControlPointPositionWorld(index, position)
        tumors.append(from_point(position, ras=True))
    return tumors


def roi_tumor(roi):
    """The tumor boxed by an ROI node: its axis-aligned world bounds (a rotated ROI is bounded by the
    axis-aligned box around it), RAS → LPS."""
    from ..imaging.tumor import from_box

    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    low, high = (bounds[0], bounds[2], bounds[4]), (bounds[1], bounds[3], bounds[5])
    if not np.all(np.isfinite(bounds)) or np.any(np.asarray(high) <= np.asarray(low)):
        raise SimilarPatientsError(f"The ROI '{roi.GetName()}' is empty or flat: size it around the tumor.")
    return from_box(low, high, ras=True)


def _matrix(getter) -> np.ndarray:
    """A 4×4 numpy matrix from a VTK getter that fills a ``vtkMatrix4x4``."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    getter(matrix)
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


def _to_world(node) -> np.ndarray:
    """The node's parent transform to world (identity without one); a non-linear one is refused."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise SimilarPatientsError(
            f"'{node.GetName()}' is under a non-linear transform ('{transform.GetName()}'): harden it first, or "
            f"remove the transform."
        )
    return _matrix(transform.GetMatrixTransformToWorld)


def _voxels(image_data) -> np.ndarray:
    """The scalars of a ``vtkImageData`` as a (z, y, x) numpy copy."""
    from vtk.util import numpy_support

    x, y, z = image_data.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    return np.array(scalars.reshape(z, y, x), copy=True)


def _image(sitk, zyx: np.ndarray, ijk_to_ras: np.ndarray):
    """A SimpleITK image of ``zyx`` voxels whose index → RAS mapping is ``ijk_to_ras``, in LPS."""
    ijk_to_lps = RAS_TO_LPS @ ijk_to_ras
    columns = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise SimilarPatientsError("The volume's geometry is degenerate (a zero voxel size).")
    image = sitk.GetImageFromArray(zyx)
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])
    image.SetDirection([float(v) for v in (columns / spacing).reshape(-1)])
    return image
