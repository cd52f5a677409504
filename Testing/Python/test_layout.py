"""The library's layout holds: every file packaged for Slicer, Python 3.9 grammar, no GUI imports, imports
only downward between the stages, the extras' packages named once, and a base install (no extras) that
imports every module and stops each extra-needing command with the extra to install."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import store_frame, synthetic_frame
from SimilarPatientsLib.util.optional import EXTRAS

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "SimilarPatients"
LIB = MODULE / "SimilarPatientsLib"
LIB_FILES = sorted(LIB.rglob("*.py"))

#: Which subpackages each subpackage may import (errors, progress and the version: anyone). The top-level modules
#: (query, demo) and cli/ sit above the stages, and scene/ (what the Slicer module talks to) above them all.
MAY_IMPORT = {
    "util": set(),
    "idc": {"util"},
    "search": {"util"},
    "imaging": {"util"},
    "references": {"util", "idc", "search"},
    "models": {"util", "imaging", "references"},
    "evaluation": {"util", "search", "references"},
    "maps": {"util", "search", "references", "idc"},
    "cloud": {"util", "search", "references"},
    # the Slicer-facing layer: nodes in, the library's inputs out; the worker runs query_image
    "scene": {"util", "idc", "search", "references", "imaging", "models", "query", "cloud"},
    # what the Slicer module decides, without Qt: it drives scene/ and the worker
    "ui": {"util", "idc", "search", "references", "imaging", "models", "query", "cloud", "scene"},
    # reference builds on Apache Beam: manifests, stages, shards; the BigQuery load through cloud/
    "pipeline": {"util", "idc", "references", "imaging", "models", "cloud"},
    # the command line: every stage a command runs, and the top-level query and demo (never the Slicer side)
    "cli": {"util", "idc", "search", "references", "imaging", "models", "evaluation", "maps", "cloud", "pipeline"}
    | {"query", "demo"},
}
BASE = {"errors", "progress", "__version__"}  # and the package's version number


def test_cmake_lists_every_library_file_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(re.findall(r"\$\{MODULE_NAME\}(\S+)", text))
    on_disk = {"Lib/" + p.relative_to(LIB).as_posix() for p in LIB_FILES} | {".py"}
    assert {entry for entry in listed if entry.endswith(".py")} == on_disk
    for resource in re.findall(r"(Resources/\S+)", text):
        assert (MODULE / resource.replace("${MODULE_NAME}", "SimilarPatients")).exists(), resource


def _imports(path: Path, module_level: bool = False) -> set:
    """Top-level names of the packages a file imports (absolute imports only), anywhere in it or only in
    its module-level statements."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = list(tree.body) if module_level else list(ast.walk(tree))
    names = {alias.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    return names | {
        node.module.split(".")[0]
        for node in nodes
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
    }


@pytest.mark.parametrize(
    "path", [MODULE / "SimilarPatients.py", *LIB_FILES], ids=lambda p: p.relative_to(MODULE).as_posix()
)
def test_slicer_python_39_syntax_and_no_gui_imports_in_library(path):
    ast.parse(path.read_text(encoding="utf-8"), feature_version=(3, 9))
    if path.is_relative_to(LIB):
        # nothing of Slicer's at import time; scene/ and ui/ alone take MRML classes, vtk and Slicer's scripted
        # modules (DICOMLib, PyTorchUtils) inside their functions; Qt never
        assert not _imports(path, module_level=True) & {"slicer", "qt", "vtk", "ctk", "DICOMLib", "PyTorchUtils"}
        gui = {"qt", "ctk"} if _stage(path) in ("scene", "ui") else {"slicer", "qt", "vtk", "ctk", "DICOMLib"}
        assert not _imports(path) & gui


def _stage(path: Path) -> str:
    """The subpackage a library file belongs to ('' for the top level)."""
    parts = path.relative_to(LIB).parts
    return parts[0] if len(parts) > 1 else ""


def _imported_stages(path: Path) -> set:
    """The library's subpackages (or top-level modules) that ``path`` imports, relative or absolute."""
    here = path.relative_to(LIB).parent.parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
            found |= {target[0]} if target else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("SimilarPatientsLib."):
            found.add(node.module.split(".")[1])
    return found


@pytest.mark.parametrize("path", [p for p in LIB_FILES if _stage(p)], ids=lambda p: p.relative_to(LIB).as_posix())
def test_stages_import_only_downward(path):
    stage = _stage(path)
    upward = _imported_stages(path) - {stage} - MAY_IMPORT[stage] - BASE
    assert not upward, f"{stage}/ must not import {sorted(upward)}"


def _module(path: Path) -> str:
    parts = path.relative_to(LIB).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_imports(path: Path, modules: set) -> set:
    """The library modules ``path`` imports when it is imported, or when a type checker reads it: its
    module-level imports, those under ``if``/``try`` (``TYPE_CHECKING``) included; not those inside functions."""
    found, pending = set(), list(ast.parse(path.read_text(encoding="utf-8")).body)
    package = _module(path).split(".") if path.name == "__init__.py" else _module(path).split(".")[:-1]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.If, ast.Try)):
            pending += [*node.body, *node.orelse, *(s for h in getattr(node, "handlers", []) for s in h.body)]
        elif isinstance(node, ast.ImportFrom) and node.level:
            target = [*package[: len(package) - (node.level - 1)], *(node.module.split(".") if node.module else [])]
            for alias in node.names:
                name = ".".join([*target, alias.name])
                found.add(name if name in modules else ".".join(target))
    return found & modules


def test_no_module_imports_one_that_imports_it_back():
    """A circle of imports (even one for type checking) makes a module's meaning depend on the order of
    imports; packages' ``__init__`` re-exports are not modules of their own here."""
    files = {_module(p): p for p in LIB_FILES if p.name != "__init__.py"}
    graph = {name: _module_imports(path, set(files)) - {name} for name, path in files.items()}
    circles = []
    for name in graph:
        seen, pending = set(), list(graph[name])
        while pending:
            other = pending.pop()
            if other not in seen:
                seen.add(other)
                pending += graph[other]
        if name in seen:
            circles.append(name)
    assert not circles, f"these modules import themselves back through others: {sorted(circles)}"


def test_every_stage_is_in_the_import_rules():
    assert {p.name for p in LIB.iterdir() if (p / "__init__.py").exists()} == set(MAY_IMPORT)


def test_extras_name_the_packages_pyproject_installs():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    for extra, (_, packages) in EXTRAS.items():
        listed = re.search(rf"^{extra} = \[(.*?)\][ \t]*(?:#[^\n]*)?$", text, re.M | re.S).group(1)
        names = {re.split(r"[<>=!~\[]", requirement)[0] for requirement in re.findall(r'"([^"]+)"', listed)}
        assert names == set(packages), extra


#: Runs before the code under test in a child: every package of an extra is "not installed".
_WITHOUT_EXTRAS = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or any(name.startswith(b + ".") or name == b for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, NotInstalled())
"""


def _base_install(code: str, home: Path) -> subprocess.CompletedProcess:
    blocked = sorted({m for _, packages in EXTRAS.values() for m in packages.values()} | {"threadpoolctl", "nibabel"})
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS.format(blocked=blocked) + code],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={**__import__("os").environ, "SIMILARPATIENTS_HOME": str(home)},
    )


def test_a_base_install_imports_every_module(tmp_path):
    modules = [
        ".".join(("SimilarPatientsLib", *p.relative_to(LIB).with_suffix("").parts)).removesuffix(".__init__")
        for p in LIB_FILES
        if p.name != "__main__.py"
    ]
    code = f"""
import importlib, json
from SimilarPatientsLib import SimilarPatientsError
failed = {{}}
for name in {modules!r}:
    try:
        importlib.import_module(name)
    except SimilarPatientsError as error:
        failed[name] = str(error)
print(json.dumps(failed))
"""
    done = _base_install(code, tmp_path)
    assert done.returncode == 0, done.stderr
    failed = json.loads(done.stdout)
    # the networks subclass torch's Module, the pipeline's stages Beam's DoFn: the modules that need their extra
    networks = [f"SimilarPatientsLib.models.networks{family}" for family in ("", "_ctclip", "_merlin", "_pasta")]
    assert sorted(failed) == sorted([*networks, "SimilarPatientsLib.pipeline.stages"])
    assert all("needs the 'embed' extra" in failed[name] for name in networks)
    assert "needs the 'pipeline' extra" in failed["SimilarPatientsLib.pipeline.stages"]


def test_a_base_install_stops_each_extra_command_with_the_extra_to_install(tmp_path):
    store_frame(synthetic_frame(n_patients=12, dim=8, models=("CTFM",)), tmp_path / "home", "mine")
    (tmp_path / "ct.nrrd").write_bytes(b"")
    commands = {
        "analysis": [
            ["evaluate", "--reference", "mine", "--label", "histology", "--positive", "adeno", "--out", "report"],
            ["explore", "--reference", "mine", "--out", str(tmp_path / "map.html")],
        ],
        "bigquery": [
            ["neighbors", "--reference", "bq://my-project.d.t", "--model", "CTFM", "--patient", "P001"],
            ["references", "push", "mine", "--bigquery", "my-project.d.t"],
        ],
        "embed": [
            ["query", "--image", str(tmp_path / "ct.nrrd"), "--point=0,0,0", "--model", "CTFM", "--reference", "mine"],
            ["embed", "--image", str(tmp_path / "ct.nrrd"), "--point=0,0,0", "--model", "TumorDescriptor"],
        ],
        "pipeline": [
            ["index", "build", "--manifest", str(tmp_path / "m.csv"), "--model", "TumorDescriptor", "--out", "o"],
        ],
    }
    for extra, argvs in commands.items():
        for argv in argvs:
            code = f"import sys\nfrom SimilarPatientsLib.cli import main\nsys.exit(main({argv!r}))"
            done = _base_install(code, tmp_path / "home")
            assert done.returncode == 2, (argv, done.stderr)
            assert "error: " in done.stderr and f"needs the '{extra}' extra" in done.stderr, (argv, done.stderr)
            assert f"pip install -e '.[{extra}]'" in done.stderr and "similar-patients[" not in done.stderr
            assert "Traceback" not in done.stderr
    # what the base install is for still works
    neighbors = ["neighbors", "--reference", "mine", "--model", "CTFM", "--patient", "P001"]
    for argv in (["references", "list"], ["models", "list"], neighbors):
        code = f"import sys\nfrom SimilarPatientsLib.cli import main\nsys.exit(main({argv!r}))"
        done = _base_install(code, tmp_path / "home")
        assert done.returncode == 0, (argv, done.stderr)
