"""Weights at plain URLs (Zenodo, NVIDIA, a site's mirror) fetched by the real ``pooch`` from a loopback HTTP
server: verified against the published or recorded hash, a corrupt or broken transfer refused with nothing
kept, offline and HTTP errors said in one sentence; and VISTA3D's published md5 checked."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

pytest.importorskip("pooch")
import pooch
from SimilarPatientsLib.errors import SimilarPatientsError
from SimilarPatientsLib.models import registry, weights

DATA = b"weights at a plain url " * 5000  # more than one of pooch's chunks


def _source(base: str, **checks) -> weights.WeightSource:
    return weights.WeightSource(f"{base}/files/w.pt", "w.pt", "Apache-2.0", False, **checks)


def _left_in(model: str) -> list:
    """What the download left in the model's cache folder (a temporary file would show here)."""
    folder = weights.weights_dir() / model
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_url_comes_through_pooch_and_its_first_sha256_is_recorded(home, server, monkeypatch):
    handler, base = server
    handler.files["/files/w.pt"] = DATA
    calls = []
    retrieve = pooch.retrieve
    monkeypatch.setattr(pooch, "retrieve", lambda *a, **k: calls.append(a[0]) or retrieve(*a, **k))
    source = _source(base)
    reported = []
    path = weights.resolve("CTFM", source, progress=lambda done, total, what: reported.append((done, total)))
    assert path == weights.cached_path("CTFM", source) and path.read_bytes() == DATA
    assert calls == [f"{base}/files/w.pt"] and _left_in("CTFM") == ["w.pt"]
    assert reported[-1] == (len(DATA), len(DATA)) and all(done <= total for done, total in reported)
    assert weights.recorded_sha256("CTFM", source) == hashlib.sha256(DATA).hexdigest()
    assert weights.expected_hash("CTFM", source) == f"sha256:{hashlib.sha256(DATA).hexdigest()}"
    for name in ("download", "Digest"):  # the hand-written downloader is no longer the weights' way
        assert name not in vars(weights)


@pytest.mark.parametrize("algorithm", ["md5", "sha256"])
def test_a_published_hash_refuses_a_corrupt_download_and_keeps_nothing(home, server, algorithm):
    handler, base = server
    published = f"{algorithm}:{hashlib.new(algorithm, DATA).hexdigest()}"
    source = _source(base, known_hash=published)
    handler.files["/files/w.pt"] = DATA[:-7] + b"corrupt"
    with pytest.raises(SimilarPatientsError) as refused:
        weights.resolve("CTFM", source)
    message = str(refused.value)
    assert f"do not match the {published} published" in message and "nothing was kept" in message
    assert _left_in("CTFM") == [] and weights.recorded_sha256("CTFM", source) is None
    handler.files["/files/w.pt"] = DATA
    assert weights.resolve("CTFM", source).read_bytes() == DATA
    assert weights.recorded_sha256("CTFM", source) is None  # a published hash is never replaced by a recorded one


def test_a_changed_upstream_file_is_refused_against_the_recorded_sha256(home, server):
    handler, base = server
    handler.files["/files/w.pt"] = DATA
    source = _source(base)
    weights.resolve("CTFM", source).unlink()
    handler.files["/files/w.pt"] = DATA[::-1]
    with pytest.raises(SimilarPatientsError, match=r"do not match the sha256:[0-9a-f]{64} recorded at the first"):
        weights.resolve("CTFM", source)
    assert _left_in("CTFM") == []


def test_a_transfer_that_breaks_off_keeps_nothing_and_the_next_run_fetches_it_whole(home, server):
    handler, base = server
    handler.files["/files/w.pt"] = DATA
    handler.cut.append(len(DATA) // 3)  # the server promises the whole file, then stops
    source = _source(base)
    with pytest.raises(SimilarPatientsError, match=r"broke off .*nothing was kept\. Run the same command again"):
        weights.resolve("CTFM", source)
    assert _left_in("CTFM") == [] and weights.recorded_sha256("CTFM", source) is None
    assert weights.resolve("CTFM", source).read_bytes() == DATA
    assert weights.recorded_sha256("CTFM", source) == hashlib.sha256(DATA).hexdigest()


def test_offline_and_http_errors_are_one_sentence_saying_how_to_supply_the_file(home, server):
    _, base = server
    offline = weights.WeightSource("http://127.0.0.1:9/w.pt", "w.pt", "Apache-2.0", False)
    with pytest.raises(SimilarPatientsError) as refused:
        weights.resolve("CTFM", offline)
    message = str(refused.value)
    assert "looks offline" in message and "models import CTFM" in message and "--weights" in message
    with pytest.raises(SimilarPatientsError, match=r"answered HTTP 404\. Offline, copy w.pt"):
        weights.resolve("CTFM", _source(base))
    assert _left_in("CTFM") == []


def test_vista3d_is_checked_against_the_md5_monai_publishes(home, server, monkeypatch):
    """VISTA3D's URL names no version; the md5 MONAI's model zoo lists for it pins the file: a mirror's other
    file is refused by it."""
    handler, base = server
    source = registry.get("VISTA3D").weights
    assert source.known_hash == "md5:6ce45a8edde4400c5d28d5e74d7b61d5" and source.pinned
    assert weights.revision("VISTA3D", source) == "pinned by its published md5"
    handler.files["/site/VISTA3D/model_vista3d.pt"] = DATA
    monkeypatch.setenv(weights.MIRROR_ENV, base + "/site")
    with pytest.raises(SimilarPatientsError, match="do not match the md5:6ce45a8edde4400c5d28d5e74d7b61d5 published"):
        weights.resolve("VISTA3D", source, accept_licence=True)
    assert _left_in("VISTA3D") == []


def test_models_import_checks_a_published_md5(home, tmp_path, capsys):
    from SimilarPatientsLib.cli import main

    other = tmp_path / "model_vista3d.pt"
    other.write_bytes(DATA)
    assert main(["models", "import", "VISTA3D", str(other)]) == 2
    error = capsys.readouterr().err
    assert f"its md5 is {hashlib.md5(DATA).hexdigest()}" in error and "Nothing was imported" in error
    assert not weights.cached_path("VISTA3D", registry.get("VISTA3D").weights).exists()


def test_a_killed_downloads_temporary_file_is_cleared_by_the_next_download_but_a_live_one_is_not(home, server):
    handler, base = server
    handler.files["/files/w.pt"] = DATA
    source = _source(base)
    folder = weights.cached_path("CTFM", source).parent
    folder.mkdir(parents=True)
    (folder / "tmpkilled").write_bytes(DATA[:100])
    os.utime(folder / "tmpkilled", (time.time() - 3600, time.time() - 3600))
    (folder / "tmplive").write_bytes(DATA[:100])  # written just now: another process's download
    weights.resolve("CTFM", source)
    assert _left_in("CTFM") == ["tmplive", "w.pt"]
