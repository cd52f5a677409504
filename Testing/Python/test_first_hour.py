"""A new user's first hour (issue 28, items 12-18): model names as the docs write them, hints for common
mistakes, what the command line prints, and the install advice."""

from __future__ import annotations

import json

import pytest
from SimilarPatientsLib.cli import main
from SimilarPatientsLib.models import registry


@pytest.fixture
def on_nlst(nlst_home, monkeypatch):
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(nlst_home))


@pytest.mark.parametrize("written", ["CT-CLIP", "ct-clip", "ctclipvit", "CTCLIPVIT"])
def test_neighbors_accepts_the_documented_model_name_in_any_case(on_nlst, capsys, written):
    assert main(["neighbors", "--reference", "nlst-sybil", "--model", written, "--patient", "100242", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["model"] == "CTClipVit"


def test_fused_neighbors_accept_documented_names(on_nlst, capsys):
    argv = ["neighbors", "--reference", "nlst-sybil", "--model", "CT-FM", "SuPreM", "--patient", "100242", "--json"]
    assert main(argv) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits and {"rank_CTFM", "rank_SUPREME"} <= set(hits[0])


@pytest.mark.parametrize(
    ("written", "model"), [("CT-FM", "CTFM"), ("suprem", "SUPREME"), ("Models Genesis", "ModelsGen")]
)
def test_registry_resolves_the_papers_names(written, model):
    assert registry.get(written).name == model


def test_every_model_has_its_aliases_listed(capsys):
    assert set(registry.ALIASES) == set(registry.MODELS)
    assert main(["models", "list"]) == 0
    table = capsys.readouterr().out
    assert "CT-CLIP" in table and "SuPreM" in table and "CT-FM" in table


def test_an_unknown_model_lists_the_documented_names():
    with pytest.raises(Exception, match="CT-CLIP"):
        registry.get("CLIP-CT")


@pytest.mark.parametrize("extra", ["embed", "analysis", "bigquery"])
def test_a_missing_extra_gives_a_command_that_works_from_the_checkout(extra):
    from SimilarPatientsLib.util.optional import missing_extra

    message = str(missing_extra(extra, "x"))
    assert f"pip install -e '.[{extra}]'" in message and "checkout" in message
    assert "similar-patients[" not in message  # no such package on PyPI
    if extra != "bigquery":  # torch first, the CPU build by PyTorch's own index
        assert "--index-url https://download.pytorch.org/whl/cpu" in message


def test_no_install_advice_promises_the_cpu_build_from_pypi():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    texts = [root / "README.md", root / "pyproject.toml", *sorted((root / "docs").glob("*.md"))]
    for path in texts:
        text = path.read_text(encoding="utf-8")
        assert "similar-patients[" not in text, path
        for line in text.splitlines():
            if "pip install torch" in line and "cu1" not in line:  # PyPI's Linux torch is the CUDA build
                assert "whl/cpu" in line or "CUDA" in line or "NVIDIA" in line, (path, line)


@pytest.fixture
def ct_and_mask(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    import numpy as np
    from synthetic_ct import tumor_ct

    image, mask, _ = tumor_ct("smooth", np.random.default_rng(0))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nrrd"))
    return tmp_path / "ct.nrrd", tmp_path / "mask.nrrd"


def test_ct_and_mask_swapped_say_they_look_swapped(ct_and_mask, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(tmp_path / "home"))
    ct, mask = ct_and_mask
    argv = ["embed", "--image", str(mask), "--mask", str(ct), "--model", "TumorDescriptor", "--out", "o.parquet"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "looks like a tumor mask, not a CT" in error and "swapped" in error
    from SimilarPatientsLib.imaging.tumor import tumors_from

    with pytest.raises(Exception, match=r"looks like a CT, not a tumor mask.*swapped"):
        tumors_from(mask=str(ct))


def test_a_negative_point_without_equals_gets_a_hint(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["query", "--image", "ct", "--point", "-1,2,3", "--model", "CTFM", "--reference", "r"])
    assert stop.value.code == 2
    assert "--point=-1,2,3" in capsys.readouterr().err


def test_explore_refuses_an_out_that_is_not_html(on_nlst, tmp_path, capsys):
    out = tmp_path / "map.pdf"
    assert main(["explore", "--reference", "nlst-sybil", "--model", "CTFM", "--out", str(out)]) == 2
    assert ".html" in capsys.readouterr().err and not out.exists()


def test_hit_tables_are_compact_and_show_closer_than(on_nlst, capsys, nlst):
    argv = ["neighbors", "--reference", "nlst-sybil", "--model", "SUPREME", "--patient", "100242"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:4] == ["rank", "PatientID", "closer", "than"]
    assert max(len(line) for line in lines[1:7]) < 160 and "https://" not in "\n".join(lines)
    from SimilarPatientsLib.references.fused import hit_closeness

    hits = nlst.search("SUPREME", patient="100242", exclude=["100242"])
    expected = hit_closeness(nlst, hits, "cosine")  # what the Slicer module shows as Similarity
    assert [line.split()[2] for line in lines[2:7]] == [f"{v:.0f}%" for v in expected]
    assert main([*argv, "--urls"]) == 0
    assert "https://viewer.imaging.datacommons.cancer.gov" in capsys.readouterr().out


def test_fused_tables_show_closer_than_too(on_nlst, capsys):
    assert main(["neighbors", "--reference", "nlst-sybil", "--model", "all", "--patient", "100242", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert all(0 <= h["closer_than"] <= 100 for h in hits)


def test_csv_and_out_write_every_column_to_a_file(on_nlst, capsys, tmp_path):
    import pandas as pd

    out = tmp_path / "hits.csv"
    argv = ["neighbors", "--reference", "nlst-sybil", "--model", "CTFM", "--patient", "100242", "--csv"]
    assert main([*argv, "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    table = pd.read_csv(out)
    assert len(table) == 5 and {"viewer_url", "closer_than", "histology", "distance"} <= set(table.columns)
    assert main([*argv[:-1], "--out", str(tmp_path / "hits.txt")]) == 0
    assert (tmp_path / "hits.txt").read_text(encoding="utf-8").startswith("Nearest 5 patients")


def test_the_nlst_import_says_a_repeated_note_once(nlst_dir):
    from SimilarPatientsLib.references import nlst_sybil

    files = {p.name.split("_")[0]: p for p in sorted((nlst_dir / "upstream" / "embeddings").glob("*.pkl"))}
    notes = nlst_sybil.read_reference(files).notes
    assert len(notes) == 1 and all(model in notes[0] for model in files), notes


def test_verbose_shows_the_librarys_log(tmp_path, capsys, monkeypatch, nlst_dir):
    import logging

    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(tmp_path / "home"))
    library = logging.getLogger("SimilarPatientsLib")
    monkeypatch.setattr(library, "handlers", [])
    monkeypatch.setattr(library, "level", logging.NOTSET)
    source = str(nlst_dir / "upstream")
    assert main(["references", "import", "x", "--source", source, "--verbose"]) == 0
    assert "INFO SimilarPatientsLib.references.store: stored reference 'x'" in capsys.readouterr().err


def test_the_data_home_is_the_platforms_data_folder_and_an_old_cache_home_moves_there(tmp_path, monkeypatch):
    from SimilarPatientsLib.util import home

    monkeypatch.delenv(home.HOME_ENV, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    old = tmp_path / "cache" / "similarpatients" / "references" / "mine"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text("{}", encoding="utf-8")
    assert home.data_home() == tmp_path / "data" / "similarpatients"  # not the folder cache cleaners wipe
    assert (home.data_home() / "references" / "mine" / "manifest.json").read_text(encoding="utf-8") == "{}"
    assert not (tmp_path / "cache" / "similarpatients").exists()
    platformdirs = pytest.importorskip("platformdirs")
    assert home.data_home() == __import__("pathlib").Path(platformdirs.user_data_dir("similarpatients", False))


def test_the_nlst_download_size_said_is_the_files_size(nlst_dir):
    from SimilarPatientsLib.ui.controller import NLST_DOWNLOAD

    files = sorted((nlst_dir / "upstream" / "embeddings").glob("*.pkl"))
    assert len(files) == 6 and f"{sum(p.stat().st_size for p in files) / 1e6:.1f} MB" in NLST_DOWNLOAD


def test_the_user_guides_plain_python_example_runs(on_nlst, capsys):
    """Every code block the docs mark as run by this file runs as written (on the NLST-Sybil reference)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    marker = "<!-- run by Testing/Python/test_first_hour.py -->"
    blocks = [
        block
        for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
        for block in re.findall(re.escape(marker) + r"\n```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)
    ]
    assert blocks
    for block in blocks:
        exec(compile(block, "docs example", "exec"), {})
    printed = capsys.readouterr().out
    assert "closer_than" in printed and "denocarcinoma" in printed


def test_umaps_compilation_is_cached_in_the_data_home_where_the_package_folder_is_read_only(home, monkeypatch):
    pytest.importorskip("umap")
    import os

    from SimilarPatientsLib.maps import projection

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    assert projection.cache_compilation() is None and "NUMBA_CACHE_DIR" not in os.environ  # numba's own cache
    writable = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: "umap" not in str(path) and writable(path, mode))
    assert projection.cache_compilation() == home / "numba"
    assert os.environ["NUMBA_CACHE_DIR"] == str(home / "numba")


def test_the_retrieval_charts_axis_starts_near_chance_not_at_zero():
    from SimilarPatientsLib.evaluation.report import near_chance

    bottom, top = near_chance(0.611, [0.543, 0.60], [0.66, 0.64])  # NLST-Sybil stage, precision@10
    assert 0.5 < bottom < 0.543 and 0.66 < top < 0.7  # the differences fill the chart
    assert near_chance(0.5, [0.45], [0.52])[0] < 0.45 < 0.5 < near_chance(0.5, [0.45], [0.52])[1]


def test_codes_are_coloured_as_categories_and_measures_on_a_scale(nlst):
    from SimilarPatientsLib.maps.embedding_map import is_continuous

    lesions = nlst.lesions("CTFM")
    assert lesions["histology_code"].nunique() > 16  # more codes than colours, still categories
    assert not is_continuous("histology_code", lesions["histology_code"], 15)
    assert is_continuous("age", lesions["age"], 15)
    assert not is_continuous("stage", lesions["stage"], 15)


def test_a_fused_image_query_asks_one_licence_question_for_every_model_before_reading_the_image(home, nlst, tmp_path):
    from SimilarPatientsLib import query_image
    from SimilarPatientsLib.errors import SimilarPatientsError

    pending = [m for m in nlst.models if registry.get(m).weights.needs_acknowledgement]
    assert len(pending) >= 2
    with pytest.raises(SimilarPatientsError) as asked:
        query_image(tmp_path / "not-read.nrrd", [], "all", nlst)
    assert f"similar-patients models accept {' '.join(pending)}" in str(asked.value)
