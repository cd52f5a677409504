"""From the query CT and the tumor marked in it to the crop a model takes: readers that refuse what is
not a 3D CT in HU, tumor marks (masks, DICOM SEG, points, boxes) in LPS mm, recipes, and the crop.

SimpleITK, pydicom and highdicom come with the ``embed`` extra; recipes need none of them.
"""

from .crop import Crop, crop
from .ct_image import read_ct
from .recipes import Recipe
from .thumbnail import axial_thumbnail, write_png
from .tumor import Tumor, from_binary_mask, from_box, from_mask, from_point, tumors_from

__all__ = [
    "Crop",
    "Recipe",
    "Tumor",
    "axial_thumbnail",
    "crop",
    "from_binary_mask",
    "from_box",
    "from_mask",
    "from_point",
    "read_ct",
    "tumors_from",
    "write_png",
]
