"""The command line: verbs, human tables, JSON, errors and the demo, on the real NLST-Sybil reference."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from SimilarPatientsLib.cli import main


@pytest.fixture
def on_nlst(nlst_home, monkeypatch):
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(nlst_home))


def test_neighbors_json_has_the_promised_keys(on_nlst, capsys):
    assert main(["neighbors", "--reference", "nlst-sybil", "--model", "CTFM", "--patient", "100242", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    for key in ("PatientID", "distance", "SeriesInstanceUID", "StudyInstanceUID", "viewer_url", "histology", "stage"):
        assert all(key in h for h in hits), key
    assert "100242" not in {h["PatientID"] for h in hits}
    assert hits[0]["viewer_url"].startswith("https://viewer.imaging.datacommons.cancer.gov/v3/viewer/?")


def test_neighbors_table_filters_and_metric(on_nlst, capsys):
    argv = [
        "neighbors",
        "--reference",
        "nlst-sybil",
        "--model",
        "PASTA",
        "--patient",
        "100242",
        "-k",
        "3",
        "--metric",
        "euclidean",
        "--where",
        "sex=F",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Nearest 3 patients to 100242") and "euclidean" in out[0]
    assert out[1].split()[:6] == ["rank", "PatientID", "closer", "than", "distance", "lesions"]
    assert len(out) == 7 and all("  F  " in line for line in out[2:5])
    assert out[5].startswith("closer than N%") and out[6] == "search: exact (every lesion compared)"


def test_include_self(on_nlst, capsys):
    argv = [
        "neighbors",
        "--reference",
        "nlst-sybil",
        "--model",
        "CTFM",
        "--patient",
        "100242",
        "--include-self",
        "--json",
        "-k",
        "1",
    ]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)[0]["PatientID"] == "100242"


def test_errors_exit_2_with_a_message(on_nlst, capsys):
    assert main(["neighbors", "--reference", "nope", "--model", "CTFM", "--patient", "1"]) == 2
    assert "No reference named 'nope'" in capsys.readouterr().err
    assert main(["neighbors", "--reference", "nlst-sybil", "--model", "CTFM", "--patient", "1"]) == 2
    assert "Patient 1 is not in reference" in capsys.readouterr().err


def test_references_list_and_import(home, nlst_dir, capsys):
    assert main(["references", "list"]) == 0
    assert "No references yet" in capsys.readouterr().out
    assert main(["references", "import", "mine", "--source", str(nlst_dir)]) == 0
    out = capsys.readouterr().out
    assert "Imported 'mine'" in out
    assert any(line.split()[:2] == ["VISTA3D", "768"] for line in out.splitlines())
    assert main(["references", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {(r["model"], r["lesions"], r["patients"]) for r in listed} >= {("CTFM", 732, 464)}


def test_demo_prints_every_model_and_a_reading(on_nlst, capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Query patient 100158 (NLST-Sybil): histology Adenocarcinoma, NOS, stage IA")
    for model in ("CTClipVit", "CTFM", "Merlin", "PASTA", "SUPREME", "VISTA3D"):
        assert f"== {model}: 5 nearest patients" in out
    assert "viewer.imaging.datacommons" not in out  # compact: the 200-character links only with --urls
    for block in out.split("== ")[1:]:  # distances with enough digits to tell the neighbours apart
        assert block.splitlines()[1].split()[:5] == ["rank", "PatientID", "closer", "than", "distance"], block
        rows = [line.split() for line in block.splitlines()[2:7]]
        assert all(re.fullmatch(r"\d+%", row[2]) for row in rows), block  # comparable across models
        distances = [row[3] for row in rows]
        assert len(set(distances)) == len(set(map(float, distances))), block
    assert "closer than N%: nearer than N% of this reference's nearest matches" in out
    assert out.count("(cosine distance, corrected space)") == 6  # the default, hub-free space (search.md)
    reading = out.strip().splitlines()[-1]
    assert reading.startswith("Across 6 models, the top-5 lists for patient 100158 share on average")
    assert "Spearman" in reading and "base rate" in reading
    # the correlation is of this patient's distances to the others, and says so (not "over all patients")
    assert "Ranking every other patient by distance to patient 100158, the models agree at a mean Spearman" in reading
    assert "over all patients" not in reading.lower()
    assert main(["demo", "--urls"]) == 0
    assert capsys.readouterr().out.count("https://viewer.imaging.datacommons.cancer.gov/v3/viewer/") == 30


def test_module_entry_point_runs_without_network_at_import(on_nlst):
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise AssertionError('network at import')\n"
        "socket.socket.connect = refuse\n"
        "import SimilarPatientsLib, SimilarPatientsLib.cli\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    done = subprocess.run(
        [sys.executable, "-m", "SimilarPatientsLib", "references", "list"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=True,
    )
    assert "nlst-sybil" in done.stdout


def test_a_read_only_data_home_is_an_error_not_a_traceback(home, tmp_path, capsys):
    """The data home bind-mounted read-only (a user and mount namespace: no privileges needed)."""
    import shlex
    import shutil

    from conftest import synthetic_frame

    if not shutil.which("unshare"):
        pytest.skip("no unshare(1) to mount the data home read-only")
    path = tmp_path / "mine.parquet"
    synthetic_frame().to_parquet(path)
    assert main(["references", "import", "mine", "--source", str(path)]) == 0
    capsys.readouterr()
    for argv in (
        ["references", "import", "other", "--source", str(path)],
        ["references", "import", "mine", "--source", str(path)],
        ["references", "delete", "mine"],
        ["models", "accept", "VISTA3D"],
        ["neighbors", "--reference", "mine", "--model", "A", "--patient", "P001"],
    ):
        cli = shlex.join([sys.executable, "-m", "SimilarPatientsLib", *argv])
        script = f"mount --bind -o ro {shlex.quote(str(home))} {shlex.quote(str(home))} && exec {cli}"
        done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, encoding="utf-8")
        if "mount" in done.stderr and done.returncode not in (0, 2):
            pytest.skip(f"cannot mount read-only here: {done.stderr.strip()}")
        if argv[0] == "neighbors":  # reading a read-only data home works
            assert done.returncode == 0 and "search: exact" in done.stdout, done.stderr
            continue
        assert done.returncode == 2, (argv, done.stderr)
        assert done.stderr.startswith("error: Cannot write") and "Read-only file system" in done.stderr, done.stderr
        assert "SIMILARPATIENTS_HOME" in done.stderr and "Traceback" not in done.stderr
    assert main(["references", "list"]) == 0 and "mine" in capsys.readouterr().out  # nothing was lost


def test_a_refused_write_names_what_and_how_to_fix(home, monkeypatch, capsys):
    """What the file system says for a read-only mount (EROFS), as root meets it too."""
    import errno

    from SimilarPatientsLib.models import weights

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(home / "weights"))

    monkeypatch.setattr(weights, "replacing", read_only)
    assert main(["models", "accept", "VISTA3D"]) == 2
    error = capsys.readouterr().err
    assert "error: Cannot write the licence acceptance: Read-only file system" in error
    assert "SIMILARPATIENTS_HOME" in error and "Traceback" not in error


def test_a_closed_pipe_ends_quietly(on_nlst):
    command = [sys.executable, "-m", "SimilarPatientsLib", "neighbors", "--reference", "nlst-sybil"]
    command += ["--model", "CTFM", "--patient", "100242", "-k", "400"]
    pipeline = subprocess.run(
        " ".join(command) + " | head -n 2", shell=True, capture_output=True, text=True, encoding="utf-8", check=True
    )
    assert len(pipeline.stdout.splitlines()) == 2
    assert "Traceback" not in pipeline.stderr and "BrokenPipeError" not in pipeline.stderr, pipeline.stderr


def test_a_figure_format_that_cannot_be_written_is_refused_before_the_work(on_nlst, tmp_path, capsys):
    argv = ["explore", "--reference", "nlst-sybil", "--out", str(tmp_path / "map.html"), "--png", "map.bmp"]
    assert main(argv) == 2
    assert "name it .png, .pdf or .svg" in capsys.readouterr().err
    assert not (tmp_path / "map.html").exists()


def test_a_control_character_in_an_id_or_label_cannot_split_the_human_table(home, tmp_path, capsys):
    from conftest import synthetic_frame

    frame = synthetic_frame(n_patients=6, lesions=(1, 1))
    frame.loc[frame.PatientID == "P001", "PatientID"] = "P001\n2  0.000001  1"  # would read as another hit
    frame.loc[frame.PatientID == "P002", "histology"] = "adeno\rsquamous\x1b[2J"
    frame.to_parquet(tmp_path / "ref.parquet")
    assert main(["references", "import", "odd", "--source", str(tmp_path / "ref.parquet")]) == 0
    capsys.readouterr()
    argv = ["neighbors", "--reference", "odd", "--model", "A", "--patient", "P000", "-k", "5"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 1 + 5 + 2  # the heading, the columns, one line per hit, 'closer than', how it searched
    assert any("P001\\n2  0.000001  1" in line for line in lines)
    assert any("adeno\\rsquamous\\x1b[2J" in line for line in lines) and not any("\x1b" in line for line in lines)
    assert main([*argv, "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert {"P001\n2  0.000001  1", "P002"} <= {h["PatientID"] for h in hits}  # the values, exact
