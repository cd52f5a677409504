"""The command line: verbs, human tables, JSON, errors and the demo, on the real NLST-Sybil reference."""

from __future__ import annotations

import json
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
    assert out[1].split()[:4] == ["rank", "PatientID", "distance", "lesions"]
    assert len(out) == 5 and all("  F  " in line for line in out[2:])


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
    assert out.count("https://viewer.imaging.datacommons.cancer.gov/v3/viewer/") == 30
    reading = out.strip().splitlines()[-1]
    assert reading.startswith("Across 6 models, the top-5 lists for patient 100158 share on average")
    assert "Spearman" in reading and "base rate" in reading


def test_module_entry_point_runs_without_network_at_import(on_nlst):
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise AssertionError('network at import')\n"
        "socket.socket.connect = refuse\n"
        "import SimilarPatientsLib, SimilarPatientsLib.cli\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    done = subprocess.run(
        [sys.executable, "-m", "SimilarPatientsLib", "references", "list"], capture_output=True, text=True, check=True
    )
    assert "nlst-sybil" in done.stdout
