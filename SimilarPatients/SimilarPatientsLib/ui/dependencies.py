"""What Slicer's Python needs for each thing the module does, checked by version (not just presence), and
installed on first use with one consent, as one plan.

One plan: whatever a click needs is installed together with everything the module may need next without a
GPU framework (the search packages, idc-index for loading matches, google-cloud-bigquery when BigQuery is
allowed), in ONE pip call, so that pip resolves them together once and a later install (idc-index at the
first Load) cannot downgrade what an earlier one put in and Slicer already imported.

No silent downgrades: the pip call's constraints pin the packages Slicer ships, torch, and every
distribution already imported in Slicer's process, at their installed versions. Before installing, a dry
run (``pip install --dry-run --report``) checks the plan; where those pins cannot be kept (another extension
imported a pandas that idc-index does not accept), the plan says which imported distributions the install
would replace, and the module offers to install and restart Slicer (as Slicer 5.12's
``slicer.packaging.pip_ensure`` offers a restart), never to carry on with old and new versions mixed.

Order: torch comes first, through Slicer's PyTorch extension (``PyTorchUtils``, which picks the build for this
computer's GPU), because MONAI depends on torch and pip would otherwise pull a torch from PyPI. pip runs in
Slicer's Python (``PythonSlicer``) as a subprocess whose output goes to the Python console line by line, so
that a failure is one message with pip's last lines. Under ``--testing`` (the extensions build machine)
nothing is installed: :class:`SlicerInstaller` refuses, saying what was missing.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata

from ..errors import SimilarPatientsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Requirement:
    """One package: its pip requirement (name and lowest version) and the module it provides."""

    name: str
    minimum: str
    module: str

    @property
    def pip(self) -> str:
        return f"{self.name}>={self.minimum}"


#: Searching references, by patient or by a query's embedding (pyproject's base dependencies; numpy is
#: Slicer's).
SEARCH = (
    Requirement("pandas", "2.0", "pandas"),
    Requirement("pyarrow", "14", "pyarrow"),
    Requirement("duckdb", "1.1", "duckdb"),
    Requirement("idc-index-data", "20", "idc_index_data"),
    Requirement("faiss-cpu", "1.8", "faiss"),
    Requirement("tqdm", "4.60", "tqdm"),
    Requirement("packaging", "21", "packaging"),
)
#: Querying from an image adds MONAI and what the networks' checkpoints need; torch comes from the PyTorch
#: extension, SimpleITK and pydicom ship with Slicer, and highdicom is not needed (the tumor is a node).
IMAGE = (
    Requirement("monai", "1.4", "monai"),
    Requirement("einops", "0.7", "einops"),
    Requirement("safetensors", "0.4", "safetensors"),
    Requirement("huggingface-hub", "0.36", "huggingface_hub"),  # weights on the Hugging Face hub
    Requirement("pooch", "1.8", "pooch"),  # weights at plain URLs (Zenodo, NVIDIA)
)
#: Loading matches from IDC's public buckets. Every idc-index below 0.13 pins ``pandas<=2.2.4`` (and 0.9-0.11
#: ``duckdb<=1.2.1`` and Sphinx): on Python >= 3.10 the floor 0.13 keeps pip from ever reaching back to one
#: of those and downgrading pandas 3; Python 3.9 (Slicer 5.8) has nothing newer than 0.10.2, so there the
#: plan resolves idc-index with the search packages at once (pandas 2.2.x, duckdb 1.2.1).
DOWNLOAD = (Requirement("idc-index", "0.13" if sys.version_info >= (3, 10) else "0.9", "idc_index"),)
#: Searching references kept in Google BigQuery.
BIGQUERY = (Requirement("google-cloud-bigquery", "3.17", "google.cloud.bigquery"),)
#: The torch the library needs (its MONAI networks and meta-device loading).
MINIMUM_TORCH = "2.1"
#: Packages Slicer ships that an install must never replace: pinned at their installed versions.
SLICER_PACKAGES = ("numpy", "SimpleITK", "pydicom", "requests", "vtk", "packaging")


def installed_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def unmet(requirements: Sequence[Requirement]) -> list[Requirement]:
    """The requirements not installed, or installed at a version below their minimum (another extension
    may have put an older one into Slicer's Python)."""
    return [r for r in requirements if not _at_least(installed_version(r.name), r.minimum)]


def torch_unmet() -> str | None:
    """Why torch cannot be used as it is ("not installed", "2.0.1, older than 2.1"), or None when it can."""
    version = installed_version("torch")
    if version is None:
        return "not installed"
    if not _at_least(version, MINIMUM_TORCH):
        return f"{version}, older than {MINIMUM_TORCH}"
    return None


def companions(bigquery_allowed: bool) -> tuple:
    """What every install brings along with a click's own needs: the search packages, idc-index, and
    google-cloud-bigquery when BigQuery is allowed (one resolution, so none downgrades another later)."""
    return (SEARCH, DOWNLOAD, *((BIGQUERY,) if bigquery_allowed else ()))


@dataclass
class InstallPlan:
    """What one click needs installed: torch (through the PyTorch extension) and PyPI packages; after
    :meth:`SlicerInstaller.resolve`, the imported distributions the install would replace."""

    torch: str | None  #: why torch must be installed, or None
    packages: list[Requirement]
    #: (distribution, version imported now, version the install brings): not empty means Slicer must restart
    replaces: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.torch is None and not self.packages

    def question(self) -> str:
        """The one consent this click asks for, naming everything it installs."""
        lines = []
        if self.torch:
            lines.append(
                f"PyTorch {MINIMUM_TORCH} or newer (here: {self.torch}), through the PyTorch extension: the build "
                f"for this computer's GPU, or for the CPU"
            )
        lines += [f"{r.pip} from PyPI" for r in self.packages]
        return (
            "Similar Patients needs these Python packages, which will be downloaded and installed into Slicer's "
            "Python (Slicer's own packages, and those already in use, are kept as they are):\n\n"
            + "\n".join(f"- {line}" for line in lines)
        )

    def restart_question(self) -> str:
        """The question when the install must replace packages Slicer has already imported."""
        replaced = "\n".join(f"- {name} {now} → {new}" for name, now, new in self.replaces)
        return (
            "These packages cannot be installed next to the versions already loaded in Slicer (by Slicer, another "
            f"extension or this module); the install replaces them:\n\n{replaced}\n\nSlicer must restart "
            "afterwards: the old versions stay loaded until then, and mixing them with the new ones fails. "
            "Install and restart Slicer now?"
        )


def plan(*needs: Sequence[Requirement], torch: bool = False) -> InstallPlan:
    """The install ``needs`` (groups of requirements) and, with ``torch``, torch itself call for."""
    packages = list({r.name: r for group in needs for r in unmet(group)}.values())
    return InstallPlan(torch_unmet() if torch else None, packages)


def imported_distributions() -> dict[str, str]:
    """The installed distributions one of whose modules this process has imported (canonical name →
    version): an install must not change them under the running code. Decided by the modules each
    distribution installed, not its top-level name: ``google`` alone is shared by dozens of them."""
    loaded = set(sys.modules)
    found = {}
    for distribution in metadata.distributions():
        name = distribution.metadata["Name"]
        if name and not loaded.isdisjoint(_modules(distribution)):
            found[canonical(name)] = distribution.version
    return found


def constraints_text(held: dict[str, str] | None = None) -> str:
    """A pip constraints file's lines: torch and the packages Slicer ships at their installed versions, and
    ``held`` (name → version: the imported distributions)."""
    pinned = {}
    for name in (*SLICER_PACKAGES, "torch"):
        version = installed_version(name)
        if version is not None:
            pinned[canonical(name)] = version
    pinned.update(held or {})
    return "".join(f"{name}=={version}\n" for name, version in sorted(pinned.items()))


def canonical(name: str) -> str:
    """A distribution name as pip compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


class SlicerInstaller:
    """Installs an :class:`InstallPlan` into Slicer's Python: torch first, then one pip call.

    Args:
        python: the Python to run pip with (default: Slicer's ``PythonSlicer``; outside Slicer this Python).
        on_line: called with each line pip prints (the module shows it in its progress display and lets
            Slicer repaint, as ``slicer.util.pip_install`` does).
        testing: whether Slicer runs its tests (``--testing``); default: asks ``slicer.app``.
    """

    def __init__(self, python: str | None = None, on_line: Callable[[str], None] | None = None, testing=None):
        self.python = python
        self.on_line = on_line
        self.testing = testing

    def resolve(self, plan: InstallPlan) -> InstallPlan:
        """``plan`` with the imported distributions its install would replace (a dry run, which asks PyPI):
        none when pip can keep every imported distribution at its version."""
        self._refuse_when_testing(plan)
        if not plan.packages:
            return plan
        held = imported_distributions()
        try:
            changes = self.dry_run([r.pip for r in plan.packages], constraints_text(held))
        except SimilarPatientsError:  # the imported versions cannot all be kept: what would change without them?
            changes = self.dry_run([r.pip for r in plan.packages], constraints_text())
        plan.replaces = [(name, held[name], new) for name, new in sorted(changes.items()) if name in held]
        return plan

    def install(self, plan: InstallPlan) -> None:
        """torch, then the PyPI packages in one pip call: imported distributions pinned unless the plan
        replaces them (then Slicer restarts afterwards; the caller asked)."""
        self._refuse_when_testing(plan)
        if plan.torch:
            self.install_torch()
        if plan.packages:
            held = {} if plan.replaces else imported_distributions()
            self.pip([r.pip for r in plan.packages], constraints_text(held))
        importlib.invalidate_caches()  # what was just installed is found by the next import
        missing = [r.pip for r in unmet(plan.packages)]
        if plan.torch and torch_unmet():
            missing.append(f"torch>={MINIMUM_TORCH}")
        if missing:
            raise SimilarPatientsError(
                f"Installing {', '.join(missing)} did not succeed (see the Python console). Restart Slicer and try "
                f"again; offline, install them from a local wheel folder with slicer.util.pip_install."
            )

    def install_torch(self) -> None:
        """torch through the PyTorch extension, which picks the build for this computer's GPU."""
        try:
            import PyTorchUtils
        except ImportError:
            raise SimilarPatientsError(
                "Querying from an image needs PyTorch: install the 'PyTorch' extension from the Extensions "
                "Manager, restart Slicer, and try again."
            ) from None
        try:
            installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=f">={MINIMUM_TORCH}"
            )
        except subprocess.CalledProcessError as error:  # its pip failed: an install failure, not a bug
            raise SimilarPatientsError(
                f"Installing PyTorch through the PyTorch extension failed (pip exit code {error.returncode}; its "
                f"output is in the Python console). Check the internet connection and try again."
            ) from None
        if installed is None:
            raise SimilarPatientsError("PyTorch was not installed (see the Python console).")

    def pip(self, requirements: list, constraints: str) -> None:
        """``pip install`` of ``requirements`` under ``constraints`` (a constraints file's text)."""
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "constraints.txt")
            with open(path, "w", encoding="utf-8") as stream:
                stream.write(constraints)
            self.run_pip(["install", *requirements, "--constraint", path], "Installing " + ", ".join(requirements))

    def dry_run(self, requirements: list, constraints: str) -> dict[str, str]:
        """What ``pip install`` would install (canonical name → version), without installing."""
        with tempfile.TemporaryDirectory() as folder:
            path, report = os.path.join(folder, "constraints.txt"), os.path.join(folder, "report.json")
            with open(path, "w", encoding="utf-8") as stream:
                stream.write(constraints)
            arguments = ["install", "--dry-run", "--report", report, *requirements, "--constraint", path]
            self.run_pip(arguments, "Planning the install of " + ", ".join(requirements))
            with open(report, encoding="utf-8") as stream:
                planned = json.load(stream)["install"]
        return {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in planned}

    def run_pip(self, arguments: list, what: str) -> None:
        """pip in Slicer's Python, its output to the Python console line by line; a failure raises one
        :class:`SimilarPatientsError` with pip's last lines (no network, a proxy, no wheel for this computer)."""
        python = self.python or shutil.which("PythonSlicer") or sys.executable
        command = [python, "-m", "pip", *arguments, "--disable-pip-version-check"]
        options = {"creationflags": 0x08000000} if os.name == "nt" else {}  # CREATE_NO_WINDOW
        tail: deque = deque(maxlen=12)
        try:
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                encoding="utf-8",
                errors="replace",
                **options,
            )
        except OSError as error:
            raise SimilarPatientsError(f"{what} failed: pip could not be started ({error}).") from None
        with process:
            for line in process.stdout:
                line = line.rstrip()
                print(line)  # Slicer's Python console, as slicer.util.pip_install does
                tail.append(line)
                if self.on_line:
                    self.on_line(line)
        if process.returncode:
            shown = "\n".join(tail)
            raise SimilarPatientsError(
                f"{what} failed (pip exit code {process.returncode}). Check the internet connection (or proxy) and "
                f"try again; offline, install them from a local wheel folder with slicer.util.pip_install. pip "
                f"said:\n\n{shown}"
            )

    def _refuse_when_testing(self, plan: InstallPlan) -> None:
        if plan.empty or not self._testing():
            return
        needed = [r.pip for r in plan.packages] + ([f"torch>={MINIMUM_TORCH}"] if plan.torch else [])
        raise SimilarPatientsError(
            f"Slicer runs in testing mode (--testing): nothing is installed into its Python, and {', '.join(needed)} "
            f"are missing. Install them before the tests (slicer.util.pip_install), or run without --testing."
        )

    def _testing(self) -> bool:
        if self.testing is not None:
            return bool(self.testing)
        try:
            import slicer
        except ImportError:
            return False
        app = getattr(slicer, "app", None)
        return bool(app is not None and app.testingEnabled())


def _modules(distribution) -> set:
    """The dotted names of the modules a distribution installed (from its RECORD), else its top-level
    names (``top_level.txt``)."""
    names = set()
    for path in distribution.files or ():
        if path.suffix in (".py", ".so", ".pyd") and path.parts and path.parts[0] != "..":
            parts = [*path.parts[:-1], path.name.split(".")[0]]  # lib.cpython-312-x86_64-linux-gnu.so: lib
            if parts[-1] == "__init__":
                parts.pop()
            if parts:
                names.add(".".join(parts))
    if not names:
        names = set((distribution.read_text("top_level.txt") or "").split())
    return names


def _at_least(version: str | None, minimum: str) -> bool:
    if version is None:
        return False
    try:
        from packaging.version import Version
    except ImportError:  # packaging is being installed: compare the release numbers
        return _release(version) >= _release(minimum)
    return Version(version) >= Version(minimum)


def _release(version: str) -> tuple:
    parts = []
    for part in version.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if digits != part:
            break
    return tuple(parts)
