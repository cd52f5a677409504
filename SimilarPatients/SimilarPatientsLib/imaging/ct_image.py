"""Read the query CT (a DICOM series folder, NIfTI, NRRD, anything SimpleITK reads) and refuse what is
not a 3D CT in Hounsfield units, before any crop is made from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SimilarPatientsError
from ..util.optional import IMAGING, optional_import, require
from .integrity import check_dicom_pixels_whole, check_whole, itk_warnings

#: A CT in HU holds air (about -1000); an image whose darkest voxel is above this is not one.
_MOST_AIR_HU = -300.0
#: The voxel sizes a CT can have, mm: an image outside them has a wrong spacing (another unit, a lost header),
#: and a crop made with it would sample the tumor at the wrong scale (or inside one voxel).
SPACING_RANGE_MM = (0.01, 20.0)
#: Direction cosines of two slices of one series differ by less (DICOM writes them rounded; 1e-3 is 0.06 degrees).
_ORIENTATION_TOLERANCE = 1e-3
#: At most this many distinct values in an image without air: a labelmap (a mask), not a CT.
_MASK_VALUES = 16


def read_ct(source, check_hounsfield: bool = True):
    """``source`` (path or ``SimpleITK.Image``) as a validated 3D ``SimpleITK.Image`` in LPS, HU values."""
    require("embed", IMAGING)
    sitk = optional_import("SimpleITK", "embed")

    if isinstance(source, sitk.Image):
        image, modality, where = source, None, "the image"
    else:
        path = Path(source)
        if not path.exists():
            raise SimilarPatientsError(f"The image {path} does not exist.")
        image, modality = (
            _read_dicom_series(path) if path.is_dir() or is_dicom_file(path) else (read_image_file(path), None)
        )
        where = str(path)
    if modality is not None and modality != "CT":
        raise SimilarPatientsError(
            f"{where} is a {modality} series, not CT. The models and the reference were made from CT in "
            f"Hounsfield units; give the CT series."
        )
    validate_ct(image, where, check_hounsfield)
    if isinstance(source, sitk.Image) and _rounded(image) != _geometry(image):
        image = sitk.Image(source)  # the caller's image keeps its geometry
    return snap_geometry(image)


def snap_geometry(image):
    """``image`` (changed in place) with its spacing, origin and direction rounded to float32, as NIfTI
    stores them: the same CT read from NIfTI (a float32 header), NRRD or DICOM (float64 text) then has the
    same geometry to the bit, and which crop voxels a mask marks (a voxel centre on the edge between two
    of the mask's) does not depend on the file format."""
    spacing, origin, direction = _rounded(image)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def _geometry(image) -> list:
    return [list(image.GetSpacing()), list(image.GetOrigin()), list(image.GetDirection())]


def _rounded(image) -> list:
    return [[float(v) for v in np.asarray(values, dtype=np.float32)] for values in _geometry(image)]


def validate_ct(image, where: str = "the image", check_hounsfield: bool = True) -> None:
    """Refuse a 2D, multi-component or non-HU image, or one whose voxel size no CT has, saying which."""
    sitk = optional_import("SimpleITK", "embed")

    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        raise SimilarPatientsError(
            f"{where} is {image.GetDimension()}D with size {image.GetSize()}; a tumor crop needs a 3D CT volume "
            f"(a DICOM series folder, not one slice)."
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SimilarPatientsError(f"{where} has {image.GetNumberOfComponentsPerPixel()} values per voxel; a CT has 1.")
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    low, high = SPACING_RANGE_MM
    if not (np.isfinite(spacing).all() and (spacing >= low).all() and (spacing <= high).all()):
        raise SimilarPatientsError(
            f"{where} has voxels of {' x '.join(f'{v:g}' for v in spacing)} mm; a CT's voxels measure {low:g} to "
            f"{high:g} mm. Its spacing is wrong (another unit than mm, or a header that lost it): fix the spacing "
            f"and try again."
        )
    # air surrounds every chest CT: a 1-in-64 sample finds it at once; only an image without air in the
    # sample (a refusal, or a tight crop) is scanned whole
    if check_hounsfield and sitk.GetArrayViewFromImage(image)[::4, ::4, ::4].min() > _MOST_AIR_HU:
        statistics = sitk.MinimumMaximumImageFilter()
        statistics.Execute(image)
        if statistics.GetMinimum() > _MOST_AIR_HU:
            values = np.unique(sitk.GetArrayViewFromImage(image)[::4, ::4, ::4])
            if len(values) <= _MASK_VALUES and statistics.GetMinimum() >= 0:
                raise SimilarPatientsError(
                    f"{where} holds only the values {', '.join(f'{v:g}' for v in values)}: it looks like a tumor "
                    f"mask, not a CT. Are the CT and the mask swapped (the CT goes to --image, the mask to --mask)?"
                )
            raise SimilarPatientsError(
                f"{where} does not look like a CT in Hounsfield units: its darkest voxel is "
                f"{statistics.GetMinimum():.0f}, but a CT holds air at about -1000 HU. Is it an MR or a "
                f"rescaled image?"
            )


def is_dicom_file(path: Path) -> bool:
    """True for a DICOM Part 10 file (the "DICM" marker after the 128-byte preamble)."""
    with open(path, "rb") as stream:
        stream.seek(128)
        return stream.read(4) == b"DICM"


def read_image_file(path: Path, what: str = "an image"):
    """One image file read by SimpleITK; a file it cannot read, or a damaged one, is our error naming the
    file and why (ITK's own warnings stay off the terminal)."""
    sitk = optional_import("SimpleITK", "embed")
    check_whole(Path(path))
    try:
        with itk_warnings(str(path)):
            return snap_geometry(sitk.ReadImage(str(path)))
    except RuntimeError as error:
        raise SimilarPatientsError(f"Cannot read {path} as {what}: {_first_line(error)}") from error


def _read_dicom_series(path: Path):
    """The one DICOM series in a folder (or the series of one DICOM file), with its modality."""
    pydicom = optional_import("pydicom", "embed")
    sitk = optional_import("SimpleITK", "embed")

    folder = path if path.is_dir() else path.parent
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise SimilarPatientsError(f"{folder} holds no DICOM image series.")
    files_of = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series}
    modality_of = {uid: _modality(files[0]) for uid, files in files_of.items()}
    if not path.is_dir():
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
    else:
        ct = [uid for uid in series if modality_of[uid] == "CT"]
        if len(ct) == 1 or len(series) == 1:
            uid = ct[0] if ct else series[0]
        else:
            listed = ", ".join(f"{uid} ({modality_of[uid] or '?'})" for uid in series)
            raise SimilarPatientsError(
                f"{folder} holds {len(series)} DICOM series, {len(ct)} of them CT: {listed}. Give one file of the "
                f"CT series, or a folder with only that series."
            )
    files, modality = files_of.get(uid, []), modality_of.get(uid)
    if not files:
        raise SimilarPatientsError(f"{path} is not part of an image series that can be read.")
    if modality == "SEG":
        raise SimilarPatientsError(f"{path} is a DICOM SEG (a segmentation); give it as the tumor mask.")
    _check_no_damaged_slice(folder, uid, {f for listed in files_of.values() for f in listed})
    for file in files:
        check_dicom_pixels_whole(file)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice tags, for the slice-gap check (no second read)
    try:
        with itk_warnings(f"the DICOM series in {folder}"):
            image = reader.Execute()
    except RuntimeError as error:
        raise SimilarPatientsError(f"Cannot read the DICOM series in {folder}: {_first_line(error)}") from error
    if len(files) < 2:
        raise SimilarPatientsError(f"The series in {folder} has one slice; a tumor crop needs a 3D CT volume.")
    position = "0020|0032"  # ImagePositionPatient
    if not all(reader.HasMetaDataKey(i, position) for i in range(len(files))):
        raise SimilarPatientsError(
            f"Some slices in {folder} have no ImagePositionPatient; the series cannot be placed."
        )
    positions = [[float(v) for v in reader.GetMetaData(i, position).split("\\")] for i in range(len(files))]
    _check_orientations(reader, len(files), folder)
    _check_slice_spacing(positions, image, folder)
    return image, modality


def _check_no_damaged_slice(folder: Path, uid: str, read: set) -> None:
    """Refuse a series with a slice file GDCM left out (it could not parse it): a cut first or last slice
    would otherwise shorten the volume without a trace."""
    pydicom = optional_import("pydicom", "embed")
    for path in sorted(p for p in folder.iterdir() if p.is_file() and str(p) not in read):
        try:
            if not is_dicom_file(path):
                continue
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as error:  # pydicom raises many types for a damaged file
            raise SimilarPatientsError(
                f"{path} is a damaged DICOM file ({type(error).__name__}); the series may be incomplete. "
                f"Fetch the whole series again."
            ) from error
        if str(getattr(dataset, "SeriesInstanceUID", "")) == uid:
            raise SimilarPatientsError(
                f"{path} belongs to the series but its image cannot be read (a cut or damaged file). Fetch "
                f"the whole series again."
            )


def _modality(file: str) -> str | None:
    pydicom = optional_import("pydicom", "embed")

    return str(getattr(pydicom.dcmread(file, stop_before_pixels=True), "Modality", "")).upper() or None


def _check_orientations(reader, slices: int, folder: Path) -> None:
    """Refuse a series whose slices do not all lie in one orientation: GDCM stacks them as if they did
    (with the first slice's), so a tilted slice would be read as a parallel one and the volume sheared."""
    orientation = "0020|0037"  # ImageOrientationPatient
    present = [i for i in range(slices) if reader.HasMetaDataKey(i, orientation)]
    if not present:
        return  # none to compare; GDCM placed the slices by their positions
    if len(present) < slices:
        raise SimilarPatientsError(
            f"{slices - len(present)} of the {slices} slices in {folder} have no ImageOrientationPatient; the "
            f"series cannot be placed. Fetch the whole series again."
        )
    try:
        cosines = np.array([reader.GetMetaData(i, orientation).split("\\") for i in present], dtype=float)
        cosines = cosines.reshape(slices, 6)
    except ValueError:
        raise SimilarPatientsError(
            f"A slice in {folder} has an ImageOrientationPatient that is not six numbers; the series cannot be "
            f"placed. Fetch the whole series again."
        ) from None
    tilt = np.abs(cosines - cosines[0]).max(axis=1)
    if tilt.max() > _ORIENTATION_TOLERANCE:
        odd = int(np.count_nonzero(tilt > _ORIENTATION_TOLERANCE))
        angle = max(_angle(cosines[0], other) for other in cosines[tilt > _ORIENTATION_TOLERANCE])
        raise SimilarPatientsError(
            f"The series in {folder} mixes slice orientations: {odd} of its {slices} slices are tilted against the "
            f"first (by up to {angle:.1f} degrees). One volume cannot hold them; it is not one acquisition (or a "
            f"damaged one). Give a series whose slices share one orientation."
        )


def _angle(first: np.ndarray, other: np.ndarray) -> float:
    """Degrees of the rotation between two slices' orientations (ImageOrientationPatient rows)."""

    def frame(cosines):
        row, column = cosines[:3], cosines[3:]
        return np.stack([row, column, np.cross(row, column)], axis=1)

    cosine = (np.trace(frame(first).T @ frame(other)) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def _check_slice_spacing(positions: list, image, folder: Path) -> None:
    """Refuse a series with missing slices (a partial download): uneven gaps would shift every crop.
    ``positions``: each slice's ImagePositionPatient (LPS mm)."""
    normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
    gaps = np.diff(sorted(float(np.dot(normal, p)) for p in positions))
    if len(gaps) and (gaps.max() - gaps.min()) > 0.01 * max(abs(gaps.min()), 1e-6) + 1e-3:
        raise SimilarPatientsError(
            f"The series in {folder} has uneven slice gaps ({gaps.min():.2f} to {gaps.max():.2f} mm): slices are "
            f"missing (a partial download?). Fetch the whole series again."
        )


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
