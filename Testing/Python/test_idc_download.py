"""Matched series onto this machine: the size from the real IDC index, a verified download into the cache
(a cut one refused and not kept; two at once never mixed), progress in bytes, the cache reused, a local
DICOM folder found by UID."""

from __future__ import annotations

import shutil
import threading

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
    (tmp_path / "cache" / uids[0]).mkdir(parents=True)  # cached already: costs nothing
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
    assert not (tmp_path / "cache" / uid).exists() and not list((tmp_path / "cache").iterdir())


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
    assert [p.name for p in root.iterdir()] == [uid]  # one verified copy, no staging folder left


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
