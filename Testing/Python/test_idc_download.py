"""Matched series onto this machine: the size from the real IDC index, a verified download into the cache
(a cut one refused and not kept; two at once never mixed), progress in bytes, the cache reused, a local
DICOM folder found by UID."""

from __future__ import annotations

import shutil
import threading

import pandas as pd
import pytest
from conftest import IDCBucket as _Bucket
from SimilarPatientsLib import SimilarPatientsError
from SimilarPatientsLib.idc import IDCIndex
from SimilarPatientsLib.idc.download import SeriesCache, series_files


def test_the_download_size_comes_from_the_ids_index(nlst, tmp_path):
    uids = nlst.lesions("CTFM").SeriesInstanceUID.dropna().unique()[:3].tolist()
    cache = SeriesCache(tmp_path / "cache")
    expected = IDCIndex().series(uids).series_size_MB.sum()
    assert cache.download_size_mb(uids) == pytest.approx(expected) and expected > 10
    cache.folder(uids[0]).mkdir(parents=True)  # cached already: costs nothing
    assert cache.download_size_mb(uids) < expected
    with pytest.raises(SimilarPatientsError, match="not in the IDC index"):
        cache.download_size_mb(["1.2.3.4.5"])


def test_a_download_is_verified_cached_and_reused(tmp_path, served):
    folders, index = served
    bucket = _Bucket(folders)
    cache = SeriesCache(tmp_path / "cache", index, bucket)
    uids = list(folders)
    got = cache.fetch(uids)
    assert all(got[u].downloaded and len(got[u].files) == 12 for u in uids)
    assert set(series_files(tmp_path / "cache")) == set(uids)
    again = cache.fetch(uids[:1])  # loading a patient twice reuses the download
    assert not again[uids[0]].downloaded and bucket.calls == 2
    assert cache.download_size_mb(uids) == 0.0
    assert cache.clear() > 0 and not (tmp_path / "cache").exists()


def test_a_cut_download_is_refused_and_not_kept(tmp_path, served):
    folders, index = served
    cache = SeriesCache(tmp_path / "cache", index, _Bucket(folders, cut=3))
    uid = next(iter(folders))
    with pytest.raises(SimilarPatientsError, match=r"brought 9 of its 12 images: it was cut short"):
        cache.fetch([uid])
    assert not cache.folder(uid).exists() and not list((tmp_path / "cache").iterdir())


def test_a_local_dicom_folder_is_found_by_uid(tmp_path, served):
    folders, _ = served
    uid = next(iter(folders))
    (tmp_path / "site" / "other").mkdir(parents=True)
    (tmp_path / "site" / "other" / "notes.txt").write_text("not DICOM")
    shutil.copytree(folders[uid], tmp_path / "site" / "ct")
    found = series_files(tmp_path / "site", [uid])
    assert list(found) == [uid] and len(found[uid]) == 12


def test_an_index_in_a_folder_whose_name_has_a_quote_is_read(tmp_path, served):
    _, index = served
    moved = tmp_path / "Dr O'Brien's data" / "index.parquet"
    moved.parent.mkdir()
    shutil.copy(index.parquet_path, moved)
    uids = index.series(list(served[0])).SeriesInstanceUID.tolist()
    assert sorted(IDCIndex(moved).series(uids).SeriesInstanceUID) == sorted(uids) and len(uids) == 2


def test_two_downloads_of_one_series_at_once_stage_apart_and_both_succeed(tmp_path, served):
    """A cancelled download still ending and the next Load's download of the same series: each stages into a
    folder of its own (they shared one, and the second failed with a false "cut short")."""
    folders, index = served
    uid = next(iter(folders))
    root = tmp_path / "cache"
    results, errors = [], []

    def fetch():
        try:
            results.append(SeriesCache(root, index, _Bucket(folders, pause=0.02)).fetch([uid]))
        except Exception as error:  # handed to the test thread
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert [len(result[uid].files) for result in results] == [12, 12]
    from SimilarPatientsLib.idc.download import series_key

    assert [p.name for p in root.iterdir()] == [series_key(uid)]  # one verified copy, no staging folder left


def test_a_download_reports_bytes_done_of_the_series_size(tmp_path, served):
    folders, index = served
    reports = []
    cache = SeriesCache(tmp_path / "cache", index, _Bucket(folders, pause=0.1))  # 1.2 s a series
    cache.fetch(list(folders), lambda done, total, message: reports.append((done, total, message)))
    total = index.series(list(folders)).series_size_MB.sum() * 1e6
    downloading = [r for r in reports if r[2].startswith("downloading")]
    assert {r[1] for r in downloading} == {total}
    assert any(0 < r[0] < total / 2 for r in downloading)  # measured mid-series, not only between series
    assert [r[0] for r in downloading] == sorted(r[0] for r in downloading)
    assert downloading[-1][2] == f"downloading series 2 of 2 ({total / 1e6:.1f} of {total / 1e6:.1f} MB)"
    assert reports[-1] == (1, 1, "series ready")


# --- Windows: short paths, no console windows, no tool output in the Python console ---------------------

#: Slicer's default DICOM database folder on Windows (Documents\SlicerDICOMDatabase, Documents redirected by
#: OneDrive, a 20-character user name: the longest local account name) and the module's cache in it.
WINDOWS_CACHE = r"C:\Users\firstname.lastname12\OneDrive - Example Health System\Documents\SlicerDICOMDatabase"
WINDOWS_CACHE += r"\SimilarPatients-series"


def test_cached_series_paths_stay_within_200_characters_under_slicers_dicom_database_on_windows(tmp_path, served):
    """The deepest path the cache makes, while downloading and once cached, for a series whose UIDs have
    NLST's real lengths (a 62-character series UID, a 58-character study UID) and idc-index's file names
    (``<uuid>.dcm``), stays within 200 characters of Slicer's DICOM database folder on Windows (Slicer.exe is
    not long-path aware: 260). idc-index's default folder tree made it 310-333."""
    import pydicom

    folders, _ = served
    source = next(iter(folders.values()))
    uid = "1.2.840.113654.2.55.310609767809678441522963921292898109470"  # NLST patient 100158's CT series
    for path in source.iterdir():
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = uid
        dataset.save_as(path)
    pd.DataFrame(
        [{"SeriesInstanceUID": uid, "collection_id": "nlst", "StudyInstanceUID": "1.2.840.113654.2.55." + "8" * 38}]
    ).assign(Modality="CT", SeriesDescription="", series_size_MB=0.03, instanceCount=12).to_parquet(
        tmp_path / "index.parquet"
    )
    bucket = _Bucket({uid: source}, uids={uid: ("nlst", "100158", "1.2.840.113654.2.55." + "8" * 38)})
    cache = SeriesCache(tmp_path / "cache", IDCIndex(tmp_path / "index.parquet"), bucket)
    files = cache.fetch([uid])[uid].files
    made = [*bucket.written, *files, *(p for p in cache.root.rglob("*"))]
    deepest = max(len(str(p.relative_to(cache.root))) for p in made)
    assert len(WINDOWS_CACHE) + 1 + deepest <= 200, (len(WINDOWS_CACHE), deepest)
    from SimilarPatientsLib.idc.download import cached_uids

    assert len(files) == 12 and cached_uids(cache.root) == [uid]  # the folder's name is a digest: the UID is kept


def test_idc_index_starts_s5cmd_without_a_console_window_on_windows(monkeypatch):
    """idc-index runs s5cmd with plain subprocess.Popen/run/check_call and takes no creation flags: on
    Windows, each of those calls gets CREATE_NO_WINDOW; everything else of subprocess is its own."""
    import re
    import types

    idc_index = pytest.importorskip("idc_index", reason="the download extra")
    pytest.importorskip("idc_index.index")
    from SimilarPatientsLib.idc import download

    started = []

    def record(*args, **kwargs):
        started.append(kwargs.get("creationflags", 0))

    fake = types.SimpleNamespace(
        subprocess=types.SimpleNamespace(Popen=record, run=record, check_call=record, DEVNULL=-3)
    )
    download.without_console_windows(fake)
    download.without_console_windows(fake)  # once is enough: not wrapped twice
    fake.subprocess.Popen(["s5cmd", "run", "manifest"], stdout=fake.subprocess.DEVNULL)
    fake.subprocess.run(["s5cmd", "--dry-run"], creationflags=0x200)
    fake.subprocess.check_call(["s5cmd", "--help"])
    assert [flags & download.CREATE_NO_WINDOW for flags in started] == [download.CREATE_NO_WINDOW] * 3
    assert started[1] & 0x200 and fake.subprocess.DEVNULL == -3
    from pathlib import Path

    source = Path(idc_index.index.__file__).read_text(encoding="utf-8")
    calls = set(re.findall(r"subprocess\.(\w+)\(", source))
    assert calls and calls <= set(download._Windowless.STARTS), calls  # every process idc-index starts

    monkeypatch.setattr(idc_index.index, "subprocess", idc_index.index.subprocess)  # restored after the test
    monkeypatch.setattr(idc_index, "IDCClient", lambda: "client")
    assert download.idc_client("posix") == "client" and not isinstance(idc_index.index.subprocess, download._Windowless)
    assert download.idc_client("nt") == "client" and isinstance(idc_index.index.subprocess, download._Windowless)


def test_a_download_keeps_idc_indexs_progress_and_log_lines_out_of_the_console(tmp_path, served, caplog):
    """No tqdm bar, s5cmd quiet, idc-index's informational lines dropped in the downloading thread (Slicer
    shows the log in its Python console); its errors still reach the log."""
    import logging

    folders, index = served
    bucket = _Bucket(folders)
    cache = SeriesCache(tmp_path / "cache", index, bucket)
    with caplog.at_level(logging.INFO):
        cache.fetch(list(folders)[:1])
        assert bucket.options == [{"dirTemplate": None, "quiet": True, "show_progress_bar": False}]
        from SimilarPatientsLib.idc.download import _tool_log_quiet

        with _tool_log_quiet():
            logging.getLogger("idc_index.index").error("Download process failed")
        logging.getLogger("idc_index.index").info("not downloading: shown")
    messages = [r.getMessage() for r in caplog.records]
    assert not any(m.startswith("Downloading data to") for m in messages)
    assert "Download process failed" in messages and "not downloading: shown" in messages
    assert any(m.startswith("downloading series") for m in messages)  # our own line says what happens
