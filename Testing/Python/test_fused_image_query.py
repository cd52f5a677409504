"""A tumor embedded by every model of a reference and the rankings fused: the library call, the CLI and the
query worker, on a reference of two models (the weight-free descriptor, and SuPreM with random weights
in its upstream layout, from a site's weights folder)."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import store_frame
from SimilarPatientsLib import ReferenceStore, SimilarPatientsError, query_image
from SimilarPatientsLib.cli import main
from SimilarPatientsLib.imaging.tumor import from_binary_mask
from SimilarPatientsLib.models import weights
from SimilarPatientsLib.models.embedder import Embedder
from SimilarPatientsLib.references import FUSED_CHOICE, schema
from SimilarPatientsLib.scene.worker import WorkerClient
from synthetic_ct import KINDS, tumor_ct

pytestmark = pytest.mark.torch  # SuPreM's network
MODELS = ("SUPREME", "TumorDescriptor")  # as the reference lists them


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """A data home with reference 'two' (2 tumors per kind, each embedded by both models), the site's weights
    folder holding SuPreM's, and a query CT with its mask on disk."""
    import torch
    from SimilarPatientsLib.models import networks
    from synthetic_weights import upstream_checkpoint

    folder = tmp_path_factory.mktemp("fused-image")
    (folder / "site" / "SUPREME").mkdir(parents=True)
    torch.manual_seed(0)
    upstream_checkpoint("SUPREME", networks.UNet3DEncoder().state_dict(), folder / "site" / "SUPREME")
    previous = os.environ.get(weights.WEIGHTS_DIR_ENV)
    os.environ[weights.WEIGHTS_DIR_ENV] = str(folder / "site")
    embedders = [Embedder(m) for m in MODELS]
    rng, rows = np.random.default_rng(31), []
    for i in range(2):
        for kind in KINDS:
            image, mask, _ = tumor_ct(kind, rng)
            for embedder in embedders:
                embedding = embedder.embed(image, from_binary_mask(mask))[0]
                rows.append(
                    {schema.MODEL: embedding.model, schema.RECIPE: embedding.recipe, schema.PATIENT: f"{kind}-{i}"}
                    | {"kind": kind, schema.EMBEDDING: embedding.vector}
                )
    store_frame(pd.DataFrame(rows), folder / "home", "two")
    image, mask, _ = tumor_ct("spiculated", rng)
    sitk.WriteImage(image, str(folder / "ct.nrrd"))
    sitk.WriteImage(mask, str(folder / "mask.nrrd"))
    yield folder
    if previous is None:
        os.environ.pop(weights.WEIGHTS_DIR_ENV, None)
    else:
        os.environ[weights.WEIGHTS_DIR_ENV] = previous


def _query(folder, model, **options):
    tumor = from_binary_mask(sitk.ReadImage(str(folder / "mask.nrrd")))
    return query_image(folder / "ct.nrrd", tumor, model, "two", store=ReferenceStore(folder / "home"), **options)


def test_all_models_embed_the_tumor_and_their_rankings_are_fused(two_models):
    fused = _query(two_models, "all", k=6)
    assert fused.model == "fused" and fused.models == MODELS and fused.fusion == "rrf"
    assert [e.model for e in fused.embeddings] == list(MODELS)
    assert len(fused.crops) == 2  # the two models' recipes differ: one crop each
    assert set(fused.seconds.per_model) == set(MODELS) and fused.seconds.embed > 0
    reference = ReferenceStore(two_models / "home").open("two")
    vectors = {e.model: e.vector for e in fused.embeddings}
    by_hand = reference.search_fused(vectors, k=6)
    assert fused.hits.PatientID.tolist() == by_hand.PatientID.tolist()
    for model in MODELS:
        own = _query(two_models, model, k=6)
        np.testing.assert_allclose(vectors[model], own.embeddings[0].vector, rtol=1e-5, atol=1e-6)
        top = own.hits.set_index("PatientID")["rank"]
        ranks = fused.hits[f"rank_{model}"]
        assert [r for p, r in zip(fused.hits.PatientID, ranks) if p in top.index] == [
            top[p] for p in fused.hits.PatientID if p in top.index
        ]


def test_one_model_as_a_list_is_that_models_query(two_models):
    single = _query(two_models, "TumorDescriptor", k=5)
    listed = _query(two_models, ["TumorDescriptor"], k=5)
    assert listed.hits.PatientID.tolist() == single.hits.PatientID.tolist()
    assert listed.hits.rank_TumorDescriptor.tolist() == single.hits["rank"].tolist()
    chosen = _query(two_models, FUSED_CHOICE, k=5, fusion="percentile")
    assert chosen.models == MODELS and chosen.hits.fusion.eq("percentile").all()


def test_fused_image_queries_are_refused_before_the_image_is_read(two_models):
    store = ReferenceStore(two_models / "home")
    with pytest.raises(SimilarPatientsError, match="has no model 'CTFM'"):
        query_image(two_models / "missing.nrrd", [], ["TumorDescriptor", "CTFM"], "two", store=store)
    with pytest.raises(SimilarPatientsError, match="weights per model"):
        query_image(two_models / "missing.nrrd", [], "all", "two", store=store, weights="x.pt")
    other = store_frame(
        pd.DataFrame({"model": ["A"] * 3, "PatientID": ["1", "2", "3"], "embedding": list(np.eye(3))}),
        two_models / "other-home",
        "other",
    )
    with pytest.raises(SimilarPatientsError, match="cannot embed an image here"):
        query_image(two_models / "missing.nrrd", [], "all", other)


def test_query_cli_with_all_models(two_models, monkeypatch, capsys):
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(two_models / "home"))
    base = ["query", "--image", str(two_models / "ct.nrrd"), "--mask", str(two_models / "mask.nrrd")]
    base += ["--reference", "two", "-k", "4"]
    assert main([*base, "--model", "all"]) == 0
    out = capsys.readouterr().out
    assert "2 models fused (SUPREME, TumorDescriptor; reciprocal rank fusion" in out
    assert "rank TumorDescriptor" in out and "rank SUPREME" in out
    assert main([*base, "--model", "TumorDescriptor", "SUPREME", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 4 and all(h["model"] == "fused" and "rank_SUPREME" in h for h in hits)
    assert main([*base, "--model", "all", "--weights", "x.pt"]) == 2
    assert "--recipe and --weights are for one model" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix", reason="process groups as on Linux and macOS")
def test_the_worker_answers_a_fused_query_and_keeps_every_model(two_models):
    worker = WorkerClient()
    request = dict(
        image=str(two_models / "ct.nrrd"),
        tumors={"mask": str(two_models / "mask.nrrd")},
        reference="two",
        k=4,
        home=str(two_models / "home"),
    )
    try:
        first = worker.query(model=FUSED_CHOICE, **request)
        again = worker.query(model=["TumorDescriptor", "SUPREME"], **request)
        single = worker.query(model="TumorDescriptor", **request)
    finally:
        worker.stop()
    assert not first["loaded"] and again["loaded"] and single["loaded"]  # every model stays loaded
    assert [h["PatientID"] for h in first["hits"]] == [h["PatientID"] for h in again["hits"]]
    hit = first["hits"][0]
    expected = np.mean([hit.get(f"closer_than_{m}") or 0.0 for m in MODELS])
    assert hit["closer_than"] == pytest.approx(expected) and "rank_SUPREME" in hit and hit["listed_by"] >= 1
    assert set(first["seconds"]["per_model"]) == set(MODELS)
    assert len(first["embeddings"]) == 2 and "rank_TumorDescriptor" not in single["hits"][0]
