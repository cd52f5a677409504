"""Atomic writes of the store, and downloads: verified, resumable, cached, with clear errors offline."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_frame
from SimilarPatientsLib import Cancelled, ReferenceStore, SimilarPatientsError
from SimilarPatientsLib.references import nlst_sybil, schema, store
from SimilarPatientsLib.references.importers import read_source
from SimilarPatientsLib.util.download import Digest, download


def test_failed_write_keeps_previous_version(home, monkeypatch):
    references = ReferenceStore()
    first = references.write("ref", schema.from_frame(synthetic_frame(seed=1)), "v1")
    before = np.asarray(first.space("A").vectors).copy()

    def crash(staging, *args, **kwargs):
        staging.mkdir(parents=True)
        (staging / "reference.parquet").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(store, "write_version", crash)
    with pytest.raises(OSError, match="disk full"):
        references.write("ref", schema.from_frame(synthetic_frame(seed=2)), "v2")
    again = references.open("ref")
    assert again.manifest["source"] == "v1"
    np.testing.assert_array_equal(again.space("A").vectors, before)
    assert [p.name for p in (home / "references" / "ref").iterdir() if p.name.endswith(".part")] == []


def test_crash_before_pointer_swap_keeps_previous_version(home, monkeypatch):
    references = ReferenceStore()
    references.write("ref", schema.from_frame(synthetic_frame(seed=1)), "v1")
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "CURRENT":
            raise KeyboardInterrupt  # killed between writing the new version and switching to it
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        references.write("ref", schema.from_frame(synthetic_frame(seed=2)), "v2")
    assert references.open("ref").manifest["source"] == "v1"
    monkeypatch.setattr(store.os, "replace", real_replace)
    references.write("ref", schema.from_frame(synthetic_frame(seed=3)), "v3")
    assert references.open("ref").manifest["source"] == "v3"
    versions = [p for p in (home / "references" / "ref").iterdir() if p.is_dir()]
    assert len(versions) == 1  # the orphaned version was cleaned up


def test_list_and_delete(home):
    references = ReferenceStore()
    references.write("one", schema.from_frame(synthetic_frame(models=("A", "B"))), "test")
    summary = references.summary()
    assert summary[["reference", "model", "dim"]].values.tolist() == [["one", "A", 16], ["one", "B", 16]]
    references.delete("one")
    assert references.names() == []
    with pytest.raises(SimilarPatientsError, match="No reference named 'one'"):
        references.open("one")


def _serve_upstream(handler, base, nlst_dir, monkeypatch, models):
    for model in models:
        data = (nlst_dir / "upstream" / "embeddings" / f"{model}_features.pkl").read_bytes()
        handler.files[f"/up/{model}_features.pkl"] = data
    monkeypatch.setattr(nlst_sybil, "RAW_URL", base + "/up/{file}")
    monkeypatch.delenv(nlst_sybil.LOCAL_DIR_ENV, raising=False)


def test_nlst_download_verifies_caches_and_imports(home, server, nlst_dir, monkeypatch):
    handler, base = server
    _serve_upstream(handler, base, nlst_dir, monkeypatch, ["CTFM", "PASTA"])
    monkeypatch.setattr(nlst_sybil, "UPSTREAM_FILES", {m: nlst_sybil.UPSTREAM_FILES[m] for m in ("CTFM", "PASTA")})
    reference = ReferenceStore().import_reference("nlst", "nlst-sybil")
    assert reference.models == ["CTFM", "PASTA"] and reference.model_info("PASTA").lesions == 732
    assert "downloaded" in reference.manifest["source"]
    assert any("no clinical table" in n for n in reference.manifest["notes"])
    handler.files.clear()  # a second import reads the verified cache, not the network
    again = ReferenceStore().import_reference("nlst2", "https://github.com/ImagingDataCommons/nlst-sybil-connectome")
    assert again.models == ["CTFM", "PASTA"]


def test_partial_download_resumes(home, server, nlst_dir, monkeypatch):
    handler, base = server
    _serve_upstream(handler, base, nlst_dir, monkeypatch, ["CTFM"])
    handler.cut.append(700_000)
    with pytest.raises(SimilarPatientsError, match="run the same command again to resume"):
        nlst_sybil.download_upstream(["CTFM"])
    paths = nlst_sybil.download_upstream(["CTFM"])
    assert handler.ranges == ["bytes=700000-"]
    assert Digest("git-blob-sha1", nlst_sybil.UPSTREAM_FILES["CTFM"]).matches(paths["CTFM"])


def test_corrupt_download_is_refused_and_not_cached(home, server, tmp_path):
    handler, base = server
    handler.files["/x.pkl"] = b"not what was promised"
    dest = tmp_path / "x.pkl"
    with pytest.raises(SimilarPatientsError, match="does not match its expected sha256"):
        download(base + "/x.pkl", dest, Digest("sha256", "0" * 64))
    assert not dest.exists() and not Path(str(dest) + ".part").exists()


def test_offline_without_local_copy_says_how_to_supply_files(home, monkeypatch):
    monkeypatch.setattr(nlst_sybil, "RAW_URL", "http://127.0.0.1:9/{file}")  # the discard port: refused
    monkeypatch.setattr(nlst_sybil, "find_local_copy", lambda extra=(): None)
    with pytest.raises(SimilarPatientsError) as error:
        read_source("nlst-sybil")
    message = str(error.value)
    assert "looks offline" in message and "--source FOLDER" in message and nlst_sybil.LOCAL_DIR_ENV in message


def test_table_from_url(home, server, tmp_path):
    handler, base = server
    path = tmp_path / "mine.parquet"
    synthetic_frame().to_parquet(path)
    handler.files["/data/mine.parquet"] = path.read_bytes()
    reference = ReferenceStore().import_reference("remote", base + "/data/mine.parquet")
    assert reference.manifest["source"] == base + "/data/mine.parquet"
    with pytest.raises(SimilarPatientsError, match="HTTP 404"):
        ReferenceStore().import_reference("missing", base + "/data/none.parquet")
    with pytest.raises(SimilarPatientsError, match="Cannot tell what"):
        ReferenceStore().import_reference("odd", base + "/data/page.html")


def test_the_nlst_setting_is_the_only_place_a_local_copy_is_looked_for(home, nlst_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(nlst_sybil.LOCAL_DIR_ENV, raising=False)
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # a checkout beside ../shared: not looked at
    assert nlst_sybil.find_local_copy() is None
    monkeypatch.setenv(nlst_sybil.LOCAL_DIR_ENV, str(nlst_dir))
    assert nlst_sybil.find_local_copy() == nlst_dir
    monkeypatch.setenv(nlst_sybil.LOCAL_DIR_ENV, str(tmp_path))
    with pytest.raises(SimilarPatientsError, match="holds no NLST-Sybil"):  # a setting that cannot match
        read_source("nlst-sybil")


def test_a_cancelled_import_leaves_no_reference_and_no_staging(home, tmp_path):
    path = tmp_path / "mine.parquet"
    synthetic_frame().to_parquet(path)

    def cancel(done, total, message):
        if message == "writing the vectors":
            raise Cancelled()

    with pytest.raises(Cancelled, match="Cancelled"):
        ReferenceStore().import_reference("mine", str(path), progress=cancel)
    assert "mine" not in ReferenceStore()
    assert [p.name for p in (home / "references" / "mine").iterdir()] == []


_WRITER = """
import sys
import numpy as np, pandas as pd
from SimilarPatientsLib import ReferenceStore
from SimilarPatientsLib.references import schema
home, first = sys.argv[1], int(sys.argv[2])
for write in range(first, first + 3):
    vectors = np.random.default_rng(write).standard_normal((40, 8)).astype(np.float32)
    vectors[:, 0] = write  # every row says which write it belongs to
    frame = pd.DataFrame({"model": "A", "PatientID": [f"P{i:02d}" for i in range(40)], "embedding": list(vectors)})
    ReferenceStore(home).write("shared", schema.from_frame(frame.assign(write=write)), f"write-{write}")
"""

_READER = """
import sys, time
import numpy as np
from SimilarPatientsLib import ReferenceStore
home, seconds = sys.argv[1], float(sys.argv[2])
reads, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    reference = ReferenceStore(home).open("shared")
    write = int(reference.manifest["source"].split("-")[1])
    lesions, vectors = reference.lesions("A"), np.asarray(reference.space("A").vectors)
    assert len(lesions) == 40 and (lesions["write"] == write).all(), "a torn version"
    assert vectors.shape == (40, 8) and (vectors[:, 0] == write).all(), "vectors of another write"
    assert len(reference.search("A", patient="P07", k=5)) == 5
    reads += 1
print(reads)
"""


def test_concurrent_writers_and_readers_of_one_name(home, tmp_path):
    import subprocess
    import sys

    from SimilarPatientsLib.references.schema import from_frame

    (tmp_path / "writer.py").write_text(_WRITER)
    subprocess.run([sys.executable, str(tmp_path / "writer.py"), str(home), "0"], check=True)  # writes 0, 1, 2
    (tmp_path / "reader.py").write_text(_READER)
    run = [sys.executable]
    readers = [
        subprocess.Popen(
            [*run, str(tmp_path / "reader.py"), str(home), "6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    writers = [
        subprocess.Popen([*run, str(tmp_path / "writer.py"), str(home), str(first)], stderr=subprocess.PIPE)
        for first in (100, 200, 300, 400)
    ]
    for writer in writers:
        assert writer.wait(120) == 0, writer.stderr.read().decode()
    for reader in readers:
        out, err = reader.communicate(timeout=120)
        assert reader.returncode == 0, err.decode()
        assert int(out) > 0
    final = ReferenceStore().open("shared")
    assert final.manifest["source"] in {f"write-{w}" for f in (100, 200, 300, 400) for w in range(f, f + 3)}
    del final
    ReferenceStore().write("shared", from_frame(synthetic_frame(dim=8).assign(write=1)), "write-last")
    folder = home / "references" / "shared"
    assert [p.name for p in folder.iterdir() if p.is_dir()] == [
        (folder / "CURRENT").read_text(encoding="utf-8").strip()
    ]
    assert not [p for p in folder.iterdir() if p.name.endswith(".part")]
