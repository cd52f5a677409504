"""What the Slicer module's widget decides, driven without Qt through SimilarPatientsLib.ui's controller with a
view that records what it is asked to show: install order and consent, versions checked, the licence and
download questions, progress stages, the size question before every load, cancel without an error box, one
task at a time, the buttons enabled, BigQuery without network calls on entry, and the first click prepared
when the module is entered. The query worker, the references and (where a scene is needed) slicer-core's
MRML scene are real."""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import NLST_DIR, IDCBucket, descriptor_reference
from SimilarPatientsLib.idc.download import SeriesCache
from SimilarPatientsLib.ui import Inputs, MemorySettings, ModuleController, ModuleLogic, ModuleSettings, dependencies
from SimilarPatientsLib.ui.results import cell_text, filter_terms, results_table
from synthetic_ct import tumor_ct

posix = pytest.mark.skipif(os.name != "posix", reason="the worker's process group as on Linux and macOS")


class RecordingView:
    """The controller's view: records every call; answers questions from ``answers`` (True when it runs out)."""

    def __init__(self, answers=()):
        self.calls: list = []
        self.answers = list(answers)

    def ask(self, question, title):
        self.calls.append(("ask", question))
        return self.answers.pop(0) if self.answers else True

    def __getattr__(self, name):
        def record(*arguments):
            self.calls.append((name, *arguments))

        return record

    def of(self, kind) -> list:
        return [call[1:] for call in self.calls if call[0] == kind]

    def last(self, kind):
        found = self.of(kind)
        return found[-1] if found else None


class RecordingInstaller:
    """Stands in for Slicer's installers (see test_slicer_module.py for the real ones): records the plans."""

    def __init__(self, after=None):
        self.plans, self.after = [], after

    def install(self, plan):
        self.plans.append(plan)
        if self.after:
            self.after()


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A data home with reference 'tumors' (the weight-free model, 3 tumors per kind) and a query CT with the
    tumor's centre."""
    folder = tmp_path_factory.mktemp("controller")
    rng = np.random.default_rng(21)
    descriptor_reference(folder / "home", 3, rng)
    image, mask, centre = tumor_ct("cavitary", rng)
    sitk.WriteImage(image, str(folder / "ct.nrrd"))
    sitk.WriteImage(mask, str(folder / "mask.nrrd"))
    return folder, centre


@pytest.fixture
def controller(setting):
    folder, _ = setting
    logic = ModuleLogic(ModuleSettings(MemorySettings()), folder / "home", python=sys.executable)
    view = RecordingView()
    made = ModuleController(view, logic, installer=RecordingInstaller())
    yield made
    logic.cleanup()


@pytest.fixture
def query_nodes(setting, controller, monkeypatch):
    """The query CT as a volume node (read by Slicer's storage node) and its tumor clicked as a point, on
    slicer-core's scene. Where there is no slicer-core (Python 3.9: Slicer 5.8's lane), stand-ins for the two
    nodes, and the logic's hand-over of the nodes' voxels replaced by the files they were read from: the rest
    (the controller, the worker, the library) runs as it does in Slicer."""
    folder, centre = setting
    try:
        from conftest import slicer_scene

        scene = slicer_scene()
    except pytest.skip.Exception:
        from SimilarPatientsLib.ui.logic import QueryFiles

        class Node:
            def __init__(self, kind):
                self.kind = kind

            def IsA(self, name):
                return name == self.kind

        def write_query(volume, point=None, **_):
            lps = [float(v) for v in centre]
            return QueryFiles(str(folder / "unused"), str(folder / "ct.nrrd"), "ct", {"points": [lps]}, volume)

        monkeypatch.setattr(controller.logic, "write_query", write_query)
        return Node("vtkMRMLScalarVolumeNode"), Node("vtkMRMLMarkupsNode")
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Query CT")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(folder / "ct.nrrd"))
    assert storage.ReadData(volume)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPoint(-centre[0], -centre[1], centre[2])
    return volume, points


def _inputs(**given) -> Inputs:
    return Inputs(**{"reference": "tumors", "model": "TumorDescriptor", "k": 3, **given})


# --- results table, filters ---------------------------------------------------------------------------


def test_the_results_table_reads_as_a_clinician_reads_it():
    hits = pd.DataFrame(
        {"rank": [1], "PatientID": ["P1"], "distance": [0.0123456], "closer_than": [97.2], "stage": ["IA"]}
        | {"collection_id": [None], "viewer_url": ["https://viewer"]}
    )
    table = results_table(hits, ["stage"])
    assert table.titles == ["#", "Patient", "Similarity", "Distance", "stage", "Collection"]
    assert table.rows == [["1", "P1", "closer than 97% of nearest matches", "0.01235", "IA", ""]]
    assert cell_text("closer_than", float("nan")) == ""
    assert filter_terms(" stage=IIIA,IIIB,IV; age>=65 ;") == ["stage=IIIA,IIIB,IV", "age>=65"]


# --- installs: one consent per click, versions checked, torch first through the PyTorch extension -------


def _pretend_installed(monkeypatch, versions: dict):
    """What ``importlib.metadata`` reports, for the named distributions (None: not installed)."""
    real = dependencies.installed_version
    monkeypatch.setattr(dependencies, "installed_version", lambda name: versions.get(name, real(name)))


#: The image query's PyPI packages, installed (in the Slicer lanes they are not: no torch there).
IMAGE_INSTALLED = {"monai": "1.4.0", "einops": "0.8.1", "safetensors": "0.5.3", "huggingface-hub": "0.36.0"}


def test_versions_not_presence_decide_what_is_installed(monkeypatch):
    _pretend_installed(monkeypatch, {**IMAGE_INSTALLED, "pandas": "1.5.3", "torch": "2.0.1", "monai": None})
    plan = dependencies.plan(dependencies.SEARCH, dependencies.IMAGE, torch=True)
    assert [r.pip for r in plan.packages] == ["pandas>=2.0", "monai>=1.4"]
    assert plan.torch == "2.0.1, older than 2.1"
    question = plan.question()
    assert question.index("PyTorch 2.1 or newer") < question.index("pandas>=2.0")  # torch named first
    assert "through the PyTorch extension" in question and "monai>=1.4 from PyPI" in question
    _pretend_installed(monkeypatch, {"pandas": "2.2.3", "torch": "2.13.0+cpu"})
    assert dependencies.plan(dependencies.SEARCH, torch=True).empty  # a local version suffix is fine


@pytest.mark.parametrize("release", ["5.8", "5.12"])
def test_the_installer_puts_torch_first_then_pip_with_torch_and_slicers_packages_pinned(monkeypatch, release):
    """torch through PyTorchUtils (no second question), then pip: ``slicer.packaging.pip_install`` on Slicer
    5.12 (never ``pip_ensure``: a second dialog, and no install under --testing), ``slicer.util.pip_install``
    before; the constraints pin torch and numpy, SimpleITK, pydicom, requests, vtk as installed."""
    calls, versions = [], {**IMAGE_INSTALLED, "torch": None, "monai": None}
    _pretend_installed(monkeypatch, versions)

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation, torchVersionRequirement):
            calls.append(("torch", askConfirmation, torchVersionRequirement))
            versions["torch"] = "2.4.1"
            return types.ModuleType("torch")

    def pip(requirements, constraints):
        with open(constraints, encoding="utf-8") as stream:
            calls.append(("pip", list(requirements), stream.read()))
        versions["monai"] = "1.4.0"

    slicer = types.ModuleType("slicer")
    if release == "5.12":
        packaging = types.ModuleType("slicer.packaging")
        packaging.pip_install = lambda requirements, constraints, requester: pip(requirements, constraints)
        packaging.pip_ensure = lambda *a, **k: pytest.fail("pip_ensure asks again and skips under --testing")
        monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    else:
        monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # Slicer 5.8 has no slicer.packaging

        def util_pip_install(arguments):
            assert arguments[-2] == "--constraint"
            pip(arguments[:-2], arguments[-1])

        slicer.util = types.SimpleNamespace(pip_install=util_pip_install)
    monkeypatch.setitem(sys.modules, "slicer", slicer)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))

    dependencies.SlicerInstaller().install(dependencies.plan(dependencies.IMAGE, torch=True))
    assert [c[0] for c in calls] == ["torch", "pip"]
    assert calls[0] == ("torch", False, ">=2.1")
    assert calls[1][1] == ["monai>=1.4"]
    pinned = dict(line.split("==") for line in calls[1][2].split())
    assert pinned["torch"] == "2.4.1" and pinned["numpy"] == dependencies.installed_version("numpy")


def test_an_install_that_did_not_take_is_an_error_naming_the_packages(monkeypatch):
    _pretend_installed(monkeypatch, {**IMAGE_INSTALLED, "monai": None})
    installer = dependencies.SlicerInstaller()
    monkeypatch.setattr(installer, "pip_install", lambda requirements, constraints: None)
    with pytest.raises(dependencies.SimilarPatientsError, match=r"Installing monai>=1.4 did not succeed"):
        installer.install(dependencies.plan(dependencies.IMAGE))


def test_without_the_pytorch_extension_an_image_query_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    with pytest.raises(dependencies.SimilarPatientsError, match="install the 'PyTorch' extension"):
        dependencies.SlicerInstaller().install_torch()


@posix
def test_one_click_asks_once_for_everything_it_installs_and_declining_installs_nothing(
    controller, query_nodes, monkeypatch
):
    volume, points = query_nodes
    versions = {**IMAGE_INSTALLED, "pandas": "1.5.3", "monai": None, "torch": None}
    _pretend_installed(monkeypatch, versions)
    controller.view.answers = [False]
    controller.find_from_image(_inputs(model="CTFM", volume=volume, tumor=points))
    controller.wait()
    assert len(controller.view.of("ask")) == 1 and not controller.installer.plans
    assert "Nothing was installed" in controller.view.last("show_status")[0] and not controller.view.of("show_error")

    controller.installer.after = lambda: versions.update(pandas="2.2.3", monai="1.4.0", torch="2.4.1")
    controller.view.answers = [True, False]  # install: yes; download CT-FM's weights: not now
    controller.find_from_image(_inputs(model="CTFM", volume=volume, tumor=points))
    controller.wait()
    install, download = (question for (question,) in controller.view.of("ask")[1:])
    assert "PyTorch" in install and "pandas>=2.0" in install and "monai>=1.4" in install
    assert "These weights would be downloaded:\nCTFM: https://" in download
    (plan,) = controller.installer.plans
    assert plan.torch == "not installed" and [r.name for r in plan.packages] == ["pandas", "monai"]
    assert controller.view.of("show_references")  # the first install lists the references
    assert controller.hits is None and not controller.view.of("show_error")  # nothing fetched, nothing asked twice


@posix
def test_the_weight_free_model_installs_no_torch(controller, query_nodes, monkeypatch):
    volume, points = query_nodes
    versions = {"pandas": "1.5.3", "monai": None, "torch": None}
    _pretend_installed(monkeypatch, versions)
    controller.installer.after = lambda: versions.update(pandas="2.2.3")
    controller.find_from_image(_inputs(volume=volume, tumor=points))
    controller.wait()
    (plan,) = controller.installer.plans
    assert plan.torch is None and [r.name for r in plan.packages] == ["pandas"]
    assert len(controller.hits) == 3


def test_before_the_first_install_the_module_opens_and_says_when_packages_come(controller, monkeypatch):
    _pretend_installed(monkeypatch, {"pandas": None})
    controller.entered(_inputs())
    assert "installed when you first import or search" in controller.view.last("show_status")[0]
    assert not controller.view.of("show_references") and not controller.view.of("show_error")
    assert "Downloaded series" in controller.cache_info()  # the settings open before any install


# --- searches: stages, results, buttons, k, one task at a time, cancel -----------------------------------


@posix
def test_an_image_query_shows_its_stages_its_hits_and_its_thumbnail(controller, query_nodes):
    volume, points = query_nodes
    controller.find_from_image(_inputs(volume=volume, tumor=points))
    assert controller.busy and not any(controller.actions().values())  # every button off while it runs
    controller.wait()
    stages = [message for _, message in controller.view.of("update_progress")]
    for stage in ("reading the CT", "cropping the tumor", "embedding with TumorDescriptor", "searching"):
        assert stage in stages
    table = controller.view.last("show_results")[0]
    assert table.titles[:4] == ["#", "Patient", "Similarity", "Distance"] and len(table.rows) == 3
    query_picture, _ = controller.view.of("show_thumbnails")[0]
    assert query_picture and os.path.isfile(query_picture)
    assert controller.actions()["load"] and controller.view.last("show_progress") == (None,)
    assert not controller.view.of("show_error")

    controller.find_by_patient(_inputs(patient="cavitary-0"))  # a patient search has no CT to load beside
    controller.wait()
    assert len(controller.hits) == 3 and not controller.actions()["load"]


@posix
def test_a_second_click_during_a_query_is_refused_and_the_first_one_is_answered(controller, query_nodes):
    """Reproduces the nested query: the first query's answer must arrive and nothing runs twice."""
    volume, points = query_nodes
    controller.find_from_image(_inputs(volume=volume, tumor=points))
    controller.find_from_image(_inputs(volume=volume, tumor=points, k=5))
    controller.find_by_patient(_inputs(patient="cavitary-0"))
    assert controller.view.of("show_status").count(("Wait for the current task to finish, or cancel it.",)) == 2
    controller.wait()
    assert len(controller.view.of("show_results")) == 1 and len(controller.hits) == 3


@posix
def test_cancel_ends_the_query_with_a_status_line_not_an_error_box(controller, query_nodes):
    volume, points = query_nodes
    controller.find_from_image(_inputs(volume=volume, tumor=points))
    controller.poll(0.2)
    worker = controller.logic.worker()
    controller.cancel()
    assert not controller.busy and controller.view.last("show_status") == ("Cancelled.",)
    assert not controller.view.of("show_error") and not worker.running
    controller.find_from_image(_inputs(volume=volume, tumor=points))  # the next one starts a fresh worker
    controller.wait()
    assert len(controller.hits) == 3


@pytest.mark.parametrize(("k", "refused"), [(0, True), (101, True), (1, False)])
def test_k_outside_1_to_100_is_refused_with_a_message(controller, k, refused):
    controller.find_by_patient(_inputs(patient="cavitary-0", k=k))
    controller.wait()
    errors = controller.view.of("show_error")
    assert bool(errors) == refused
    if refused:
        assert f"Ask for 1 to 100 patients, not {k}" in errors[0][0]


def test_a_search_with_filters_no_patient_passes_says_so(controller):
    controller.find_by_patient(_inputs(patient="cavitary-0", filters="kind=smooth; kind=cavitary"))
    controller.wait()
    assert controller.hits is not None and len(controller.hits) == 0
    assert controller.view.last("show_status") == ("No patient of the reference passes the filters.",)
    assert not controller.view.of("show_error") and not controller.actions()["load"]


def test_a_filter_value_no_lesion_holds_is_an_error_naming_what_the_field_holds(controller):
    controller.find_by_patient(_inputs(patient="cavitary-0", filters="kind=nonesuch"))
    controller.wait()
    (error,) = controller.view.of("show_error")
    assert "No lesion has kind = 'nonesuch'" in error[0] and "smooth" in error[0]


@pytest.fixture
def empty_controller(tmp_path):
    """A controller on an empty data home."""
    logic = ModuleLogic(ModuleSettings(MemorySettings()), tmp_path / "home", python=sys.executable)
    yield ModuleController(RecordingView(), logic, installer=RecordingInstaller())
    logic.cleanup()


def test_importing_nlst_sybil_from_the_local_copy_lists_it_and_asks_nothing(empty_controller, monkeypatch):
    controller = empty_controller
    monkeypatch.setenv("SIMILARPATIENTS_NLST_SYBIL_DIR", str(NLST_DIR))
    controller.import_nlst()
    controller.wait()
    assert not controller.view.of("ask") and not controller.view.of("show_error")
    names, current = controller.view.last("show_references")
    assert "nlst-sybil" in names and current == "nlst-sybil"
    assert controller.view.last("show_status") == ("NLST-Sybil imported: choose a model and search.",)
    models = controller.view.last("show_models")[0]
    assert {"CTFM", "SUPREME"} <= set(models)


def test_importing_nlst_sybil_without_a_local_copy_asks_before_downloading(empty_controller, monkeypatch):
    controller = empty_controller
    monkeypatch.setattr(controller.logic, "nlst_local_copy", lambda: None)
    controller.view.answers = [False]  # the downloads question, declined
    controller.import_nlst()
    controller.wait()
    (question,) = controller.view.of("ask")
    assert "13.6 MB for six models' files" in question[0] and "GitHub" in question[0]
    assert controller.logic.references() == [] and not controller.view.of("show_error")


def test_a_double_click_opens_only_a_https_viewer_link(controller):
    controller.find_by_patient(_inputs(patient="cavitary-0"))
    controller.wait()
    controller.hits = controller.hits.assign(viewer_url=["https://viewer.example/1", "javascript:alert(1)", None])
    for row in (0, 1, 2, 7, -1):
        controller.open_viewer(row)
    assert controller.view.of("open_url") == [("https://viewer.example/1",)]


def test_a_bug_in_a_task_is_shown_once_with_its_kind_and_the_buttons_come_back(controller, monkeypatch):
    def broken(*_, **__):
        raise KeyError("column")

    monkeypatch.setattr(controller.logic, "start_neighbors", broken)
    controller.find_by_patient(_inputs(patient="cavitary-0"))
    controller.wait()
    (error,) = controller.view.of("show_error")
    assert error[0].startswith("Unexpected error (KeyError") and "Python console" in error[0]
    assert not controller.busy and all(controller.actions()[a] for a in ("find", "find_image", "import"))


def test_an_error_is_shown_once_and_the_buttons_come_back(controller):
    controller.find_by_patient(_inputs(patient="no-such-patient"))
    controller.wait()
    (error,) = controller.view.of("show_error")
    assert "no-such-patient" in error[0] and all(controller.actions()[a] for a in ("find", "find_image", "import"))


# --- the first click is prepared when the module is entered ----------------------------------------------


@posix
def test_entering_the_module_loads_the_model_in_the_background(controller, query_nodes):
    volume, points = query_nodes
    controller.entered(_inputs())
    assert controller.view.last("show_references") == (["tumors"], "tumors")
    assert controller._warming is not None and not controller.busy  # the buttons stay usable meanwhile
    while controller._warming is not None:
        controller.poll(0.05)
    pid = controller.logic.worker().pid
    controller.find_from_image(_inputs(volume=volume, tumor=points))
    controller.wait()
    assert controller.logic.worker().pid == pid  # the prepared worker answered


def test_a_model_whose_weights_must_be_downloaded_is_not_loaded_on_entry(controller, monkeypatch):
    monkeypatch.setattr(controller.logic, "weights_to_download", lambda model: "https://example.org/w.pt")
    controller.entered(_inputs())
    assert controller._warming is None  # nothing is fetched without the user's consent


# --- loading matches: the size question every time, then beside the query --------------------------------


@posix
def test_loading_asks_the_download_size_every_time_even_once_downloads_are_allowed(
    controller, query_nodes, served, monkeypatch
):
    volume, points = query_nodes
    _pretend_installed(monkeypatch, {"idc-index": "0.9.0"})  # its install question is another test's
    folders, index = served
    bucket = IDCBucket(folders)
    cache = SeriesCache(controller.logic.home / "series", index, bucket)
    monkeypatch.setattr(controller.logic, "series_cache", lambda: cache)
    shown = []
    monkeypatch.setattr(controller.logic, "show_matches", lambda hits, files: shown.append((hits, files)))
    controller.find_from_image(_inputs(volume=volume, tumor=points))
    controller.wait()
    uids = list(folders)
    controller.hits = controller.hits.head(2).assign(SeriesInstanceUID=uids)  # matches whose series IDC holds

    controller.view.answers = [False]  # the first load: the opt-in, with the size
    controller.load_selected(_inputs())
    controller.wait()
    assert (
        "0 MB of CT series" in controller.view.last("ask")[0]
        and "Allow Similar Patients" in controller.view.last("ask")[0]
    )
    assert not shown and bucket.calls == 0 and not controller.logic.settings.downloads_allowed

    controller.logic.settings.downloads_allowed = True
    controller.view.answers = [True]
    controller.load_selected(_inputs(selected_rows=[1]))
    controller.wait()
    question = controller.view.last("ask")[0]
    assert "Download them?" in question and "for 1 patient(s)" in question  # asked although allowed
    assert bucket.calls == 1 and list(shown[-1][1]) == [uids[1]]
    asked = len(controller.view.of("ask"))
    controller.load_selected(_inputs(selected_rows=[1]))  # cached now: nothing to download, nothing to ask
    controller.wait()
    assert len(controller.view.of("ask")) == asked and bucket.calls == 1


@posix
def test_loading_from_the_sites_dicom_folder_asks_nothing_and_reads_it_once(
    controller, query_nodes, served, monkeypatch, tmp_path
):
    volume, points = query_nodes
    folders, _ = served
    controller.logic.settings.local_dicom_folder = str(next(iter(folders.values())).parent)
    shown = []
    monkeypatch.setattr(controller.logic, "show_matches", lambda hits, files: shown.append(files))
    controller.find_from_image(_inputs(volume=volume, tumor=points))
    controller.wait()
    controller.hits = controller.hits.head(2).assign(SeriesInstanceUID=list(folders))
    asked = len(controller.view.of("ask"))
    controller.load_selected(_inputs())
    controller.wait()
    assert len(controller.view.of("ask")) == asked and set(shown[0]) == set(folders)
    index = controller.logic._folders[controller.logic.settings.local_dicom_folder]
    known = dict(index._known)
    controller.load_selected(_inputs())
    controller.wait()
    assert index._known == known  # no file read again


def test_load_before_an_image_query_says_to_query_first(controller):
    controller.load_selected(_inputs())
    controller.wait()
    assert "Find similar patients from an image first" in controller.view.last("show_error")[0]


# --- settings and BigQuery --------------------------------------------------------------------------------


def test_the_downloads_opt_in_is_kept_and_can_be_taken_back(controller):
    settings = controller.logic.settings
    assert not settings.downloads_allowed
    controller.allow_downloads(True)
    assert ModuleSettings(settings.store).downloads_allowed
    controller.allow_downloads(False)
    assert not settings.downloads_allowed


def test_bigquery_needs_its_opt_in_its_package_and_calls_no_service_on_entry(controller, monkeypatch):
    from SimilarPatientsLib import cloud

    opened, local = [], cloud.open_reference

    def open_reference(name, store):
        if name.startswith("bq://"):
            opened.append(name)
            pytest.fail(f"{name} opened: a call to Google")
        return local(name, store)

    monkeypatch.setattr(cloud, "open_reference", open_reference)
    controller.bigquery_references_edited("my-project.embeddings.nlst; bad name!", _inputs())
    assert "not" in controller.view.last("show_error")[0].lower()  # the bad name is refused, nothing kept
    controller.bigquery_references_edited("my-project.embeddings.nlst", _inputs())
    assert controller.logic.references() == ["tumors"]  # listed only after the opt-in
    _pretend_installed(monkeypatch, {"google-cloud-bigquery": None})
    controller.view.answers = [False]
    controller.allow_bigquery(True, _inputs())
    assert not controller.logic.settings.bigquery_allowed  # declined its package: not allowed
    controller.view.answers = [True]
    controller.allow_bigquery(True, _inputs())
    assert [r.name for r in controller.installer.plans[-1].packages] == ["google-cloud-bigquery"]
    assert controller.logic.settings.bigquery_allowed
    controller.entered(_inputs(reference="bq://my-project.embeddings.nlst", model="CTFM"))
    assert controller.view.last("show_models") == (
        ["CTFM"],
        "CTFM",
        {"CTFM": "choose the reference again to list its models"},
    )
    assert not opened


def test_clearing_the_cache_removes_its_dicom_database_entries_first(controller, monkeypatch, tmp_path):
    removed = []
    database = types.SimpleNamespace(
        isOpen=True, databaseDirectory=str(tmp_path / "db"), removeSeries=lambda uid: removed.append(uid)
    )
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace(dicomDatabase=database))
    series = tmp_path / "db" / "SimilarPatients-series" / "1.2.3"
    series.mkdir(parents=True)
    (series / "a.dcm").write_bytes(b"x" * 1000)
    controller.clear_cache()
    assert removed == ["1.2.3"] and not series.exists()
    assert "MB of downloaded series deleted" in controller.view.last("show_status")[0]


def test_the_worker_opens_no_console_window_on_windows():
    from SimilarPatientsLib.scene.worker import process_group_options

    flags = process_group_options("nt")["creationflags"]
    assert flags & 0x08000000 and flags & 0x00000200  # CREATE_NO_WINDOW, CREATE_NEW_PROCESS_GROUP
    assert process_group_options("posix") == {"start_new_session": True}


# --- all models fused ---------------------------------------------------------------------------------


def test_the_fused_choice_is_offered_with_why_and_preselected_only_where_it_won(nlst_home, monkeypatch):
    """NLST-Sybil's committed evaluation found fusion below the best single model: offered, not preselected,
    its tooltip saying why; where a verdict says it is at least as good, it is preselected."""
    from SimilarPatientsLib.references import FUSED_CHOICE, FusionAdvice

    logic = ModuleLogic(ModuleSettings(MemorySettings()), nlst_home)
    view = RecordingView()
    controller = ModuleController(view, logic, installer=RecordingInstaller())
    controller.refresh_models("nlst-sybil")
    names, current, tooltips = view.last("show_models")
    assert names[-1] == FUSED_CHOICE and len(names) == 7 and current == "CTClipVit"
    assert "not preselected" in tooltips[FUSED_CHOICE] or "below" in tooltips[FUSED_CHOICE].lower()
    monkeypatch.setattr(
        "SimilarPatientsLib.references.fusion_default", lambda reference, metric: FusionAdvice(True, "it won")
    )
    controller.refresh_models("nlst-sybil")
    assert view.last("show_models")[1] == FUSED_CHOICE and view.last("show_models")[2][FUSED_CHOICE].endswith("it won")
    controller.refresh_models("nlst-sybil", "PASTA")  # the user's saved choice wins over the preference
    assert view.last("show_models")[1] == "PASTA"


def test_a_fused_search_by_patient_shows_each_models_rank(nlst_home):
    from SimilarPatientsLib.references import FUSED_CHOICE

    logic = ModuleLogic(ModuleSettings(MemorySettings()), nlst_home)
    view = RecordingView()
    controller = ModuleController(view, logic, installer=RecordingInstaller())
    controller.find_by_patient(Inputs(reference="nlst-sybil", model=FUSED_CHOICE, k=5, patient="100242"))
    controller.wait()
    table = view.last("show_results")[0]
    models = ["CTClipVit", "CTFM", "Merlin", "PASTA", "SUPREME", "VISTA3D"]
    assert table.titles[:3] == ["#", "Patient", "Similarity"]
    assert table.titles[3:9] == [f"{m} rank" for m in models] and table.titles[9] == "Distance"
    assert len(table.rows) == 5 and "100242" not in [row[1] for row in table.rows]
    assert all(cell.isdigit() or cell.startswith(">") or cell == "–" for row in table.rows for cell in row[3:9])
    assert all(row[2].startswith("closer than") for row in table.rows) and not view.of("show_error")


def test_a_fused_image_query_asks_one_licence_question_and_one_download_question(controller, home, monkeypatch):
    """The fused choice runs every model: one question lists every licence to accept, one every download."""
    logic = controller.logic
    monkeypatch.setattr(logic, "models_of", lambda reference, choice: ["CTFM", "VISTA3D", "SUPREME"])
    monkeypatch.setattr(logic, "needs_torch", lambda models: False)
    _pretend_installed(monkeypatch, {"pandas": "2.2.3"})
    controller.view.answers = [True, False]  # VISTA3D's and SuPreM's licences: yes; the downloads: not now
    controller.find_from_image(_inputs(model="All models (fused)", volume=object(), tumor=object()))
    controller.wait()
    licence, download = (question for (question,) in controller.view.of("ask"))
    assert licence.startswith("These models' weights are published under:\nVISTA3D: NVIDIA")
    assert "\nSUPREME: SuPreM weights" in licence and "CTFM" not in licence  # Apache-2.0: nothing to accept
    assert logic.licence_to_accept("VISTA3D") is None and logic.licence_to_accept("SUPREME") is None
    assert "CTFM: https://" in download and "VISTA3D: https://" in download
    assert controller.hits is None
