"""The sample patient a clinician tries the module on: the reference's own lesion record of a public IDC CT,
and the whole loop in one click on slicer-core's scene (Sample Data's button → the CT downloaded with
consent and cached, its tumor point selected → query → results table → Load side by side), with synthetic
DICOM under the sample's SeriesInstanceUID standing in for IDC's download."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
from conftest import WorkerBucket
from SimilarPatientsLib.idc import IDCIndex, viewer_url
from SimilarPatientsLib.idc.download import SeriesCache
from SimilarPatientsLib.ui import Inputs, MemorySettings, ModuleController, ModuleLogic, ModuleSettings
from SimilarPatientsLib.ui.sample import SAMPLE
from synthetic_ct import tumor_ct, write_dicom_series
from test_module_controller import IDC, RecordingInstaller, RecordingView, _pretend_installed


def test_the_sample_is_the_references_own_lesion_record_of_a_series_idc_serves(nlst):
    lesions = nlst.lesions("CTFM")
    record = lesions[lesions.PatientID == SAMPLE.patient]
    assert len(record) == 1  # one lesion: the point marks the tumor the reference embedded
    row = record.iloc[0]
    assert row.SeriesInstanceUID == SAMPLE.series
    np.testing.assert_allclose(row[["center_x", "center_y", "center_z"]].astype(float), SAMPLE.centre_lps)
    assert (row.histology, row.stage) == (SAMPLE.histology, SAMPLE.stage)
    assert SAMPLE.viewer == viewer_url(row.StudyInstanceUID, SAMPLE.series)
    assert len(IDCIndex().series([SAMPLE.series])) == 1  # in IDC's index: downloadable


def _series(image, folder, uid: str | None = None) -> str:
    """``image`` written as DICOM (under ``uid`` when given, as IDC holds it); its SeriesInstanceUID."""
    import pydicom

    written = str(write_dicom_series(image, folder)[0].SeriesInstanceUID)
    if uid is None:
        return written
    for path in folder.iterdir():
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = uid
        dataset.save_as(path)
    return uid


@pytest.mark.skipif(sys.platform == "win32", reason="the query worker's process group as on POSIX")
def test_the_sample_in_one_click_then_query_table_and_load_side_by_side(mrml_application, tmp_path, monkeypatch):
    from SimilarPatientsLib.imaging.tumor import from_binary_mask
    from SimilarPatientsLib.models.embedder import Embedder
    from SimilarPatientsLib.references import schema
    from SimilarPatientsLib.references.store import ReferenceStore

    rng = np.random.default_rng(11)
    embedder, rows, served = Embedder("TumorDescriptor"), [], {}
    for i, kind in enumerate(("lobulated", "smooth", "cavitary", "spiculated")):  # the reference's patients
        image, mask, centre = tumor_ct(kind, rng, size=(48, 48, 24))
        uid = _series(image, tmp_path / "idc" / kind)
        served[uid] = tmp_path / "idc" / kind
        vector = embedder.embed(image, from_binary_mask(mask))[0]
        rows.append({"model": vector.model, "recipe": vector.recipe, "PatientID": f"P{i}", "embedding": vector.vector})
        rows[-1] |= {"SeriesInstanceUID": uid} | dict(zip(("center_x", "center_y", "center_z"), centre))
    ReferenceStore(tmp_path / "home").write("tumors", schema.from_frame(pd.DataFrame(rows)), "test")
    image, _, centre = tumor_ct("lobulated", rng, size=(48, 48, 24))
    image.SetOrigin(tuple(np.add(image.GetOrigin(), np.subtract(SAMPLE.centre_lps, centre))))  # tumor where IDC's is
    served[_series(image, tmp_path / "idc" / "sample", SAMPLE.series)] = tmp_path / "idc" / "sample"
    index = pd.DataFrame({"SeriesInstanceUID": list(served), "collection_id": "nlst", "StudyInstanceUID": "1.2.3"})
    sizes = [0.5] * (len(served) - 1) + [76.88]  # the sample's CT is IDC's 77 MB series
    index.assign(Modality="CT", SeriesDescription="", series_size_MB=sizes, instanceCount=24).to_parquet(
        tmp_path / "index.parquet"
    )
    bucket = WorkerBucket(served, tmp_path, monkeypatch)  # the worker downloads, through s5cmd's stand-in
    logic = ModuleLogic(ModuleSettings(MemorySettings()), tmp_path / "home", python=sys.executable)
    cache = SeriesCache(tmp_path / "cache", IDCIndex(tmp_path / "index.parquet"))
    monkeypatch.setattr(logic, "series_cache", lambda: cache)
    _pretend_installed(monkeypatch, IDC)
    view = RecordingView()
    controller = ModuleController(view, logic, installer=RecordingInstaller())
    try:
        controller.load_sample()  # Sample Data's button
        controller.wait()
        assert "sample patient's CT (NLST patient 100158, Adenocarcinoma, NOS, stage IA: 77 MB)" in view.of("ask")[0][0]
        volume, point = view.last("show_sample")
        assert volume.GetName() == SAMPLE.volume_name and point.GetName() == SAMPLE.tumor_name
        x, y, z = SAMPLE.centre_lps
        assert np.allclose(point.GetNthControlPointPositionWorld(0), (-x, -y, z)) and len(bucket.downloads) == 1

        controller.find_from_image(Inputs("tumors", "TumorDescriptor", 3, volume=volume, tumor=point))
        controller.wait()
        assert not view.of("show_error"), view.of("show_error")
        table = view.last("show_results")[0]
        assert len(table.rows) == 3 and {row[1] for row in table.rows} <= {"P0", "P1", "P2", "P3"}

        controller.load_selected(Inputs("tumors", "TumorDescriptor", 3, selected_rows=[0, 1]))
        controller.wait()
        assert not view.of("show_error"), view.of("show_error")
        views = logic.comparison.slice_nodes
        assert len(views) == 3 and len(bucket.downloads) == 3  # the query and the two matches, each downloaded once
        at = [views[0].GetSliceToRAS().GetElement(r, 3) for r in range(3)]
        assert np.allclose(at, (-x, -y, z), atol=1.0)  # the query's view on the sample's tumor

        asked = len(view.of("ask"))
        controller.load_sample()  # cached now: nothing downloaded, nothing asked
        controller.wait()
        assert len(bucket.downloads) == 3 and len(view.of("ask")) == asked
    finally:
        logic.cleanup()
