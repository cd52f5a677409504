"""The persistent query worker: a query, a second one reusing the loaded model, cancel mid-query and
mid-download with no process left behind, a worker that dies surfaced as a clear error and replaced by a
fresh one."""

from __future__ import annotations

import http.server
import os
import signal
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import descriptor_reference
from SimilarPatientsLib import Cancelled, SimilarPatientsError
from SimilarPatientsLib.scene.worker import WorkerClient
from synthetic_ct import tumor_ct

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups as on Linux and macOS")


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A data home with reference 'tumors' (weight-free model, 3 per kind) and a query CT with its mask."""
    folder = tmp_path_factory.mktemp("worker")
    rng = np.random.default_rng(17)
    descriptor_reference(folder / "home", 3, rng)
    image, mask, _ = tumor_ct("cavitary", rng)
    sitk.WriteImage(image, str(folder / "ct.nrrd"))
    sitk.WriteImage(mask, str(folder / "mask.nrrd"))
    request = dict(
        image=str(folder / "ct.nrrd"),
        tumors={"mask": str(folder / "mask.nrrd")},
        model="TumorDescriptor",
        reference="tumors",
        k=3,
        home=str(folder / "home"),
    )
    return folder, request


@pytest.fixture
def client():
    worker = WorkerClient()
    yield worker
    worker.stop()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_second_query_reuses_the_loaded_model(client, setting):
    _, request = setting
    messages = []
    first = client.query(progress=lambda done, total, message: messages.append(message), **request)
    assert len(first["hits"]) == 3 and sum(h["kind"] == "cavitary" for h in first["hits"]) >= 2
    assert first["loaded"] is False and {"reading the CT", "embedding with TumorDescriptor"} <= set(messages)
    similarity = [h["closer_than"] for h in first["hits"]]
    assert similarity == sorted(similarity, reverse=True) and all(0 <= s <= 100 for s in similarity)
    pid = client.pid
    second = client.query(**request)
    assert second["loaded"] is True and client.pid == pid  # the same process, the model kept
    assert [h["PatientID"] for h in second["hits"]] == [h["PatientID"] for h in first["hits"]]


def test_cancel_mid_query_ends_the_whole_worker_and_the_next_query_starts_fresh(client, setting):
    _, request = setting
    client.query(**request)
    pid = client.pid
    seen = []
    with pytest.raises(Cancelled):
        client.query(
            progress=lambda done, total, message: seen.append(message),
            cancelled=lambda: "embedding with TumorDescriptor" in seen,
            **request,
        )
    assert _gone(pid) and not client.running
    again = client.query(**request)
    assert client.pid != pid and len(again["hits"]) == 3


def test_a_worker_that_dies_is_a_clear_error_and_is_replaced(client, setting):
    _, request = setting
    client.query(**request)
    pid = client.pid

    def crash(done, total, message):
        os.kill(pid, signal.SIGKILL)

    with pytest.raises(SimilarPatientsError, match=r"stopped unexpectedly \(exit code -9\).*starts a new one"):
        client.query(progress=crash, **request)
    assert len(client.query(**request)["hits"]) == 3 and client.pid != pid


def test_errors_come_back_with_the_libraries_message_and_the_worker_stays(client, setting):
    _, request = setting
    with pytest.raises(SimilarPatientsError, match="Reference 'tumors' has no model 'CTFM'"):
        client.query(**{**request, "model": "CTFM"})
    pid = client.pid
    with pytest.raises(SimilarPatientsError, match=r"mask .* does not exist"):
        client.query(**{**request, "tumors": {"mask": "/nowhere/mask.nrrd"}})
    assert client.pid == pid and len(client.query(**request)["hits"]) == 3


def test_a_missing_python_is_named():
    with pytest.raises(SimilarPatientsError, match="PythonSlicer"):
        WorkerClient(python="/opt/Slicer/bin/PythonSlicer-missing")


def test_a_ct_named_by_its_key_is_sent_once(client, setting):
    from SimilarPatientsLib.scene.worker import ImageNotHeld

    _, request = setting
    with pytest.raises(ImageNotHeld, match="send it again"):  # a fresh worker holds no image
        client.query(**{**request, "image": None, "image_key": "ct-1"})
    first = client.query(**{**request, "image_key": "ct-1"})
    again = client.query(**{**request, "image": None, "image_key": "ct-1"})  # the voxels are not sent again
    assert [h["PatientID"] for h in again["hits"]] == [h["PatientID"] for h in first["hits"]]
    assert again["image_reused"] and not first["image_reused"]
    with pytest.raises(ImageNotHeld):
        client.query(**{**request, "image": None, "image_key": "ct-2"})  # another volume: send it


class _SlowWeights(http.server.BaseHTTPRequestHandler):
    """A weights mirror that trickles a 64 MB file: a download that is still running when cancelled."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(64 << 20))
        self.end_headers()
        try:
            for _ in range(1024):
                self.wfile.write(b"\0" * (64 << 10))
                time.sleep(0.02)
        except OSError:  # the worker was killed: its end of the connection is gone
            pass

    def log_message(self, *args):
        pass


@pytest.mark.torch  # CT-FM's network
def test_cancel_mid_download_ends_the_worker_and_keeps_no_weights_file(tmp_path, nlst_home, setting):
    """CT-FM's weights come from the site's mirror (``$SIMILARPATIENTS_WEIGHTS_MIRROR``); the user cancels
    while they download: the worker's whole process tree ends, and no weights file is left to be taken
    for whole (only pooch's temporary file, which the next download clears)."""
    _, request = setting
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowWeights)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    home = tmp_path / "home"
    environment = dict(os.environ, SIMILARPATIENTS_WEIGHTS_MIRROR=f"http://127.0.0.1:{server.server_address[1]}/")
    environment["SIMILARPATIENTS_HOME"] = str(home)
    client = WorkerClient(environment=environment)
    seen, pids = [], []

    def progress(done, total, message):
        seen.append((done, total, message))
        pids.append(client.pid)

    try:
        with pytest.raises(Cancelled):
            client.query(
                progress=progress,
                cancelled=lambda: sum(m.startswith("downloading") for _, _, m in seen) >= 3,
                **{**request, "model": "CTFM", "reference": "nlst-sybil", "home": str(nlst_home)},
                accept_licence=True,
            )
        stopped = not client.running
    finally:
        client.stop()
        server.shutdown()
        server.server_close()
    assert stopped and _gone(pids[-1])
    downloading = [(done, total) for done, total, m in seen if m.startswith("downloading")]
    assert downloading[-1][1] == 64 << 20 and 0 < downloading[-1][0] < 64 << 20  # a determinate bar, midway
    weights = home / "weights" / "CTFM"
    assert not (weights / "model.safetensors").exists()
    left = [p.name for p in weights.iterdir()]
    assert len(left) == 1 and left[0].startswith("tmp")


def test_a_line_that_is_not_a_request_is_answered_with_an_error_and_the_worker_lives_on():
    import json
    import subprocess
    import sys

    from SimilarPatientsLib.scene import worker

    lines = [b"[1,2]", b"42", b"null", b'"text"', b"[" * 100_000 + b"]" * 100_000, b'{"id": 1, "op"']
    lines += [b'\xff\xfe{"id": 2, "op": "ping"}', b'{"id": [[1]], "op": "ping"}', b'{"id": 3, "op": 7}']
    lines += [b'{"id": 4, "op": "ping"}']
    environment = dict(os.environ, PYTHONPATH=str(worker._PACKAGE.parent))
    done = subprocess.run(
        [sys.executable, "-m", "SimilarPatientsLib.scene.worker"],
        input=b"\n".join(lines) + b"\n",
        capture_output=True,
        env=environment,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    events = [json.loads(line) for line in done.stdout.decode("utf-8").splitlines()]
    assert len(events) == len(lines)  # one answer per line, the last one to a request after all the others
    messages = [e["message"] for e in events[:-1]]
    for message in messages[:4]:
        assert message.startswith("Not a request: a request is a JSON object")
    assert messages[4] == "Not a request: the line nests brackets too deeply to read."
    assert messages[5].startswith('Not a request: \'{"id": 1, "op"\' is not JSON.')
    assert messages[6].startswith("Not a request: the line is not UTF-8 (byte 0")
    assert messages[7] == "Not a request: its id must be a number or a text."
    assert messages[8] == "Unknown worker request '7'." and events[8]["id"] == 3
    assert all(e["event"] == "error" and e["id"] is None for e in events[:8])
    assert events[-1]["event"] == "result" and events[-1]["id"] == 4


def test_a_one_patient_reference_answers_a_fused_image_query_and_its_preparation(client, setting, tmp_path):
    """A query from a new image has a nearest patient even in a reference of one; only the closeness
    ("closer than N% of nearest matches") has no distribution to read, and is left empty."""
    import pandas as pd
    from conftest import store_frame
    from SimilarPatientsLib.imaging.tumor import from_binary_mask
    from SimilarPatientsLib.models.embedder import Embedder

    _, request = setting
    image, mask, _ = tumor_ct("smooth", np.random.default_rng(5))
    embedding = Embedder("TumorDescriptor").embed(image, from_binary_mask(mask))[0]
    row = {"model": embedding.model, "recipe": embedding.recipe, "PatientID": "ONLY", "embedding": embedding.vector}
    store_frame(pd.DataFrame([row]), tmp_path / "home", "one")
    asked = {**request, "reference": "one", "home": str(tmp_path / "home")}
    client.request("prepare", **{**asked, "model": "all"})
    for model, fusion in (("all", "rrf"), ("all", "percentile"), ("TumorDescriptor", "rrf")):
        hits = client.query(**{**asked, "model": model, "fusion": fusion})["hits"]
        assert [h["PatientID"] for h in hits] == ["ONLY"] and hits[0]["closer_than"] is None


def test_a_request_missing_a_field_is_answered_naming_the_field_not_as_a_key_error():
    import json
    import subprocess
    import sys

    from SimilarPatientsLib.scene import worker

    requests = [
        {"id": 1, "op": "query", "reference": "tumors"},
        {"id": 2, "op": "prepare"},
        {"id": 3, "op": "thumbnails", "folder": "/tmp", "series": [{"uid": "1.2"}]},
        {"id": 4, "op": "thumbnails"},
    ]
    environment = dict(os.environ, PYTHONPATH=str(worker._PACKAGE.parent))
    done = subprocess.run(
        [sys.executable, "-m", "SimilarPatientsLib.scene.worker"],
        input="".join(json.dumps(r) + "\n" for r in requests).encode(),
        capture_output=True,
        env=environment,
        timeout=120,
    )
    messages = [json.loads(line)["message"] for line in done.stdout.decode("utf-8").splitlines()]
    assert messages == [
        "The worker's 'query' request lacks model; it needs reference, model.",
        "The worker's 'prepare' request lacks reference, model; it needs reference, model.",
        "The worker's 'thumbnails' request lacks series[].centre; it needs folder (and uid, centre in each series).",
        "The worker's 'thumbnails' request lacks folder; it needs folder (and uid, centre in each series).",
    ]
    assert "KeyError" not in done.stderr.decode(errors="replace")
