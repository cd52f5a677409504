"""The build manifest: one row per lesion to embed, validated before a worker starts.

A row names the CT (``SeriesInstanceUID``, fetched from IDC or found in a local DICOM folder, or an
``image`` path), the patient (``PatientID``), optionally the lesion (``lesion_id``; else one is derived from
the mark), and the tumor by exactly one mark:

- a seed point: ``seed_x``, ``seed_y``, ``seed_z`` (LPS mm);
- a box: ``box_x0``, ``box_y0``, ``box_z0``, ``box_x1``, ``box_y1``, ``box_z1`` (two opposite corners, LPS mm);
- a mask file: ``mask`` (labelmap, ``.seg.nrrd`` or DICOM SEG path), with ``segment`` when it holds several;
- a DICOM SEG series: ``seg_series`` (its SeriesInstanceUID, fetched like the CT) and ``segment`` (its number);
- a box on one CT slice, as NLST-Sybil's SR holds it: ``slice_sop`` (the slice's SOPInstanceUID) and
  ``slice_polyline`` (column,row pairs in pixels, DICOM SCOORD convention).

Every other column is a label that rides along into the reference rows.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import SimilarPatientsError
from ..idc.index import SERIES
from ..references import schema
from ..util import files

IMAGE = "image"
SEED = ("seed_x", "seed_y", "seed_z")
BOX = ("box_x0", "box_y0", "box_z0", "box_x1", "box_y1", "box_z1")
MASK, SEG_SERIES, SEGMENT = "mask", "seg_series", "segment"
SLICE_SOP, SLICE_POLYLINE = "slice_sop", "slice_polyline"
#: Columns that say where the lesion is; the rest (but PatientID and lesion_id) are labels.
MARK_COLUMNS = (*SEED, *BOX, MASK, SEG_SERIES, SEGMENT, SLICE_SOP, SLICE_POLYLINE)


@dataclass(frozen=True)
class Mark:
    """How one tumor is marked. ``kind``: seed, box, mask, seg or slice_box. ``values``: the seed (3), the
    box (6) or the slice polyline (column,row pairs); ``path``: the mask file; ``series``: the SEG series;
    ``segment``: the label or segment; ``sop``: the slice's SOPInstanceUID."""

    kind: str
    values: tuple = ()
    path: str = ""
    series: str = ""
    segment: str = ""
    sop: str = ""

    def digest(self) -> str:
        """A short stable name for the mark (the derived lesion_id)."""
        text = json.dumps([self.kind, list(self.values), self.path, self.series, self.segment, self.sop])
        return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class Lesion:
    """One manifest row: where the CT is, which patient and lesion, the mark, and the labels."""

    patient: str
    lesion: str
    series: str
    image: str
    mark: Mark
    labels: tuple = ()

    @property
    def source(self) -> str:
        """The CT the lesion lies in (its series UID, or its image path)."""
        return self.series or self.image

    def key(self, model: str, recipe: str) -> tuple:
        """Which reference row this lesion becomes with ``model`` and ``recipe``."""
        return (model, recipe, self.patient, self.lesion)

    def digest(self) -> str:
        """What the manifest says of the lesion (its CT, mark and labels): a row built from another
        definition is stale, and a re-run replaces it."""
        mark = self.mark
        where = [mark.kind, list(mark.values), mark.path, mark.series, mark.segment, mark.sop]
        text = json.dumps([self.series, self.image, *where, [list(label) for label in self.labels]], default=str)
        return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def read_manifest(path: Path | str) -> list[Lesion]:
    """A manifest file (CSV or Parquet, on this machine or ``gs://``) as validated lesions."""
    text = str(path)
    name = files.name(text)
    if not name.lower().endswith((".parquet", ".pq", ".csv", ".csv.gz")):
        raise SimilarPatientsError(f"A manifest is a .csv or .parquet file, not '{name}'.")
    if not files.exists(text) or (not files.is_url(text) and not Path(text).is_file()):
        raise SimilarPatientsError(f"The manifest {text} does not exist.")
    try:
        frame = read_frame(files.read(text), name)
    except (OSError, ValueError) as error:
        raise SimilarPatientsError(f"Cannot read the manifest {text}: {error}") from error
    try:
        return lesions_from_frame(frame)
    except SimilarPatientsError as error:
        raise SimilarPatientsError(f"{name}: {error}") from None


def read_frame(data: bytes, name: str) -> pd.DataFrame:
    """A manifest's bytes as a table (by its file name's type); every CSV value kept as text."""
    if name.lower().endswith((".parquet", ".pq")):
        return pd.read_parquet(io.BytesIO(data))
    compression = "gzip" if name.lower().endswith(".gz") else None
    return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, na_values=[""], compression=compression)


def lesions_from_frame(frame: pd.DataFrame) -> list[Lesion]:
    """Validate manifest rows: a CT, a patient, exactly one mark each, and no lesion twice."""
    if schema.PATIENT not in frame.columns:
        raise SimilarPatientsError(f"The manifest has no {schema.PATIENT} column; every lesion needs its patient.")
    if SERIES not in frame.columns and IMAGE not in frame.columns:
        raise SimilarPatientsError(f"The manifest names no CT: give a {SERIES} or an {IMAGE} column.")
    if frame.empty:
        raise SimilarPatientsError("The manifest has no rows: nothing to build.")
    label_columns = [c for c in frame.columns if c not in (*MARK_COLUMNS, SERIES, IMAGE, schema.PATIENT, schema.LESION)]
    schema.check_label_names(label_columns)  # before any embedding, not at the import after the build
    lesions = []
    for row_number, row in enumerate(frame.to_dict("records"), start=1):
        where = f"row {row_number}"
        patient = _text(row.get(schema.PATIENT))
        if not patient:
            raise SimilarPatientsError(f"{where} has no {schema.PATIENT}.")
        series, image = _text(row.get(SERIES)), _text(row.get(IMAGE))
        if bool(series) == bool(image):
            raise SimilarPatientsError(
                f"{where} must name its CT by one of {SERIES} or {IMAGE} (got {'both' if series else 'neither'})."
            )
        mark = _mark(row, where)
        labels = tuple((c, _label(row.get(c))) for c in label_columns)
        lesions.append(Lesion(patient, _text(row.get(schema.LESION)) or mark.digest(), series, image, mark, labels))
    seen: dict = {}
    for number, lesion in enumerate(lesions, start=1):
        key = (lesion.patient, lesion.lesion)
        if key in seen:
            raise SimilarPatientsError(
                f"rows {seen[key]} and {number} are both lesion '{lesion.lesion}' of patient {lesion.patient}; "
                f"give each lesion its own {schema.LESION}, or remove the repeated row."
            )
        seen[key] = number
    return lesions


def lesions_to_frame(lesions: list[Lesion]) -> pd.DataFrame:
    """Lesions as manifest rows (what ``read_manifest`` reads back)."""
    rows = []
    for lesion in lesions:
        mark = lesion.mark
        row = {SERIES: lesion.series or None, IMAGE: lesion.image or None, schema.PATIENT: lesion.patient}
        row[schema.LESION] = lesion.lesion
        if mark.kind == "seed":
            row |= dict(zip(SEED, mark.values))
        elif mark.kind == "box":
            row |= dict(zip(BOX, mark.values))
        elif mark.kind == "mask":
            row |= {MASK: mark.path, SEGMENT: mark.segment or None}
        elif mark.kind == "seg":
            row |= {SEG_SERIES: mark.series, SEGMENT: mark.segment}
        else:
            row |= {SLICE_SOP: mark.sop, SLICE_POLYLINE: " ".join(repr(float(v)) for v in mark.values)}
        rows.append(row | dict(lesion.labels))
    return pd.DataFrame(rows)


def _mark(row: dict, where: str) -> Mark:
    given = {
        "seed": any(_present(row.get(c)) for c in SEED),
        "box": any(_present(row.get(c)) for c in BOX),
        "mask": _present(row.get(MASK)),
        "seg": _present(row.get(SEG_SERIES)),
        "slice_box": _present(row.get(SLICE_SOP)) or _present(row.get(SLICE_POLYLINE)),
    }
    kinds = [k for k, present in given.items() if present]
    if len(kinds) != 1:
        raise SimilarPatientsError(
            f"{where} must mark its tumor one way: a seed ({', '.join(SEED)}), a box ({', '.join(BOX)}), a {MASK} "
            f"file, a {SEG_SERIES} with its {SEGMENT}, or a {SLICE_SOP} with its {SLICE_POLYLINE} (got "
            f"{', '.join(kinds) or 'none'})."
        )
    kind = kinds[0]
    if kind in ("seed", "box"):
        columns = SEED if kind == "seed" else BOX
        values = tuple(_number(row.get(c), c, where) for c in columns)
        if kind == "box" and any(a == b for a, b in zip(values[:3], values[3:])):
            raise SimilarPatientsError(f"{where}: the box is flat (its corners share a coordinate).")
        return Mark(kind, values)
    if kind == "mask":
        return Mark(kind, path=_text(row.get(MASK)), segment=_text(row.get(SEGMENT)))
    if kind == "seg":
        segment = _text(row.get(SEGMENT))
        if not segment:
            raise SimilarPatientsError(f"{where}: a {SEG_SERIES} needs the {SEGMENT} number of the tumor.")
        return Mark(kind, series=_text(row.get(SEG_SERIES)), segment=segment)
    sop, polyline = _text(row.get(SLICE_SOP)), _text(row.get(SLICE_POLYLINE))
    try:
        values = tuple(float(v) for v in polyline.replace(",", " ").split())
    except ValueError:
        values = ()
    if not sop or len(values) < 4 or len(values) % 2 or not np.all(np.isfinite(values)):
        raise SimilarPatientsError(
            f"{where}: a slice box needs the slice's {SLICE_SOP} and a {SLICE_POLYLINE} of column,row pairs "
            f"(at least two points); got '{polyline}'."
        )
    return Mark(kind, values, sop=sop)


def _present(value) -> bool:
    return _text(value) != ""


def _text(value) -> str:
    if value is None or (np.isscalar(value) and pd.isna(value)):
        return ""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))  # an ID read from CSV as a number
    return str(value).strip()


def _number(value, column: str, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number):
        raise SimilarPatientsError(f"{where}: {column} must be a finite number in mm, not {value!r}.")
    return number


def _label(value):
    if value is None or (np.isscalar(value) and pd.isna(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value
