"""Crop a tumor's neighbourhood from a CT as a recipe says, in physical space.

The crop reproduces TumorImagingBench's pipeline (orient to LPS, resample to the recipe spacing with
corners aligned, seed-based box clamped at the border, orient to the recipe axes, window, zero-pad) on
axis-aligned volumes, sample for sample. It samples with SimpleITK in physical space, so oblique volumes
(where MONAI's ``Spacingd(diagonal=True)`` misplaces the data) land where they truly are.

Geometry: the reference resamples onto a grid whose axes run toward R, A, S (MONAI's RAS world), starting
at the smallest corner of the image's voxel centres, with ``round(extent / spacing) + 1`` points per axis.
The seed becomes a grid index by truncation toward zero; the box ``[index - size // 2, index + size // 2)``
is clamped to the grid; what the clamp removes is padded back symmetrically after reorientation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import SimilarPatientsError
from ..util.optional import optional_import
from .recipes import Recipe

#: The resampling grid's axes run toward R, A, S: in LPS terms -x, -y, +z.
_GRID_SIGNS = (-1, -1, 1)


@dataclass
class Crop:
    """A network input: ``image`` (float32, ``recipe.size``, axes as ``recipe.axes``, windowed), and the
    tumor ``mask`` on the same voxels when a mask (or a box) was given."""

    image: np.ndarray
    mask: np.ndarray | None
    seed: tuple[float, float, float]
    recipe: Recipe
    #: Where the seed lies in ``image`` (continuous voxel index): the centre, unless clamped at a border.
    seed_index: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: True when ``mask`` is the box the tumor was marked with, not its drawn outline.
    mask_is_box: bool = False


def check_inside(image, point: Sequence[float], what: str = "The point") -> None:
    """Refuse an LPS point outside the image's voxels (by more than half a voxel)."""
    index = np.asarray(image.TransformPhysicalPointToContinuousIndex([float(v) for v in point]))
    size = np.asarray(image.GetSize())
    if np.any(index < -0.5) or np.any(index > size - 0.5):
        low, high = _physical_bounds(image)
        raise SimilarPatientsError(
            f"{what} ({', '.join(f'{v:.1f}' for v in point)}) LPS mm is outside the image, which spans "
            f"x {low[0]:.1f}…{high[0]:.1f}, y {low[1]:.1f}…{high[1]:.1f}, z {low[2]:.1f}…{high[2]:.1f} (LPS mm). "
            f"If the point came from Slicer, it is in RAS: pass it with the RAS flag."
        )


def _check_mask_geometry(image, mask) -> None:
    """Refuse a mask saved without the CT's geometry (from an array: 1 mm voxels at the origin), whatever its
    size, and a mask with the CT's voxel grid size but another spacing, origin or direction: either would
    place the tumor elsewhere in the CT."""
    if _bare(mask) and not _bare(image):
        raise SimilarPatientsError(
            f"The mask has no geometry of its own (1 mm voxels at the origin, {' x '.join(map(str, mask.GetSize()))} "
            f"voxels), but the CT has spacing {_mm(image.GetSpacing())} mm and origin {_mm(image.GetOrigin())} "
            f"(LPS mm): it was saved without the CT's geometry (from an array), and its tumor would be placed "
            f"elsewhere in the CT. Save the mask with the CT's spacing, origin and direction."
        )
    if tuple(mask.GetSize()) != tuple(image.GetSize()):
        return  # a mask of its own extent (a cropped labelmap, a SEG's frames) is placed by its own geometry
    spacing, other_spacing = np.asarray(image.GetSpacing()), np.asarray(mask.GetSpacing())
    shift = float(np.linalg.norm(np.subtract(mask.GetOrigin(), image.GetOrigin())))
    turned = float(np.abs(np.subtract(mask.GetDirection(), image.GetDirection())).max())
    differ = []
    if (np.abs(other_spacing - spacing) > 1e-3 * spacing).any():
        differ.append(f"spacing {_mm(other_spacing)} mm, the CT's {_mm(spacing)} mm")
    if shift > 0.1 * spacing.min():
        differ.append(f"origin {_mm(mask.GetOrigin())}, the CT's {_mm(image.GetOrigin())} (LPS mm)")
    if turned > 1e-3:
        differ.append("another direction")
    if differ:
        raise SimilarPatientsError(
            f"The mask has the CT's size ({' x '.join(map(str, image.GetSize()))} voxels) but not its geometry "
            f"({'; '.join(differ)}): it was saved without the CT's geometry, and its tumor would be placed "
            f"elsewhere in the CT. Save the mask with the CT's spacing, origin and direction."
        )


def _bare(image) -> bool:
    """Whether ``image`` has the geometry an array gets when saved without one: 1 mm voxels, origin 0, identity."""
    return (
        np.allclose(image.GetSpacing(), 1.0)
        and np.allclose(image.GetOrigin(), 0.0)
        and np.allclose(image.GetDirection(), np.eye(3).reshape(-1))
    )


def _mm(values) -> str:
    return ", ".join(f"{float(v):g}" for v in values)


def _physical_bounds(image) -> tuple[np.ndarray, np.ndarray]:
    """The LPS bounding box of the image's voxel centres."""
    corners = _voxel_centre_corners(image)
    return corners.min(axis=0), corners.max(axis=0)


def crop(image, seed: Sequence[float], recipe: Recipe, mask=None, box=None) -> Crop:
    """The recipe's input around ``seed`` (LPS mm) from ``image`` (a 3D ``SimpleITK.Image`` in HU), and
    the ``mask`` (a ``SimpleITK.Image`` in the same physical space) resampled onto the same voxels, or,
    without a mask, the ``box`` ((low, high) LPS corners) as a mask."""
    sitk = optional_import("SimpleITK", "embed")

    if mask is not None:
        _check_mask_geometry(image, mask)
    check_inside(image, seed, "The tumor seed")
    spacing = np.asarray(recipe.spacing, dtype=float)
    corners_ras = _voxel_centre_corners(image) * _GRID_SIGNS
    origin = corners_ras.min(axis=0)
    shape = np.round((corners_ras.max(axis=0) - origin) / spacing + 1.0).astype(int)
    seed_ras = np.asarray(seed, dtype=float) * _GRID_SIGNS
    index = np.array([math.trunc(v) for v in (seed_ras - origin) / spacing])
    roi = np.zeros(3, dtype=int)
    for array_axis, (axis, _) in enumerate(recipe.axis_order()):
        roi[axis] = recipe.size[array_axis]
    low = np.maximum(index - roi // 2, 0)
    high = np.minimum(index + roi // 2, shape)
    if np.any(high <= low):
        raise SimilarPatientsError(f"The seed {tuple(seed)} gives an empty crop; it lies outside the image.")

    grid = dict(
        size=[int(v) for v in high - low],
        outputOrigin=[float(v) for v in (origin + low * spacing) * _GRID_SIGNS],
        outputSpacing=[float(v) for v in spacing],
        outputDirection=[float(v) for v in np.diag(_GRID_SIGNS).reshape(-1)],
    )
    corners = [
        (origin + (low + np.array(offset) * (high - low - 1)) * spacing) * _GRID_SIGNS for offset in np.ndindex(2, 2, 2)
    ]
    # Only the voxels around the box are cast and resampled. A one-voxel border of ``outside_hu`` makes
    # interpolation past the image's last voxel blend toward it, as the reference's zero-padded resampling
    # does (toward 0 HU); inside the image the region's margin keeps that border out of reach.
    outside = float(recipe.outside_hu)
    region = sitk.Cast(_region(image, corners), sitk.sitkFloat32)
    _check_finite(region, seed)
    padded = sitk.ConstantPad(region, [1, 1, 1], [1, 1, 1], outside)
    values = sitk.Resample(padded, interpolator=sitk.sitkLinear, defaultPixelValue=outside, **grid)
    patch = recipe.scale(_to_recipe_axes(sitk.GetArrayViewFromImage(values), recipe)).astype(np.float32)
    patch_mask = None
    if mask is not None:
        labels = sitk.Resample(
            sitk.Cast(_region(mask, corners) > 0, sitk.sitkUInt8),
            interpolator=sitk.sitkNearestNeighbor,
            defaultPixelValue=0,
            **grid,
        )
        patch_mask = _to_recipe_axes(sitk.GetArrayViewFromImage(labels), recipe).astype(np.uint8)
    elif box is not None:
        ras = [np.asarray(corner, dtype=float) * _GRID_SIGNS for corner in box]
        points = [origin[a] + (low[a] + np.arange(high[a] - low[a])) * spacing[a] for a in range(3)]
        inside = [(p >= min(ras[0][a], ras[1][a])) & (p <= max(ras[0][a], ras[1][a])) for a, p in enumerate(points)]
        grid_mask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
        patch_mask = _to_recipe_axes(grid_mask.transpose(2, 1, 0), recipe).astype(np.uint8)
    seed_in_box = (seed_ras - origin) / spacing - low
    seed_index = []
    for array_axis, (axis, sign) in enumerate(recipe.axis_order()):
        position = seed_in_box[axis] if sign == _GRID_SIGNS[axis] else (high - low)[axis] - 1 - seed_in_box[axis]
        seed_index.append(float(position + max(recipe.size[array_axis] - (high - low)[axis], 0) // 2))
    return Crop(
        _pad_symmetric(patch, recipe.size, recipe.pad_value),
        None if patch_mask is None else _pad_symmetric(patch_mask, recipe.size),
        tuple(float(v) for v in seed),
        recipe,
        tuple(seed_index),
        mask is None and box is not None,
    )


def _check_finite(region, seed: Sequence[float]) -> None:
    """Refuse NaN or infinite voxels where the crop samples: they would carry into every value of a network's
    embedding (or be clipped by the window into plausible tissue)."""
    sitk = optional_import("SimpleITK", "embed")

    values = sitk.GetArrayViewFromImage(region)
    finite = np.isfinite(values)
    if finite.all():
        return
    first = region.TransformIndexToPhysicalPoint([int(i) for i in np.argwhere(~finite)[0][::-1]])
    raise SimilarPatientsError(
        f"The CT holds {int(finite.size - finite.sum())} NaN or infinite voxel(s) where the tumor at LPS "
        f"({', '.join(f'{v:.1f}' for v in seed)}) mm is cropped (the first at {', '.join(f'{v:.1f}' for v in first)}): "
        f"the image is damaged or was converted with a NaN fill value. Fix or export the image again."
    )


def _region(image, corners: Sequence[np.ndarray], margin: int = 2):
    """The part of ``image`` that holds the LPS ``corners`` plus ``margin`` voxels (clamped to the image)."""
    index = np.array([image.TransformPhysicalPointToContinuousIndex([float(v) for v in c]) for c in corners])
    size = np.asarray(image.GetSize())
    low = np.clip(np.floor(index.min(axis=0)).astype(int) - margin, 0, size - 1)
    high = np.clip(np.ceil(index.max(axis=0)).astype(int) + margin + 1, low + 1, size)
    return image[int(low[0]) : int(high[0]), int(low[1]) : int(high[1]), int(low[2]) : int(high[2])]


def _voxel_centre_corners(image) -> np.ndarray:
    """The 8 corner voxel centres in LPS mm."""
    size = image.GetSize()
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([float(i), float(j), float(k)])
        for i in (0, size[0] - 1)
        for j in (0, size[1] - 1)
        for k in (0, size[2] - 1)
    ]
    return np.asarray(corners, dtype=float)


def _to_recipe_axes(zyx: np.ndarray, recipe: Recipe) -> np.ndarray:
    """From SimpleITK's [z, y, x] buffer of the RAS-running grid to the recipe's axis order and directions."""
    grid = np.transpose(zyx, (2, 1, 0))  # [x, y, z]: toward R, A, S
    order = recipe.axis_order()
    array = np.transpose(grid, [axis for axis, _ in order])
    flips = tuple(a for a, (axis, sign) in enumerate(order) if sign != _GRID_SIGNS[axis])
    return np.flip(array, flips) if flips else array


def _pad_symmetric(array: np.ndarray, size: Sequence[int], value: float = 0) -> np.ndarray:
    missing = [max(int(s) - n, 0) for s, n in zip(size, array.shape)]
    if not any(missing):
        return np.ascontiguousarray(array)
    return np.pad(array, [(m // 2, m - m // 2) for m in missing], constant_values=value)
