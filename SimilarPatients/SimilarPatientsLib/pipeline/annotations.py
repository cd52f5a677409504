"""Lesions from IDC's annotations: DICOM SEG segments of a chosen type, and TID 1500 SR regions (NLST-Sybil's
boxes: a polyline on one CT slice), found through the IDC index and read from the annotation files.

The launcher reads only the annotation series (kilobytes to a few MB each) to list the lesions and their CT
series; the CT is read on a worker. A SEG segment's seed is its centroid (``imaging/tumor.py``, on the
worker); a slice box's seed is its centre in LPS mm, from the referenced slice's geometry.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import SimilarPatientsError
from ..idc.index import SERIES, STUDY, IDCIndex
from ..references import schema
from ..util.optional import optional_import
from .fetch import SeriesSource
from .manifest import Lesion, Mark

log = logging.getLogger(__name__)

#: The index columns an annotation series is listed by, and those joined as labels when IDC has them.
_LISTED = (SERIES, schema.PATIENT, STUDY, "collection_id", "analysis_result_id", "Modality")
_IDC_LABELS = ("PatientAge", "PatientSex")
_SEG_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")


@dataclass(frozen=True)
class SegmentInfo:
    """One segment of a DICOM SEG: its number, label, segmented property type, and the CT series it is on."""

    number: int
    label: str
    property_type: str
    property_code: str
    series: str


@dataclass(frozen=True)
class SliceRegion:
    """One planar region of a TID 1500 SR: the polyline (column,row pairs) on one image, by its UID."""

    sop: str
    points: tuple
    series: str


def seg_segments(dataset) -> list[SegmentInfo]:
    """The segments a DICOM SEG (a pydicom dataset; pixels not needed) describes."""
    referenced = [str(s.SeriesInstanceUID) for s in getattr(dataset, "ReferencedSeriesSequence", [])]
    if len(set(referenced)) != 1:
        raise SimilarPatientsError(
            f"The SEG {dataset.SeriesInstanceUID} references {len(set(referenced))} image series; one CT expected."
        )
    segments = []
    for item in getattr(dataset, "SegmentSequence", []):
        code = item.SegmentedPropertyTypeCodeSequence[0] if "SegmentedPropertyTypeCodeSequence" in item else None
        segments.append(
            SegmentInfo(
                int(item.SegmentNumber),
                str(getattr(item, "SegmentLabel", "")),
                str(getattr(code, "CodeMeaning", "")),
                f"{getattr(code, 'CodingSchemeDesignator', '')}:{getattr(code, 'CodeValue', '')}",
                referenced[0],
            )
        )
    return segments


def sr_regions(dataset) -> list[SliceRegion]:
    """Every planar polyline/polygon region of an SR (TID 1500 image regions), with the image it lies on."""
    series_of = {}
    for name in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in getattr(dataset, name, []):
            for series in getattr(study, "ReferencedSeriesSequence", []):
                for instance in getattr(series, "ReferencedSOPSequence", []):
                    series_of[str(instance.ReferencedSOPInstanceUID)] = str(series.SeriesInstanceUID)
    regions = []
    for item in _content_items(dataset):
        if getattr(item, "ValueType", "") != "SCOORD" or item.GraphicType not in ("POLYLINE", "POLYGON"):
            continue
        images = [
            c.ReferencedSOPSequence[0]
            for c in getattr(item, "ContentSequence", [])
            if getattr(c, "ValueType", "") == "IMAGE"
        ]
        if len(images) != 1:
            continue  # a region not drawn on one image is not a slice box
        sop = str(images[0].ReferencedSOPInstanceUID)
        points = tuple(float(v) for v in item.GraphicData)
        if sop not in series_of:
            raise SimilarPatientsError(
                f"The SR {dataset.SeriesInstanceUID} draws on image {sop} but its evidence lists no series for it."
            )
        regions.append(SliceRegion(sop, points, series_of[sop]))
    return regions


def slice_point(dataset, points: Sequence[float]) -> tuple[float, float, float]:
    """The centre of the box around ``points`` (column,row pairs, DICOM SCOORD pixels: (0, 0) is the top left
    corner of the first pixel) on the slice ``dataset``, in LPS mm."""
    pixels = np.asarray(points, dtype=float).reshape(-1, 2)
    column, row = (pixels.min(axis=0) + pixels.max(axis=0)) / 2 - 0.5  # to the pixel-centre index
    orientation = np.asarray(dataset.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
    position = np.asarray(dataset.ImagePositionPatient, dtype=float)
    point = position + orientation[:3] * column_spacing * column + orientation[3:] * row_spacing * row
    return tuple(float(v) for v in point)


def idc_lesions(
    analyses: Sequence[str],
    source: SeriesSource,
    segment_type: str | None = None,
    index: IDCIndex | None = None,
    labels: pd.DataFrame | None = None,
    limit: int | None = None,
) -> list[Lesion]:
    """The lesions of IDC analysis results ``analyses`` (``analysis_result_id``, e.g. ``nlst_sybil``,
    ``nlstseg``): their SEG segments whose property type is ``segment_type`` (all when None) and their SR
    regions. ``labels``: a clinical table by PatientID joined onto every lesion; ``limit``: the first
    annotation series only (a trial run)."""
    pydicom = optional_import("pydicom", "embed")
    listed = annotation_series(analyses, index or IDCIndex())
    if limit is not None:
        listed = listed.head(int(limit))
    clinical = _clinical(labels)
    lesions = []
    for row in listed.to_dict("records"):
        files = source.files(row[SERIES])
        extra = tuple((c, row[c]) for c in _IDC_LABELS if c in row and row[c] not in (None, ""))
        extra += (("analysis_result_id", row["analysis_result_id"]), ("annotation_series", row[SERIES]))
        extra += clinical.get(str(row[schema.PATIENT]), ())
        for path in files:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
            lesions += _lesions_of(dataset, row, extra, segment_type)
        source.release(row[SERIES])
    log.info("%d lesions from %d annotation series of %s", len(lesions), len(listed), ", ".join(analyses))
    return lesions


def annotation_series(analyses: Sequence[str], index: IDCIndex) -> pd.DataFrame:
    """The SEG and SR series of IDC analysis results ``analyses``, from the index (no network)."""
    import duckdb

    with duckdb.connect() as connection:
        have = set(
            connection.execute(f"DESCRIBE SELECT * FROM read_parquet('{index.parquet_path}')").df()["column_name"]
        )
        missing = [c for c in _LISTED if c not in have]
        if missing:
            raise SimilarPatientsError(f"The IDC index {index.version} has no {missing}: update idc-index-data.")
        columns = ", ".join([*_LISTED, *(c for c in _IDC_LABELS if c in have)])
        known = connection.execute(
            f"SELECT DISTINCT analysis_result_id FROM read_parquet('{index.parquet_path}') "
            f"WHERE Modality IN ('SEG', 'SR') AND analysis_result_id IS NOT NULL"
        ).df()["analysis_result_id"]
        unknown = [a for a in analyses if a not in set(known)]
        if unknown:
            raise SimilarPatientsError(
                f"The IDC index ({index.version}) has no SEG or SR annotations called {', '.join(unknown)}; "
                f"it has: {', '.join(sorted(known)[:40])}."
            )
        return connection.execute(
            f"SELECT {columns} FROM read_parquet('{index.parquet_path}') "
            f"WHERE Modality IN ('SEG', 'SR') AND analysis_result_id IN (SELECT unnest(?)) "
            f"ORDER BY {schema.PATIENT}, {SERIES}",
            [list(analyses)],
        ).df()


def _lesions_of(dataset, row: dict, labels: tuple, segment_type: str | None) -> list[Lesion]:
    patient = str(row[schema.PATIENT])
    if str(getattr(dataset, "SOPClassUID", "")) in _SEG_CLASSES:
        wanted = None if segment_type is None else segment_type.lower()
        return [
            Lesion(
                patient,
                f"seg-{row[SERIES][-12:]}-{s.number}",
                s.series,
                "",
                Mark("seg", series=str(dataset.SeriesInstanceUID), segment=str(s.number)),
                (*labels, ("segment_label", s.label), ("segment_type", s.property_type)),
            )
            for s in seg_segments(dataset)
            if wanted is None or wanted in (s.property_type.lower(), s.property_code.lower())
        ]
    if str(getattr(dataset, "Modality", "")) == "SR":
        lesions = []
        for region in sr_regions(dataset):
            mark = Mark("slice_box", region.points, sop=region.sop)
            lesions.append(Lesion(patient, f"sr-{mark.digest()}", region.series, "", mark, labels))
        return lesions
    return []


def _clinical(labels: pd.DataFrame | None) -> dict:
    if labels is None:
        return {}
    if schema.PATIENT not in labels.columns:
        raise SimilarPatientsError(f"The clinical table has no {schema.PATIENT} column to join lesions by.")
    if labels[schema.PATIENT].duplicated().any():
        raise SimilarPatientsError("The clinical table lists a PatientID twice; one row per patient is needed.")
    columns = [c for c in labels.columns if c != schema.PATIENT]
    return {
        str(r[schema.PATIENT]): tuple((c, None if pd.isna(r[c]) else r[c]) for c in columns)
        for r in labels.to_dict("records")
    }


def _content_items(dataset):
    for item in getattr(dataset, "ContentSequence", []):
        yield item
        yield from _content_items(item)


def read_clinical(path: Path) -> pd.DataFrame:
    """A clinical table (CSV or Parquet) keyed by PatientID."""
    path = Path(path)
    if not path.is_file():
        raise SimilarPatientsError(f"The clinical table {path} does not exist.")
    if path.suffix.lower() in (".parquet", ".pq"):
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_csv(path, dtype={schema.PATIENT: str})
    frame[schema.PATIENT] = frame[schema.PATIENT].astype(str)
    return frame
