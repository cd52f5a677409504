"""Weights on the Hugging Face hub fetched by the real ``huggingface_hub`` client from a loopback server that
answers the two calls it makes (``HEAD`` then ``GET`` of ``/<repo>/resolve/<revision>/<file>``, with the
hub's headers), through ``$HF_ENDPOINT``: the token for a gated dataset, the shared cache, the commit the
first download records; and ``models download`` / ``models import``."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
import urllib.parse
from typing import ClassVar

import pytest

pytest.importorskip("huggingface_hub")
from SimilarPatientsLib.cli import main
from SimilarPatientsLib.errors import SimilarPatientsError
from SimilarPatientsLib.models import registry, weights

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LATER = "89abcdef0123456789abcdef0123456789abcdef"  # where a branch has moved to since
TOKEN = "hf_loopback_token"


class _Hub(http.server.BaseHTTPRequestHandler):
    """The hub's resolve endpoint: ``files[(repository, file name)][commit]``, ``heads[repository]`` the commit
    ``main`` points to (COMMIT unless moved); ``gated`` repositories answer 401 without ``Authorization:
    Bearer TOKEN``, as the hub does (``X-Error-Code: GatedRepo``)."""

    files: ClassVar[dict] = {}
    heads: ClassVar[dict] = {}
    gated: ClassVar[set] = set()
    seen: ClassVar[list] = []

    def _answer(self, body: bool):
        path = urllib.parse.unquote(self.path.split("?")[0])
        self.seen.append((self.command, path, self.headers.get("Authorization")))
        found = re.fullmatch(r"/((?:datasets/)?[^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo, revision, name = found.groups() if found else (None, None, None)
        if repo in self.gated and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(401, "GatedRepo", "Access to this dataset is restricted.")
        commit = self.heads.get(repo, COMMIT) if revision == "main" else revision
        versions = self.files.get((repo, name), {})
        if commit not in versions and not any(commit in files for files in self.files.values()):
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        data = versions.get(commit)
        if data is None:
            return self._error(404, "EntryNotFound", "Entry not found")
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, code: int, kind: str, message: str):
        self.send_response(code)
        self.send_header("X-Error-Code", kind)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):
        self._answer(False)

    def do_GET(self):
        self._answer(True)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(home, tmp_path, monkeypatch):
    _Hub.files, _Hub.heads, _Hub.gated, _Hub.seen = {}, {}, set(), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{httpd.server_address[1]}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv(weights.MIRROR_ENV, raising=False)
    yield _Hub
    httpd.shutdown()
    httpd.server_close()


def _repo(model: str) -> str:
    source = registry.get(model).weights.hub
    return f"datasets/{source.repo_id}" if source.repo_type == "dataset" else source.repo_id


def _serve(hub, model: str, data: bytes, commit: str = COMMIT) -> None:
    """``data`` as the model's file at ``commit``, and ``main`` moved there."""
    hub.files.setdefault((_repo(model), registry.get(model).weights.hub.filename), {})[commit] = data
    hub.heads[_repo(model)] = commit


def test_hub_weights_come_into_the_shared_cache_and_the_first_commit_is_pinned(hub, tmp_path):
    data = b"ct-fm weights" * 1000
    _serve(hub, "CTFM", data)
    source = registry.get("CTFM").weights
    reported = []
    path = weights.resolve("CTFM", source, progress=lambda done, total, what: reported.append((done, total)))
    assert path.read_bytes() == data and (tmp_path / "hf-cache") in path.parents  # the hub's cache, not ours
    assert ("HEAD", "/project-lighter/ct_fm_feature_extractor/resolve/main/model.safetensors", None) in hub.seen
    assert reported[-1] == (len(data), len(data))
    assert weights.recorded_sha256("CTFM", source) == hashlib.sha256(data).hexdigest()
    hub.seen.clear()
    assert weights.status("CTFM", source).present == path  # found in the cache without asking the hub
    assert weights.resolve("CTFM", source) == path and hub.seen == []
    path.unlink()  # fetched again: at the commit the first download recorded, not the moving branch
    weights.resolve("CTFM", source)
    assert hub.seen[0][1] == f"/project-lighter/ct_fm_feature_extractor/resolve/{COMMIT}/model.safetensors"


def test_a_gated_dataset_sends_the_token_and_without_one_says_how_to_log_in(hub, monkeypatch):
    hub.gated.add("datasets/ibrahimhamamci/CT-RATE")
    _serve(hub, "CT-CLIP", b"ct-clip weights")
    source = registry.get("CT-CLIP").weights
    with pytest.raises(SimilarPatientsError) as refused:
        weights.resolve("CTClipVit", source, accept_licence=True)
    message = str(refused.value)
    assert "HTTP 401" in message and "huggingface-cli login" in message and "HF_TOKEN" in message
    assert "accept the dataset's terms" in message and "huggingface.co/datasets/ibrahimhamamci/CT-RATE" in message
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert weights.resolve("CTClipVit", source).read_bytes() == b"ct-clip weights"
    assert hub.seen[-1][2] == f"Bearer {TOKEN}"


def test_a_changed_hub_file_is_refused_against_the_recorded_digest(hub):
    _serve(hub, "CTFM", b"first")
    source = registry.get("CTFM").weights
    weights.resolve("CTFM", source).unlink()
    _serve(hub, "CTFM", b"other")
    with pytest.raises(SimilarPatientsError, match="do not match the sha256"):
        weights.resolve("CTFM", source)


def test_models_download_all_asks_one_licence_question_before_fetching_anything(hub, capsys):
    assert main(["models", "download", "all"]) == 2
    error = capsys.readouterr().err
    pending = [s.name for s in registry.MODELS.values() if s.weights is not None and s.weights.needs_acknowledgement]
    assert len(pending) > 1 and f"similar-patients models accept {' '.join(pending)}" in error
    assert error.count("error:") == 1 and hub.seen == []


def test_models_download_fetches_ahead_of_time(hub, capsys):
    _serve(hub, "CT-FM", b"weights")
    assert main(["models", "download", "ct-fm"]) == 0
    assert "CTFM: " in capsys.readouterr().out
    assert weights.status("CTFM", registry.get("CTFM").weights).present.read_bytes() == b"weights"


def test_models_import_checks_and_copies_a_file_fetched_elsewhere(hub, tmp_path, capsys):
    given = tmp_path / "supervised_suprem_unet_2100.pth"
    given.write_bytes(b"suprem weights")
    assert main(["models", "import", "SuPreM", str(given)]) == 0
    source = registry.get("SUPREME").weights
    assert weights.status("SUPREME", source).present == weights.cached_path("SUPREME", source)
    assert weights.resolve("SUPREME", source).read_bytes() == b"suprem weights" and hub.seen == []
    other = tmp_path / "other.pth"
    other.write_bytes(b"other weights")
    capsys.readouterr()
    assert main(["models", "import", "SUPREME", str(other)]) == 2  # not the file recorded at the first import
    assert "Nothing was imported" in capsys.readouterr().err
    assert weights.cached_path("SUPREME", source).read_bytes() == b"suprem weights"


def _pinned_here(monkeypatch, data: bytes):
    """ModelsGen as the registry pins it (its commit), checked against ``data``'s sha256: the publisher's
    file cannot be served here, so its published size and hash give way to the test's file's."""
    import dataclasses

    spec = registry.MODELS["ModelsGen"]
    source = dataclasses.replace(spec.weights, size=len(data), known_hash=f"sha256:{hashlib.sha256(data).hexdigest()}")
    monkeypatch.setitem(registry.MODELS, "ModelsGen", dataclasses.replace(spec, weights=source))
    return source


def test_a_pinned_model_asks_for_its_commit_whatever_the_branch_and_records_none(hub, monkeypatch):
    pinned = registry.get("ModelsGen").weights.hub.revision
    _serve(hub, "ModelsGen", b"the publisher's file", pinned)
    _serve(hub, "ModelsGen", b"a later file on main", LATER)  # the branch moved on
    source = _pinned_here(monkeypatch, b"the publisher's file")
    path = weights.resolve("ModelsGen", source, accept_licence=True)
    assert path.read_bytes() == b"the publisher's file"
    assert [p for _, p, _ in hub.seen] == [f"/MrGiovanni/ModelsGenesis/resolve/{pinned}/Genesis_Chest_CT.pt"] * 2
    assert weights.recorded_commit("ModelsGen", source) is None  # a pin is never replaced by a recorded commit
    assert weights.revision("ModelsGen", source) == f"pinned {pinned[:12]}"


def test_a_pinned_models_file_that_is_not_the_published_one_is_refused_and_not_kept(hub):
    """The registry's real pin: a file at that commit with another size or hash than the hub's page lists."""
    source = registry.get("ModelsGen").weights
    _serve(hub, "ModelsGen", b"not Models Genesis", source.hub.revision)
    with pytest.raises(SimilarPatientsError, match=r"do not match the published size, 152639120 bytes.*nothing was"):
        weights.resolve("ModelsGen", source, accept_licence=True)
    assert weights.status("ModelsGen", source).present is None  # gone from the Hugging Face cache too


def test_an_unpinned_model_says_so_and_a_moved_branch_does_not_change_its_recorded_commit(hub, caplog, capsys):
    source = registry.get("CTFM").weights
    assert not source.pinned
    assert main(["models", "list", "--json"]) == 0
    rows = {row["model"]: row for row in __import__("json").loads(capsys.readouterr().out)}
    assert rows["CTFM"]["revision"] == "unpinned: main, commit recorded at first download"
    _serve(hub, "CTFM", b"ct-fm as first fetched")
    with caplog.at_level("WARNING", logger="SimilarPatientsLib"):
        path = weights.resolve("CTFM", source)
    assert f"names no pinned commit; this first download came from commit {COMMIT}, now recorded" in caplog.text
    assert weights.recorded_commit("CTFM", source) == COMMIT
    _serve(hub, "CTFM", b"ct-fm replaced on main", LATER)  # the branch moves on
    path.unlink()
    hub.seen.clear()
    assert weights.resolve("CTFM", source).read_bytes() == b"ct-fm as first fetched"
    assert hub.seen[0][1] == f"/project-lighter/ct_fm_feature_extractor/resolve/{COMMIT}/model.safetensors"
    assert main(["models", "list", "--json"]) == 0
    rows = {row["model"]: row for row in __import__("json").loads(capsys.readouterr().out)}
    assert rows["CTFM"]["revision"] == f"unpinned: recorded {COMMIT[:12]}"


def test_models_download_revision_pins_an_unpinned_model_and_is_refused_for_a_pinned_one(hub, capsys):
    source = registry.get("CTFM").weights
    _serve(hub, "CTFM", b"first")
    weights.resolve("CTFM", source)
    _serve(hub, "CTFM", b"second", LATER)
    assert main(["models", "download", "CT-FM", "--revision", LATER]) == 0
    assert (
        f"CTFM: {weights.status('CTFM', source).present} (unpinned: recorded {LATER[:12]})" in capsys.readouterr().out
    )
    assert weights.recorded_commit("CTFM", source) == LATER
    assert weights.recorded_sha256("CTFM", source) == hashlib.sha256(b"second").hexdigest()
    weights.status("CTFM", source).present.unlink()
    hub.seen.clear()
    assert weights.resolve("CTFM", source).read_bytes() == b"second" and LATER in hub.seen[0][1]
    assert main(["models", "download", "ModelsGen", "--revision", LATER, "--accept-licence"]) == 2
    assert "is pinned at commit 4f4e9cbe3a7b8ef5c7813e2d1ac38d23561e1993" in capsys.readouterr().err
    assert main(["models", "download", "FMCIB", "--revision", LATER]) == 2
    assert "not on the Hugging Face hub" in capsys.readouterr().err
    assert main(["models", "download", "CTFM", "Merlin", "--revision", LATER]) == 2
    assert "--revision pins one model" in capsys.readouterr().err
