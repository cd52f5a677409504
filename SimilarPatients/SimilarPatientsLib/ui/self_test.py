"""The module's in-Slicer self-test, as functions the module's test class calls in Slicer and pytest calls on
``slicer-core``'s scene: a search through the logic, and an image query from volume and segment nodes
through the worker whose top match is loaded beside the query, each view centred on its tumor.

Everything it writes lies in temporary folders it removes, and its DICOM files go to a temporary DICOM
database (``DICOMUtils.TemporaryDICOMDatabase``), never into the user's.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import numpy as np

from .logic import ModuleLogic
from .settings import MemorySettings, ModuleSettings


def check(condition, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def neighbors_through_logic(make_logic=None) -> None:
    """A reference of 20 random patients, searched by patient through the logic."""
    import pandas as pd

    from ..references import schema
    from ..references.store import ReferenceStore

    make_logic = make_logic or _logic
    with tempfile.TemporaryDirectory() as home:
        rng = np.random.default_rng(0)
        frame = pd.DataFrame(
            {
                "model": "M",
                "PatientID": [f"P{i}" for i in range(20)],
                "embedding": list(rng.standard_normal((20, 8)).astype(np.float32)),
                "histology": ["adeno", "squamous"] * 10,
            }
        )
        ReferenceStore(home).write("selftest", schema.from_frame(frame), "self-test")
        logic = make_logic(home)
        try:
            check(logic.references() == ["selftest"], f"references: {logic.references()}")
            check(logic.models("selftest") == ["M"], "models")
            hits = logic.neighbors("selftest", "M", "P3", k=4)  # searched by the worker
            check(len(hits) == 4 and "P3" not in set(hits.PatientID), "four other patients")
            check(hits.distance.is_monotonic_increasing, "ranked by distance")
        finally:
            logic.cleanup()
    logging.info("SimilarPatients self-test: search by patient passed")


def query_and_load_through_logic(make_logic=None) -> None:
    """Volume and segment nodes → the worker → hits; the tumor also boxed and clicked (the seed must be its
    centre); then the top match loaded from a local DICOM folder beside the query, each view centred."""
    import pandas as pd
    import SimpleITK as sitk
    import slicer
    from DICOMLib import DICOMUtils

    from ..imaging import from_binary_mask
    from ..models import Embedder
    from ..references import schema
    from ..references.store import ReferenceStore

    make_logic = make_logic or _logic
    spacing = (0.8, 0.8, 1.2)
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as home:
        embedder, rows = Embedder("TumorDescriptor"), []
        for radius in (5, 6, 9, 10):
            values, inside = _ct_with_sphere(radius)
            image, mask = sitk.GetImageFromArray(values), sitk.GetImageFromArray(inside)
            for item in (image, mask):
                item.SetSpacing(spacing)
            vector = embedder.embed(image, from_binary_mask(mask))[0]
            series = write_dicom_series(image, os.path.join(folder, f"R{radius}"))
            centre = image.TransformContinuousIndexToPhysicalPoint((32.0, 32.0, 24.0))  # the sphere's centre, LPS
            rows.append({"model": vector.model, "recipe": vector.recipe, "PatientID": f"R{radius}"})
            rows[-1].update({"SeriesInstanceUID": series, "embedding": vector.vector})
            rows[-1].update(dict(zip(("center_x", "center_y", "center_z"), centre)))
        ReferenceStore(home).write("selftest-image", schema.from_frame(pd.DataFrame(rows)), "self-test")

        values, inside = _ct_with_sphere(9.5)
        volume = slicer.util.addVolumeFromArray(values, ijkToRAS=None, name="SelfTestCT")
        volume.SetSpacing(*spacing)
        labelmap = slicer.util.addVolumeFromArray(inside, nodeClassName="vtkMRMLLabelMapVolumeNode")
        labelmap.SetSpacing(*spacing)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
        segment = segmentation.GetSegmentation().GetNthSegmentID(0)
        centre = (32 * spacing[0], 32 * spacing[1], 24 * spacing[2])  # the query sphere's centre, RAS
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        roi.SetCenter(centre)
        roi.SetSize(24, 24, 24)
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
        points.AddControlPoint(*centre)
        logic = make_logic(home, local_folder=folder)
        try:
            query = dict(model="TumorDescriptor", reference="selftest-image", k=2)
            hits = logic.find_similar(volume, segmentation, segment, **query)
            check(set(hits.PatientID) == {"R9", "R10"}, f"nearest spheres: {list(hits.PatientID)}")
            check(len(logic.last_thumbnails) == 1 and os.path.isfile(logic.last_thumbnails[0]), "query thumbnail")
            pictures = logic.start_match_thumbnails(hits).wait()["thumbnails"]
            check(set(pictures) == set(hits.SeriesInstanceUID), "match thumbnails from the local folder")
            seed = logic.last_seed_lps
            for marker in (roi, points):  # the same tumor boxed, and clicked: the seed is its centre
                check(len(logic.find_similar(volume, marker, **query)) == 2, "two hits")
                check(np.allclose(logic.last_seed_lps, (-centre[0], -centre[1], centre[2]), atol=1e-3), "seed")
            hits = logic.find_similar(volume, segmentation, segment, **query)
            check(np.allclose(logic.last_seed_lps, seed), "the segment's seed again")
            with DICOMUtils.TemporaryDICOMDatabase(os.path.join(folder, "database")):
                comparison = logic.load_matches(hits.head(1))  # beside the last query
            check(len(comparison.slice_nodes) == 2, "the query and its top match")
            top = hits.iloc[0]
            for slice_node, (x, y, z) in zip(
                comparison.slice_nodes, [logic.last_seed_lps, (top.center_x, top.center_y, top.center_z)]
            ):
                shown = [slice_node.GetSliceToRAS().GetElement(row, 3) for row in range(3)]
                check(np.allclose(shown, (-x, -y, z), atol=1.2), f"{slice_node.GetName()} centred at {shown}")
        finally:
            logic.cleanup()
    logging.info("SimilarPatients self-test: image query and load passed")


def write_dicom_series(image, folder: str) -> str:
    """Write a CT as a DICOM series (one file per slice, SimpleITK); returns its SeriesInstanceUID."""
    import SimpleITK as sitk

    os.makedirs(folder, exist_ok=True)
    stamp = f"{time.time():.6f}".replace(".", "")
    study, series = f"1.2.826.0.1.3680043.8.498.{stamp}.1", f"1.2.826.0.1.3680043.8.498.{stamp}.2"
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for index in range(image.GetDepth()):
        plane = image[:, :, index]
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series}.{index + 1}",
            "0020|000d": study,
            "0020|000e": series,
            "0020|0013": str(index + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, index))),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[0:7:3], *direction[1:8:3])),
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, f"{index:04d}.dcm"))
        writer.Execute(plane)
    return series


def _ct_with_sphere(radius: float):
    z, y, x = np.mgrid[:48, :64, :64]
    inside = (x - 32) ** 2 + (y - 32) ** 2 + ((z - 24) * 1.5) ** 2 <= radius**2
    return np.where(inside, 40, -850).astype(np.int16), inside.astype(np.uint8)


def _logic(home, local_folder=None) -> ModuleLogic:
    settings = ModuleSettings(MemorySettings())
    settings.local_dicom_folder = local_folder
    return ModuleLogic(settings, home)
