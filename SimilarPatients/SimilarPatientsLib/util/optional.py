"""Optional packages: one way to import what an install extra provides, so that a missing one is a
:class:`SimilarPatientsError` naming the extra to install, not a bare ``ModuleNotFoundError``.

The base install searches references and prints hits. Reading CT and running the encoders needs the
``embed`` extra; maps and evaluation need ``analysis``; references in BigQuery need ``bigquery``. Heavy
modules are imported on first use, never at import time, so every module of the library imports on the
base install. Entry points call :func:`require` before any work, so a missing package stops them at once
rather than minutes in.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from types import ModuleType

from ..errors import SimilarPatientsError

#: extra -> (what it is for, {pip requirement name: module it provides}); pyproject.toml's extras match.
EXTRAS = {
    "embed": (
        "reading CT images and running the embedding models",
        {
            "torch": "torch",
            "monai": "monai",
            "einops": "einops",
            "SimpleITK": "SimpleITK",
            "pydicom": "pydicom",
            "highdicom": "highdicom",
            "safetensors": "safetensors",
            "huggingface-hub": "huggingface_hub",
            "pooch": "pooch",
        },
    ),
    "download": ("downloading matched series from IDC", {"idc-index": "idc_index"}),
    "pipeline": ("building references on Apache Beam (Python >= 3.10)", {"apache-beam": "apache_beam"}),
    "analysis": (
        "maps and evaluation of embeddings",
        {
            "scikit-learn": "sklearn",
            "umap-learn": "umap",
            "plotly": "plotly",
            "matplotlib": "matplotlib",
            "torch": "torch",
        },
    ),
    "bigquery": (
        "searching and pushing references in Google BigQuery",
        {"google-cloud-bigquery": "google.cloud.bigquery"},
    ),
}


def optional_import(module: str, extra: str) -> ModuleType:
    """Import ``module``, which the install extra ``extra`` provides; a clear error if it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise missing_extra(extra, error.name or module) from error


#: What reading CT images needs of the ``embed`` extra (the weight-free model needs nothing more; 3D Slicer
#: ships both): no torch.
IMAGING = ("SimpleITK", "pydicom")
#: What running a network encoder adds.
NETWORKS = ("torch", "monai", "einops", "safetensors")


def require(extra: str, modules: Sequence[str] | None = None) -> None:
    """Raise the missing-extra error unless every package of ``extra`` (or only ``modules`` of it) can be
    imported (nothing is imported)."""
    for module in EXTRAS[extra][1].values() if modules is None else modules:
        try:
            found = importlib.util.find_spec(module)
        except ImportError:  # a finder may refuse outright
            found = None
        if found is None:
            raise missing_extra(extra, module)


#: PyTorch's CPU build: plain ``pip install torch`` on Linux gives the CUDA build (about 15 NVIDIA wheels and
#: triton, several GB), which only a machine with an NVIDIA GPU uses.
TORCH_CPU = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def install_command(extra: str) -> str:
    """What installs ``extra``: the package is not on PyPI, so from the SimilarPatients checkout folder."""
    return f"pip install -e '.[{extra}]'"


def missing_extra(extra: str, module: str) -> SimilarPatientsError:
    """The error for a missing package of ``extra``: what it is needed for and the install command."""
    purpose, packages = EXTRAS[extra]
    if "torch" in packages:
        how = (
            f"Install torch first: the CPU build with `{TORCH_CPU}`, or `pip install torch` on a Linux machine "
            f"with an NVIDIA GPU (the CUDA build); then, in the SimilarPatients checkout folder, "
            f"`{install_command(extra)}`. In 3D Slicer, the module installs it on first use."
        )
    else:
        how = (
            f"Install it in the SimilarPatients checkout folder with `{install_command(extra)}`; in 3D Slicer's "
            f"Python console, `slicer.util.pip_install('{' '.join(packages)}')`."
        )
    return SimilarPatientsError(
        f"{purpose[0].upper()}{purpose[1:]} needs the '{extra}' extra, and the package '{module}' is not installed. "
        + how
    )


def pyplot() -> ModuleType:
    """matplotlib's pyplot on the file-only Agg backend (no window; safe off the GUI thread)."""
    optional_import("matplotlib", "analysis").use("Agg")
    return optional_import("matplotlib.pyplot", "analysis")
