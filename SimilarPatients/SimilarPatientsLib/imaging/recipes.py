"""Preprocessing recipes: how a crop around a tumor becomes a network input.

A recipe is part of a model's identity: embeddings of one model made with two recipes are not comparable,
so every reference row records its recipe and a query must use the same one. Each model's
``tumorimagingbench`` recipe reproduces the TumorImagingBench pipeline the NLST-Sybil reference was built
with; ``fmcib-original`` is FMCIB's own published preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SimilarPatientsError

_AXIS_LETTERS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


@dataclass(frozen=True)
class Recipe:
    """One preprocessing recipe.

    Args:
        name: the recipe's name as stored in reference rows (with the model name it identifies the space).
        axes: the patient directions the array axes point to, e.g. ``"SPL"``: axis 0 runs toward Superior.
        spacing: voxel size in mm along the patient x (L), y (P), z (S) axes.
        size: crop size in voxels along the array axes.
        window: the HU range mapped linearly to ``output_range``.
        output_range: the values ``window`` maps to.
        clip: clip to ``output_range`` after the mapping (TumorImagingBench does; FMCIB's original does not).
        outside_hu: the HU of points outside the image (TumorImagingBench resamples with zero padding: 0 HU).
        pad_value: the value, after windowing, that pads a crop clamped at the image border to ``size``.
    """

    name: str
    axes: str
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]
    window: tuple[float, float]
    output_range: tuple[float, float] = (0.0, 1.0)
    clip: bool = True
    outside_hu: float = 0.0
    pad_value: float = 0.0

    def __post_init__(self):
        letters = self.axes.upper()
        if len(letters) != 3 or any(c not in _AXIS_LETTERS for c in letters):
            raise SimilarPatientsError(f"Recipe axes '{self.axes}' must be 3 of the letters L/R, P/A, S/I.")
        if sorted(_AXIS_LETTERS[c][0] for c in letters) != [0, 1, 2]:
            raise SimilarPatientsError(f"Recipe axes '{self.axes}' name one direction twice.")
        if min(self.spacing) <= 0 or min(self.size) <= 0:
            raise SimilarPatientsError("A recipe's spacing and size must be positive.")

    def axis_order(self) -> tuple[tuple[int, int], ...]:
        """Per array axis: (patient LPS axis index, +1 if it runs toward L/P/S, -1 toward R/A/I)."""
        return tuple(_AXIS_LETTERS[c] for c in self.axes.upper())

    def scale(self, hu):
        """Map HU values to the network's range (numpy or torch arrays)."""
        (low, high), (out_low, out_high) = self.window, self.output_range
        values = (hu - low) / (high - low) * (out_high - out_low) + out_low
        if self.clip:
            values = values.clip(min(out_low, out_high), max(out_low, out_high))
        return values


def tumorimagingbench(
    axes: str,
    window: tuple[float, float] = (-1024.0, 2048.0),
    size: int = 48,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    output_range: tuple[float, float] = (0.0, 1.0),
) -> Recipe:
    """The TumorImagingBench recipe with one model's axes, window and size."""
    return Recipe("tumorimagingbench", axes, spacing, (size, size, size), window, output_range, clip=True)


#: FMCIB's own published preprocessing: 50³ at 1 mm, (HU + 1024) / 3072 without clipping, SPL axes.
FMCIB_ORIGINAL = Recipe("fmcib-original", "SPL", (1.0, 1.0, 1.0), (50, 50, 50), (-1024.0, 2048.0), clip=False)
