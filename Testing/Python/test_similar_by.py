""" "Similar with respect to …": the label-aware search (``Reference.search(..., similar_by=LABEL)``, CLI
``--similar-by``, the module's "Similar with respect to" choice), its refusals, its nested evaluation that
never sees a query's label, and what it measured on NLST-Sybil."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
from SimilarPatientsLib.cli import main
from SimilarPatientsLib.errors import SimilarPatientsError
from SimilarPatientsLib.evaluation import label_aware as evaluation
from SimilarPatientsLib.references import label_aware, schema
from SimilarPatientsLib.references.store import ReferenceStore
from SimilarPatientsLib.search import label_direction as direction
from SimilarPatientsLib.ui import Inputs, MemorySettings, ModuleController, ModuleLogic, ModuleSettings

STAGES = label_aware.STAGE_ORDER


def labelled_frame(patients: int = 80, dim: int = 12, seed: int = 0) -> pd.DataFrame:
    """Lesion rows whose vectors carry their patient's stage along one direction (learnable), with a
    two-class text label, a label too rare to fit, and a numeric one."""
    rng = np.random.default_rng(seed)
    axis = rng.standard_normal(dim)
    rows = []
    for p in range(patients):
        stage = p % len(STAGES)
        for lesion in range(1 + p % 2):
            vector = rng.standard_normal(dim) + 0.8 * stage * axis / len(STAGES)
            rows.append(
                {
                    "model": "A",
                    "PatientID": f"P{p:03d}",
                    "lesion_id": f"L{lesion}",
                    "SeriesInstanceUID": f"S{p}.{lesion}",
                    "embedding": vector.astype(np.float32),
                    "stage": STAGES[stage],
                    "site": "upper" if p % 2 else "lower",
                    "rare": "x" if p < 3 else None,
                    "size": float(stage + rng.random()),
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("similar-by") / "home"
    ReferenceStore(path).write("labelled", schema.from_frame(labelled_frame()), "test")
    return path


@pytest.fixture
def reference(home):
    return ReferenceStore(home).open("labelled")


# --- the search ------------------------------------------------------------------------------------


def test_a_label_aware_search_says_so_and_keeps_the_search_rules(reference):
    hits = reference.search("A", patient="P010", k=6, exclude=["P010"], where="site=lower", similar_by="stage")
    assert list(hits["rank"]) == list(range(1, 7))
    assert set(hits["similar_by"]) == {"stage"}
    assert {"visual_rank", "label_rank", "label_distance", "blend_weight"} <= set(hits.columns)
    assert "P010" not in set(hits["PatientID"]) and set(hits["site"]) == {"lower"}
    # the order is the blended distance's: visual distance × (1 + weight · label distance)
    blended = hits["distance"] * (1 + hits["blend_weight"] * hits["label_distance"])
    assert blended.is_monotonic_increasing
    # every hit was among the first DEPTH by one of the two distances
    assert (hits["visual_rank"].notna() | hits["label_rank"].notna()).all()


def test_a_hit_only_the_label_lists_gets_its_own_nearest_lesion_pair(reference):
    """The label's candidates beyond the visual list get the distance a plain search would give them."""
    everyone = reference.search("A", patient="P004", k=79, exclude=["P004"])
    hits = reference.search("A", patient="P004", k=79, exclude=["P004"], similar_by="stage")
    plain = everyone.set_index("PatientID")["distance"]
    assert np.allclose(hits.set_index("PatientID")["distance"], plain.reindex(hits["PatientID"]), rtol=1e-9)


def test_the_fit_is_recorded_digested_and_read_back(home):
    first = ReferenceStore(home).open("labelled")
    hits = first.search("A", patient="P001", k=5, similar_by="site")
    about = first.manifest["models"]["A"]["label_aware"]["site-cosine"]
    assert about["kind"] == "categorical" and about["labelled_patients"] == 80
    assert about["blend_weight"] in direction.WEIGHTS and about["penalty"] in direction.PENALTIES
    again = ReferenceStore(home).open("labelled")
    monkey = pytest.MonkeyPatch()
    monkey.setattr(label_aware, "fit", lambda *a, **k: pytest.fail("refitted instead of read"))
    try:
        pd.testing.assert_frame_equal(again.search("A", patient="P001", k=5, similar_by="site"), hits)
    finally:
        monkey.undo()
    recorded = again.manifest["files"]
    assert any(name.endswith("label-site-cosine-scores.npy") for name in recorded)


def test_a_query_by_embedding_is_scored_by_its_vectors(reference):
    own = reference.patient_embeddings("A", "P020")
    by_patient = reference.search("A", patient="P020", k=5, similar_by="stage")
    by_vectors = reference.search("A", embeddings=own.vectors, k=5, similar_by="stage")
    assert list(by_patient["PatientID"]) == list(by_vectors["PatientID"])


def test_the_ridge_fits_every_penalty_as_the_closed_form():
    rng = np.random.default_rng(1)
    for n, d in ((30, 50), (60, 8)):
        x, y = rng.standard_normal((n, d)), rng.standard_normal((n, 2))
        weights, intercept = direction.RidgeFit(x, y).coefficients(0.5)
        centred, target = x - x.mean(0), y - y.mean(0)
        expected = np.linalg.solve(centred.T @ centred + 0.5 * n * np.eye(d), centred.T @ target)
        assert np.allclose(weights, expected) and np.allclose(intercept, y.mean(0) - x.mean(0) @ expected)


# --- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "says"),
    [
        ("PatientID", "no label 'PatientID'"),
        ("SeriesInstanceUID", "no label 'SeriesInstanceUID'"),
        ("nonsense", "it offers: stage, site, rare, size"),
        ("rare", "at least 2 classes with 10 or more"),
    ],
)
def test_what_cannot_be_searched_by_is_refused(reference, label, says):
    with pytest.raises(SimilarPatientsError, match=says):
        reference.search("A", patient="P001", k=3, similar_by=label)


def test_a_numeric_label_with_too_few_values_is_refused(tmp_path):
    frame = labelled_frame(patients=30)
    frame["size"] = np.where(frame["PatientID"] < "P010", 1.0, np.nan)
    store = ReferenceStore(tmp_path / "home")
    store.write("few", schema.from_frame(frame), "test")
    with pytest.raises(SimilarPatientsError, match="20 or more labelled patients"):
        store.open("few").search("A", patient="P001", k=3, similar_by="size")


def test_the_raw_space_and_several_models_are_refused(reference):
    with pytest.raises(SimilarPatientsError, match="corrected"):
        reference.search("A", patient="P001", k=3, space="raw", similar_by="stage")
    with pytest.raises(SimilarPatientsError, match="one model"):
        reference.search_fused(patient="P001", k=3, similar_by="stage")


def test_a_label_and_like_unlike_marks_are_not_combined(reference):
    """The label-aware blend was measured for the query as given, not for a query moved by feedback."""
    with pytest.raises(SimilarPatientsError, match="not both at once"):
        reference.search("A", patient="P001", k=3, similar_by="stage", like=["P002"])


# --- the command line and the module ---------------------------------------------------------------


def test_the_command_line_searches_by_a_label_and_says_what_it_is_worth(home, monkeypatch, capsys):
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(home))
    args = ["neighbors", "--reference", "labelled", "--model", "A", "--patient", "P002", "-k", "4"]
    assert main([*args, "--similar-by", "stage", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and {row["similar_by"] for row in rows} == {"stage"}
    assert main([*args, "--similar-by", "stage"]) == 0
    assert "similar by stage:" in capsys.readouterr().out
    assert main([*args, "--similar-by", "PatientID"]) == 2
    assert "no label 'PatientID'" in capsys.readouterr().err
    assert main([*args, "--model", "all", "--similar-by", "stage"]) == 2
    assert "one --model" in capsys.readouterr().err


def test_bigquery_is_refused_before_anything_is_opened(home, monkeypatch, capsys):
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(home))
    args = ["neighbors", "--reference", "bq://p.d.t", "--model", "A", "--patient", "P1", "--similar-by", "stage"]
    assert main(args) == 2
    assert "not bq://" in capsys.readouterr().err


class RecordingView:
    def __init__(self):
        self.calls = []

    def ask(self, question, title):
        return True

    def __getattr__(self, name):
        return lambda *arguments: self.calls.append((name, *arguments))

    def of(self, kind):
        return [call[1:] for call in self.calls if call[0] == kind]


@pytest.fixture
def controller(home):
    logic = ModuleLogic(ModuleSettings(MemorySettings()), home, python=sys.executable)
    made = ModuleController(RecordingView(), logic)
    yield made
    logic.cleanup()


def test_the_module_offers_the_references_labels_with_what_each_is_worth(controller):
    controller.reference_chosen(Inputs(reference="labelled", model="A"))
    names, tooltips = controller.view.of("show_similar_by")[-1]
    assert names == ["appearance", "stage", "site", "rare", "size"]
    assert "Not evaluated" in tooltips["site"] and "appearance" in tooltips


def test_the_module_searches_by_a_label_and_refuses_it_fused(controller):
    controller.find_by_patient(Inputs(reference="labelled", model="A", k=4, patient="P003", similar_by="stage"))
    controller.wait()
    assert not controller.view.of("show_error")
    assert len(controller.hits) == 4 and set(controller.hits["similar_by"]) == {"stage"}
    controller.find_by_patient(Inputs(reference="labelled", model="all", k=4, patient="P003", similar_by="stage"))
    controller.wait()
    assert "one model" in controller.view.of("show_error")[-1][0]


# --- the evaluation never sees a query's label -----------------------------------------------------


def synthetic_prepared(n: int = 120, dim: int = 200, seed: int = 3) -> evaluation.Prepared:
    """Patients with random features (one lesion each, no same-tumor pairs): nothing about a label is in them."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n, dim))
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    visual = 1.0 - unit @ unit.T
    np.fill_diagonal(visual, np.inf)
    ids = np.array([f"P{i:03d}" for i in range(n)], dtype=object)
    return evaluation.Prepared("M", ids, features, visual, features, np.arange(n), visual, None)


def test_a_label_the_features_do_not_carry_stays_at_chance_and_a_leak_would_show():
    """Random labels on random features: with more dimensions than patients the ridge memorises whatever
    labels it is fitted on, so a query whose label reached the fit would find its own class (the leaky
    control below); the nested evaluation must stay near chance."""
    prepared = synthetic_prepared()
    n = len(prepared.patient_ids)
    labels = np.random.default_rng(4).permutation(np.arange(n) % 2)
    codes = direction.Codes(direction.CATEGORICAL, np.eye(2)[labels], labels)
    task = pd.Series(labels, index=prepared.patient_ids)
    honest = evaluation.nested(prepared, np.arange(n), codes, task)
    honest_bp = direction.balanced(honest.precision.to_numpy(), labels)
    # the leak: one fit on every patient, the query's own label included, at the weakest penalty
    scores = direction.RidgeFit(prepared.features, codes.values).scores(prepared.features, min(direction.PENALTIES))
    label = direction.label_distances(scores, scores) / direction.label_scale(scores)
    top = direction.first(direction.blend(prepared.visual, label, max(direction.WEIGHTS)), direction.K)
    leaky_bp = direction.balanced((labels[top] == labels[:, None]).mean(axis=1), labels)
    assert leaky_bp > 0.8
    assert abs(honest_bp - 0.5) < 0.1


# --- NLST-Sybil: what was measured -------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_nlst(tmp_path_factory, nlst_dir):
    """A NLST-Sybil import of its own: the fits recorded here change no other test's reference."""
    path = tmp_path_factory.mktemp("nlst-similar-by")
    return ReferenceStore(path).import_reference("nlst-sybil", str(nlst_dir))


def test_the_evaluation_measures_distances_as_the_search_does(own_nlst):
    prepared = evaluation.prepare(own_nlst, "CTFM")
    hits = own_nlst.search("CTFM", patient="100012", k=20, exclude=["100012"])
    row = prepared.visual[np.searchsorted(prepared.patient_ids, "100012")]
    codes = np.searchsorted(prepared.patient_ids, hits["PatientID"].to_numpy(dtype=object))
    assert np.allclose(row[codes], hits["distance"], rtol=1e-9)


@pytest.mark.slow
def test_on_nlst_sybil_stage_gains_for_ct_fm_and_histology_does_not_beat_demographics(own_nlst):
    """Measured (docs/search.md, benchmarks/label_aware.py): CT-FM stage class-balanced P@10 0.517 → 0.546,
    gain +0.029 [+0.008, +0.049], same-tumor R@1 0.681 → 0.660; histology 0.514 → 0.513, below the
    demographic anchor (0.537)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        prepared = evaluation.prepare(own_nlst, "CTFM")
        stage = evaluation.evaluate(own_nlst, prepared, "stage")
        histology = evaluation.evaluate(own_nlst, prepared, "histology")
    assert stage.gain[1] > 0  # the paired interval of the gain lies above 0
    assert stage.same_tumor_aware >= stage.same_tumor_visual - direction.SAME_TUMOR_TOLERANCE
    assert stage.aware < 0.56  # the target is not met: say so, do not hide it
    assert histology.aware < 0.537  # the demographic anchor's BP@10 on these patients (docs/evaluation)


def test_the_permutation_test_refits_the_whole_procedure_under_each_shuffle(monkeypatch):
    """A label the features carry: the observed BP@10 is far above every shuffle's, and each shuffle ran
    the selection and the fits again (a null that kept the fitted direction would be anti-conservative)."""
    prepared = synthetic_prepared(n=60, dim=20, seed=5)
    labels = (prepared.features[:, 0] > 0).astype(int)
    codes = direction.Codes(direction.CATEGORICAL, np.eye(2)[labels], labels)
    task = pd.Series(labels, index=prepared.patient_ids)
    observed = direction.balanced(evaluation.nested(prepared, np.arange(60), codes, task).precision.to_numpy(), labels)
    fits = []
    real = direction.RidgeFit
    monkeypatch.setattr(direction, "RidgeFit", lambda *a: fits.append(1) or real(*a))
    null = evaluation.permutation_null(prepared, np.arange(60), codes, task, shuffles=9, seed=0)
    # per shuffle and outer fold: the inner folds' fits, the same-tumor-free selection's, and the final one
    assert len(fits) >= 9 * evaluation.OUTER * (direction.FOLDS + 1)
    assert observed > 0.7 and null.max() < observed and abs(null.mean() - 0.5) < 0.1


def test_a_query_from_an_image_can_be_similar_by_a_label(tmp_path):
    """``query_image(..., similar_by=)`` (the CLI's ``query --similar-by`` and the module's image query):
    the weight-free model embeds the tumor, the label-aware search answers; several models are refused."""
    import SimpleITK as sitk
    from conftest import store_frame
    from SimilarPatientsLib.imaging.tumor import from_binary_mask
    from SimilarPatientsLib.models.embedder import Embedder
    from SimilarPatientsLib.query import query_image
    from synthetic_ct import KINDS, tumor_ct

    rng = np.random.default_rng(8)
    embedder, rows = Embedder("TumorDescriptor"), []
    for i in range(24):
        image, mask, _ = tumor_ct(KINDS[i % len(KINDS)], rng)
        embedding = embedder.embed(image, from_binary_mask(mask))[0]
        rows.append(
            {"model": embedding.model, "recipe": embedding.recipe, "PatientID": f"T{i:02d}", "order": float(i)}
            | {"embedding": embedding.vector, "SeriesInstanceUID": f"S{i}"}
        )
    store_frame(pd.DataFrame(rows), tmp_path / "home", "tumors")
    store = ReferenceStore(tmp_path / "home")
    image, mask, _ = tumor_ct("spiculated", rng)
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    result = query_image(tmp_path / "ct.nrrd", from_binary_mask(mask), embedder, "tumors", k=4, store=store,
                         similar_by="order")  # fmt: skip
    assert len(result.hits) == 4 and set(result.hits["similar_by"]) == {"order"}
    with pytest.raises(SimilarPatientsError, match="one model"):
        query_image(tmp_path / "ct.nrrd", from_binary_mask(mask), "all", "tumors", k=4, store=store, similar_by="order")
