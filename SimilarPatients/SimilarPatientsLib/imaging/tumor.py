"""The tumor a query is about: a seed point in LPS mm, and the mask when one was drawn.

Marks come as a mask (a labelmap, a Slicer ``.seg.nrrd`` segment, a DICOM SEG segment), a point (LPS mm,
or RAS mm as Slicer shows them, flagged), or a box (two opposite corners). A mask's seed is its centroid.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SimilarPatientsError
from ..util.optional import optional_import
from .ct_image import is_dicom_file, read_image_file, snap_geometry

#: A mask holding a value below this (a CT's air is about -1000 HU), or more distinct values than
#: ``_MOST_LABELS``, is a CT given as the mask.
_AIR_HU = -500
_MOST_LABELS = 1000


@dataclass
class Tumor:
    """``seed``: LPS mm. ``mask``: a binary ``SimpleITK.Image`` (1 = tumor) or None. ``box``: the LPS
    (low, high) corners when the tumor was boxed."""

    seed: tuple[float, float, float]
    mask: object | None = None
    box: tuple[tuple[float, ...], tuple[float, ...]] | None = None


def from_point(point: Sequence[float], ras: bool = False) -> Tumor:
    """A clicked point; ``ras=True`` when it is in RAS (Slicer's world), else LPS (DICOM's)."""
    return Tumor(_lps(point, ras))


def from_box(corner: Sequence[float], opposite: Sequence[float], ras: bool = False) -> Tumor:
    """A box given by two opposite corners; its centre is the seed."""
    a, b = np.asarray(_lps(corner, ras)), np.asarray(_lps(opposite, ras))
    if np.any(a == b):
        raise SimilarPatientsError("The box is flat: its two corners share a coordinate.")
    low, high = np.minimum(a, b), np.maximum(a, b)
    return Tumor(tuple(float(v) for v in (low + high) / 2), box=(tuple(low.tolist()), tuple(high.tolist())))


def from_mask(source, segment: str | int | None = None) -> Tumor:
    """A drawn tumor: a labelmap (path or ``SimpleITK.Image``; ``segment`` = label value when it holds
    several), a ``.seg.nrrd`` (``segment`` = name or label value) or a DICOM SEG (``segment`` = number)."""
    sitk = optional_import("SimpleITK", "embed")

    if isinstance(source, sitk.Image):
        mask = _select_label(source, segment, "the mask")
    else:
        path = Path(source)
        if not path.is_file():
            raise SimilarPatientsError(f"The mask {path} does not exist.")
        mask = _read_dicom_seg(path, segment) if is_dicom_file(path) else _read_labelmap(path, segment)
    return from_binary_mask(mask)


def from_binary_mask(mask) -> Tumor:
    """A tumor from a binary ``SimpleITK.Image``: refused when empty or full; seeded at its centroid."""
    sitk = optional_import("SimpleITK", "embed")

    if mask.GetDimension() != 3:
        raise SimilarPatientsError(f"The mask is {mask.GetDimension()}D; it must be a 3D volume.")
    mask = snap_geometry(sitk.Cast(mask > 0, sitk.sitkUInt8))  # as the CT's: read_ct snaps it the same way
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(mask)
    if not shape.HasLabel(1):
        raise SimilarPatientsError("The tumor mask is empty: no voxel is marked. Draw the tumor first.")
    voxels = int(np.prod(mask.GetSize()))
    if shape.GetNumberOfPixels(1) == voxels:
        raise SimilarPatientsError(
            f"The tumor mask marks every one of its {voxels} voxels: that is no tumor outline (an inverted mask, "
            f"a blank image saved as the mask, or the wrong file). Give the mask of the tumor."
        )
    return Tumor(tuple(float(v) for v in shape.GetCentroid(1)), mask=mask)


def tumors_from(
    mask=None,
    segments: Sequence[str | int | None] | None = None,
    points: Sequence[Sequence[float]] | None = None,
    boxes: Sequence[Sequence[float]] | None = None,
    ras: bool = False,
) -> list[Tumor]:
    """One patient's tumors from one kind of mark: a ``mask`` (one tumor per segment in ``segments``, or its
    only one), ``points``, or ``boxes`` (each six numbers: two opposite corners). ``ras``: points and
    boxes are in RAS mm (as Slicer shows them), else LPS."""
    marks = (("a mask", mask is not None), ("points", bool(points)), ("boxes", bool(boxes)))
    given = [name for name, present in marks if present]
    if len(given) != 1:
        raise SimilarPatientsError(f"Mark the tumor with one of a mask, points or boxes (got {given or 'none'}).")
    if segments and mask is None:
        raise SimilarPatientsError("--segment names a segment of --mask; give the mask too.")
    if mask is not None:
        return [from_mask(mask, segment) for segment in segments or [None]]
    if points:
        return [from_point(point, ras=ras) for point in points]
    for box in boxes:
        if len(box) != 6:
            raise SimilarPatientsError(f"A box needs six numbers, two opposite corners x,y,z; got {list(box)}.")
    return [from_box(box[:3], box[3:], ras=ras) for box in boxes]


def _lps(point: Sequence[float], ras: bool) -> tuple[float, float, float]:
    values = [float(v) for v in point]
    if len(values) != 3 or not np.all(np.isfinite(values)):
        raise SimilarPatientsError(f"A point needs three finite coordinates x,y,z in mm; got {point!r}.")
    if ras:
        values[0], values[1] = -values[0], -values[1]
    return tuple(values)


def _read_labelmap(path: Path, segment: str | int | None):
    image = read_image_file(path, "a tumor mask")
    segments = _slicer_segments(image)
    if segments:
        return _select_slicer_segment(image, segments, segment, path)
    return _select_label(image, segment, str(path))


def _slicer_segments(image) -> list[dict]:
    """The segments a Slicer ``.seg.nrrd`` describes in its header (name, label value, layer)."""
    segments, index = [], 0
    while image.HasMetaDataKey(f"Segment{index}_ID"):
        key = f"Segment{index}_"

        def field(name, default="", key=key):
            return image.GetMetaData(key + name) if image.HasMetaDataKey(key + name) else default

        segments.append(
            {"name": field("Name"), "label": int(field("LabelValue", "1")), "layer": int(field("Layer", "0"))}
        )
        index += 1
    return segments


def _select_slicer_segment(image, segments: list[dict], segment, path: Path):
    sitk = optional_import("SimpleITK", "embed")

    names = [s["name"] for s in segments]
    if segment is None and len(segments) > 1:
        raise SimilarPatientsError(f"{path} holds {len(segments)} segments ({', '.join(names)}); name one.")
    if segment is None:
        chosen = segments[0]
    else:
        matches = [s for s in segments if s["name"] == str(segment)] or [
            s for s in segments if str(s["label"]) == str(segment)
        ]
        if not matches:
            raise SimilarPatientsError(f"{path} has no segment '{segment}'; it has: {', '.join(names)}.")
        chosen = matches[0]
    layer = image
    if image.GetNumberOfComponentsPerPixel() > 1:
        layer = sitk.VectorIndexSelectionCast(image, chosen["layer"])
    return sitk.Cast(layer == chosen["label"], sitk.sitkUInt8)


def _select_label(image, segment, where: str):
    sitk = optional_import("SimpleITK", "embed")

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SimilarPatientsError(f"{where} has several values per voxel; give a labelmap or a .seg.nrrd.")
    values = np.unique(sitk.GetArrayViewFromImage(image))
    fractions = values[values != np.round(values)]
    # a soft (probability) mask, however many values it holds: fractions spanning about 0 to 1 (a CT spans thousands)
    probabilities = len(fractions) and values.max() - values.min() <= 2
    if not probabilities and (values.min() < _AIR_HU or len(values) > _MOST_LABELS):
        raise SimilarPatientsError(
            f"{where} holds {len(values):,} different values from {values.min():g} to {values.max():g}: it looks "
            f"like a CT, not a tumor mask. Are the CT and the mask swapped (the CT goes to --image, the mask to "
            f"--mask)?"
        )
    if len(fractions):
        raise SimilarPatientsError(
            f"{where} holds {len(fractions)} fractional values (from {values.min():g} to {values.max():g}): it is a "
            f"soft (probability) mask, not a labelmap. Threshold it (e.g. at 0.5) and save it as a labelmap."
        )
    labels = [int(v) for v in values if v != 0]
    if segment is None:
        if len(labels) > 1:
            raise SimilarPatientsError(
                f"{where} holds {len(labels)} labels ({_listed(labels)}); choose the tumor's label value."
            )
        return sitk.Cast(image != 0, sitk.sitkUInt8)
    try:
        value = int(segment)
    except ValueError:
        raise SimilarPatientsError(f"{where} is a plain labelmap; choose a label value, not '{segment}'.") from None
    if value not in labels:
        raise SimilarPatientsError(f"{where} has no label {value}; it holds {_listed(labels) or 'no labels (empty)'}.")
    return sitk.Cast(image == value, sitk.sitkUInt8)


def _listed(labels: list, shown: int = 10) -> str:
    """The first ``shown`` labels, and how many more: a message stays one line."""
    more = f" and {len(labels) - shown} more" if len(labels) > shown else ""
    return ", ".join(map(str, labels[:shown])) + more


def _read_dicom_seg(path: Path, segment):
    if sys.version_info < (3, 10):
        raise SimilarPatientsError(
            f"Reading the DICOM SEG {path} needs highdicom 0.23 or newer, which needs Python 3.10 or newer (this is "
            f"Python {sys.version_info.major}.{sys.version_info.minor}). Export the segment as NRRD or NIfTI (in 3D "
            f"Slicer: Segmentations, Export to files) and give that file, or use Python 3.10 or newer."
        )
    hd = optional_import("highdicom", "embed")

    try:
        seg = hd.seg.segread(str(path))
    except Exception as error:  # pydicom and highdicom raise many types for a bad file
        raise SimilarPatientsError(f"Cannot read {path} as a DICOM SEG: {error}") from error
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    described = ", ".join(f"{s.SegmentNumber} ({s.SegmentLabel})" for s in seg.SegmentSequence)
    if segment is None and len(numbers) > 1:
        raise SimilarPatientsError(f"{path} holds {len(numbers)} segments: {described}; choose one by number.")
    try:
        number = numbers[0] if segment is None else int(segment)
    except ValueError:
        labels = {s.SegmentLabel: int(s.SegmentNumber) for s in seg.SegmentSequence}
        if segment not in labels:
            raise SimilarPatientsError(f"{path} has no segment '{segment}'; it has: {described}.") from None
        number = labels[segment]
    if number not in numbers:
        raise SimilarPatientsError(f"{path} has no segment {number}; it has: {described}.")
    try:
        volume = seg.get_volume(segment_numbers=[number], combine_segments=True, dtype="uint8")
    except (ValueError, RuntimeError) as error:
        raise SimilarPatientsError(f"Segment {number} of {path} does not form a 3D volume: {error}") from error
    return _volume_image(volume)


def _volume_image(volume):
    """A highdicom ``Volume`` (array indexed slice, row, column; geometry in LPS) as a ``SimpleITK.Image``:
    highdicom's own ``to_simpleitk`` exists only from 0.28 (Slicer 5.12 bundles 0.27)."""
    sitk = optional_import("SimpleITK", "embed")
    image = sitk.GetImageFromArray(np.asarray(volume.array, dtype=np.uint8).transpose(2, 1, 0))
    image.SetSpacing([float(v) for v in volume.spacing])
    image.SetDirection([float(v) for v in np.asarray(volume.direction).flatten()])
    image.SetOrigin([float(v) for v in volume.position])
    return image
