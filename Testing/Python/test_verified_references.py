"""A stored reference is checked against the digests recorded when it was written: a changed byte, a cut
file, a file of another model put in its place, a damaged manifest or pointer, are each an error that names
the file and how to repair it, found before any answer, never a traceback, and never in the way of
`references list` or of the other references. Each file is read in full once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import store_frame, synthetic_frame
from SimilarPatientsLib import ReferenceStore, SimilarPatientsError
from SimilarPatientsLib.cli import main
from SimilarPatientsLib.util import digests


@pytest.fixture
def two(home):
    """Two references in the data home: 'damaged' (two models; a test damages it) and 'other'."""
    store_frame(synthetic_frame(n_patients=20, lesions=(2, 2), models=("A", "B")), home, "damaged")
    store_frame(synthetic_frame(n_patients=12, seed=3), home, "other")
    return ReferenceStore(home).open("damaged").path


def _refused(capsys, file: str, argv=None, listed: bool = False) -> str:
    """The CLI refuses with exit 2, naming the file and the repair, without a traceback; the other reference
    still answers and `references list` still lists it. ``listed``: the damage shows in the list too (what a
    ``stat`` finds: a damaged manifest or pointer, a missing or cut file; the list reads no file in full)."""
    digests._checked.clear()  # a new process: nothing checked yet
    argv = argv or ["neighbors", "--reference", "damaged", "--model", "A", "--patient", "P001"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Reference 'damaged' is damaged: ") and file in err, err
    assert "similar-patients references import damaged --source" in err and "Traceback" not in err
    assert main(["neighbors", "--reference", "other", "--model", "A", "--patient", "P001"]) == 0
    capsys.readouterr()
    assert main(["references", "list"]) == 0
    out, listing = capsys.readouterr()
    assert "other" in out and ("warning: Reference 'damaged' is damaged" in listing) == listed, listing
    assert main(["references", "list", "--json"]) == 0
    statuses = {r["reference"]: r["status"] for r in json.loads(capsys.readouterr().out)}
    assert statuses["other"] == "ok" and (file in statuses["damaged"]) == listed
    return err


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_one_changed_byte_in_the_table_is_found_before_any_answer(two, capsys):
    path = two / "reference.parquet"
    _flip(path, path.stat().st_size // 3)
    err = _refused(capsys, "reference.parquet")
    assert "has changed since it was written" in err


def test_one_flipped_bit_in_the_vectors_is_found(two, capsys):
    _flip(two / "models" / "0" / "vectors.npy", -7)
    err = _refused(capsys, "models/0/vectors.npy (model A)")
    assert "has changed since it was written" in err


def test_another_models_norms_in_place_are_found(two, capsys):
    theirs = (two / "models" / "1" / "norms.npy").read_bytes()
    assert len(theirs) == (two / "models" / "0" / "norms.npy").stat().st_size  # same size: only the digest differs
    (two / "models" / "0" / "norms.npy").write_bytes(theirs)
    _refused(capsys, "models/0/norms.npy (model A)")


def test_another_models_index_in_place_is_found(two, capsys):
    reference = ReferenceStore().open("damaged")
    for model in ("A", "B"):  # indexes built and recorded on first use
        reference.search(model, patient="P001", method="approximate")
    recorded = ReferenceStore().open("damaged").manifest["files"]
    assert {"models/0/hnsw-corrected-cosine.faiss", "models/1/hnsw-corrected-cosine.json"} <= set(recorded)
    index = "hnsw-corrected-cosine.faiss"
    (two / "models" / "0" / index).write_bytes((two / "models" / "1" / index).read_bytes())
    argv = ["neighbors", "--reference", "damaged", "--model", "A", "--patient", "P001", "--method", "approximate"]
    _refused(capsys, f"models/0/{index} (model A)", argv)


@pytest.mark.parametrize("file", ["models/0/vectors.npy", "models/1/norms.npy", "reference.parquet"])
def test_a_cut_file_is_found_when_the_reference_is_opened(two, capsys, file):
    path = two / file
    with open(path, "r+b") as stream:
        stream.truncate(path.stat().st_size // 2)
    err = _refused(capsys, file, listed=True)
    assert "bytes where" in err and "were written" in err


def test_a_damaged_index_file_is_found(two, capsys):
    reference = ReferenceStore().open("damaged")
    reference.search("A", patient="P001", method="approximate")
    path = two / "models" / "0" / "hnsw-corrected-cosine.faiss"
    with open(path, "r+b") as stream:
        stream.truncate(100)
    argv = ["neighbors", "--reference", "damaged", "--model", "A", "--patient", "P001", "--method", "approximate"]
    _refused(capsys, "models/0/hnsw-corrected-cosine.faiss", argv, listed=True)


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # cut short
        lambda text: text.replace('"lesions": ', '"lesions": 1', 1),  # one digit more
        lambda text: "[1, 2]",
        lambda text: "\ufffd" + text,
    ],
    ids=["cut", "digit", "not-a-manifest", "not-json"],
)
def test_a_damaged_manifest_is_found(two, capsys, damage):
    path = two / "manifest.json"
    path.write_text(damage(path.read_text(encoding="utf-8")), encoding="utf-8")
    _refused(capsys, "manifest.json", listed=True)


def test_a_pointer_to_a_missing_version_says_so_and_how_to_repair(two, capsys):
    import shutil

    shutil.rmtree(two)
    err = _refused(capsys, f"its CURRENT file names version {two.name}, which is not there", listed=True)
    assert "kept changing" not in err
    (two.parent / "CURRENT").write_text("../../elsewhere\n", encoding="utf-8")
    _refused(capsys, "its CURRENT file does not name a version", listed=True)
    assert main(["references", "delete", "damaged"]) == 0  # and it can be deleted, then imported again
    assert "damaged" not in ReferenceStore()


def test_each_file_is_read_in_full_once_per_process(two, monkeypatch):
    digests._checked.clear()
    read = []
    real = digests.file_record
    monkeypatch.setattr(digests, "file_record", lambda path, progress=None: read.append(Path(path).name) or real(path))
    for _ in range(3):
        reference = ReferenceStore().open("damaged")
        reference.search("A", patient="P001")
        reference.closeness("A", "cosine", [0.5])
        reference.close()
    # the default search reads the corrected space's statistics (and the raw norms, for its rounding bound)
    written = ["reference.parquet", "vectors.npy", "norms.npy", "centre.npy", "scale.npy", "corrected-norms.npy"]
    written.append("radii-cosine.npy")
    assert sorted(read) == sorted([*written, "nearest-corrected-cosine.npy"])
    # a later change of the same file, even of the same size, is found (its modification time moved)
    _flip(two / "models" / "0" / "vectors.npy", -3)
    with pytest.raises(SimilarPatientsError, match=r"models/0/vectors.npy .* has changed"):
        ReferenceStore().open("damaged").search("A", patient="P001")


def test_a_reference_written_before_digests_is_adopted_then_checked(two):
    """A version with a manifest of the earlier format (no digests): its files are recorded when it is first
    opened, it says so in its notes, and a change after that is found."""
    path = two / "manifest.json"
    content = json.loads(path.read_text(encoding="utf-8"))
    for key in ("files", "format", "digests", "digest"):
        content.pop(key)
    path.write_text(json.dumps(content, indent=2), encoding="utf-8")
    reference = ReferenceStore().open("damaged")
    assert "not when written" in reference.manifest["notes"][-1]
    assert "models/0/vectors.npy" in json.loads(path.read_text(encoding="utf-8"))["files"]
    assert len(reference.search("A", patient="P001", k=3)) == 3
    digests._checked.clear()
    _flip(two / "models" / "1" / "vectors.npy", -3)
    with pytest.raises(SimilarPatientsError, match=r"models/1/vectors.npy .* has changed"):
        ReferenceStore().open("damaged").search("B", patient="P001")


_FULL = """
import resource, signal, sys
from SimilarPatientsLib.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG) instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
sys.exit(main(["references", "import", "big", "--source", sys.argv[2]]))
"""


def test_a_full_disk_while_the_vectors_are_written_names_the_file_and_what_to_do(home, tmp_path):
    """Before: "374784 requested and 283616 written (no file name)". A file size limit makes the write of the
    largest file (the vectors) fail as a full disk would, after the smaller ones went through."""
    frame = synthetic_frame(n_patients=400, dim=256)
    frame.to_parquet(tmp_path / "big.parquet")
    vectors = len(frame) * 256 * 4
    script = tmp_path / "full.py"
    script.write_text(_FULL, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script), str(vectors // 2), str(tmp_path / "big.parquet")],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={**os.environ, "SIMILARPATIENTS_HOME": str(home)},
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: Cannot write reference 'big': File too large ("), done.stderr
    assert "vectors.npy" in done.stderr and "free some space" in done.stderr and "Traceback" not in done.stderr
    assert "big" not in ReferenceStore() and not list((home / "references" / "big").glob(".v*"))
