"""What Slicer's Python needs for each thing the module does, checked by version (not just presence), and
installed on first use with one consent per click.

Order matters: torch comes first, through Slicer's PyTorch extension (``PyTorchUtils``, which picks the build
for this computer's GPU), because MONAI depends on torch and pip would otherwise pull a torch from PyPI (CUDA
wheels on Linux, CPU-only on Windows), or replace the extension's. The PyPI packages follow with a
constraints file that pins torch and the packages Slicer ships at their installed versions, so nothing of
Slicer's is replaced. Slicer >= 5.12 installs through ``slicer.packaging.pip_install`` (its progress
dialog), older releases through ``slicer.util.pip_install``; never through ``pip_ensure``, which would ask
a second time and skips installs under ``--testing``.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
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
)
#: Loading matches from IDC's public buckets.
DOWNLOAD = (Requirement("idc-index", "0.9", "idc_index"),)
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


@dataclass
class InstallPlan:
    """What one click needs installed: torch (through the PyTorch extension) and PyPI packages."""

    torch: str | None  #: why torch must be installed, or None
    packages: list[Requirement]

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
            "Python (Slicer's own packages are kept as they are):\n\n" + "\n".join(f"- {line}" for line in lines)
        )


def plan(*needs: Sequence[Requirement], torch: bool = False) -> InstallPlan:
    """The install ``needs`` (groups of requirements) and, with ``torch``, torch itself call for."""
    packages = list({r.name: r for group in needs for r in unmet(group)}.values())
    return InstallPlan(torch_unmet() if torch else None, packages)


def constraints_text() -> str:
    """A pip constraints file's lines: torch and the packages Slicer ships, at their installed versions."""
    pinned = []
    for name in (*SLICER_PACKAGES, "torch"):
        version = installed_version(name)
        if version is not None:
            pinned.append(f"{name}=={version}")
    return "\n".join(pinned) + "\n"


class SlicerInstaller:
    """Installs an :class:`InstallPlan` into Slicer's Python, torch first."""

    def install(self, plan: InstallPlan) -> None:
        import tempfile

        if plan.torch:
            self.install_torch()
        if plan.packages:
            with tempfile.TemporaryDirectory() as folder:
                constraints = os.path.join(folder, "slicer-constraints.txt")
                with open(constraints, "w", encoding="utf-8") as stream:
                    stream.write(constraints_text())
                self.pip_install([r.pip for r in plan.packages], constraints)
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
        installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=f">={MINIMUM_TORCH}"
        )
        if installed is None:
            raise SimilarPatientsError("PyTorch was not installed (see the Python console).")

    def pip_install(self, requirements: list, constraints: str) -> None:
        """pip through Slicer: its packaging module's progress dialog (>= 5.12), else ``slicer.util``."""
        try:
            packaging = importlib.import_module("slicer.packaging")
        except ImportError:  # Slicer 5.8 and 5.10
            import slicer

            slicer.util.pip_install([*requirements, "--constraint", constraints])
            return
        packaging.pip_install(requirements, constraints=constraints, requester="Similar Patients")


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
