"""What the Slicer module's widget decides, driven without Qt through SimilarPatientsLib.ui's controller with a
view that records what it is asked to show: install order and consent, versions checked, the licence and
download questions, progress stages, the size question before every load, cancel without an error box, one
task at a time, the buttons enabled, BigQuery without network calls on entry, and the first click prepared
when the module is entered. The query worker, the references and (where a scene is needed) slicer-core's
MRML scene are real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import NLST_DIR, WorkerBucket, descriptor_reference
from SimilarPatientsLib.idc.download import UID_FILE, SeriesCache, series_key
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
    """Stands in for :class:`dependencies.SlicerInstaller` (pip in Slicer's Python): records the plans it
    installs; its dry run finds ``replaces`` (imported distributions the install would change)."""

    def __init__(self, after=None, replaces=(), failure=None):
        self.plans, self.after, self.replaces, self.failure = [], after, list(replaces), failure

    def resolve(self, plan):
        plan.replaces = list(self.replaces)
        return plan

    def install(self, plan):
        if self.failure:
            raise self.failure
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


#: idc-index at its lowest version for this Python: installed (most tests' install questions are not its).
IDC = {"idc-index": dependencies.DOWNLOAD[0].minimum}
#: The image query's PyPI packages, installed (in the Slicer lanes they are not: no torch there).
IMAGE_INSTALLED = {
    "monai": "1.4.0",
    "einops": "0.8.1",
    "safetensors": "0.5.3",
    "huggingface-hub": "0.36.0",
    "pooch": "1.8.2",
}


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


def test_the_installer_puts_torch_first_then_one_pip_call_with_slicers_and_imported_packages_pinned(monkeypatch):
    """torch through PyTorchUtils (no second question), then one pip call in Slicer's Python whose
    constraints pin torch, Slicer's packages and every distribution imported in this process (pandas here)."""
    calls, versions = [], {**IMAGE_INSTALLED, "torch": None, "monai": None}
    _pretend_installed(monkeypatch, versions)

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation, torchVersionRequirement):
            calls.append(("torch", askConfirmation, torchVersionRequirement))
            versions["torch"] = "2.4.1"
            return types.ModuleType("torch")

    def run_pip(arguments, what):
        constraints = arguments[arguments.index("--constraint") + 1]
        with open(constraints, encoding="utf-8") as stream:
            calls.append(("pip", arguments[: arguments.index("--constraint")], stream.read()))
        versions["monai"] = "1.4.0"

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    held = {name: version for name, version in dependencies.imported_distributions().items() if name != "torch"}
    monkeypatch.setattr(dependencies, "imported_distributions", lambda: held)  # torch: not yet, as pretended
    installer = dependencies.SlicerInstaller(testing=False)
    monkeypatch.setattr(installer, "run_pip", run_pip)
    installer.install(dependencies.plan(dependencies.IMAGE, torch=True))
    assert [c[0] for c in calls] == ["torch", "pip"]
    assert calls[0] == ("torch", False, ">=2.1")
    assert calls[1][1] == ["install", "monai>=1.4"]
    pinned = dict(line.split("==") for line in calls[1][2].split())
    assert pinned["torch"] == "2.4.1" and pinned["numpy"] == dependencies.installed_version("numpy")
    assert pinned["pandas"] == pd.__version__  # imported here: held at its version


def test_imported_distributions_are_those_whose_packages_are_imported():
    held = dependencies.imported_distributions()
    assert held["pandas"] == pd.__version__ and held["numpy"] == np.__version__
    assert "ruff" not in held  # installed (a program), never imported


def test_a_plan_that_cannot_keep_the_imported_versions_names_what_it_replaces(monkeypatch):
    """The dry run with the imported versions held fails (idc-index 0.10 wants pandas <= 2.2.4 while 2.3.3 is
    imported): the plan is resolved again without them, and says which imported distributions change."""
    installer = dependencies.SlicerInstaller(testing=False)
    tried = []

    def dry_run(requirements, constraints):
        tried.append(constraints)
        if "pandas==" in constraints:
            raise dependencies.SimilarPatientsError("ResolutionImpossible")
        return {"pandas": "2.2.3", "idc-index": "0.10.2", "sphinx": "7.4.7"}

    monkeypatch.setattr(installer, "dry_run", dry_run)
    monkeypatch.setattr(dependencies, "imported_distributions", lambda: {"pandas": "2.3.3", "numpy": "1.26.4"})
    plan = installer.resolve(dependencies.InstallPlan(None, list(dependencies.DOWNLOAD)))
    assert plan.replaces == [("pandas", "2.3.3", "2.2.3")] and len(tried) == 2
    assert "pandas 2.3.3 → 2.2.3" in plan.restart_question() and "restart" in plan.restart_question()
    monkeypatch.setattr(installer, "dry_run", lambda requirements, constraints: {"idc-index": "0.13.4"})
    assert installer.resolve(dependencies.InstallPlan(None, list(dependencies.DOWNLOAD))).replaces == []


def test_a_pip_failure_is_one_message_with_pips_last_lines(tmp_path):
    """Real pip, no network: a wheel that is not there. The error names what was installed and pip's words."""
    installer = dependencies.SlicerInstaller(python=sys.executable, testing=False)
    missing = tmp_path / "nowhere-1.0-py3-none-any.whl"
    with pytest.raises(dependencies.SimilarPatientsError) as raised:
        installer.pip([str(missing)], "")
    message = str(raised.value)
    assert message.startswith(f"Installing {missing} failed (pip exit code 1)")
    assert "does not exist" in message and "internet connection" in message


def test_in_testing_mode_nothing_is_installed_and_the_refusal_says_what_is_missing(monkeypatch):
    """Slicer's --testing (the extensions build machine): no pip, no dry run; an empty plan is fine."""
    _pretend_installed(monkeypatch, {"pandas": None})
    installer = dependencies.SlicerInstaller(testing=True)
    monkeypatch.setattr(installer, "run_pip", lambda *a: pytest.fail("pip ran under --testing"))
    for step in (installer.resolve, installer.install):
        with pytest.raises(dependencies.SimilarPatientsError, match=r"testing mode.*pandas>=2.0"):
            step(dependencies.plan(dependencies.SEARCH))
    installer.install(dependencies.plan(dependencies.IMAGE[:0]))


def test_an_install_that_did_not_take_is_an_error_naming_the_packages(monkeypatch):
    _pretend_installed(monkeypatch, {**IMAGE_INSTALLED, "monai": None})
    installer = dependencies.SlicerInstaller(testing=False)
    monkeypatch.setattr(installer, "pip", lambda requirements, constraints: None)
    with pytest.raises(dependencies.SimilarPatientsError, match=r"Installing monai>=1.4 did not succeed"):
        installer.install(dependencies.plan(dependencies.IMAGE))


def test_a_failed_torch_install_is_an_install_failure(monkeypatch):
    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation, torchVersionRequirement):
            raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip"])

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    with pytest.raises(dependencies.SimilarPatientsError, match=r"Installing PyTorch .* failed \(pip exit code 1"):
        dependencies.SlicerInstaller(testing=False).install_torch()


def test_without_the_pytorch_extension_an_image_query_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    with pytest.raises(dependencies.SimilarPatientsError, match="install the 'PyTorch' extension"):
        dependencies.SlicerInstaller().install_torch()


@posix
def test_one_click_asks_once_for_everything_it_installs_and_declining_installs_nothing(
    controller, query_nodes, monkeypatch
):
    volume, points = query_nodes
    versions = {**IMAGE_INSTALLED, "pandas": "1.5.3", "monai": None, "torch": None, "idc-index": None}
    _pretend_installed(monkeypatch, versions)
    controller.view.answers = [False]
    controller.find_from_image(_inputs(model="CTFM", volume=volume, tumor=points))
    controller.wait()
    assert len(controller.view.of("ask")) == 1 and not controller.installer.plans
    assert "Nothing was installed" in controller.view.last("show_status")[0] and not controller.view.of("show_error")

    controller.installer.after = lambda: versions.update(pandas="2.2.3", monai="1.4.0", torch="2.4.1", **IDC)
    controller.view.answers = [True, False]  # install: yes; download CT-FM's weights: not now
    controller.find_from_image(_inputs(model="CTFM", volume=volume, tumor=points))
    controller.wait()
    install, download = (question for (question,) in controller.view.of("ask")[1:])
    assert "PyTorch" in install and "pandas>=2.0" in install and "monai>=1.4" in install
    assert "These weights would be downloaded:\nCTFM: https://" in download
    (plan,) = controller.installer.plans
    assert plan.torch == "not installed" and [r.name for r in plan.packages] == ["pandas", "monai", "idc-index"]
    assert controller.view.of("show_references")  # the first install lists the references
    assert controller.hits is None and not controller.view.of("show_error")  # nothing fetched, nothing asked twice


@posix
def test_the_weight_free_model_installs_no_torch(controller, query_nodes, monkeypatch):
    volume, points = query_nodes
    versions = {"pandas": "1.5.3", "monai": None, "torch": None, **IDC}
    _pretend_installed(monkeypatch, versions)
    controller.installer.after = lambda: versions.update(pandas="2.2.3")
    controller.find_from_image(_inputs(volume=volume, tumor=points))
    controller.wait()
    (plan,) = controller.installer.plans
    assert plan.torch is None and [r.name for r in plan.packages] == ["pandas"]
    assert len(controller.hits) == 3


def test_the_first_use_installs_search_downloads_and_bigquery_in_one_plan_with_one_consent(controller, monkeypatch):
    """A search by patient on a fresh Slicer: one question and one pip plan with the search packages,
    idc-index (the first Load needs it: pip resolves it with pandas now, not later against an imported
    pandas) and, BigQuery being allowed, google-cloud-bigquery."""
    versions = {"pandas": None, "idc-index": None, "google-cloud-bigquery": None}
    _pretend_installed(monkeypatch, versions)
    controller.logic.settings.bigquery_allowed = True
    controller.installer.after = lambda: versions.update(pandas="2.2.3", **IDC, **{"google-cloud-bigquery": "3.17"})
    controller.find_by_patient(_inputs(patient="cavitary-0"))
    controller.wait()
    (question,) = controller.view.of("ask")
    assert "pandas>=2.0" in question[0] and "idc-index>=" in question[0] and "google-cloud-bigquery>=" in question[0]
    (plan,) = controller.installer.plans
    assert {"pandas", "idc-index", "google-cloud-bigquery"} <= {r.name for r in plan.packages}
    assert len(controller.hits) == 3 and not controller.view.of("show_error")


def test_without_idc_index_the_first_load_installs_it_before_any_download(controller, monkeypatch):
    """Searches installed, idc-index not (a module from before the one plan): Load asks for it, and
    declining downloads nothing."""
    _pretend_installed(monkeypatch, {"idc-index": None})
    controller.hits, controller.image_hits = pd.DataFrame({"PatientID": ["P1"], "SeriesInstanceUID": ["1.2"]}), True
    monkeypatch.setattr(controller.logic, "download_size", lambda chosen: pytest.fail("sized before idc-index"))
    controller.view.answers = [False]
    controller.load_selected(_inputs())
    controller.wait()
    (question,) = controller.view.of("ask")
    assert "idc-index>=" + dependencies.DOWNLOAD[0].minimum in question[0]
    assert "Nothing was installed" in controller.view.last("show_status")[0] and not controller.installer.plans


def test_an_install_that_would_replace_imported_packages_happens_only_with_a_restart(controller, monkeypatch):
    """The dry run says pandas 2.3.3 (imported) would become 2.2.3: the module asks to install and restart;
    declined, nothing is installed and nothing searched; accepted, it installs and restarts Slicer, and
    does not go on with old and new versions mixed."""
    versions = {"pandas": None, "idc-index": None}
    _pretend_installed(monkeypatch, versions)
    controller.installer.replaces = [("pandas", "2.3.3", "2.2.3")]
    controller.view.answers = [True, False]
    controller.find_by_patient(_inputs(patient="cavitary-0"))
    controller.wait()
    restart = controller.view.of("ask")[1][0]
    assert "pandas 2.3.3 → 2.2.3" in restart and "restart" in restart.lower()
    assert not controller.installer.plans and controller.hits is None and not controller.view.of("restart")
    assert "packages in use were kept" in controller.view.last("show_status")[0]

    controller.view.answers = [True, True]
    controller.find_by_patient(_inputs(patient="cavitary-0"))
    controller.wait()
    assert len(controller.installer.plans) == 1 and controller.view.of("restart") == [()]
    assert controller.hits is None and not controller.view.of("show_error")


def test_a_failed_install_is_one_clear_error_and_bigquery_is_unticked(controller, monkeypatch):
    """pip's failure reaches the user once, as an install failure with pip's words, not "Unexpected
    error"; the BigQuery opt-in whose install failed is unticked."""
    _pretend_installed(monkeypatch, {"pandas": None, "google-cloud-bigquery": None})
    failure = dependencies.SimilarPatientsError("Installing pandas>=2.0 failed (pip exit code 1). ... pip said: x")
    controller.installer.failure = failure
    controller.find_by_patient(_inputs(patient="cavitary-0"))
    controller.wait()
    assert controller.view.of("show_error") == [(str(failure),)] and not controller.busy
    controller.allow_bigquery(True, _inputs())
    assert controller.view.of("show_error")[-1] == (str(failure),) and len(controller.view.of("show_error")) == 2
    assert controller.view.last("show_bigquery_allowed") == (False,)
    assert not controller.logic.settings.bigquery_allowed


def test_a_search_in_the_controller_imports_no_torch_into_slicers_process(tmp_path):
    """Only the query worker (its own process) needs torch and MONAI: the module's logic, controller and a
    search by patient leave them out of Slicer's process (a fresh interpreter stands for it)."""
    code = (
        "import sys, numpy as np, pandas as pd\n"
        "from SimilarPatientsLib.references import schema\n"
        "from SimilarPatientsLib.references.store import ReferenceStore\n"
        "from SimilarPatientsLib.ui import Inputs, MemorySettings, ModuleController, ModuleLogic, ModuleSettings\n"
        "home = sys.argv[1]\n"
        "vectors = list(np.random.default_rng(0).standard_normal((12, 4)))\n"
        "frame = pd.DataFrame({'model': 'M', 'PatientID': [f'P{i}' for i in range(12)], 'embedding': vectors})\n"
        "ReferenceStore(home).write('r', schema.from_frame(frame), 'torch test')\n"
        "class View:\n"
        "    def ask(self, question, title): return True\n"
        "    def __getattr__(self, name): return lambda *a: print(name, *a) if name == 'show_error' else None\n"
        "logic = ModuleLogic(ModuleSettings(MemorySettings()), home, python=sys.executable)\n"
        "controller = ModuleController(View(), logic)\n"
        "inputs = Inputs(reference='r', model='M', k=3, patient='P1')\n"
        "controller.entered(inputs)\n"
        "controller.find_by_patient(inputs)\n"
        "controller.wait()\n"
        "assert len(controller.hits) == 3, controller.hits\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


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
    assert controller.busy and [a for a, on in controller.actions().items() if on] == ["find_image"]  # its Cancel
    assert controller.view.last("show_running") == ("find_image",)
    controller.wait()
    stages = [message for _, message in controller.view.of("update_progress")]
    for stage in ("reading the CT", "cropping the tumor", "embedding with TumorDescriptor", "searching"):
        assert stage in stages
    table = controller.view.last("show_results")[0]
    assert table.titles[:4] == ["#", "Patient", "Similarity", "Distance"] and len(table.rows) == 3
    query_picture, _ = controller.view.of("show_thumbnails")[0]
    assert query_picture and os.path.isfile(query_picture)
    assert controller.actions()["load"] and controller.view.last("show_progress") == (None,)
    assert controller.view.last("show_running") == (None,) and not controller.view.of("show_error")
    logged = [line for (line,) in controller.view.of("log")]  # one line per stage, in order, the title first
    assert logged[0] == "Finding similar patients" and len(logged) == len(set(logged))
    assert logged.index("cropping the tumor") < logged.index("searching")

    controller.find_by_patient(_inputs(patient="cavitary-0"))  # a patient search has no CT to load beside
    controller.wait()
    assert len(controller.hits) == 3 and not controller.actions()["load"]


@posix
def test_another_action_during_a_query_is_refused_and_the_query_is_answered(controller, query_nodes):
    """Reproduces the nested query: the first query's answer must arrive and nothing runs twice."""
    volume, points = query_nodes
    controller.find_from_image(_inputs(volume=volume, tumor=points))
    controller.find_by_patient(_inputs(patient="cavitary-0"))
    controller.import_nlst()
    assert controller.view.of("show_status").count(("Wait for the current task to finish, or cancel it.",)) == 2
    controller.wait()
    assert len(controller.view.of("show_results")) == 1 and len(controller.hits) == 3


@posix
def test_the_running_actions_button_is_its_cancel(controller, query_nodes):
    volume, points = query_nodes
    controller.find_from_image(_inputs(volume=volume, tumor=points))
    controller.find_from_image(_inputs(volume=volume, tumor=points, k=5))  # the same button, now Cancel
    assert not controller.busy and controller.view.last("show_status") == ("Cancelled.",)
    assert controller.view.last("show_running") == (None,) and controller.hits is None
    assert not controller.view.of("show_error") and controller.actions()["find_image"]


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


def test_the_log_has_a_line_per_stage_not_per_count(controller):
    """A download's megabytes change every half second: the bar follows them, the log names the stage once;
    brackets that are part of a stage's name (the fused choice) stay."""
    controller._stage = ""
    for message in (
        "starting the query worker and loading All models (fused)",
        "downloading series 1 of 2 (0.4 of 61.0 MB)",
        "downloading series 1 of 2 (12.9 of 61.0 MB)",
        "downloading series 2 of 2 (30.6 of 61.0 MB)",
        "downloading series 2 of 2 (58.2 of 61.0 MB)",
    ):
        controller._progress(1, 2, message)
    assert controller.view.of("log") == [
        ("starting the query worker and loading All models (fused)",),
        ("downloading series 1 of 2",),
        ("downloading series 2 of 2",),
    ]
    assert controller.view.last("update_progress") == (0.5, "downloading series 2 of 2 (58.2 of 61.0 MB)")


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
    pid, jobs = controller.logic.worker().pid, controller.logic.worker("jobs").pid
    assert jobs is not None  # the jobs worker started too, opening the reference for a search by patient
    controller.find_from_image(_inputs(volume=volume, tumor=points))
    controller.wait()
    assert controller.logic.worker().pid == pid  # the prepared worker answered
    controller.find_by_patient(_inputs(patient="cavitary-0"))
    controller.wait()
    assert controller.logic.worker("jobs").pid == jobs and len(controller.hits) == 3


def test_a_model_whose_weights_must_be_downloaded_is_not_loaded_on_entry(controller, monkeypatch):
    monkeypatch.setattr(controller.logic, "weights_to_download", lambda model: "https://example.org/w.pt")
    controller.entered(_inputs())
    assert controller._warming is None  # nothing is fetched without the user's consent


# --- loading matches: the size question every time, then beside the query --------------------------------


@posix
def test_loading_asks_the_download_size_every_time_even_once_downloads_are_allowed(
    controller, query_nodes, served, monkeypatch, tmp_path
):
    volume, points = query_nodes
    _pretend_installed(monkeypatch, IDC)  # its install question is another test's
    folders, index = served
    bucket = WorkerBucket(folders, tmp_path, monkeypatch)
    cache = SeriesCache(controller.logic.home / "series", index)
    monkeypatch.setattr(controller.logic, "series_cache", lambda: cache)
    shown = []
    monkeypatch.setattr(controller.logic, "show_matches", lambda hits, files, **_: shown.append((hits, files)))
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
    assert not shown and not bucket.downloads and not controller.logic.settings.downloads_allowed

    controller.logic.settings.downloads_allowed = True
    controller.view.answers = [True]
    controller.load_selected(_inputs(selected_rows=[1]))
    controller.wait()
    question = controller.view.last("ask")[0]
    assert "Download them?" in question and "for 1 patient(s)" in question  # asked although allowed
    assert len(bucket.downloads) == 1 and list(shown[-1][1]) == [uids[1]]
    asked = len(controller.view.of("ask"))
    controller.load_selected(_inputs(selected_rows=[1]))  # cached now: nothing to download, nothing to ask
    controller.wait()
    assert len(controller.view.of("ask")) == asked and len(bucket.downloads) == 1


@posix
def test_loading_from_the_sites_dicom_folder_asks_nothing_and_reads_it_once(
    controller, query_nodes, served, monkeypatch, tmp_path
):
    volume, points = query_nodes
    folders, _ = served
    controller.logic.settings.local_dicom_folder = str(next(iter(folders.values())).parent)
    shown = []
    monkeypatch.setattr(controller.logic, "show_matches", lambda hits, files, **_: shown.append(files))
    controller.find_from_image(_inputs(volume=volume, tumor=points))
    controller.wait()
    controller.hits = controller.hits.head(2).assign(SeriesInstanceUID=list(folders))
    asked = len(controller.view.of("ask"))
    controller.load_selected(_inputs())
    controller.wait()
    assert len(controller.view.of("ask")) == asked and set(shown[0]) == set(folders)
    uid = next(iter(folders))
    first = shown[0][uid][0]  # made unreadable with its size and time kept: only a second read would see it
    stat = os.stat(first)
    with open(first, "r+b") as stream:
        stream.write(b"\0" * stat.st_size)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    controller.load_selected(_inputs())
    controller.wait()
    assert shown[1][uid] == shown[0][uid]  # the worker kept its index of the folder: no file read again


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
    _pretend_installed(monkeypatch, {"google-cloud-bigquery": None, **IDC})
    controller.view.answers = [False]
    controller.allow_bigquery(True, _inputs())
    assert not controller.logic.settings.bigquery_allowed  # declined its package: not allowed
    assert controller.view.last("show_bigquery_allowed") == (False,)  # and the box unticked
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
    series = tmp_path / "db" / "SimilarPatients-series" / series_key("1.2.3")
    series.mkdir(parents=True)
    (series / "a.dcm").write_bytes(b"x" * 1000)
    (series / UID_FILE).write_text("1.2.3", encoding="utf-8")
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

    logic = ModuleLogic(ModuleSettings(MemorySettings()), nlst_home, python=sys.executable)
    view = RecordingView()
    controller = ModuleController(view, logic, installer=RecordingInstaller())
    controller.find_by_patient(Inputs(reference="nlst-sybil", model=FUSED_CHOICE, k=5, patient="100242"))
    controller.wait()
    logic.cleanup()
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


# --- cancel, whatever runs ------------------------------------------------------------------------------


def _poll_until(controller, condition, timeout=60.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert controller.busy, "the task ended before the moment to cancel it"
        assert time.monotonic() < deadline, "the moment to cancel never came"
        controller.poll(0.05)


def _alive(pid: int, within: float = 0.0) -> bool:
    """Whether process ``pid`` still runs ``within`` seconds from now (a SIGKILL takes effect when the process
    is next scheduled; a zombie waiting for its parent does not run)."""
    import time

    deadline = time.monotonic() + within
    while True:
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as stream:
                if stream.read().split(")")[-1].split()[0] == "Z":
                    return False
        except FileNotFoundError:
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.05)


def test_cancel_pressed_during_an_install_ends_the_task_when_the_install_returns(controller, monkeypatch):
    """Slicer's pip and torch installs spin Qt's event loop (processEvents per line), where the user presses
    Cancel: that used to close the task's generator from inside itself (ValueError: generator already
    executing) and leave the task running. Now the install finishes, nothing more is asked or run, and the
    module is ready again, with a status line and no error."""
    _pretend_installed(monkeypatch, {"pandas": "1.5.3"})
    seen = []

    def cancel_from_the_nested_event_loop():
        controller.cancel()  # what the Cancel button's slot does inside processEvents
        seen.append((controller.busy, controller.actions()))

    controller.installer.after = cancel_from_the_nested_event_loop
    controller.find_by_patient(_inputs(patient="cavitary-0"))
    ((busy, actions),) = seen
    assert busy and not any(actions.values())  # still in the install: the Cancel button is off meanwhile
    assert not controller.busy and controller.view.last("show_status") == ("Cancelled.",)
    assert controller.view.last("show_running") == (None,) and controller.hits is None
    assert ("cancelling: the current step finishes first",) in controller.view.of("log")
    assert not controller.view.of("show_error") and all(controller.actions()[a] for a in ("find", "import"))


def test_cancel_pressed_while_the_matches_are_imported_stops_before_any_is_loaded(controller, monkeypatch):
    """The DICOM import of each match spins Qt's event loop (ctkDICOMIndexer waits in a QEventLoop): a Cancel
    pressed there stops before the next series, loads no volume, and raises nothing."""
    slicer = pytest.importorskip("slicer", reason="slicer-core's module stands for Slicer's")
    imported = []

    def import_dicom(folder):
        imported.append(folder)
        controller.cancel()  # pressed while the first series is imported

    dicom_lib = types.ModuleType("DICOMLib")
    dicom_lib.DICOMUtils = types.SimpleNamespace(importDicom=import_dicom)
    monkeypatch.setitem(sys.modules, "DICOMLib", dicom_lib)
    loaded = []
    monkeypatch.setattr("SimilarPatientsLib.scene.matches.load_series", lambda *a: loaded.append(a))
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    logic = controller.logic
    query_volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")  # the query's CT, in the scene
    logic.last_volume, logic.last_seed_lps = query_volume, [0.0, 0.0, 0.0]
    fetched = {"files": {"1.2.3": ["/a/1.dcm"], "1.2.4": ["/b/1.dcm"]}}
    monkeypatch.setattr(logic, "start_fetch", lambda hits, progress: _Answered(fetched))
    controller.hits, controller.image_hits = pd.DataFrame({"SeriesInstanceUID": ["1.2.3", "1.2.4"]}), True
    logic.settings.local_dicom_folder = "/a"  # nothing to download, nothing to ask
    controller.load_selected(_inputs())
    controller.wait(10)
    assert imported == ["/a"] and not loaded  # the second series was not imported, no volume was read
    assert controller.view.last("show_status") == ("Cancelled.",) and not controller.view.of("show_error")
    assert controller.view.last("show_running") == (None,) and controller.actions()["load"]


class _Answered:
    """A request answered already (the worker's part is not what these tests are about)."""

    def __init__(self, answer):
        self.answer = answer

    def poll(self, timeout=0.0):
        return True

    def result(self):
        return self.answer

    def cancel(self):
        pass


@posix
def test_cancel_mid_download_ends_s5cmd_keeps_nothing_and_the_next_load_succeeds(
    controller, query_nodes, served, monkeypatch, tmp_path
):
    """Cancel in the middle of a series: the worker and its download child (s5cmd's place) end, their staging
    folder goes, nothing enters the cache; a Load at once downloads into a folder of its own and succeeds
    (it used to share the cancelled one's folder and fail with a false "cut short")."""
    volume, points = query_nodes
    _pretend_installed(monkeypatch, IDC)
    folders, index = served
    bucket = WorkerBucket(folders, tmp_path, monkeypatch, pause=0.3)  # 12 files: 3.6 s each
    cache = SeriesCache(tmp_path / "series", index)
    monkeypatch.setattr(controller.logic, "series_cache", lambda: cache)
    shown = []
    monkeypatch.setattr(controller.logic, "show_matches", lambda hits, files, **_: shown.append(files))
    controller.logic.settings.downloads_allowed = True
    controller.find_from_image(_inputs(volume=volume, tumor=points))
    controller.wait()
    uids = list(folders)
    controller.hits = controller.hits.head(2).assign(SeriesInstanceUID=uids)

    before = len(controller.view.of("update_progress"))

    def part_downloaded():
        return [(f, m) for f, m in controller.view.of("update_progress")[before:] if f and 0 < f < 0.5]

    query_worker = controller.logic.worker().pid
    controller.load_selected(_inputs())
    _poll_until(controller, part_downloaded)
    (_, message), *_ = part_downloaded()
    assert message.startswith("downloading series 1 of 2 (") and message.endswith(" MB)")  # bytes, mid-series
    (download,) = bucket.downloads
    assert _alive(download["pid"])
    controller.load_selected(_inputs())  # the Load button is the Cancel now
    assert not controller.busy and controller.view.last("show_status") == ("Cancelled.",)
    assert not _alive(download["pid"], within=5.0) and not os.path.exists(download["staging"])
    assert controller.logic.worker().pid == query_worker  # the query worker and its loaded model are kept
    assert not shown and (not cache.root.exists() or not any(cache.root.iterdir()))

    description = os.environ["SIMILARPATIENTS_TEST_BUCKET"]  # no pause now: the next load runs through
    with open(description, encoding="utf-8") as stream:
        served_now = dict(json.load(stream), pause=0.0)
    with open(description, "w", encoding="utf-8") as stream:
        json.dump(served_now, stream)
    controller.load_selected(_inputs())
    controller.wait()
    assert not controller.view.of("show_error"), controller.view.of("show_error")
    assert set(shown[0]) == set(uids) and all(len(files) == 12 for files in shown[0].values())
    assert sorted(p.name for p in cache.root.iterdir()) == sorted(map(series_key, uids))  # no staging left


def test_cancel_mid_import_stores_nothing_and_the_module_is_ready(empty_controller, monkeypatch):
    controller = empty_controller
    monkeypatch.setenv("SIMILARPATIENTS_NLST_SYBIL_DIR", str(NLST_DIR))
    controller.import_nlst()
    _poll_until(controller, lambda: controller.view.of("update_progress"))
    controller.import_nlst()  # its button is the Cancel
    assert not controller.busy and controller.view.last("show_status") == ("Cancelled.",)
    assert controller.logic.references() == [] and not controller.view.of("show_error")
    assert all(controller.actions()[a] for a in ("import", "find", "find_image"))


@posix
def test_cancel_while_the_matches_thumbnails_are_drawn_keeps_the_hits(controller, query_nodes, served, monkeypatch):
    """The thumbnail stage is busy (no count) and used to run with no progress display and no Cancel: its
    button stays the Cancel through it, and cancelling keeps the table that was already shown."""
    volume, points = query_nodes
    folders, _ = served
    logic = controller.logic

    def thumbnails(hits, progress=None):
        series = [{"uid": uid, "centre": [0.0, 0.0, 0.0]} for uid in folders]
        local = str(next(iter(folders.values())).parent)
        return logic.worker("jobs").submit(
            "thumbnails", progress, folder=str(logic.thumbnail_folder()), series=series, local_folder=local
        )

    monkeypatch.setattr(logic, "start_match_thumbnails", thumbnails)
    controller.find_from_image(_inputs(volume=volume, tumor=points))
    _poll_until(controller, lambda: ("drawing the matches found on this computer",) in controller.view.of("log"))
    assert controller.actions()["find_image"] and controller.view.last("show_running") == ("find_image",)
    assert controller.view.last("show_progress") != (None,)  # the display stays through the busy stage
    controller.find_from_image(_inputs(volume=volume, tumor=points))
    assert not controller.busy and controller.view.last("show_status") == ("Cancelled.",)
    assert len(controller.hits) == 3 and not controller.view.of("show_error")
