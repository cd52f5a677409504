"""The Slicer side, checked outside Slicer: packaging lists, Python 3.9 syntax, no Slicer imports in the
library, and the module's logic adapter and self-test run against a stand-in for the Slicer application."""

from __future__ import annotations

import ast
import io
import re
import sys
import types
import unittest
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "SimilarPatients"
LIB = MODULE / "SimilarPatientsLib"


def test_first_use_requirements_match_the_package():
    text = (ROOT / "pyproject.toml").read_text()
    dependencies = set(re.findall(r'^\s+"([^"]+)",$', text.split("[project.optional-dependencies]")[0], re.M))
    module = ast.parse((MODULE / "SimilarPatients.py").read_text())
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
    # torch comes from Slicer's PyTorch extension; SimpleITK and pydicom ship with Slicer
    assert set(embed_requirements) == embed - {"torch>=2.1", "SimpleITK>=2.2", "pydicom>=2.4"}


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
    slicer.util, slicer.ScriptedLoadableModule = util, loadable
    slicer.mrmlScene = types.SimpleNamespace(Clear=lambda: None)
    for name, module in {
        "slicer": slicer,
        "slicer.util": util,
        "slicer.ScriptedLoadableModule": loadable,
        "qt": types.ModuleType("qt"),
        "vtk": types.ModuleType("vtk"),
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
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


def test_image_query_runs_in_a_child_process_and_can_be_cancelled(slicer_module, tmp_path):
    """The adapter's file-level query (what the widget runs after writing the nodes to files)."""
    import numpy as np
    import pandas as pd
    import SimpleITK as sitk
    from conftest import store_frame
    from SimilarPatientsLib import Cancelled, SimilarPatientsError
    from SimilarPatientsLib.imaging.tumor import from_binary_mask
    from SimilarPatientsLib.models.embedder import Embedder
    from synthetic_ct import KINDS, tumor_ct

    embedder, rng, rows = Embedder("TumorDescriptor"), np.random.default_rng(3), []
    for i in range(3):
        for kind in KINDS:
            image, mask, _ = tumor_ct(kind, rng)
            embedding = embedder.embed(image, from_binary_mask(mask))[0]
            rows.append(
                {"model": embedding.model, "recipe": embedding.recipe, "PatientID": f"{kind}-{i}", "kind": kind}
                | {"embedding": embedding.vector}
            )
    store_frame(pd.DataFrame(rows), tmp_path / "home", "tumors")
    image, mask, centre = tumor_ct("cavitary", rng)
    sitk.WriteImage(image, str(tmp_path / "image.nrrd"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nrrd"))
    logic = slicer_module.SimilarPatientsLogic(tmp_path / "home")
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


def test_licence_and_download_prompts_follow_the_weights_state(slicer_module, home):
    logic = slicer_module.SimilarPatientsLogic(home)
    assert "Noncommercial" in logic.licenceToAccept("VISTA3D")
    logic.acceptLicence("VISTA3D")
    assert logic.licenceToAccept("VISTA3D") is None
    assert logic.licenceToAccept("CTFM") is None  # Apache-2.0: nothing to accept
    assert logic.weightsToDownload("CTFM").startswith("https://huggingface.co/project-lighter/")
