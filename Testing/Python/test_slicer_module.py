"""The Slicer module file, checked outside Slicer: it imports with stand-ins for Slicer's application
modules, its widgets and parameter node match the .ui file, it is wiring only, its packaging lists match
pyproject, the extension validates against the catalogue's schema, and the in-Slicer self-test runs on
slicer-core's scene. What the widget decides is tested in test_module_controller.py."""

from __future__ import annotations

import ast
import io
import re
import sys
import types
import unittest
from pathlib import Path

import pytest
from SimilarPatientsLib.ui import dependencies

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "SimilarPatients"
MODULE_FILE = MODULE / "SimilarPatients.py"
UI_FILE = MODULE / "Resources" / "UI" / "SimilarPatients.ui"


def _for_this_python(specs: set) -> set:
    """The requirements whose environment markers this Python meets, without their markers."""
    from packaging.requirements import Requirement

    kept = {Requirement(s) for s in specs}
    return {f"{r.name}{r.specifier}" for r in kept if r.marker is None or r.marker.evaluate()}


def _pyproject_list(text: str, start: str) -> set:
    return set(re.findall(r'"([^"]+)"', text.split(start, 1)[1].split("]", 1)[0]))


def test_first_use_requirements_are_pyprojects_with_their_minimum_versions():
    """What the module installs in Slicer is what pyproject declares (names and lowest versions), less what
    Slicer ships (numpy, SimpleITK, pydicom) and torch (the PyTorch extension's) and highdicom (in Slicer the
    tumor is a node, never a DICOM SEG file)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    specs = lambda group: {r.pip for r in group}  # noqa: E731
    assert specs(dependencies.SEARCH) == _pyproject_list(text, "dependencies = [") - {"numpy>=1.26"}
    embed = {s for s in _pyproject_list(text, "embed = [") if not s.startswith(("torch", "SimpleITK", "pydicom"))}
    assert specs(dependencies.IMAGE) == {s for s in embed if not s.startswith("highdicom")}
    assert specs(dependencies.DOWNLOAD) == _for_this_python(_pyproject_list(text, "download = ["))
    assert specs(dependencies.BIGQUERY) == _pyproject_list(text, "bigquery = [")
    assert "torch>=" + dependencies.MINIMUM_TORCH in _pyproject_list(text, "embed = [")


@pytest.fixture
def slicer_module(monkeypatch):
    """Import SimilarPatients.py with minimal stand-ins for the Slicer application's Python modules (the MRML
    classes from slicer-core where it is installed)."""
    slicer = types.ModuleType("slicer")
    loadable = types.ModuleType("slicer.ScriptedLoadableModule")

    class Base:
        def __init__(self, *args):
            pass

    loadable.ScriptedLoadableModule = loadable.ScriptedLoadableModuleLogic = Base
    loadable.ScriptedLoadableModuleWidget = Base
    loadable.ScriptedLoadableModuleTest = unittest.TestCase
    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = type("VTKObservationMixin", (), {"__init__": lambda self: None})
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls  # Slicer's decorator binds the fields to a parameter node

    class Validator:
        """Slicer's validators (the widget connectors read them: a combo box's choices, a spin box's range)."""

        def __init__(self, *arguments):
            self.arguments = arguments

    wrapper.Choice = wrapper.WithinRange = Validator
    slicer.util, slicer.ScriptedLoadableModule = util, loadable
    try:  # Slicer's own module holds the MRML classes: take them from slicer-core where it is installed
        import slicer as core

        slicer.__dict__.update(
            {k: v for k, v in vars(core).items() if k.startswith(("vtkMRML", "vtkSlicer", "vtkOriented", "vtkSegment"))}
        )
    except ImportError:
        slicer.vtkMRMLScalarVolumeNode = object
    slicer.mrmlScene = types.SimpleNamespace(Clear=lambda: None)
    qt = types.ModuleType("qt")
    qt.QSettings = lambda: None
    for name, module in {
        "slicer": slicer,
        "slicer.util": util,
        "slicer.ScriptedLoadableModule": loadable,
        "slicer.parameterNodeWrapper": wrapper,
        "qt": qt,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.syspath_prepend(str(MODULE))
    monkeypatch.delitem(sys.modules, "SimilarPatients", raising=False)
    import SimilarPatients

    return SimilarPatients


def test_the_module_file_is_wiring_only():
    """Under half of its former 1,053 lines; no library call it decides on its own: the handlers hand the
    widgets' values to the controller."""
    lines = MODULE_FILE.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 1053 // 2, len(lines)
    code = "\n".join(lines)
    for decision in ("confirmOkCancelDisplay(", "errorDisplay(", "pip_install", "processEvents"):
        assert code.count(decision) <= 1, decision  # asked for by the controller only, never decided here


def test_the_self_test_installs_nothing_in_testing_mode(slicer_module, monkeypatch):
    """Under --testing (the extensions build machine) the self-test never changes Slicer's Python: it is
    skipped, naming what is missing (as pip_ensure's skip_in_testing)."""
    real = dependencies.installed_version
    monkeypatch.setattr(dependencies, "installed_version", lambda name: None if name == "pandas" else real(name))
    monkeypatch.setattr(dependencies.SlicerInstaller, "run_pip", lambda *a: pytest.fail("pip ran under --testing"))
    monkeypatch.setattr(slicer_module.slicer, "app", types.SimpleNamespace(testingEnabled=lambda: True), raising=False)
    with pytest.raises(unittest.SkipTest, match=r"--testing.*pandas>=2\.0"):
        slicer_module.SimilarPatientsTest().setUp()


def test_the_console_calls_are_the_librarys(slicer_module, nlst_home):
    from SimilarPatientsLib.ui import MemorySettings

    logic = slicer_module.SimilarPatientsLogic(nlst_home, sys.executable, settings=MemorySettings())
    assert logic.references() == ["nlst-sybil"] and "CTFM" in logic.models("nlst-sybil")
    hits = logic.neighbors("nlst-sybil", "CTFM", "100242", k=3)  # searched by the worker
    logic.cleanup()
    assert len(hits) == 3 and "100242" not in set(hits.PatientID)
    assert hits.closer_than.is_monotonic_decreasing and hits.closer_than.between(0, 100).all()
    assert logic.findSimilar.__func__ is not None and logic.loadMatches.__func__ is not None


def test_every_ui_name_the_module_uses_is_in_the_ui_file():
    code = MODULE_FILE.read_text(encoding="utf-8")
    used = set(re.findall(r"(?:self\.ui|(?<![\w.])ui)\.(\w+)", code))
    used |= set(re.findall(r'"(\w+(?:Button|CheckBox))"', code))
    declared = set(re.findall(r'name="(\w+)"', UI_FILE.read_text(encoding="utf-8")))
    assert used and used <= declared, used - declared


def test_the_parameter_node_fields_are_bound_to_widgets_in_the_ui():
    """Every widget-bound field of the parameter node has a widget with that SlicerParameterName, and back; a
    field shown in a QComboBox carries Slicer's ``Choice`` (its connector refuses a str without one), and one
    in a QSpinBox ``WithinRange`` (without one, the connector opens the spin box to ±2³¹, over the .ui's
    range); reference and model, whose choices come at run time, are kept by the widget's code."""
    module = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    wrapper = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "SimilarPatientsParameterNode")
    fields = {n.target.id: ast.unparse(n.annotation) for n in wrapper.body if isinstance(n, ast.AnnAssign)}
    bound = dict(
        (name, widget)
        for widget, name in re.findall(
            r'<widget class="(\w+)" name="\w+">\s*<property name="SlicerParameterName" stdset="0">\s*'
            r"<string>(\w+)</string>",
            UI_FILE.read_text(encoding="utf-8"),
        )
    )
    assert set(bound) == {"volume", "k", "metric", "filters"}
    assert set(fields) == set(bound) | {"reference", "model"}
    assert "Choice(" in fields["metric"] and "WithinRange(*K_RANGE)" in fields["k"]
    for name, widget in bound.items():
        if widget == "QComboBox":
            assert "Choice(" in fields[name], name
        if widget == "QSpinBox":
            assert "WithinRange(" in fields[name], name
    code = MODULE_FILE.read_text(encoding="utf-8")
    assert "self._parameterNode.reference = " in code and "self._parameterNode.model = " in code


def test_the_module_imports_before_any_package_is_installed(tmp_path):
    """Slicer imports the module file at start-up, before the first use installs pandas and the rest: the
    library's ui part (all the module imports) needs only the standard library (and Slicer's numpy)."""
    import subprocess

    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'pandas', 'pyarrow', 'duckdb', 'faiss', 'tqdm', 'idc_index_data'}:\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import SimilarPatientsLib.ui as ui\n"
        "from SimilarPatientsLib.ui import dependencies, self_test\n"
        "logic = ui.ModuleLogic(ui.ModuleSettings(ui.MemorySettings()), 'home')\n"
        "print(logic.cache_info(), logic.clear_series_cache())\n"  # the settings section opens before any install
        "print(sorted(r.name for r in dependencies.unmet(dependencies.SEARCH)))\n"
    )
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


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
    screenshot = re.search(r'EXTENSION_SCREENSHOTURLS "https://\S+?/main/(\S+)"', cmake).group(1)
    assert screenshot == "Resources/Screenshots/comparison.png" and (ROOT / screenshot).is_file()  # the module at work
    for setting in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL"):
        assert re.search(rf'set\(EXTENSION_{setting} "[^"]+"\)', cmake), setting
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("                                 Apache License")


@pytest.fixture
def slicer_application(monkeypatch):
    """slicer-core's scene as ``slicer.mrmlScene``, with stand-ins, as Slicer documents them, for what
    slicer-core lacks: ``slicer.util.addVolumeFromArray``, the Segmentations module's logic, the layout
    manager, ``DICOMUtils`` (its importer and temporary database, recorded) and the PythonSlicer launcher."""
    import shutil

    import numpy as np
    from conftest import slicer_scene

    scene = slicer_scene()
    core = sys.modules["slicer"]

    def add_volume_from_array(array, ijkToRAS=None, name=None, nodeClassName=None):
        import vtk
        from vtk.util import numpy_support

        node = scene.AddNewNodeByClass(nodeClassName or "vtkMRMLScalarVolumeNode", name or "")
        image = vtk.vtkImageData()
        image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
        node.SetAndObserveImageData(image)
        node.CreateDefaultDisplayNodes()
        return node

    manager = types.SimpleNamespace(layoutLogic=lambda: scene.layout_logic)
    monkeypatch.setattr(core, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(core, "util", types.SimpleNamespace(addVolumeFromArray=add_volume_from_array), raising=False)
    monkeypatch.setattr(
        core,
        "modules",
        types.SimpleNamespace(segmentations=types.SimpleNamespace(logic=lambda: scene.segmentations_logic)),
        raising=False,
    )
    monkeypatch.setattr(core, "app", types.SimpleNamespace(layoutManager=lambda: manager), raising=False)
    imported, databases = [], []

    class TemporaryDICOMDatabase:
        def __init__(self, folder=None):
            databases.append(folder)

        def __enter__(self):
            return self

        def __exit__(self, *error):
            databases.append("closed")

    dicom_lib = types.ModuleType("DICOMLib")
    dicom_lib.DICOMUtils = types.SimpleNamespace(
        importDicom=imported.append, TemporaryDICOMDatabase=TemporaryDICOMDatabase
    )
    monkeypatch.setitem(sys.modules, "DICOMLib", dicom_lib)
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: sys.executable if name == "PythonSlicer" else which(name))
    return types.SimpleNamespace(scene=scene, imported=imported, databases=databases)


def test_the_in_slicer_self_test_runs_on_a_real_scene_and_leaves_nothing(
    slicer_module, slicer_application, tmp_path, monkeypatch
):
    """SimilarPatientsTest on slicer-core's scene: both scenarios pass, its DICOM files go to a temporary
    database only, and its temporary folders are gone afterwards."""
    import tempfile

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))  # this process's and the worker's temporary files
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    test = slicer_module.SimilarPatientsTest
    test.setUp = lambda self: None  # the scene is the fixture's; the packages are this environment's
    result = unittest.TextTestRunner(stream=io.StringIO()).run(unittest.defaultTestLoader.loadTestsFromTestCase(test))
    assert result.wasSuccessful(), result.failures + result.errors
    assert slicer_application.databases[-1] == "closed" and slicer_application.imported
    assert all(Path(folder).is_relative_to(temporary) for folder in slicer_application.imported)
    assert not list(temporary.iterdir()), list(temporary.iterdir())


def test_the_sample_patient_is_registered_with_slicers_sample_data_module(slicer_module, monkeypatch):
    """At start-up the module registers the sample (``ui/sample.py``) with the Sample Data module, as
    SampleDataLogic.registerCustomSampleDataSource takes it (one URI, file and node name: its lists must be
    of one length); the sample's button opens the module and runs its load_sample task."""
    from SimilarPatientsLib.ui.sample import SAMPLE

    slicer = sys.modules["slicer"]
    connected, registered, selected, loaded = [], [], [], []
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(connect=lambda *c: connected.append(c)), raising=False)
    module_class = slicer_module.SimilarPatients
    monkeypatch.setattr(module_class, "parent", types.SimpleNamespace(), raising=False)  # Slicer's base sets it
    module_class(None)
    assert connected == [("startupCompleted()", slicer_module.registerSampleData)]
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **e: registered.append(e))
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    slicer_module.registerSampleData()
    (entry,) = registered
    assert entry["sampleName"] == SAMPLE.name and entry["customDownloader"] is slicer_module.loadSample
    assert all(isinstance(entry[k], str) for k in ("uris", "fileNames", "nodeNames"))
    assert Path(entry["thumbnailFileName"]).is_file() and entry["uris"] == SAMPLE.viewer

    widget = types.SimpleNamespace(controller=types.SimpleNamespace(load_sample=lambda: loaded.append(True)))
    module = types.SimpleNamespace(widgetRepresentation=lambda: types.SimpleNamespace(self=lambda: widget))
    monkeypatch.setattr(slicer.util, "selectModule", selected.append, raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(similarpatients=module), raising=False)
    entry["customDownloader"](object())  # Sample Data calls it with the source
    assert selected == ["SimilarPatients"] and loaded == [True]


def test_the_checkout_route_the_guide_gives_finds_the_module_its_library_and_its_worker(tmp_path):
    """The user guide's checkout route: the checkout's ``SimilarPatients`` folder as an additional module path.
    Slicer finds a scripted module as ``<Name>.py`` there and puts the folder on ``sys.path``, so the library
    is imported from the checkout, and the worker is started with that folder as its path and runs from it
    alone. (The self-test from that folder: the fixture of the self-test test imports the module from it.)"""
    import os
    import subprocess

    guide = (ROOT / "docs" / "user-guide.md").read_text(encoding="utf-8")
    assert "Additional module paths" in guide and "`<checkout>/SimilarPatients`" in guide
    folder = ROOT / "SimilarPatients"
    assert (folder / "SimilarPatients.py").is_file() and (folder / "Resources" / "UI" / "SimilarPatients.ui").is_file()
    code = (
        "import os, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"  # what Slicer does for a scripted module's folder
        "import SimilarPatientsLib, SimilarPatientsLib.ui.sample, SimilarPatientsLib.scene.watch\n"
        "from SimilarPatientsLib.scene.worker import WorkerClient\n"
        "print(SimilarPatientsLib.__file__)\n"
        "print(WorkerClient(sys.executable, {}).environment['PYTHONPATH'].split(os.pathsep)[0])\n"
    )
    found = subprocess.run(
        [sys.executable, "-I", "-c", code, str(folder)], capture_output=True, text=True, cwd=tmp_path
    )
    assert found.returncode == 0, found.stderr
    library, worker_path = found.stdout.split()
    assert Path(library).is_relative_to(folder) and Path(worker_path) == folder
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": worker_path}
    worker = subprocess.run(
        [sys.executable, "-c", "import sys, SimilarPatientsLib.scene.worker as w; print(w.__file__); w.main()"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
        timeout=120,
    )
    assert worker.returncode == 0 and Path(worker.stdout.split()[0]).is_relative_to(folder), worker.stderr
