"""The crop reproduces TumorImagingBench's MONAI pipeline on axis-aligned volumes, is geometrically right on
oblique ones, and every way of giving a CT and a tumor (DICOM, NIfTI, NRRD, SEG, point, box) agrees."""

from __future__ import annotations

import itertools
import sys
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from SimilarPatientsLib import SimilarPatientsError
from SimilarPatientsLib.imaging import ct_image, recipes, tumor
from SimilarPatientsLib.imaging.crop import check_inside, crop
from synthetic_ct import blank_ct, physical_grid, tumor_ct, write_dicom_seg, write_dicom_series

RECIPES = {
    "FMCIB/CTFM": recipes.tumorimagingbench("SPL"),
    "VISTA3D/SUPREME/ModelsGen": recipes.tumorimagingbench("RAS"),
    "PASTA": recipes.tumorimagingbench("LPS"),
    "Merlin": recipes.tumorimagingbench("RAS", window=(-1000, 1000)),
    "CTClipVit": recipes.tumorimagingbench("SLP", (-1000, 1000), 60, (1.5, 0.75, 0.75), (-1.0, 1.0)),
    "Voco": recipes.tumorimagingbench("RAS", size=64),
}


def tumorimagingbench_pipeline(image: sitk.Image, seed_lps, recipe) -> np.ndarray:
    """The reference: TumorImagingBench's transforms with MONAI (ITK reader's RAS affine, Orientationd LPS,
    Spacingd diagonal with corners aligned, FMCIB's seed crop, Orientationd, ScaleIntensityRanged,
    SpatialPadd), applied to the same voxels."""
    import monai.transforms as mt
    import torch
    from monai.data import MetaTensor

    warnings.filterwarnings("ignore", category=FutureWarning)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    values = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)
    data = MetaTensor(torch.from_numpy(values)[None], affine=torch.tensor(np.diag([-1.0, -1, 1, 1]) @ lps))
    data = mt.Orientation("LPS")(data)
    data = mt.Spacing(recipe.spacing, mode="bilinear", padding_mode="zeros", align_corners=True, diagonal=True)(data)
    centre = np.linalg.inv(np.asarray(data.affine)) @ np.array([-seed_lps[0], -seed_lps[1], seed_lps[2], 1.0])
    centre = [int(v) for v in centre[:3]]
    size = recipe.size
    box = [slice(max(c - s // 2, 0), min(c + s // 2, n)) for c, s, n in zip(centre, size, data.shape[1:])]
    data = mt.Orientation(recipe.axes)(data[:, box[0], box[1], box[2]])
    (a_min, a_max), (b_min, b_max) = recipe.window, recipe.output_range
    data = mt.ScaleIntensityRange(a_min, a_max, b_min, b_max, clip=True)(data)
    return mt.SpatialPad(size)(data).as_tensor()[0].numpy()


def axis_aligned_directions():
    """All 48 axis-aligned direction matrices: every axis order and every flip."""
    for order in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            matrix = np.zeros((3, 3))
            for column, (row, sign) in enumerate(zip(order, signs)):
                matrix[row, column] = sign
            yield matrix


def random_ct(direction, size=(61, 51, 41), spacing=(0.7, 0.8, 1.25), seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.normal(-300, 500, size[::-1]).astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin((12.5, -20.25, 31.0))
    image.SetDirection(np.asarray(direction, dtype=float).reshape(-1).tolist())
    return image


def interior_point(image: sitk.Image, fraction) -> np.ndarray:
    index = [f * (n - 1) for f, n in zip(fraction, image.GetSize())]
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(index)) + 0.37


@pytest.mark.parametrize("direction", list(axis_aligned_directions()), ids=lambda m: "".join(map(str, m.argmax(0))))
@pytest.mark.torch  # compared with MONAI's transforms
def test_crop_equals_the_tumorimagingbench_pipeline_in_every_axis_order_and_flip(direction):
    image = random_ct(direction)
    for i, (name, recipe) in enumerate(RECIPES.items()):
        # centre and an off-centre seed whose box is clamped by the border
        for fraction in ((0.5, 0.5, 0.5), ((0.1, 0.9, 0.2), (0.8, 0.15, 0.9))[i % 2]):
            seed = interior_point(image, fraction)
            expected = tumorimagingbench_pipeline(image, seed, recipe)
            got = crop(image, seed, recipe).image
            assert got.shape == expected.shape == recipe.size, name
            np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=name)


@pytest.mark.torch  # compared with MONAI's transforms
def test_crop_equals_the_pipeline_when_the_extent_is_not_a_whole_number_of_mm():
    image = random_ct(np.eye(3), size=(53, 47, 23), spacing=(0.73, 0.81, 2.3))
    for fraction in ((0.5, 0.5, 0.5), (0.98, 0.02, 0.97)):
        seed = interior_point(image, fraction)
        for recipe in RECIPES.values():
            np.testing.assert_allclose(
                crop(image, seed, recipe).image, tumorimagingbench_pipeline(image, seed, recipe), atol=1e-5
            )


def _sphere_ct(direction, centre, radius=4.0, size=(80, 70, 60), spacing=(0.7, 0.8, 1.1)):
    """A sphere of 2000 HU in -1000 HU, on a grid of any direction whose middle is near LPS (0, 0, 0)."""
    half_extent = np.asarray(direction, dtype=float) @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2)
    origin = np.array([1.1, -0.7, 0.4]) - half_extent
    image = blank_ct(size=size, spacing=spacing, origin=origin, direction=direction, background=-1000)
    inside = np.linalg.norm(physical_grid(image) - np.asarray(centre), axis=-1) <= radius
    values = np.where(inside, 2000, -1000).astype(np.int16)
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(image)
    return out


def _bright_centroid(array: np.ndarray) -> np.ndarray:
    weights = np.clip(array - array.min(), 0, None)
    weights = np.where(weights > 0.75 * weights.max(), weights, 0)  # above the 0 HU that pads the data
    return (np.argwhere(np.ones_like(array, dtype=bool)) * weights.reshape(-1, 1)).sum(0) / weights.sum()


@pytest.mark.parametrize("axes", ["SPL", "RAS", "LPS", "SLP", "IAR"])
@pytest.mark.parametrize("direction", list(axis_aligned_directions())[::7])
def test_a_bright_sphere_at_a_known_lps_point_lands_at_the_crop_centre(axes, direction):
    centre = (3.3, -4.1, 2.6)
    image = _sphere_ct(direction, centre)
    recipe = recipes.tumorimagingbench(axes)
    result = crop(image, centre, recipe)
    np.testing.assert_allclose(_bright_centroid(result.image), result.seed_index, atol=0.5)
    # the box is centred on the voxel the seed truncates to: within a voxel of the middle of the crop
    np.testing.assert_allclose(result.seed_index, (np.asarray(recipe.size) - 1) / 2, atol=1.5)


def test_recipe_axes_point_where_they_say():
    """A sphere displaced toward patient Superior and Left shows up toward the end of the S and L axes."""
    image = _sphere_ct(np.eye(3), (8.0, 0.0, 10.0))  # LPS: +x is Left, +z is Superior
    spl = crop(image, (0.0, 0.0, 0.0), recipes.tumorimagingbench("SPL")).image
    ras = crop(image, (0.0, 0.0, 0.0), recipes.tumorimagingbench("RAS")).image
    spl_centroid, ras_centroid = _bright_centroid(spl), _bright_centroid(ras)
    assert spl_centroid[0] > 30 and spl_centroid[2] > 28  # toward S, toward L
    assert ras_centroid[0] < 20 and ras_centroid[2] > 30  # toward R is lower: the sphere is Left; S is high


def _rotation(degrees_x, degrees_z):
    a, b = np.radians(degrees_x), np.radians(degrees_z)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


@pytest.mark.parametrize("angles", [(25, 30), (10, 0), (0, 10), (45, 0), (20, -35)])
def test_oblique_volume_is_cropped_where_the_tumor_truly_is(angles):
    for centre, spacing in (((6.0, -9.0, 7.0), (0.7, 0.8, 1.1)), ((15.0, 12.0, -14.0), (0.7, 0.7, 2.5))):
        image = _sphere_ct(_rotation(*angles), centre, size=(80, 70, 50), spacing=spacing)
        for axes in ("SPL", "RAS"):
            result = crop(image, centre, recipes.tumorimagingbench(axes))
            # the bright sphere is where the seed is, within a third of a voxel (the seed sits mid-crop
            # unless the box is clamped at the border, which these small volumes often do)
            np.testing.assert_allclose(_bright_centroid(result.image), result.seed_index, atol=0.35)


def test_oblique_anisotropic_dicom_series_reads_and_crops_correctly(tmp_path):
    centre = (4.0, 5.0, -6.0)
    image = _sphere_ct(_rotation(15, -20), centre, size=(72, 64, 30), spacing=(0.68, 0.68, 2.5))
    write_dicom_series(image, tmp_path / "ct")
    read = ct_image.read_ct(tmp_path / "ct", check_hounsfield=False)
    np.testing.assert_allclose(read.GetDirection(), image.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(read.GetSpacing(), image.GetSpacing(), atol=1e-6)
    recipe = recipes.tumorimagingbench("RAS")
    result = crop(read, centre, recipe)
    np.testing.assert_allclose(_bright_centroid(result.image), result.seed_index, atol=0.5)
    np.testing.assert_allclose(result.image, crop(image, centre, recipe).image, atol=1e-5)


@pytest.mark.torch  # compared with MONAI's transforms
def test_tumor_touching_the_border_is_padded_as_the_reference_does():
    image = _sphere_ct(np.eye(3), (-22.0, 0.0, 0.0))  # 3 mm from the image's -x (Right) edge
    seed = (-22.0, 0.0, 0.0)
    for axes in ("SPL", "RAS"):
        recipe = recipes.tumorimagingbench(axes)
        result = crop(image, seed, recipe)
        np.testing.assert_allclose(result.image, tumorimagingbench_pipeline(image, seed, recipe), atol=1e-5)
        np.testing.assert_allclose(_bright_centroid(result.image), result.seed_index, atol=0.5)
        assert np.abs(np.asarray(result.seed_index) - 23.5).max() > 5  # clamped: not centred


def test_nifti_nrrd_and_dicom_give_the_same_crop(tmp_path):
    image, _, centre = tumor_ct("lobulated", np.random.default_rng(3))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    write_dicom_series(image, tmp_path / "dicom")
    recipe = recipes.tumorimagingbench("SPL")
    crops = [
        crop(ct_image.read_ct(source), centre, recipe).image
        for source in (image, tmp_path / "ct.nii.gz", tmp_path / "ct.nrrd", tmp_path / "dicom")
    ]
    for other in crops[1:]:
        np.testing.assert_allclose(other, crops[0], atol=1e-5)
    one_file = sorted((tmp_path / "dicom").iterdir())[3]
    np.testing.assert_allclose(crop(ct_image.read_ct(one_file), centre, recipe).image, crops[0], atol=1e-5)


def test_ras_point_and_lps_point_are_the_same_tumor():
    image, _, centre = tumor_ct("smooth", np.random.default_rng(4))
    lps = tumor.from_point(centre)
    ras = tumor.from_point((-centre[0], -centre[1], centre[2]), ras=True)
    assert ras.seed == lps.seed
    recipe = recipes.tumorimagingbench("SPL")
    np.testing.assert_array_equal(crop(image, ras.seed, recipe).image, crop(image, lps.seed, recipe).image)
    box = tumor.from_box(
        (-centre[0] - 5, -centre[1] - 5, centre[2] - 5), (-centre[0] + 5, -centre[1] + 5, centre[2] + 5), ras=True
    )
    np.testing.assert_allclose(box.seed, lps.seed)


def _write_seg_nrrd(path, labels: sitk.Image, segments):
    """A Slicer-style .seg.nrrd: one labelmap layer, segments described in the header."""
    image = sitk.Image(labels)
    for i, (name, value) in enumerate(segments):
        image.SetMetaData(f"Segment{i}_ID", f"Segment_{i}")
        image.SetMetaData(f"Segment{i}_Name", name)
        image.SetMetaData(f"Segment{i}_LabelValue", str(value))
        image.SetMetaData(f"Segment{i}_Layer", "0")
    sitk.WriteImage(image, str(path))


def test_every_mask_format_gives_the_same_tumor(tmp_path):
    pytest.importorskip(
        "highdicom", minversion="0.23", reason="DICOM SEG masks need highdicom >= 0.23 (Python >= 3.10)"
    )
    image, mask, _ = tumor_ct("cavitary", np.random.default_rng(5), spacing=(0.8, 0.8, 1.7), size=(96, 96, 48))
    other = sitk.Cast(sitk.BinaryThreshold(physical_grid_image(image, (-30, -30, 0), 4.0), 1, 1), sitk.sitkUInt8)
    labels = sitk.Cast(mask, sitk.sitkUInt8) * 3 + other * 7
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "labels.nrrd"))
    _write_seg_nrrd(tmp_path / "tumor.seg.nrrd", labels, [("vessel", 7), ("nodule", 3)])
    datasets = write_dicom_series(image, tmp_path / "ct")
    write_dicom_seg(datasets, mask, tmp_path / "seg.dcm")

    marks = {
        "sitk": tumor.from_mask(mask),
        "nifti": tumor.from_mask(tmp_path / "mask.nii.gz"),
        "label value": tumor.from_mask(tmp_path / "labels.nrrd", 3),
        "segment name": tumor.from_mask(tmp_path / "tumor.seg.nrrd", "nodule"),
        "segment label value": tumor.from_mask(tmp_path / "tumor.seg.nrrd", "3"),
        "dicom seg": tumor.from_mask(tmp_path / "seg.dcm", 1),
        "dicom seg by label": tumor.from_mask(tmp_path / "seg.dcm", "tumor"),
    }
    recipe = recipes.tumorimagingbench("RAS")
    reference = crop(image, marks["sitk"].seed, recipe, marks["sitk"].mask)
    for name, mark in marks.items():
        np.testing.assert_allclose(mark.seed, marks["sitk"].seed, atol=1e-3, err_msg=name)
        got = crop(image, mark.seed, recipe, mark.mask)
        # NIfTI (float32) and DICOM (decimal strings) hold the geometry differently; read, it is rounded to
        # float32 alike, so nearest-neighbour ties (1 mm points halfway between 0.8 mm voxels) fall alike
        np.testing.assert_array_equal(got.mask, reference.mask, err_msg=name)
    assert reference.mask.sum() > 100

    with pytest.raises(SimilarPatientsError, match=r"holds 2 segments .*vessel, nodule"):
        tumor.from_mask(tmp_path / "tumor.seg.nrrd")
    with pytest.raises(SimilarPatientsError, match="no segment 'lesion'"):
        tumor.from_mask(tmp_path / "tumor.seg.nrrd", "lesion")
    with pytest.raises(SimilarPatientsError, match=r"holds 2 labels \(3, 7\); choose"):
        tumor.from_mask(tmp_path / "labels.nrrd")
    with pytest.raises(SimilarPatientsError, match="has no segment 2"):
        tumor.from_mask(tmp_path / "seg.dcm", 2)


@pytest.mark.skipif(sys.version_info >= (3, 10), reason="Python 3.9 (Slicer 5.8) only")
def test_a_dicom_seg_mask_on_python_3_9_is_refused_with_what_to_do_instead(tmp_path):
    image, _, _ = tumor_ct("cavitary", np.random.default_rng(5))
    datasets = write_dicom_series(image, tmp_path / "ct")
    with pytest.raises(SimilarPatientsError, match=r"needs highdicom 0\.23 or newer.*Export the segment as NRRD"):
        tumor.from_mask(tmp_path / "ct" / datasets[0].filename.split("/")[-1])


def physical_grid_image(image, centre, radius):
    inside = np.linalg.norm(physical_grid(image) - np.asarray(centre), axis=-1) <= radius
    out = sitk.GetImageFromArray(inside.astype(np.uint8))
    out.CopyInformation(image)
    return out


def test_bad_inputs_get_clear_errors(tmp_path):
    image, mask, _ = tumor_ct("smooth", np.random.default_rng(6))
    empty = sitk.Image(mask)
    empty *= 0
    with pytest.raises(SimilarPatientsError, match="mask is empty"):
        tumor.from_mask(empty)
    with pytest.raises(SimilarPatientsError, match=r"outside the image.*RAS flag"):
        crop(image, (500.0, 0.0, 0.0), recipes.tumorimagingbench("SPL"))
    with pytest.raises(SimilarPatientsError, match="three finite coordinates"):
        tumor.from_point((1.0, 2.0))
    with pytest.raises(SimilarPatientsError, match="flat"):
        tumor.from_box((0, 0, 0), (5, 5, 0))

    slice_2d = sitk.GetImageFromArray(np.full((40, 40), -1000, dtype=np.int16))
    sitk.WriteImage(slice_2d, str(tmp_path / "slice.nrrd"))
    with pytest.raises(SimilarPatientsError, match=r"2D .*3D CT volume"):
        ct_image.read_ct(tmp_path / "slice.nrrd")
    with pytest.raises(SimilarPatientsError, match="one slice"):
        write_dicom_series(image[:, :, :1], tmp_path / "single")
        ct_image.read_ct(tmp_path / "single")

    mr = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 800, (20, 30, 30)).astype(np.int16))
    write_dicom_series(mr, tmp_path / "mr", modality="MR")
    with pytest.raises(SimilarPatientsError, match="MR series, not CT"):
        ct_image.read_ct(tmp_path / "mr")
    sitk.WriteImage(mr, str(tmp_path / "mr.nii.gz"))
    with pytest.raises(SimilarPatientsError, match="does not look like a CT in Hounsfield units"):
        ct_image.read_ct(tmp_path / "mr.nii.gz")

    write_dicom_series(image, tmp_path / "partial")
    (tmp_path / "partial" / "slice0020.dcm").unlink()  # a slice lost in a partial download
    with pytest.raises(SimilarPatientsError, match="uneven slice gaps"):
        ct_image.read_ct(tmp_path / "partial")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(SimilarPatientsError, match="Cannot read"):
        ct_image.read_ct(tmp_path / "broken.nii.gz")
    with pytest.raises(SimilarPatientsError, match="does not exist"):
        ct_image.read_ct(tmp_path / "nowhere.nii.gz")


def test_the_ct_is_found_among_mr_and_seg_series_in_one_folder(tmp_path):
    pytest.importorskip("highdicom", reason="writing the DICOM SEG: highdicom")
    image, mask, _ = tumor_ct("smooth", np.random.default_rng(6))
    mr = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 800, (20, 30, 30)).astype(np.int16))
    write_dicom_series(mr, tmp_path / "two" / "mr", modality="MR")
    datasets = write_dicom_series(image, tmp_path / "two" / "ct")
    write_dicom_seg(datasets, mask, tmp_path / "two" / "seg.dcm")
    for path in (tmp_path / "two").glob("*/*.dcm"):
        path.rename(tmp_path / "two" / f"{path.parent.name}-{path.name}")
    # one CT among an MR series and a SEG: the CT is the image
    assert ct_image.read_ct(tmp_path / "two").GetSize() == image.GetSize()
    write_dicom_series(image, tmp_path / "two" / "ct2")
    for path in (tmp_path / "two" / "ct2").glob("*.dcm"):
        path.rename(tmp_path / "two" / f"ct2-{path.name}")
    with pytest.raises(SimilarPatientsError, match="holds 4 DICOM series, 2 of them CT"):
        ct_image.read_ct(tmp_path / "two")
    ct_file = next((tmp_path / "two").glob("ct-*.dcm"))
    assert ct_image.read_ct(ct_file).GetSize() == image.GetSize()  # one file names its series
    with pytest.raises(SimilarPatientsError, match="DICOM SEG"):
        ct_image.read_ct(tmp_path / "two" / "seg.dcm")


@pytest.mark.parametrize("name", ["ct.nii", "ct.nii.gz", "ct.nrrd", "ct.mha"])
def test_a_cut_image_file_is_refused_not_read_as_zeros(tmp_path, name, capfd):
    image, _, _ = tumor_ct("smooth", np.random.default_rng(4))
    sitk.WriteImage(image, str(tmp_path / name))
    assert ct_image.read_ct(tmp_path / name).GetSize() == image.GetSize()  # the whole file reads
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(SimilarPatientsError, match=r"Cannot read .*(cut short|damaged|fread got only)") as error:
        ct_image.read_ct(tmp_path / name)
    assert "Copy or download it again" in str(error.value) or "fread" in str(error.value)
    assert "WARNING" not in capfd.readouterr().err  # ITK's own lines stay off the terminal


def test_a_gzip_stream_with_a_bad_checksum_is_refused(tmp_path):
    image, _, _ = tumor_ct("smooth", np.random.default_rng(4))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    data = bytearray((tmp_path / "ct.nii.gz").read_bytes())
    data[-6] ^= 0xFF  # the CRC32 in the gzip trailer: the bytes decompress, but are not what was written
    (tmp_path / "ct.nii.gz").write_bytes(bytes(data))
    with pytest.raises(SimilarPatientsError, match="damaged"):
        ct_image.read_ct(tmp_path / "ct.nii.gz")


@pytest.mark.parametrize("which", ["first", "last"])
def test_a_cut_slice_at_either_end_of_a_dicom_series_is_refused(tmp_path, which):
    image, _, _ = tumor_ct("smooth", np.random.default_rng(4))
    write_dicom_series(image, tmp_path / "ct")
    files = sorted((tmp_path / "ct").glob("*.dcm"))
    cut = files[0] if which == "first" else files[-1]
    cut.write_bytes(cut.read_bytes()[:-100])  # without this check the volume would just be one slice shorter
    # SimpleITK 2.5 leaves the cut file out of the series (then named as unreadable); 2.3 (Slicer 5.8) reads it
    # padded with zeros, unless its pixel data is checked against its header
    refused = f"{cut.name} (is cut short|belongs to the series but its image cannot be read)"
    with pytest.raises(SimilarPatientsError, match=refused):
        ct_image.read_ct(tmp_path / "ct")


@pytest.mark.parametrize("axis", ["in-plane", "tilted"])
def test_a_dicom_series_whose_slices_alternate_between_two_orientations_is_refused(tmp_path, axis):
    image, _, _ = tumor_ct("smooth", np.random.default_rng(4))
    datasets = write_dicom_series(image, tmp_path / "ct")
    assert ct_image.read_ct(tmp_path / "ct").GetSize() == image.GetSize()  # one orientation: read
    c, s = np.cos(np.radians(5)), np.sin(np.radians(5))
    turned = [c, s, 0.0, -s, c, 0.0] if axis == "in-plane" else [1.0, 0.0, 0.0, 0.0, c, s]
    for dataset in datasets[1::2]:  # every other slice rotated 5 degrees, its position kept
        dataset.ImageOrientationPatient = turned
        dataset.save_as(dataset.filename)
    with pytest.raises(SimilarPatientsError, match=r"mixes slice orientations: 32 of its 64 slices .* 5\.0 degrees"):
        ct_image.read_ct(tmp_path / "ct")


def test_a_mask_saved_without_the_cts_geometry_is_refused(tmp_path):
    image, mask, _ = tumor_ct("smooth", np.random.default_rng(6), spacing=(0.7, 0.7, 1.25))
    image.SetOrigin((-180.0, -150.0, -300.0))
    mask.CopyInformation(image)
    assert np.allclose(
        crop(image, tumor.from_binary_mask(mask).seed, RECIPES["PASTA"], mask).seed,
        crop(image, tumor.from_binary_mask(mask).seed, RECIPES["PASTA"]).seed,
    )
    bare = sitk.GetImageFromArray(sitk.GetArrayFromImage(mask))  # the same voxels as an array: 1 mm at the origin
    sitk.WriteImage(bare, str(tmp_path / "mask.nii.gz"))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    drawn = tumor.from_mask(tmp_path / "mask.nii.gz")
    with pytest.raises(SimilarPatientsError, match=r"no geometry of its own \(1 mm voxels at the origin, 96 x 96"):
        crop(ct_image.read_ct(tmp_path / "ct.nii.gz"), drawn.seed, RECIPES["PASTA"], drawn.mask)
    stretched = sitk.Image(mask)
    stretched.SetSpacing((0.7, 0.7, 2.5))  # origin kept, spacing not the CT's
    with pytest.raises(SimilarPatientsError, match=r"the CT's size \(\d+ x \d+ x \d+ voxels\) but not its geometry"):
        crop(image, tumor.from_binary_mask(stretched).seed, RECIPES["PASTA"], stretched)
    shifted = sitk.Image(mask)
    shifted.SetOrigin((-170.0, -150.0, -300.0))  # spacing kept, origin 10 mm off
    with pytest.raises(SimilarPatientsError, match=r"origin -170, -150, -300, the CT's -180, -150, -300"):
        crop(image, tumor.from_binary_mask(shifted).seed, RECIPES["PASTA"], shifted)


def test_a_mask_saved_without_geometry_is_refused_whatever_its_size(tmp_path):
    image, mask, _ = tumor_ct("smooth", np.random.default_rng(6))
    marked = sitk.GetArrayFromImage(mask)[8:40, 10:60, 12:70]  # a smaller array around the tumor
    bare = sitk.GetImageFromArray(marked)  # 1 mm voxels at the origin: its centroid lies inside the CT
    sitk.WriteImage(bare, str(tmp_path / "mask.nrrd"))
    drawn = tumor.from_mask(tmp_path / "mask.nrrd")
    check_inside(image, drawn.seed)  # nothing else would stop it
    with pytest.raises(SimilarPatientsError, match=r"no geometry of its own \(1 mm voxels at the origin, 58 x 50 x 32"):
        crop(image, drawn.seed, RECIPES["PASTA"], drawn.mask)
    same = blank_ct(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))  # a CT that has that geometry itself
    assert crop(same, drawn.seed, RECIPES["PASTA"], drawn.mask).mask.any()


def test_the_same_ct_as_nifti_and_as_nrrd_gives_the_same_embedding(tmp_path):
    from SimilarPatientsLib.models.embedder import Embedder

    # 0.8 mm voxels: the 1 mm grid's voxel centres fall on the edges between mask voxels, where the float32
    # (NIfTI) and float64 (NRRD) spacing and origin decided differently which side they lie on
    image, mask, _ = tumor_ct(
        "lobulated", np.random.default_rng(3), spacing=(0.8, 0.8, 0.8), origin=(-38.1, -37.7, -40.3)
    )
    embedder = Embedder("TumorDescriptor")
    crops, vectors = [], []
    for suffix in ("nii.gz", "nrrd"):
        sitk.WriteImage(image, str(tmp_path / f"ct.{suffix}"))
        sitk.WriteImage(mask, str(tmp_path / f"mask.{suffix}"))
        ct, drawn = ct_image.read_ct(tmp_path / f"ct.{suffix}"), tumor.from_mask(tmp_path / f"mask.{suffix}")
        crops.append(embedder.crops(ct, drawn)[0])
        vectors.append(embedder.embed_prepared(crops[-1:])[0].vector)
    assert crops[0].mask.sum() > 1000
    np.testing.assert_array_equal(crops[0].mask, crops[1].mask)
    np.testing.assert_array_equal(vectors[0], vectors[1])
    given = sitk.Image(image)
    assert ct_image.read_ct(given).GetOrigin() == ct_image.read_ct(tmp_path / "ct.nii.gz").GetOrigin()
    assert given.GetOrigin() == image.GetOrigin()  # the caller's image keeps its own geometry


def test_a_soft_probability_mask_is_refused_in_one_short_sentence(tmp_path):
    _, mask, _ = tumor_ct("smooth", np.random.default_rng(6))
    soft = sitk.SmoothingRecursiveGaussian(sitk.Cast(mask, sitk.sitkFloat32), 2.0)  # probabilities 0..1
    sitk.WriteImage(soft, str(tmp_path / "soft.nii.gz"))
    with pytest.raises(SimilarPatientsError, match=r"fractional values .* soft \(probability\) mask") as refused:
        tumor.from_mask(tmp_path / "soft.nii.gz")
    assert len(str(refused.value)) < 250
    many = sitk.GetImageFromArray(np.arange(64, dtype=np.uint8).reshape(4, 4, 4))
    with pytest.raises(SimilarPatientsError, match=r"holds 63 labels \(1, 2, .*, 10 and 53 more\)") as refused:
        tumor.from_mask(many)
    assert len(str(refused.value)) < 250


def test_a_mask_marking_every_voxel_is_not_a_tumor(tmp_path):
    _, mask, _ = tumor_ct("smooth", np.random.default_rng(6))
    full = sitk.Image(mask) * 0 + 1
    with pytest.raises(SimilarPatientsError, match=r"marks every one of its \d+ voxels: that is no tumor outline"):
        tumor.from_binary_mask(full)
    sitk.WriteImage(full, str(tmp_path / "full.nrrd"))
    with pytest.raises(SimilarPatientsError, match="marks every one"):
        tumor.from_mask(tmp_path / "full.nrrd")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_nan_or_infinite_voxel_in_the_crop_is_refused(value):
    image, mask, centre = tumor_ct("smooth", np.random.default_rng(6))
    floating = sitk.Cast(image, sitk.sitkFloat32)
    floating[floating.TransformPhysicalPointToIndex(centre)] = float(value)
    with pytest.raises(SimilarPatientsError, match=r"holds 1 NaN or infinite voxel\(s\) where the tumor at LPS"):
        crop(floating, centre, RECIPES["FMCIB/CTFM"], mask)
    elsewhere = sitk.Cast(image, sitk.sitkFloat32)
    elsewhere[2, 2, 2] = float(value)  # far from the tumor: not where the crop samples
    assert np.isfinite(crop(elsewhere, centre, RECIPES["FMCIB/CTFM"], mask).image).all()


@pytest.mark.parametrize("spacing", [500.0, 1000.0, 0.001])
def test_an_image_with_voxels_no_ct_has_is_refused(tmp_path, spacing):
    image, _, _ = tumor_ct("smooth", np.random.default_rng(6))
    image.SetSpacing((spacing, spacing, spacing))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no numpy warnings on the way
        with pytest.raises(SimilarPatientsError, match=rf"has voxels of {spacing:g} x {spacing:g} x {spacing:g} mm"):
            ct_image.read_ct(image)


@pytest.mark.parametrize("name", ["ct.nii", "ct.nii.gz"])
@pytest.mark.parametrize("pixel", [sitk.sitkFloat32, sitk.sitkFloat64])
def test_a_nifti_holding_nan_or_infinite_voxels_is_refused_before_itk_changes_them(tmp_path, name, pixel):
    image, _, centre = tumor_ct("smooth", np.random.default_rng(6))
    floating = sitk.Cast(image, pixel)
    sitk.WriteImage(floating, str(tmp_path / name))
    assert ct_image.read_ct(tmp_path / name).GetPixelID() == pixel  # finite values: read as they are
    floating[floating.TransformPhysicalPointToIndex(centre)] = float("nan")
    floating[0, 0, 0] = float("inf")
    sitk.WriteImage(floating, str(tmp_path / name))
    with pytest.raises(SimilarPatientsError, match=r"holds 2 NaN or infinite voxel\(s\), which ITK's NIfTI reader"):
        ct_image.read_ct(tmp_path / name)
