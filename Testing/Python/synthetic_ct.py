"""Synthetic chest CTs with tumors of known kind, place and size, written as real DICOM (pydicom),
DICOM SEG (highdicom), NIfTI and NRRD: the test data of the embedding pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

KINDS = ("smooth", "lobulated", "spiculated", "cavitary", "part-solid")
LUNG_HU, SOLID_HU, GROUND_GLASS_HU, AIR_HU = -850.0, 30.0, -550.0, -980.0


def rotation(rng: np.random.Generator) -> np.ndarray:
    """A random proper rotation (determinant +1)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def blank_ct(
    size=(96, 96, 64),
    spacing=(0.8, 0.8, 1.25),
    origin=(-38.0, -38.0, -40.0),
    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
    background: float = LUNG_HU,
) -> sitk.Image:
    """Lung-like HU background; ``size`` and ``spacing`` are in SimpleITK (x, y, z) order."""
    image = sitk.GetImageFromArray(np.full(size[::-1], background, dtype=np.int16))
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in origin])
    image.SetDirection([float(v) for v in np.asarray(direction, dtype=float).reshape(-1)])
    return image


def physical_grid(image: sitk.Image, low=(0, 0, 0), high=None) -> np.ndarray:
    """LPS mm of the voxels with (x, y, z) index in [low, high), shaped like the numpy view ([z, y, x, 3])."""
    high = image.GetSize() if high is None else high
    axes = [np.arange(a, b) for a, b in zip(low, high)]
    index = np.stack(np.meshgrid(*axes[::-1], indexing="ij"), axis=-1)[..., ::-1]
    matrix = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    return index @ matrix.T + np.asarray(image.GetOrigin())


def tumor_values(kind: str, offsets: np.ndarray, radius: float, rng: np.random.Generator):
    """(inside mask, HU where inside) of a tumor of ``kind`` for points ``offsets`` (mm from its centre)."""
    p = offsets @ rotation(rng)
    d = np.linalg.norm(p, axis=-1)
    hu = np.full(d.shape, SOLID_HU)
    if kind == "smooth":
        inside = np.linalg.norm(p / (radius * np.array([1.0, 0.9, 0.8])), axis=-1) <= 1
    elif kind == "lobulated":
        inside = d <= 0.55 * radius
        for _ in range(5):
            centre = rng.standard_normal(3)
            inside |= np.linalg.norm(p - 0.55 * radius * centre / np.linalg.norm(centre), axis=-1) <= 0.55 * radius
    elif kind == "spiculated":
        inside = d <= 0.65 * radius
        for _ in range(12):
            axis = rng.standard_normal(3)
            axis /= np.linalg.norm(axis)
            along = p @ axis
            across = np.linalg.norm(p - along[..., None] * axis, axis=-1)
            inside |= (along > 0) & (along < 1.8 * radius) & (across <= 0.9 * (1 - along / (2.0 * radius)))
    elif kind == "cavitary":
        inside = d <= radius
        hu = np.where(np.linalg.norm(p - 0.1 * radius, axis=-1) <= 0.6 * radius, AIR_HU, SOLID_HU)
    elif kind == "part-solid":
        inside = d <= radius
        hu = np.where(d <= 0.45 * radius, SOLID_HU, GROUND_GLASS_HU)
    else:
        raise ValueError(kind)
    return inside, hu


def add_tumor(image: sitk.Image, kind: str, centre, radius: float, rng: np.random.Generator):
    """``image`` with a tumor at ``centre`` (LPS mm), and its mask (a ``SimpleITK.Image``)."""
    reach = 2.2 * radius  # spicules reach 1.8 radii
    corners = [np.asarray(centre, dtype=float) + reach * (2 * np.array(o) - 1) for o in np.ndindex(2, 2, 2)]
    index = np.array([image.TransformPhysicalPointToContinuousIndex(c.tolist()) for c in corners])
    size = np.asarray(image.GetSize())
    low = np.clip(np.floor(index.min(axis=0)).astype(int) - 1, 0, size)
    high = np.clip(np.ceil(index.max(axis=0)).astype(int) + 2, low, size)
    values = sitk.GetArrayFromImage(image)
    inside = np.zeros(values.shape, dtype=bool)
    box = tuple(slice(a, b) for a, b in zip(low[::-1], high[::-1]))
    offsets = physical_grid(image, low, high) - np.asarray(centre, dtype=float)
    inside_box, hu = tumor_values(kind, offsets, radius, rng)
    inside[box] = inside_box
    values[box][inside_box] = hu[inside_box]
    out = sitk.GetImageFromArray(values.astype(np.int16))
    out.CopyInformation(image)
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(image)
    return out, mask


def add_noise(image: sitk.Image, rng: np.random.Generator, sigma: float = 20.0) -> sitk.Image:
    values = sitk.GetArrayFromImage(image).astype(np.float32) + rng.normal(0, sigma, image.GetSize()[::-1])
    out = sitk.GetImageFromArray(np.round(values).astype(np.int16))
    out.CopyInformation(image)
    return out


def tumor_ct(kind: str, rng: np.random.Generator, radius: float | None = None, **grid):
    """A noisy CT with one tumor of ``kind`` near the middle: (image, mask, centre LPS)."""
    image = blank_ct(**grid)
    middle = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    centre = middle + rng.uniform(-3, 3, 3)
    image, mask = add_tumor(image, kind, centre, radius or rng.uniform(7, 12), rng)
    return add_noise(image, rng), mask, tuple(centre)


def write_dicom_series(image: sitk.Image, folder: Path, modality: str = "CT", patient: str = "SYNTH") -> list:
    """Write ``image`` as a DICOM series of one file per slice (pydicom); returns the datasets."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    values = sitk.GetArrayFromImage(image).astype(np.int16)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    datasets = []
    for k in range(values.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientName = modality, patient, f"{patient}^TEST"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.SeriesNumber, ds.InstanceNumber = "20260101", "120000", 1, k + 1
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
        ds.PatientBirthDate, ds.PatientSex, ds.Manufacturer = "", "O", "SimilarPatients tests"
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [float(v) for v in image.TransformIndexToPhysicalPoint([0, 0, k])]
        ds.ImageOrientationPatient = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = values.shape[1], values.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        if modality == "CT":
            ds.RescaleType, ds.KVP, ds.ImageType = "HU", 120, ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelData = values[k].tobytes()
        path = folder / f"slice{k:04d}.dcm"
        save_dicom(ds, path)
        datasets.append(pydicom.dcmread(path))
    return datasets


def save_dicom(dataset, path: Path) -> None:
    """Write a conformant DICOM file (preamble, file meta) with pydicom 3, or with Slicer 5.8's pydicom 2.4."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        dataset.save_as(path, enforce_file_format=True)
    else:
        dataset.save_as(path, write_like_original=False)


def write_dicom_seg(datasets: list, mask: sitk.Image, path: Path, label: str = "tumor") -> Path:
    """Write ``mask`` (on the grid of ``datasets``) as a binary DICOM SEG with one segment (highdicom)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=sitk.GetArrayFromImage(mask).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="SimilarPatients tests",
        manufacturer_model_name="synthetic",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(path)
    return Path(path)


def write_sr_boxes(datasets: list, boxes: list, path: Path) -> Path:
    """Write a TID 1500 measurement report (highdicom Comprehensive 3D SR) with one planar region per box,
    as NLST-Sybil's are: ``boxes`` holds (slice index, column,row polyline in pixels) pairs."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name="Test^Reader"),
    )
    groups = [
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"box {n + 1}"),
            referenced_region=hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=np.asarray(points, dtype=float).reshape(-1, 2),
                source_image=hd.sr.SourceImageForRegion.from_source_image(datasets[index]),
            ),
            finding_type=codes.SCT.Nodule,
        )
        for n, (index, points) in enumerate(boxes)
    ]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[datasets[index] for index, _ in boxes],
        content=report,
        series_instance_uid=generate_uid(),
        series_number=3,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="SimilarPatients tests",
    )
    sr.save_as(path)
    return Path(path)
