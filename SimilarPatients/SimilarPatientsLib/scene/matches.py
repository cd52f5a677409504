"""Matched patients into the scene beside the query: each series read into a volume node by Slicer's own
reader, then the side-by-side views (``layout``), each centred on its patient's tumor (the reference's
lesion centre, LPS mm, turned into RAS here) and labelled with the patient and its similarity."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from ..errors import SimilarPatientsError
from ..util.optional import optional_import
from . import layout

_CENTRE = ("center_x", "center_y", "center_z")


def load_series(scene, files: Sequence[Path], name: str):
    """A DICOM series' files read into a new scalar volume node (the archetype reader Slicer uses), in the
    order of their slices."""
    if not files:
        raise SimilarPatientsError(f"No image files to load for {name}.")
    files = slice_order(files)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(files[0]))
    for path in files:
        storage.AddFileName(str(path))
    if not storage.ReadData(volume) or volume.GetImageData() is None:
        scene.RemoveNode(volume)
        scene.RemoveNode(storage)
        raise SimilarPatientsError(f"The series of {name} could not be read from {Path(files[0]).parent}.")
    volume.SetAndObserveStorageNodeID(storage.GetID())
    return volume


def slice_order(files: Sequence[Path]) -> list:
    """``files`` sorted along the slices' normal (as Slicer's DICOM plugin hands them to the reader): the
    archetype reader takes the list's order for the slices' order, and IDC's files are named by random UUIDs,
    which read in name order gave a volume with a wrong slice spacing. Files without a position keep their
    order, after the others."""
    import numpy as np

    pydicom = optional_import("pydicom", "embed")
    placed, rest = [], []
    for path in files:
        dataset = pydicom.dcmread(
            str(path), stop_before_pixels=True, specific_tags=["ImagePositionPatient", "ImageOrientationPatient"]
        )
        position, orientation = dataset.get("ImagePositionPatient"), dataset.get("ImageOrientationPatient")
        if position is None or orientation is None or len(orientation) != 6:
            rest.append(path)
            continue
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        placed.append((float(np.dot(normal, np.asarray(position, float))), len(placed), path))
    return [path for *_, path in sorted(placed)] + rest


def label(hit: Mapping) -> str:
    """What a match's view is called: rank, patient and how similar (closeness when known, else distance)."""
    closeness = hit.get("closer_than")
    if closeness is not None and closeness == closeness:
        similarity = f"closer than {closeness:.0f}% of nearest matches"
    else:
        similarity = f"distance {hit['distance']:.4g}"
    return f"#{hit['rank']} {hit['PatientID']} ({similarity})"


def centre_ras(hit: Mapping) -> tuple:
    """The match's tumor centre in RAS mm, from the reference's LPS centre."""
    values = [hit.get(c) for c in _CENTRE]
    if any(v is None or v != v for v in values):
        raise SimilarPatientsError(
            f"The reference has no tumor centre for patient {hit.get('PatientID')}: its view cannot be centred "
            f"on the tumor. Import the reference with center_x/y/z (LPS mm)."
        )
    x, y, z = (float(v) for v in values)
    return (-x, -y, z)


def require_in_scene(scene, query_volume) -> None:
    """Refuse a query CT that is no longer in ``scene`` (the scene was closed, or the volume removed). The
    node itself is looked for, not its ID: a closed scene gives the next volume loaded the same ID."""
    if query_volume is None or not scene.IsNodePresent(query_volume):
        name = query_volume.GetName() if query_volume is not None else "(none)"
        raise SimilarPatientsError(
            f"The query's CT ('{name}') is no longer in the scene (the scene was closed or the volume removed): "
            f"find similar patients from an image again, then load the matches beside it."
        )


def show_matches(
    scene,
    layout_node,
    query_volume,
    query_centre_lps: Sequence[float],
    hits: pd.DataFrame,
    volumes: Mapping[str, object],
) -> layout.Comparison:
    """The query (centred on its tumor) and up to 8 matches whose series are loaded (``volumes``:
    SeriesInstanceUID → volume node), side by side, in the order of ``hits``."""
    shown = [h for h in hits.to_dict("records") if h.get("SeriesInstanceUID") in volumes][: layout.MAX_MATCHES]
    if not shown:
        raise SimilarPatientsError("None of the matches has a loaded series to show.")
    require_in_scene(scene, query_volume)
    x, y, z = (float(v) for v in query_centre_lps)
    query = layout.Pane(query_volume, (-x, -y, z), query_volume.GetName())
    panes = [layout.Pane(volumes[h["SeriesInstanceUID"]], centre_ras(h), label(h)) for h in shown]
    return layout.show(scene, layout_node, query, panes)
