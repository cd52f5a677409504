"""The NLST-Sybil tumor-embedding reference published by the IDC team, from its upstream files.

Upstream: repository ``ImagingDataCommons/nlst-sybil-connectome`` (Apache-2.0), one pickle per model,
``embeddings/<Model>_features.pkl`` = ``{"all": [{"feature": (1, D) float32, "row": pandas.Series}, ...]}``.
A local copy (a folder laid out like the repository, named by ``--source`` or by the setting
``$SIMILARPATIENTS_NLST_SYBIL_DIR``) is read in place; otherwise the files of a pinned commit are
downloaded into the data home and verified against their git blob ids.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import SimilarPatientsError
from ..progress import ProgressCallback, report
from ..util.download import Digest, download, verify
from ..util.home import downloads_dir
from . import schema
from .safe_pickle import restricted_loads

REPOSITORY = "ImagingDataCommons/nlst-sybil-connectome"
COMMIT = "61e327fe4ccd29cea104f954df34cbf380c23481"
RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/embeddings/{file}"
#: The preprocessing the published embeddings were made with (TumorImagingBench, per model).
RECIPE = "tumorimagingbench"
LOCAL_DIR_ENV = "SIMILARPATIENTS_NLST_SYBIL_DIR"

#: Model -> git blob id of ``embeddings/<Model>_features.pkl`` at ``COMMIT``.
UPSTREAM_FILES: dict[str, str] = {
    "CTClipVit": "7cf2a7887e3f1e6f707e5372039fddd8ad588a8f",
    "CTFM": "ac65c2dc53b311cf905e9ad2e3bff53c4ad19bb3",
    "FMCIB": "370d33bbafaba1dc598ac81f1a74a5aabff8dbc1",
    "Merlin": "97bd8d7bc8dbc892f0955d9016e4be6bbe72667d",
    "ModelsGen": "ac5d44f66d6b8ceaf39866327d16354fb253a244",
    "PASTA": "0f7460a42bb75ef38a505cd3bf26c90a9355ae19",
    "SUPREME": "e71c266ab416007a616684349b4a074cf643830f",
    "VISTA3D": "e37529fdbc59b1e1880f27a060627ee68bad0630",
    "Voco": "efd2548b0d924aad25654d790d2102ad65d666f7",
}

#: NLST ``de_stag`` mapped to 0..6 upstream, as AJCC stage groups.
STAGES = ("IA", "IB", "IIA", "IIB", "IIIA", "IIIB", "IV")
#: Upstream dashboard clinical columns that ride along (per patient).
CLINICAL_FIELDS = ("age", "sex", "race", "smoking")
#: The label fields a person sees first in results, in this order (stored in the reference's manifest).
DISPLAY_FIELDS = ("histology", "stage", "age", "sex", "smoking")


@dataclass
class UpstreamReference:
    """The upstream files converted: the canonical table and notes for the user."""

    table: schema.ReferenceTable
    notes: list = field(default_factory=list)


def file_name(model: str) -> str:
    return f"{model}_features.pkl"


def find_local_copy() -> Path | None:
    """The folder named by ``$SIMILARPATIENTS_NLST_SYBIL_DIR`` when it holds upstream ``*_features.pkl``
    files (a site's or a development checkout's copy), else None."""
    folder = os.environ.get(LOCAL_DIR_ENV)
    if not folder:
        return None
    if not upstream_files_in(Path(folder)):
        raise SimilarPatientsError(
            f"{LOCAL_DIR_ENV}={folder} holds no NLST-Sybil *_features.pkl files; point it at a copy of "
            f"{REPOSITORY} (or its embeddings/ folder), or unset it to download the files."
        )
    return Path(folder)


def upstream_files_in(folder: Path) -> dict[str, Path]:
    """Model -> upstream pickle in ``folder`` (as the repository lays them out, or flat)."""
    folder = Path(folder)
    found: dict[str, Path] = {}
    for sub in (folder / "upstream" / "embeddings", folder / "embeddings", folder):
        if sub.is_dir():
            for path in sorted(sub.glob("*_features.pkl")):
                found.setdefault(path.name[: -len("_features.pkl")], path)
    return found


def download_upstream(models: Sequence[str] | None = None, progress: ProgressCallback | None = None) -> dict[str, Path]:
    """Download (or reuse cached, verified) upstream files of ``models`` (default: all published)."""
    cache = downloads_dir() / "nlst-sybil-connectome" / COMMIT / "embeddings"
    wanted = list(models or UPSTREAM_FILES)
    unknown = [m for m in wanted if m not in UPSTREAM_FILES]
    if unknown:
        raise SimilarPatientsError(f"No upstream NLST-Sybil file for {unknown}; published: {list(UPSTREAM_FILES)}.")
    paths = {}
    for model in wanted:
        url = RAW_URL.format(repo=REPOSITORY, commit=COMMIT, file=file_name(model))
        try:
            paths[model] = download(
                url, cache / file_name(model), Digest("git-blob-sha1", UPSTREAM_FILES[model]), progress
            )
        except SimilarPatientsError as error:
            raise SimilarPatientsError(
                f"{error}\nTo import NLST-Sybil without network, get the files embeddings/<Model>_features.pkl "
                f"of {REPOSITORY} (commit {COMMIT[:12]}) onto this machine and run "
                f"`similar-patients references import nlst-sybil --source FOLDER`, or set {LOCAL_DIR_ENV}=FOLDER."
            ) from error
    return paths


def read_reference(
    files: dict[str, Path],
    clinical: Path | None = None,
    progress: ProgressCallback | None = None,
) -> UpstreamReference:
    """Convert upstream files (model -> path) to the canonical table, with notes for the user."""
    parts, repeats = [], {}
    clinical_table = _read_clinical(clinical) if clinical is not None and Path(clinical).exists() else None
    for i, (model, path) in enumerate(sorted(files.items())):
        report(progress, i, len(files), f"reading {path.name}")
        if model in UPSTREAM_FILES:
            verify(path, Digest("git-blob-sha1", UPSTREAM_FILES[model]))
        frame, dropped = _read_model_file(path, model)
        if dropped:
            repeats.setdefault(dropped, []).append(model)
        if clinical_table is not None:
            frame = frame.merge(clinical_table, on=schema.PATIENT, how="left")
        parts.append(schema.from_frame(frame))
    report(progress, len(files), len(files), "read upstream files")
    notes = [  # one note for the models that dropped as many rows (all six do: the same lesions repeat)
        f"{', '.join(models)}: dropped {dropped} upstream row(s) {'each ' if len(models) > 1 else ''}repeating a "
        f"lesion with the same embedding"
        for dropped, models in repeats.items()
    ]
    return UpstreamReference(schema.concat(parts), notes)


def _read_model_file(path: Path, model: str) -> tuple[pd.DataFrame, int]:
    content = restricted_loads(Path(path).read_bytes())
    if not isinstance(content, dict) or not isinstance(content.get("all"), list):
        raise SimilarPatientsError(f"{path} is not an NLST-Sybil embedding file (expected a dict with 'all').")
    records = []
    for i, item in enumerate(content["all"]):
        try:
            feature = np.asarray(item["feature"], dtype=np.float32).reshape(-1)
            row = item["row"]
            stage = row["labels_de_stag_mapped"]
            records.append(
                {
                    schema.MODEL: model,
                    schema.RECIPE: RECIPE,
                    schema.PATIENT: str(row["PatientID"]),
                    schema.SERIES: str(row["SeriesInstanceUID"]),
                    "SOPInstanceUID": str(row["SOPInstanceUID"]),
                    schema.CENTER[0]: float(row["coordX"]),
                    schema.CENTER[1]: float(row["coordY"]),
                    schema.CENTER[2]: float(row["coordZ"]),
                    "histology": str(row["labels_de_type_mapped"]),
                    "histology_code": int(row["labels_de_type"]),
                    "stage": STAGES[int(stage)] if pd.notna(stage) and 0 <= int(stage) < len(STAGES) else None,
                    schema.EMBEDDING: feature,
                }
            )
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise SimilarPatientsError(
                f"{path.name}: entry {i} lacks the fields of the NLST-Sybil format ({error})."
            ) from error
    frame = pd.DataFrame.from_records(records)
    key = [schema.PATIENT, schema.SERIES, *schema.CENTER]
    digests = frame[schema.EMBEDDING].map(lambda v: v.tobytes())
    repeated = pd.concat([frame[key], digests], axis=1).duplicated()
    return frame[~repeated].reset_index(drop=True), int(repeated.sum())


def _read_clinical(path: Path) -> pd.DataFrame:
    table = pd.read_parquet(path)
    if schema.PATIENT not in table.columns:
        raise SimilarPatientsError(f"{path} has no {schema.PATIENT} column to join clinical data on.")
    table = table.assign(**{schema.PATIENT: table[schema.PATIENT].astype(str)})
    keep = [c for c in CLINICAL_FIELDS if c in table.columns]
    return table[[schema.PATIENT, *keep]].drop_duplicates(schema.PATIENT)
