"""The Slicer side, checked outside Slicer: packaging lists, Python 3.9 syntax, no Slicer imports in the
library, and the module's logic adapter and self-test run against a stand-in for the Slicer application."""

from __future__ import annotations

import ast
import io
import re
import sys
import types
import typing
import unittest
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "SimilarPatients"
LIB = MODULE / "SimilarPatientsLib"


def test_first_use_requirements_match_the_package():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    dependencies = set(re.findall(r'^\s+"([^"]+)",$', text.split("[project.optional-dependencies]")[0], re.M))
    module = ast.parse((MODULE / "SimilarPatients.py").read_text(encoding="utf-8"))
    requirements = next(
        ast.literal_eval(n.value)
        for n in module.body
        if isinstance(n, ast.AnnAssign | ast.Assign) and "REQUIREMENTS" in ast.unparse(n)
    )
    assert set(requirements) == dependencies - {"numpy>=1.24"}  # Slicer ships numpy
    extra = text.split("embed = [")[1].split("]")[0]
    embed = set(re.findall(r'"([^"]+)"', extra))
    embed_requirements = next(
        ast.literal_eval(n.value)
        for n in module.body
        if isinstance(n, ast.AnnAssign | ast.Assign)
        and "EMBED_REQUIREMENTS" in ast.unparse(n.targets[0] if isinstance(n, ast.Assign) else n.target)
    )
    # torch comes from Slicer's PyTorch extension; SimpleITK and pydicom ship with Slicer; highdicom reads
    # DICOM SEG files, and in Slicer the tumor is a segmentation node
    assert set(embed_requirements) == embed - {"torch>=2.1", "SimpleITK>=2.2", "pydicom>=2.4", "highdicom>=0.22"}


@pytest.fixture
def slicer_module(monkeypatch):
    """Import SimilarPatients.py with minimal stand-ins for the Slicer application's Python modules."""
    slicer = types.ModuleType("slicer")
    loadable = types.ModuleType("slicer.ScriptedLoadableModule")

    class Base:
        def __init__(self, *args):
            pass

    loadable.ScriptedLoadableModule = loadable.ScriptedLoadableModuleLogic = Base
    loadable.ScriptedLoadableModuleWidget = Base
    loadable.ScriptedLoadableModuleTest = unittest.TestCase
    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = object
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls  # Slicer's decorator binds the fields to a parameter node

    class Choice:
        """Slicer's validator of a field's allowed values (the QComboBox connector lists them)."""

        def __init__(self, choices):
            self.choices = list(choices)

    wrapper.Choice = Choice
    slicer.util, slicer.ScriptedLoadableModule = util, loadable
    try:  # Slicer's own module holds the MRML classes: take them from slicer-core where it is installed
        import slicer as core

        slicer.__dict__.update(
            {k: v for k, v in vars(core).items() if k.startswith(("vtkMRML", "vtkSlicer", "vtkOriented"))}
        )
    except ImportError:
        pass
    slicer.mrmlScene = types.SimpleNamespace(Clear=lambda: None)
    qt = types.ModuleType("qt")

    class Settings:
        """Stands in for qt.QSettings: the application's settings, one store for every instance."""

        values: typing.ClassVar[dict] = {}

        def value(self, key, default=None):
            return self.values.get(key, default)

        def setValue(self, key, value):
            self.values[key] = value

    Settings.values = {}
    qt.QSettings = Settings
    for name, module in {
        "slicer": slicer,
        "slicer.util": util,
        "slicer.ScriptedLoadableModule": loadable,
        "slicer.parameterNodeWrapper": wrapper,
        "qt": qt,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    try:  # Slicer ships vtk; slicer-core brings the same
        import vtk  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "vtk", types.ModuleType("vtk"))
    monkeypatch.syspath_prepend(str(MODULE))
    monkeypatch.delitem(sys.modules, "SimilarPatients", raising=False)
    import SimilarPatients

    return SimilarPatients


def test_self_test_passes_through_the_logic_adapter(slicer_module):
    result = unittest.TextTestRunner(stream=io.StringIO()).run(
        slicer_module.SimilarPatientsTest("test_neighbors_through_logic")
    )
    assert result.wasSuccessful(), result.failures + result.errors


def test_logic_adapter_on_real_reference(slicer_module, nlst_home):
    logic = slicer_module.SimilarPatientsLogic(nlst_home)
    assert logic.references() == ["nlst-sybil"]
    assert "CTFM" in logic.models("nlst-sybil")
    hits = logic.neighbors("nlst-sybil", "CTFM", "100242", k=3)
    assert len(hits) == 3 and "100242" not in set(hits.PatientID)
    assert hits.closer_than.is_monotonic_decreasing and hits.closer_than.between(0, 100).all()
    assert slicer_module.cellText("closer_than", 97.2) == "closer than 97% of nearest matches"


def test_every_ui_name_the_module_uses_is_in_the_ui_file():
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "SimilarPatients.py").read_text(encoding="utf-8")))
    declared = set(
        re.findall(r'name="(\w+)"', (MODULE / "Resources" / "UI" / "SimilarPatients.ui").read_text(encoding="utf-8"))
    )
    assert used and used <= declared, used - declared


def test_image_query_runs_in_a_child_process_and_can_be_cancelled(slicer_module, tmp_path):
    """The adapter's file-level query (what the widget runs after writing the nodes to files)."""
    import numpy as np
    import SimpleITK as sitk
    from conftest import descriptor_reference
    from SimilarPatientsLib import Cancelled, SimilarPatientsError
    from synthetic_ct import tumor_ct

    rng = np.random.default_rng(3)
    descriptor_reference(tmp_path / "home", 3, rng)
    image, mask, centre = tumor_ct("cavitary", rng)
    sitk.WriteImage(image, str(tmp_path / "image.nrrd"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nrrd"))
    logic = slicer_module.SimilarPatientsLogic(tmp_path / "home", python=sys.executable)
    hits = logic.queryFiles(tmp_path / "image.nrrd", "tumors", "TumorDescriptor", mask=tmp_path / "mask.nrrd", k=3)
    assert len(hits) == 3 and (hits["kind"] == "cavitary").sum() >= 2
    ras = [-centre[0], -centre[1], centre[2]]
    by_point = logic.queryFiles(tmp_path / "image.nrrd", "tumors", "TumorDescriptor", point_ras=ras, k=3)
    assert list(by_point.columns[:3]) == ["rank", "PatientID", "distance"]
    with pytest.raises(SimilarPatientsError, match="has no model 'CTFM'"):  # the child's own message
        logic.queryFiles(tmp_path / "image.nrrd", "tumors", "CTFM", mask=tmp_path / "mask.nrrd")
    with pytest.raises(Cancelled, match="Cancelled"):
        logic.queryFiles(
            tmp_path / "image.nrrd", "tumors", "TumorDescriptor", mask=tmp_path / "mask.nrrd", cancelled=lambda: True
        )
    assert logic.weightsToDownload("TumorDescriptor") is None and logic.licenceToAccept("TumorDescriptor") is None
    first = logic.queryFiles(tmp_path / "image.nrrd", "tumors", "TumorDescriptor", mask=tmp_path / "mask.nrrd", k=3)
    pid = logic.worker().pid  # a fresh worker after the cancel
    again = logic.queryFiles(tmp_path / "image.nrrd", "tumors", "TumorDescriptor", mask=tmp_path / "mask.nrrd", k=3)
    assert (
        first.PatientID.tolist() == hits.PatientID.tolist()
        and logic.worker().pid == pid
        and again.PatientID.tolist() == hits.PatientID.tolist()
    )  # one worker, kept

    # from the nodes, as the widget calls it: a volume read by Slicer's storage node, a segment, a point list
    from conftest import slicer_scene

    scene = slicer_scene()
    core = sys.modules["slicer"]
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "image.nrrd"))
    assert storage.ReadData(volume)
    volume.SetAndObserveStorageNodeID(storage.GetID())
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    mask_storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    mask_storage.SetFileName(str(tmp_path / "mask.nrrd"))
    assert mask_storage.ReadData(labelmap)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert core.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    segment = segmentation.GetSegmentation().GetNthSegmentID(0)
    from_nodes = logic.queryFromImage(
        volume, "tumors", "TumorDescriptor", segmentation=segmentation, segment=segment, k=3
    )
    assert from_nodes.PatientID.tolist() == hits.PatientID.tolist()  # the nodes are the files
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPoint(*ras)
    assert logic.queryFromImage(volume, "tumors", "TumorDescriptor", point=points, k=3).PatientID.tolist() == (
        by_point.PatientID.tolist()
    )
    assert volume.GetStorageNode().GetFileName() == str(tmp_path / "image.nrrd")  # the user's storage kept
    logic.cleanup()
    assert logic._worker is None


def test_no_python_slicer_is_a_clear_error(slicer_module, home, monkeypatch):
    from SimilarPatientsLib import SimilarPatientsError

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SimilarPatientsError, match="PythonSlicer was not found"):
        slicer_module.SimilarPatientsLogic(home).worker()


def test_licence_and_download_prompts_follow_the_weights_state(slicer_module, home):
    logic = slicer_module.SimilarPatientsLogic(home)
    assert "Noncommercial" in logic.licenceToAccept("VISTA3D")
    logic.acceptLicence("VISTA3D")
    assert logic.licenceToAccept("VISTA3D") is None
    assert logic.licenceToAccept("CTFM") is None  # Apache-2.0: nothing to accept
    assert logic.weightsToDownload("CTFM").startswith("https://huggingface.co/project-lighter/")


def test_the_extension_is_packaged_for_the_catalogue():
    import json

    import jsonschema

    schema = json.loads(
        (ROOT.parent / "shared" / "slicer" / "slicer-extension-catalog-entry-schema-v1.0.1.json").read_text(
            encoding="utf-8"
        )
    )
    entry = json.loads((ROOT / "SimilarPatients.json").read_text(encoding="utf-8"))
    jsonschema.validate(entry, schema)
    assert entry["build_dependencies"] == ["PyTorch"]
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in cmake and 'EXTENSION_SCREENSHOTURLS "https://' in cmake
    for setting in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL"):
        assert re.search(rf'set\(EXTENSION_{setting} "[^"]+"\)', cmake), setting
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("                                 Apache License")


def test_load_matches_downloads_imports_and_shows_them_beside_the_query(slicer_module, tmp_path, served, monkeypatch):
    """loadMatches on a real scene; stand-ins only for what slicer-core lacks, as Slicer documents them:
    ``slicer.app.layoutManager().layoutLogic()`` and ``DICOMLib.DICOMUtils.importDicom``."""
    import numpy as np
    import pandas as pd
    from conftest import IDCBucket, slicer_scene
    from SimilarPatientsLib.idc.download import SeriesCache

    folders, index = served
    scene = slicer_scene()
    manager = types.SimpleNamespace(layoutLogic=lambda: scene.layout_logic)
    monkeypatch.setattr(slicer_module.slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(
        slicer_module.slicer, "app", types.SimpleNamespace(layoutManager=lambda: manager), raising=False
    )
    imported = []
    dicom_lib = types.ModuleType("DICOMLib")
    dicom_lib.DICOMUtils = types.SimpleNamespace(importDicom=imported.append)
    monkeypatch.setitem(sys.modules, "DICOMLib", dicom_lib)

    bucket = IDCBucket(folders)
    logic = slicer_module.SimilarPatientsLogic(tmp_path / "home")
    monkeypatch.setattr(logic, "seriesCache", lambda: SeriesCache(tmp_path / "dicom-db" / "series", index, bucket))
    query = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Query CT")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(next(iter(folders.values())) / "slice0000.dcm"))
    assert storage.ReadData(query)
    hits = pd.DataFrame(
        [
            {"rank": r, "PatientID": f"P{r}", "distance": 0.1 * r, "closer_than": 95.0 - r, "SeriesInstanceUID": uid}
            | {"center_x": 0.0, "center_y": 0.0, "center_z": -30.0}
            for r, uid in enumerate(folders, 1)
        ]
    )
    assert logic.downloadSize(hits) == pytest.approx(0.06)
    comparison = logic.loadMatches(hits, query, (0.0, 0.0, -30.0))
    assert len(comparison.slice_nodes) == 3 and bucket.calls == 2 and len(imported) == 2
    centres = [[n.GetSliceToRAS().GetElement(r, 3) for r in range(3)] for n in comparison.slice_nodes]
    assert np.allclose(centres, [[0.0, 0.0, -30.0]] * 3, atol=1.25)
    assert logic.downloadSize(hits) == 0.0  # loading them again reuses the download
    logic.loadMatches(hits, query, (0.0, 0.0, -30.0))
    assert bucket.calls == 2


def test_model_status_filters_and_where_through_the_logic(slicer_module, nlst_home, monkeypatch):
    logic = slicer_module.SimilarPatientsLogic(nlst_home)
    assert slicer_module.filterTerms(" stage=IIIA,IIIB,IV; age>=65 ;") == ["stage=IIIA,IIIB,IV", "age>=65"]
    hits = logic.neighbors("nlst-sybil", "CTFM", "100242", k=5, where=["stage=IIIA,IIIB,IV"])
    assert set(hits.stage) <= {"IIIA", "IIIB", "IV"}
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(nlst_home))
    status = logic.modelStatus("nlst-sybil", "CTFM")
    assert status.startswith("CTFM (tumorimagingbench): Apache-2.0;") and "downloads at least 311 MB" in status
    merlin = logic.modelStatus("nlst-sybil", "Merlin")  # all six NLST-Sybil models run from an image
    assert merlin.startswith("Merlin (tumorimagingbench): MIT per the authors' code") and "474 MB" in merlin


def test_a_model_without_a_network_is_searched_by_patient_only(slicer_module, tmp_path):
    from conftest import store_frame, synthetic_frame

    store_frame(synthetic_frame(n_patients=6, models=("HomeGrown",)), tmp_path, "own")
    status = slicer_module.SimilarPatientsLogic(tmp_path).modelStatus("own", "HomeGrown")
    assert "search by patient only" in status and "Unknown model 'HomeGrown'" in status


def test_the_download_opt_in_is_kept_in_the_settings_and_can_be_taken_back(slicer_module, home):
    logic = slicer_module.SimilarPatientsLogic(home)
    assert not logic.downloadsAllowed()  # nothing is fetched before the user says so
    logic.allowDownloads(True)
    assert slicer_module.SimilarPatientsLogic(home).downloadsAllowed()  # kept for the next session
    logic.allowDownloads(False)
    assert not logic.downloadsAllowed()


def test_settings_a_weights_file_per_model_and_the_cache(slicer_module, home, tmp_path):
    logic = slicer_module.SimilarPatientsLogic(home)
    assert logic.weightsToDownload("VISTA3D") and logic.licenceToAccept("VISTA3D")
    logic.setWeightsFile("VISTA3D", str(tmp_path / "model_vista3d.pt"))
    assert logic.weightsFile("VISTA3D") == str(tmp_path / "model_vista3d.pt")
    assert logic.weightsToDownload("VISTA3D") is None and logic.licenceToAccept("VISTA3D") is None  # nothing to fetch
    (home / "series" / "1.2.3").mkdir(parents=True)
    (home / "series" / "1.2.3" / "a.dcm").write_bytes(b"x" * 2_000_000)
    assert "Downloaded series: " in logic.cacheInfo() and "(2 MB)" in logic.cacheInfo()
    assert logic.clearSeriesCache() == pytest.approx(2.0) and "(0 MB)" in logic.cacheInfo()
    assert logic.localDicomFolder() is None
    logic.setLocalDicomFolder(str(tmp_path))
    assert slicer_module.SimilarPatientsLogic(home).localDicomFolder() == str(tmp_path)


def test_the_in_slicer_self_test_of_query_and_load_runs_on_a_real_scene(slicer_module, monkeypatch):
    """SimilarPatientsTest's image-query-and-load test on slicer-core's scene, with stand-ins, as Slicer
    documents them, for what slicer-core lacks: addVolumeFromArray, the Segmentations module's logic, the
    layout manager, DICOMUtils.importDicom and the PythonSlicer launcher."""
    import shutil

    import numpy as np
    from conftest import slicer_scene
    from vtk.util import numpy_support

    scene = slicer_scene()

    def add_volume_from_array(array, ijkToRAS=None, name=None, nodeClassName=None):
        import vtk

        node = scene.AddNewNodeByClass(nodeClassName or "vtkMRMLScalarVolumeNode", name or "")
        image = vtk.vtkImageData()
        image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
        node.SetAndObserveImageData(image)
        node.CreateDefaultDisplayNodes()
        return node

    stub = slicer_module.slicer
    monkeypatch.setattr(stub, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(stub.util, "addVolumeFromArray", add_volume_from_array, raising=False)
    monkeypatch.setattr(
        stub,
        "modules",
        types.SimpleNamespace(segmentations=types.SimpleNamespace(logic=lambda: scene.segmentations_logic)),
        raising=False,
    )
    manager = types.SimpleNamespace(layoutLogic=lambda: scene.layout_logic)
    monkeypatch.setattr(stub, "app", types.SimpleNamespace(layoutManager=lambda: manager), raising=False)
    dicom_lib = types.ModuleType("DICOMLib")
    dicom_lib.DICOMUtils = types.SimpleNamespace(importDicom=lambda folder: None)
    monkeypatch.setitem(sys.modules, "DICOMLib", dicom_lib)
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: sys.executable if name == "PythonSlicer" else which(name))

    result = unittest.TextTestRunner(stream=io.StringIO()).run(
        slicer_module.SimilarPatientsTest("test_query_from_image_through_logic")
    )
    assert result.wasSuccessful(), result.failures + result.errors


def test_the_parameter_node_fields_are_bound_to_widgets_in_the_ui():
    """Every widget-bound field of the module's parameter node has a widget with that SlicerParameterName, and
    back; a field shown in a QComboBox carries Slicer's ``Choice`` annotation (its connector refuses a str
    without one); reference and model, whose choices come at run time, are kept by the widget's code."""
    module = ast.parse((MODULE / "SimilarPatients.py").read_text(encoding="utf-8"))
    wrapper = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "SimilarPatientsParameterNode")
    fields = {n.target.id: ast.unparse(n.annotation) for n in wrapper.body if isinstance(n, ast.AnnAssign)}
    ui = (MODULE / "Resources" / "UI" / "SimilarPatients.ui").read_text(encoding="utf-8")
    bound = dict(
        (name, widget)
        for widget, name in re.findall(
            r'<widget class="(\w+)" name="\w+">\s*<property name="SlicerParameterName" stdset="0">\s*'
            r"<string>(\w+)</string>",
            ui,
        )
    )
    assert set(bound) == {"volume", "k", "metric", "filters"}
    assert set(fields) == set(bound) | {"reference", "model"}
    for name, widget in bound.items():
        if widget == "QComboBox":
            assert "Choice(" in fields[name], name
    code = (MODULE / "SimilarPatients.py").read_text(encoding="utf-8")
    assert "self._parameterNode.reference = " in code and "self._parameterNode.model = " in code


def test_bigquery_references_are_listed_and_searched_only_after_their_opt_in(
    slicer_module, nlst_home, nlst, monkeypatch
):
    pytest.importorskip("google.cloud.bigquery")
    from bigquery_contract import BigQueryContractServer
    from SimilarPatientsLib import SimilarPatientsError
    from SimilarPatientsLib.cloud import client, parse_table
    from SimilarPatientsLib.cloud.push import push

    with BigQueryContractServer("my-project") as server:
        monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", server.url)  # the loopback BigQuery of the contract test
        table = parse_table("my-project.embeddings.ctfm")
        push(nlst, table, client.connect(table), models=["CTFM"])
        logic = slicer_module.SimilarPatientsLogic(nlst_home)
        logic.setBigQueryReferences([table.path])
        assert logic.references() == ["nlst-sybil"]  # nothing leaves the machine before the user says so
        with pytest.raises(SimilarPatientsError, match="Allow BigQuery searches"):
            logic.neighbors(table.url, "CTFM", "100242", k=3)
        logic.allowBigQuery(True)
        assert slicer_module.SimilarPatientsLogic(nlst_home).references() == ["nlst-sybil", table.url]
        hits = logic.neighbors(table.url, "CTFM", "100242", k=3)
        local = logic.neighbors("nlst-sybil", "CTFM", "100242", k=3)
        assert list(hits.PatientID) == list(local.PatientID) and hits.closer_than.isna().all()
        assert slicer_module.cellText("closer_than", hits.closer_than.iloc[0]) == ""
        assert server.violations == []
