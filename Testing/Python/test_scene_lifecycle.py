"""The module's results live as long as the scene's nodes they name, on slicer-core's real scene: Close Scene
(``vtkMRMLScene.Clear``, which also hands the next CT the old query's node ID) or removing the query's CT
drops the hits, their thumbnails, the comparison and the remembered CT, and turns Load off; loading matches
beside a CT that is no longer in the scene is refused before anything is imported or shown."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import descriptor_reference
from SimilarPatientsLib import SimilarPatientsError
from SimilarPatientsLib.scene.watch import SceneWatch
from SimilarPatientsLib.ui import Inputs, MemorySettings, ModuleController, ModuleLogic, ModuleSettings
from synthetic_ct import tumor_ct, write_dicom_series
from test_module_controller import RecordingInstaller, RecordingView

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the query worker's process group as on POSIX")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lifecycle")
    descriptor_reference(folder / "home", 2, np.random.default_rng(5))
    return folder / "home"


@pytest.fixture
def module(mrml_application, home):
    """The controller as the widget wires it: the scene's closing and node removals go to it."""
    logic = ModuleLogic(ModuleSettings(MemorySettings()), home, python=sys.executable)
    controller = ModuleController(RecordingView(), logic, installer=RecordingInstaller())
    watch = SceneWatch(mrml_application.scene, controller.scene_closed, controller.node_removed)
    yield controller
    watch.remove()
    logic.cleanup()


def _ct(scene, folder, kind: str, seed: int):
    """A synthetic CT read into the scene by Slicer's storage node, and its tumor centre (LPS)."""
    image, _, centre = tumor_ct(kind, np.random.default_rng(seed))
    path = folder / f"{kind}-{seed}.nrrd"
    sitk.WriteImage(image, str(path))
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"CT {kind}")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(volume)
    return volume, centre


def _query(controller, scene, folder):
    volume, centre = _ct(scene, folder, "cavitary", 1)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPoint(-centre[0], -centre[1], centre[2])
    controller.find_from_image(Inputs("tumors", "TumorDescriptor", 3, volume=volume, tumor=points))
    controller.wait()
    assert controller.actions()["load"] and controller.logic.last_volume is volume
    return volume


def test_close_scene_drops_the_results_and_load_is_refused_beside_another_ct(module, mrml_application, tmp_path):
    scene, view = mrml_application.scene, module.view
    query = _query(module, scene, tmp_path)
    old_id = query.GetID()
    arrangement = scene.layout_logic.GetLayoutNode().GetViewArrangement()

    scene.Clear(0)  # File > Close Scene
    assert module.hits is None and not module.actions()["load"]
    assert view.last("show_results")[0].rows == [] and view.last("show_thumbnails") == (None, {})
    assert module.logic.last_volume is None and module.logic.comparison is None

    other, _ = _ct(scene, tmp_path, "spiculated", 2)  # another patient's CT: it gets the old query's ID
    assert other.GetID() == old_id
    module.load_selected(Inputs("tumors", "TumorDescriptor", 3))
    module.wait()
    assert "Find similar patients from an image first" in view.last("show_error")[0]
    assert not mrml_application.imported and scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
    assert scene.layout_logic.GetLayoutNode().GetViewArrangement() == arrangement  # no view switched


def test_matches_are_not_shown_beside_a_ct_no_longer_in_the_scene(module, mrml_application, tmp_path):
    """Even with the old CT still remembered (as before this was fixed), the logic refuses it before any
    series is imported or loaded, and the views are not switched."""
    scene = mrml_application.scene
    query = _query(module, scene, tmp_path)
    image, _, centre = tumor_ct("smooth", np.random.default_rng(3), size=(32, 32, 12))
    uid = str(write_dicom_series(image, tmp_path / "match")[0].SeriesInstanceUID)
    hits = pd.DataFrame([{"rank": 1, "PatientID": "P1", "distance": 0.1, "SeriesInstanceUID": uid}])
    hits = hits.assign(center_x=centre[0], center_y=centre[1], center_z=centre[2])
    files = {uid: sorted(str(p) for p in (tmp_path / "match").iterdir())}
    seed = module.logic.last_seed_lps
    arrangement = scene.layout_logic.GetLayoutNode().GetViewArrangement()
    scene.Clear(0)
    _ct(scene, tmp_path, "spiculated", 2)
    with pytest.raises(SimilarPatientsError, match="no longer in the scene"):
        module.logic.show_matches(hits, files, query, seed)
    assert not mrml_application.imported and scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
    assert scene.layout_logic.GetLayoutNode().GetViewArrangement() == arrangement


def test_removing_the_query_ct_drops_its_results_and_other_nodes_do_not(module, mrml_application, tmp_path):
    scene = mrml_application.scene
    query = _query(module, scene, tmp_path)
    scene.RemoveNode(scene.GetFirstNodeByClass("vtkMRMLMarkupsFiducialNode"))  # the tumor's point: kept
    assert module.actions()["load"] and module.logic.last_volume is query
    scene.RemoveNode(query)
    assert module.hits is None and not module.actions()["load"] and module.logic.last_volume is None
