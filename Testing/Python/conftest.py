"""Shared fixtures: a throw-away data home, the real NLST-Sybil files, small synthetic references, and a
local HTTP server with Range support (downloads are tested against it, never the internet)."""

from __future__ import annotations

import http.server
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import types
import uuid
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest

NLST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "nlst-sybil-embeddings"
#: The Slicer-release lane this run is (``scripts/slicer_lanes.sh`` sets it, e.g. "slicer-5.8"): that
#: release's Python and bundled packages, where torch has no wheel here, so tests marked ``torch`` are skipped.
LANE = os.environ.get("SIMILARPATIENTS_LANE")
#: What the full lane (``scripts/test.sh`` sets SIMILARPATIENTS_FULL_LANE) must import: there, no test may be
#: skipped for want of a package.
FULL_LANE_MODULES = (
    "torch",
    "monai",
    "sklearn",
    "umap",
    "highdicom",
    "nibabel",
    "slicer",
    "apache_beam",
    "google.cloud.bigquery",
    "idc_index",
)


def pytest_configure(config):
    config.addinivalue_line("markers", "torch: needs torch (the embed or analysis extra); skipped in the Slicer lanes")
    if os.environ.get("SIMILARPATIENTS_FULL_LANE"):
        missing = [m for m in FULL_LANE_MODULES if not _importable(m)]
        if missing:
            raise pytest.UsageError(f"The full test lane lacks {', '.join(missing)}: its tests would be skipped.")


def pytest_collection_modifyitems(config, items):
    if LANE:
        skip = pytest.mark.skip(reason=f"needs torch, which has no wheel for the {LANE} lane's Python here")
        for item in items:
            if "torch" in item.keywords:
                item.add_marker(skip)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty data home for one test."""
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="session")
def nlst_dir() -> Path:
    """The shared real data; CI must have it, a bare checkout skips."""
    if not (NLST_DIR / "upstream" / "embeddings").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the shared NLST-Sybil data at {NLST_DIR}")
        pytest.skip(f"no shared NLST-Sybil data at {NLST_DIR}")
    return NLST_DIR


@pytest.fixture(scope="session")
def nlst_home(tmp_path_factory, nlst_dir):
    """A data home holding the NLST-Sybil reference, imported once for the session."""
    from SimilarPatientsLib import ReferenceStore

    path = tmp_path_factory.mktemp("nlst-home")
    ReferenceStore(path).import_reference("nlst-sybil", str(nlst_dir))
    return path


@pytest.fixture(scope="session")
def nlst(nlst_home):
    from SimilarPatientsLib import ReferenceStore

    return ReferenceStore(nlst_home).open("nlst-sybil")


def synthetic_frame(n_patients=30, lesions=(1, 3), dim=16, models=("A",), seed=0) -> pd.DataFrame:
    """Lesion rows in the canonical shape with random vectors and labels."""
    rng = np.random.default_rng(seed)
    rows = []
    for model in models:
        for p in range(n_patients):
            for lesion in range(rng.integers(lesions[0], lesions[1] + 1)):
                rows.append(
                    {
                        "model": model,
                        "PatientID": f"P{p:03d}",
                        "lesion_id": f"L{lesion}",
                        "embedding": rng.standard_normal(dim).astype(np.float32),
                        "histology": ["adeno", "squamous", "small cell"][p % 3],
                        "age": 50 + p,
                    }
                )
    return pd.DataFrame(rows)


def planted_frame(n_patients=60, signal=3.0, lesions=(1, 3), dim=24, models=("A", "B"), seed=0) -> pd.DataFrame:
    """Lesion rows whose label ``group`` (pos/neg) is written into the vectors with strength ``signal``
    (0 = no signal) along one direction, the same for every lesion of a patient; model "B" carries half
    the signal of "A". Rows have IDC UIDs, so they have viewer URLs."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    rows = []
    for p in range(n_patients):
        positive = p % 3 == 0
        count = int(rng.integers(lesions[0], lesions[1] + 1))
        for model_index, model in enumerate(models):
            strength = signal / (1 + model_index)
            for lesion in range(count):
                vector = rng.standard_normal(dim) + (strength if positive else 0.0) * direction
                rows.append(
                    {
                        "model": model,
                        "PatientID": f"P{p:03d}",
                        "lesion_id": f"L{lesion}",
                        "StudyInstanceUID": f"1.2.826.0.1.3680043.8.498.{p + 1}",
                        "SeriesInstanceUID": f"1.2.826.0.1.3680043.8.498.{p + 1}.{lesion + 1}",
                        "embedding": vector.astype(np.float32),
                        "group": "pos" if positive else "neg",
                        "histology": ["adeno", "squamous", "small cell"][p % 3],
                        "age": 50.0 + (p * 7) % 30,
                    }
                )
    return pd.DataFrame(rows)


def store_frame(frame: pd.DataFrame, home: Path, name: str = "synthetic"):
    """Write ``frame`` as reference ``name`` in a data home and open it."""
    from SimilarPatientsLib import ReferenceStore
    from SimilarPatientsLib.references import schema

    return ReferenceStore(home).write(name, schema.from_frame(frame), "test")


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` with Range support; ``cut`` truncates the next response to that many bytes."""

    files: ClassVar[dict] = {}
    cut: ClassVar[list] = []
    ranges: ClassVar[list] = []

    def do_GET(self):
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            self.ranges.append(self.headers["Range"])
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.cut:
            body = body[: self.cut.pop()]
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Files.files, _Files.cut, _Files.ranges = {}, [], []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield _Files, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


#: idc-index's DOWNLOAD_HIERARCHY_DEFAULT (index.py).
IDC_DIR_TEMPLATE = "%collection_id/%PatientID/%StudyInstanceUID/%Modality_%SeriesInstanceUID"


class IDCBucket:
    """Stands in for IDC's buckets behind ``idc_index.IDCClient.download_from_selection``: it copies the
    series the test wrote (``cut`` drops files, as a broken transfer would; ``pause`` seconds between files,
    as a transfer takes time), under the folders and file names idc-index gives them, counts its calls,
    records their options and every path it writes."""

    def __init__(self, series: dict, cut: int = 0, uids: dict | None = None, pause: float = 0.0):
        self.series, self.cut, self.pause, self.calls, self.locations = series, cut, pause, 0, []
        self.uids = uids or {}  # a series' (collection, patient, study) for the default folder tree
        self.options: list = []
        self.written: list = []

    def download_from_selection(
        self,
        seriesInstanceUID,
        downloadDir,
        source_bucket_location="aws",
        dirTemplate=IDC_DIR_TEMPLATE,
        quiet=True,
        show_progress_bar=True,
    ):
        # idc-index (index.py, download_from_selection): "source_bucket_location: string selecting the provider
        # of the bucket from which the files will be downloaded, allowing to select between Google ('gcs') and
        # AWS ('aws') storage. Defaults to 'aws'." Anything else: ValueError. "show_progress_bar (bool): If
        # True, tracks the progress of download" (a tqdm bar on the console): nothing to stand in for.
        if source_bucket_location not in ("aws", "gcs"):
            raise ValueError("source_bucket_location must be either 'aws' or 'gcs'")
        self.locations.append(source_bucket_location)
        self.options.append({"dirTemplate": dirTemplate, "quiet": quiet, "show_progress_bar": show_progress_bar})
        self.calls += 1
        logging.getLogger("idc_index.index").info("Downloading data to %s", downloadDir)  # as idc-index logs
        for uid in seriesInstanceUID:
            # "dirTemplate ... When set to None all files will be downloaded to the download directory with no
            # subdirectories"; the files are named by their CRDC instance UUID: "<crdc_instance_uuid>.dcm"
            collection, patient, study = self.uids.get(uid, ("nlst", "100158", "1.2.840.113654.2.55." + "8" * 38))
            fields = {"collection_id": collection, "PatientID": patient, "StudyInstanceUID": study}
            fields |= {"Modality": "CT", "SeriesInstanceUID": uid}
            target = Path(downloadDir)
            if dirTemplate is not None:
                target = target / re.sub("%(" + "|".join(fields) + ")", lambda m, f=fields: f[m.group(1)], dirTemplate)
            target.mkdir(parents=True, exist_ok=True)
            sources = sorted(Path(self.series[uid]).iterdir())
            for source in sources[self.cut :]:
                path = target / f"{uuid.uuid4()}.dcm"
                shutil.copyfile(source, path)
                self.written.append(path)
                time.sleep(self.pause)


class WorkerBucket:
    """:class:`IDCBucket` for the query worker, a process of its own: the stand-in ``idc_index`` of
    ``stand_ins/`` first on the path of the workers started from now on, copying ``series`` through a child
    process (s5cmd's place) with ``pause`` seconds between files; :attr:`downloads` lists each download
    (``uid``, the child's ``pid``, its ``staging`` folder)."""

    def __init__(self, series: dict, folder: Path, monkeypatch, pause: float = 0.0):
        self.log = folder / "bucket-log.jsonl"
        self.log.write_text("")
        description = folder / "bucket.json"
        plain = {uid: str(path) for uid, path in series.items()}
        description.write_text(json.dumps({"series": plain, "pause": pause, "log": str(self.log)}))
        monkeypatch.setenv("SIMILARPATIENTS_TEST_BUCKET", str(description))
        stand_ins = str(Path(__file__).parent / "stand_ins")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (stand_ins, os.environ.get("PYTHONPATH")) if p))

    @property
    def downloads(self) -> list:
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def served(tmp_path):
    """Two synthetic series in an :class:`IDCBucket`, and an IDC index (real Parquet, queried with
    DuckDB) that lists them."""
    from SimilarPatientsLib.idc import IDCIndex
    from synthetic_ct import tumor_ct, write_dicom_series

    rows, folders = [], {}
    for i in range(2):
        image, _, _ = tumor_ct("smooth", np.random.default_rng(i), size=(32, 32, 12))
        datasets = write_dicom_series(image, tmp_path / "bucket" / str(i))
        uid = str(datasets[0].SeriesInstanceUID)
        folders[uid] = tmp_path / "bucket" / str(i)
        rows.append(
            {
                "SeriesInstanceUID": uid,
                "collection_id": "synthetic",
                "StudyInstanceUID": str(datasets[0].StudyInstanceUID),
            }
            | {"Modality": "CT", "SeriesDescription": "test", "series_size_MB": 0.03, "instanceCount": len(datasets)}
        )
    pd.DataFrame(rows).to_parquet(tmp_path / "index.parquet")
    return folders, IDCIndex(tmp_path / "index.parquet")


def slicer_scene():
    """A real MRML scene (slicer-core's, or Slicer's classes wherever ``slicer`` has them) prepared as Slicer's
    application prepares it: slice orientation presets, the Segmentations logic (its converters) and the
    layout logic, kept alive on the scene as ``segmentations_logic`` and ``layout_logic``."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (Python >= 3.10) provides the MRML scene")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the 'slicer' module here is not slicer-core's")
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    scene.segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    scene.segmentations_logic.SetMRMLScene(scene)
    scene.layout_logic = slicer.vtkMRMLLayoutLogic()
    scene.layout_logic.SetMRMLScene(scene)
    return scene


@pytest.fixture
def scene():
    return slicer_scene()


@pytest.fixture
def mrml_application(monkeypatch):
    """slicer-core's scene as Slicer's ``slicer.mrmlScene``, its layout logic as the layout manager's, and a
    DICOMLib whose importer records the folders it is given."""
    scene = slicer_scene()
    core = sys.modules["slicer"]
    manager = types.SimpleNamespace(layoutLogic=lambda: scene.layout_logic)
    monkeypatch.setattr(core, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(core, "app", types.SimpleNamespace(layoutManager=lambda: manager), raising=False)
    imported = []
    dicom_lib = types.ModuleType("DICOMLib")
    dicom_lib.DICOMUtils = types.SimpleNamespace(importDicom=imported.append)
    monkeypatch.setitem(sys.modules, "DICOMLib", dicom_lib)
    return types.SimpleNamespace(scene=scene, imported=imported)


def descriptor_reference(home: Path, per_kind: int, rng: np.random.Generator, name: str = "tumors"):
    """Reference ``name`` of ``per_kind`` synthetic tumors of every kind (one patient each, label ``kind``),
    embedded with the weight-free model."""
    from SimilarPatientsLib.imaging.tumor import from_binary_mask
    from SimilarPatientsLib.models.embedder import Embedder
    from synthetic_ct import KINDS, tumor_ct

    embedder, rows = Embedder("TumorDescriptor"), []
    for i in range(per_kind):
        for kind in KINDS:
            image, mask, _ = tumor_ct(kind, rng)
            embedding = embedder.embed(image, from_binary_mask(mask))[0]
            rows.append(
                {"model": embedding.model, "recipe": embedding.recipe, "PatientID": f"{kind}-{i}", "kind": kind}
                | {"embedding": embedding.vector}
            )
    return store_frame(pd.DataFrame(rows), home, name)


@pytest.fixture(scope="session")
def gcs():
    """A local Cloud Storage server (gcp-storage-emulator, from PyPI) with a bucket ``bucket``; the storage
    client, and Beam's gs:// file system through it, reach it through ``STORAGE_EMULATOR_HOST``. One rule
    the emulator does not hold is added: an upload with ``ifGenerationMatch=0`` onto a live object is refused
    (Cloud Storage, request preconditions: "setting ifGenerationMatch to 0 ... the request succeeds only if
    there are no live objects in the bucket with the specified name"; HTTP 412 otherwise)."""
    import socket
    from http import HTTPStatus

    pytest.importorskip("apache_beam.io.gcp.gcsfilesystem")
    server_module = pytest.importorskip("gcp_storage_emulator.server")
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def strict_insert(request, response, storage, *args, **kwargs):
        if request.query.get("ifGenerationMatch", [None])[0] == "0":
            name = request.query.get("name", [None])[0]
            if name is None and isinstance(request.data, dict):
                name = (request.data.get("meta") or request.data).get("name")
            try:
                storage.get_file_obj(request.params["bucket_name"], name)
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "conditionNotMet", "errors": []}})
                return None
            except NotFound:
                pass
        return objects.insert(request, response, storage, *args, **kwargs)

    for _, handlers in server_module.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is objects.insert:
                handlers[method] = strict_insert
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    from apache_beam.internal.gcp import auth

    auth._Credentials._credentials_init = True  # anonymous, as Beam ends up without credentials (without retries)
    auth._Credentials._credentials = None
    server = server_module.create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
    server.start()
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    try:
        yield "gs://bucket"
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
