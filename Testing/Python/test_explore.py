"""Maps: projections, nearest-lesion edges by the real distance, the HTML page (opened and clicked in
headless Chromium) and the static figure."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import numpy as np
import pytest
from conftest import planted_frame, store_frame
from SimilarPatientsLib import SimilarPatientsError
from SimilarPatientsLib.cli import main
from SimilarPatientsLib.idc import viewer_url
from SimilarPatientsLib.maps import embedding_map, figure, page, projection
from SimilarPatientsLib.search import pairwise_distances

pytestmark = pytest.mark.torch  # the analysis extra (umap-learn, scikit-learn, torch)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def reference(tmp_path):
    return store_frame(planted_frame(n_patients=40, signal=2.0), tmp_path / "home")


@pytest.fixture
def browser():
    """Headless Chromium from Debian, driven by Selenium; closed network flags as on CI machines."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium and chromium-driver (scripts/test.sh installs them)")
        pytest.skip("no Chromium here")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1200,900",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _page_data(path) -> dict:
    match = re.search(
        r'<script type="application/json" id="map-data">(.*?)</script>', path.read_text(encoding="utf-8"), re.S
    )
    return json.loads(match.group(1).replace("<\\/", "</"))


def test_map_layers_hold_every_lesion_and_real_nearest_edges(reference):
    the_map = embedding_map.build(reference, method="pca", graph=3, neighbours=4, space="raw")
    assert [layer.model for layer in the_map.layers] == ["A", "B"]
    for layer in the_map.layers:
        lesions = reference.lesions(layer.model)
        assert sorted(layer.rows.tolist()) == list(range(len(lesions)))
        assert layer.xy.shape == (len(lesions), 2) and np.isfinite(layer.xy).all()
        vectors = np.asarray(reference.space(layer.model).vectors, dtype=np.float64)
        patients = lesions.PatientID.to_numpy()
        distances = pairwise_distances(vectors, vectors, "cosine")
        distances[patients[:, None] == patients[None, :]] = np.inf
        expected = np.argsort(distances, axis=1, kind="stable")[:, :3]
        got = layer.edges.reshape(len(lesions), 3, 2)
        assert (got[:, :, 0] == np.arange(len(lesions))[:, None]).all()
        assert np.array_equal(got[:, :, 1], expected)  # the high-dimensional neighbours, not the 2-D ones
        hits = reference.search(layer.model, patient="P007", k=4, exclude=["P007"], space="raw")
        assert layer.neighbours["P007"] == hits.PatientID.tolist()


def test_the_default_map_is_drawn_in_the_space_the_search_ranks_in(reference):
    """Layout of the z-scored vectors; each lesion's edges in the locally scaled order, so that a patient's
    nearest edge leads to the patient the default search ranks first; the search box's neighbours are the
    default search's."""
    the_map = embedding_map.build(reference, method="pca", graph=3, neighbours=4)
    assert the_map.space == "corrected" and page.page_data(the_map)["space"] == "corrected"
    for layer in the_map.layers:
        lesions = reference.lesions(layer.model)
        space = reference.space(layer.model, space="corrected")
        vectors = space.correction.transformed(space.vectors)
        patients = lesions.PatientID.to_numpy()
        scaled = pairwise_distances(vectors, vectors, "cosine") / np.sqrt(space.row_radii)[None, :]
        scaled[patients[:, None] == patients[None, :]] = np.inf
        expected = np.argsort(scaled, axis=1, kind="stable")[:, :3]
        assert np.array_equal(layer.edges.reshape(len(lesions), 3, 2)[:, :, 1], expected)
        assert not np.array_equal(
            layer.xy, embedding_map.build(reference, [layer.model], "pca", space="raw").layers[0].xy
        )
        for patient in np.unique(patients):
            own = np.flatnonzero(patients == patient)
            nearest = expected[own, 0][np.argmin(scaled[own, expected[own, 0]])]
            hits = reference.search(layer.model, patient=patient, k=4, exclude=[patient])
            assert patients[nearest] == hits.PatientID.iloc[0]
            assert layer.neighbours[str(patient)] == hits.PatientID.tolist()


def test_page_holds_every_point_and_url_and_needs_no_network(reference, tmp_path):
    path = page.write(embedding_map.build(reference, method="pca", graph=2), tmp_path / "map.html")
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", text)  # plotly.js and data are inline
    data = _page_data(path)
    lesions = reference.lesions("A")
    assert len(data["points"]["patient"]) == len(lesions)
    urls = {viewer_url(s, r) for s, r in zip(lesions.StudyInstanceUID, lesions.SeriesInstanceUID)}
    assert set(data["points"]["url"]) == urls
    assert data["numeric"] == {"group": False, "histology": False, "age": True}
    assert all(len(m["x"]) == len(lesions) for m in data["models"])


def test_page_opens_clicks_and_searches_in_chromium(reference, tmp_path, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    path = page.write(embedding_map.build(reference, method="pca", graph=2), tmp_path / "map.html")
    data = _page_data(path)
    browser.get(path.as_uri())
    deadline = time.time() + 30
    while not browser.execute_script("return document.body.dataset.ready") and time.time() < deadline:
        time.sleep(0.1)
    assert browser.execute_script("return document.body.dataset.ready") == "true"
    browser.execute_script("window.opened = []; window.open = (url) => { window.opened.push(url); return null; };")

    # the top-most point (last point of the last trace) at its pixel position, clicked with the mouse
    target = browser.execute_script(
        """const gd = document.getElementById('map'), layout = gd._fullLayout, box = gd.getBoundingClientRect();
           const trace = gd.data[gd.data.length - 1], i = trace.x.length - 1;
           return {x: layout.xaxis._offset + layout.xaxis.l2p(trace.x[i]) - box.width / 2,
                   y: layout.yaxis._offset + layout.yaxis.l2p(trace.y[i]) - box.height / 2,
                   row: trace.customdata[i]};"""
    )
    plot = browser.find_element(By.ID, "map")
    ActionChains(browser).move_to_element_with_offset(plot, target["x"], target["y"]).pause(0.3).click().perform()
    time.sleep(0.3)
    expected = data["points"]["url"][target["row"]]
    assert browser.execute_script("return window.opened") == [expected]
    assert expected in browser.find_element(By.ID, "status").text

    # the search box highlights a patient and its nearest patients
    search = browser.find_element(By.ID, "search")
    search.send_keys("P007\n")
    time.sleep(0.3)
    neighbours = data["models"][0]["neighbours"]["P007"]
    assert browser.find_element(By.ID, "status").text.endswith(", ".join(neighbours))
    names = browser.execute_script("return document.getElementById('map').data.map(t => t.name)")
    assert names[-2:] == ["nearest patients of P007", "patient P007"]
    highlighted = browser.execute_script(
        "const d = document.getElementById('map').data; return d[d.length - 2].customdata;"
    )
    assert {data["points"]["patient"][r] for r in highlighted} == set(neighbours)

    # switching model and colour field redraws
    browser.find_element(By.CSS_SELECTOR, "#model option[value='1']").click()
    browser.find_element(By.CSS_SELECTOR, "#color option[value='age']").click()
    time.sleep(0.3)
    title = browser.execute_script("return document.getElementById('map').layout.title.text")
    assert title.startswith("B — PCA")
    search.clear()
    search.send_keys("nobody\n")
    time.sleep(0.2)
    assert browser.find_element(By.ID, "status").text == "No patient nobody in model B."
    # beside age's colour bar the legend lies below the plot, not over the bar
    assert browser.execute_script("return document.getElementById('map').layout.legend.orientation") == "h"
    # the status line speaks of the model shown, after a model change too
    browser.find_element(By.CSS_SELECTOR, "#model option[value='0']").click()
    time.sleep(0.3)
    assert browser.find_element(By.ID, "status").text == "No patient nobody in model A."
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []


@pytest.mark.slow
@pytest.mark.parametrize("method", ["umap", "tsne"])
def test_projections_are_seeded(method):
    vectors = np.random.default_rng(0).standard_normal((60, 16))
    first = projection.project(vectors, method, seed=3)
    assert first.shape == (60, 2) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, projection.project(vectors, method, seed=3))


def test_bad_map_requests_are_refused(reference):
    with pytest.raises(SimilarPatientsError, match="Unknown projection"):
        projection.project(np.zeros((10, 3)), "mds")
    with pytest.raises(SimilarPatientsError, match="at least 4 lesions"):
        projection.project(np.ones((3, 3)), "pca")
    with pytest.raises(SimilarPatientsError, match="Cannot colour by 'stage'"):
        embedding_map.build(reference, method="pca", color_by="stage")
    with pytest.raises(SimilarPatientsError, match="--graph must be ≥ 0"):
        embedding_map.build(reference, method="pca", graph=-1)
    with pytest.raises(SimilarPatientsError, match="no model 'C'"):
        embedding_map.build(reference, models=["C"], method="pca")


@pytest.mark.parametrize("color_by", ["histology", "age"])
def test_figure_is_written(reference, tmp_path, color_by):
    the_map = embedding_map.build(reference, method="pca", color_by=color_by)
    path = figure.write(the_map, tmp_path / "figures" / "map.png", dpi=60)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["map.png"]


def test_explore_command(reference, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(reference.path.parents[2]))
    out = tmp_path / "maps" / "map.html"
    code = main(
        ["explore", "--reference", "synthetic", "--model", "B", "--method", "pca", "--graph", "2",
         "--color-by", "group", "--out", str(out), "--png", str(tmp_path / "maps" / "map.png")]
    )  # fmt: skip
    assert code == 0
    assert "Map of 1 model(s)" in capsys.readouterr().out
    assert _page_data(out)["colorBy"] == "group" and (tmp_path / "maps" / "map.png").exists()
    assert _page_data(out)["space"] == "corrected"
    assert main(["explore", "--reference", "synthetic", "--model", "B", "--method", "pca", "--space", "raw",
                 "--out", str(out)]) == 0  # fmt: skip
    assert _page_data(out)["space"] == "raw"
    assert main(["explore", "--reference", "synthetic", "--color-by", "nope", "--out", str(out)]) == 2
    assert "Cannot colour by 'nope'" in capsys.readouterr().err
