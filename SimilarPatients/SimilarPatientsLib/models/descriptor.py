"""A weight-free tumor descriptor: size, shape, intensity and texture measured on the mask and the crop.

It is the baseline every foundation model should beat, and the model that works offline with nothing to
download. It needs the tumor's extent: a drawn mask, or else one grown from the seed (the connected
component of soft tissue nearest the seed, holes filled, kept inside the box when one was drawn).

Each feature is centred and scaled by fixed constants (typical lung-nodule values), so that cosine and
Euclidean distances weigh the groups comparably without statistics from any reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import SimilarPatientsError
from ..imaging.crop import Crop
from ..imaging.recipes import Recipe
from ..util.optional import IMAGING, optional_import

#: 1 mm voxels, LPS array axes, HU values unchanged (no window), 64³: room for nodules up to 6 cm; what lies
#: outside the image is air.
RECIPE = Recipe("descriptor-v1", "LPS", (1.0, 1.0, 1.0), (64, 64, 64), (0.0, 1.0), (0.0, 1.0), False, -1024.0, -1024.0)
_SOFT_TISSUE_HU = -650.0
_SHELLS = (0.0, 0.35, 0.7, 1.0, 1.3)

#: (name, centre, scale): the vector holds (value - centre) / scale.
FEATURES = (
    ("log10_volume_mm3", 3.3, 0.6),
    ("equivalent_radius_mm", 9.0, 4.0),
    ("elongation", 1.3, 0.3),
    ("flatness", 1.3, 0.3),
    ("roundness", 0.8, 0.15),
    ("surface_radius_cv", 0.2, 0.1),
    ("opening_loss", 0.15, 0.15),
    ("closing_gain", 0.15, 0.15),
    ("mean_hu", -200.0, 300.0),
    ("std_hu", 300.0, 200.0),
    ("p10_hu", -600.0, 400.0),
    ("p50_hu", -100.0, 400.0),
    ("p90_hu", 30.0, 100.0),
    ("air_fraction", 0.1, 0.15),
    ("ground_glass_fraction", 0.2, 0.2),
    *[(f"shell_{i}_mean_hu", -200.0, 400.0) for i in range(len(_SHELLS) - 1)],
    ("gradient_mean", 150.0, 100.0),
    ("gradient_std", 150.0, 100.0),
)
DIMENSION = len(FEATURES)


class DescriptorEncoder:
    """The descriptor as an encoder: each crop measured on the CPU, with its drawn mask, or with one grown
    from the seed (inside the box when the tumor was boxed). There is nothing to load."""

    device = "cpu"
    load_seconds = 0.0
    needs = IMAGING  #: the packages it runs with (no torch)

    def __init__(
        self, spec=None, weights: Path | None = None, device=None, precision="fp32", batch_size=8, progress=None
    ):
        """Takes every encoder's arguments; whatever they say, the descriptor is measured on the CPU."""

    def optimise(self, shape: tuple) -> bool:
        """Nothing to make faster: measuring a crop has no set-up."""
        return False

    def encode(self, crops: Sequence[Crop]) -> np.ndarray:
        return np.stack(
            [
                describe(c.image, None if c.mask_is_box else c.mask, c.mask if c.mask_is_box else None, c.seed_index)
                for c in crops
            ]
        )


def describe(
    hu: np.ndarray, mask: np.ndarray | None, box_mask: np.ndarray | None = None, seed_index=None
) -> np.ndarray:
    """The descriptor (float32, ``DIMENSION``) of a 1 mm HU crop around the tumor, with its ``mask``
    (grown from ``seed_index``, default the centre, if None; ``box_mask`` bounds the growth)."""
    sitk = optional_import("SimpleITK", "embed")

    hu = np.asarray(hu, dtype=np.float32)
    if mask is None:
        mask = grow_mask(hu, box_mask, seed_index)
    mask = np.asarray(mask) > 0
    if mask.sum() < 8:
        raise SimilarPatientsError(
            f"The tumor has {int(mask.sum())} voxel(s) of 1 mm³ in the crop: too small to describe. Check the mask."
        )
    label = sitk.GetImageFromArray(mask.astype(np.uint8))
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.ComputePerimeterOn()
    shape.Execute(label)
    volume = float(mask.sum())
    radius = shape.GetEquivalentSphericalRadius(1)

    opened = sitk.GetArrayFromImage(sitk.BinaryMorphologicalOpening(label, [2, 2, 2])) > 0
    closed = sitk.GetArrayFromImage(sitk.BinaryMorphologicalClosing(label, [3, 3, 3])) > 0
    inside = hu[mask]
    coords = np.argwhere(mask).astype(np.float64)
    centre = coords.mean(axis=0)
    distance = np.linalg.norm(np.moveaxis(np.indices(mask.shape), 0, -1) - centre, axis=-1) / radius
    surface = mask & ~(sitk.GetArrayFromImage(sitk.BinaryErode(label, [1, 1, 1])) > 0)
    if not surface.any():
        raise SimilarPatientsError(
            f"The tumor fills the whole {' x '.join(map(str, mask.shape))} mm crop: it has no outline to measure. "
            f"The mask marks more than a tumor (the whole image?), or the image's voxels are far too large."
        )
    surface_radii = np.linalg.norm(np.argwhere(surface) - centre, axis=1)
    shells = []
    for low, high in zip(_SHELLS[:-1], _SHELLS[1:]):
        ring = mask & (distance >= low) & (distance < high)
        shells.append(float(hu[ring].mean()) if ring.any() else float(inside.mean()))
    gradient = np.linalg.norm(np.stack(np.gradient(hu)), axis=0)[mask]

    values = [
        np.log10(volume),
        radius,
        shape.GetElongation(1),
        shape.GetFlatness(1),
        shape.GetRoundness(1),
        float(surface_radii.std() / max(surface_radii.mean(), 1e-6)),
        float((mask & ~opened).sum() / volume),
        float((closed & ~mask).sum() / volume),
        float(inside.mean()),
        float(inside.std()),
        *np.percentile(inside, [10, 50, 90]).tolist(),
        float((inside < -800).mean()),
        float(((inside >= -800) & (inside < -300)).mean()),
        *shells,
        float(gradient.mean()),
        float(gradient.std()),
    ]
    centres = np.array([c for _, c, _ in FEATURES])
    scales = np.array([s for _, _, s in FEATURES])
    return ((np.asarray(values, dtype=np.float64) - centres) / scales).astype(np.float32)


def grow_mask(hu: np.ndarray, box_mask: np.ndarray | None = None, seed_index=None) -> np.ndarray:
    """The soft-tissue component nearest the seed (default: the crop centre), holes filled (a cavity is
    part of its tumor)."""
    sitk = optional_import("SimpleITK", "embed")

    tissue = hu > _SOFT_TISSUE_HU
    if box_mask is not None:
        tissue &= np.asarray(box_mask) > 0
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(tissue.astype(np.uint8))))
    if components.max() == 0:
        raise SimilarPatientsError(
            "No soft tissue (above -650 HU) near the point: is it on the tumor? Draw a mask to describe it."
        )
    centre = (np.array(hu.shape) - 1) / 2.0 if seed_index is None else np.asarray(seed_index, dtype=float)
    labelled = np.argwhere(components > 0)
    nearest = labelled[np.argmin(np.linalg.norm(labelled - centre, axis=1))]
    if np.linalg.norm(nearest - centre) > 10:
        raise SimilarPatientsError("No soft tissue within 10 mm of the point: is it on the tumor? Draw a mask.")
    chosen = sitk.GetImageFromArray((components == components[tuple(nearest)]).astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.BinaryFillhole(chosen)) > 0
