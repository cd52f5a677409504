"""A small picture of a tumor for a results table: the axial plane through its centre, resampled in LPS
(patient's right on the left, anterior at the top, as Slicer's axial view shows it) whatever the CT's own
orientation, in a lung window. It shows a clinician what the query and each match look like before
anything is loaded into the scene."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..util.atomic import replacing
from ..util.optional import optional_import
from .crop import check_inside

#: Lung window (level -600 HU, width 1500 HU) as the (low, high) HU shown black and white.
LUNG_WINDOW = (-1350.0, 150.0)


def axial_thumbnail(
    image,
    centre_lps: Sequence[float],
    field_mm: float = 64.0,
    pixels: int = 96,
    window: tuple[float, float] = LUNG_WINDOW,
) -> np.ndarray:
    """The ``pixels`` × ``pixels`` uint8 axial view, ``field_mm`` across, centred on ``centre_lps``.

    Args:
        image: a SimpleITK CT in HU.
        centre_lps: the tumor centre, LPS mm; it must lie in the image.
        field_mm: the width and height shown.
        pixels: the picture's side.
        window: HU shown as black and as white.
    """
    sitk = optional_import("SimpleITK", "embed")
    check_inside(image, centre_lps, "The tumor centre")
    spacing = field_mm / pixels
    origin = [c - field_mm / 2 + spacing / 2 for c in centre_lps[:2]] + [float(centre_lps[2])]
    plane = sitk.Resample(
        image,
        [pixels, pixels, 1],
        sitk.Transform(),
        sitk.sitkLinear,
        origin,
        [spacing, spacing, 1.0],
        [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        -1024.0,
        sitk.sitkFloat32,
    )
    values = sitk.GetArrayFromImage(plane)[0]  # rows run anterior → posterior, columns right → left
    low, high = window
    return np.round(np.clip((values - low) / (high - low), 0.0, 1.0) * 255).astype(np.uint8)


def write_png(picture: np.ndarray, path: Path | str) -> Path:
    """``picture`` (2D uint8) as a PNG at ``path``, written beside and renamed into place."""
    sitk = optional_import("SimpleITK", "embed")
    if picture.ndim != 2 or picture.dtype != np.uint8:
        raise ValueError(f"A thumbnail is a 2D uint8 array, not {picture.dtype} of shape {picture.shape}.")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"A thumbnail is written as .png, not {path.name}.")
    with replacing(path) as temporary:  # the temporary keeps the .png suffix SimpleITK picks its writer by
        sitk.WriteImage(sitk.GetImageFromArray(picture), str(temporary))
    return path
