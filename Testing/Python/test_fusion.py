"""Several models at once: the fusion rule by hand (ties, depth, patients a model lacks), the fused search
equal to the model's own for one model and to the hand-computed fusion for several, its hit table's
per-model columns, the refusals, the evaluation's fused rows and verdict, and where the verdict is kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import planted_frame, store_frame
from SimilarPatientsLib import SimilarPatientsError, evaluation
from SimilarPatientsLib.cli import main
from SimilarPatientsLib.evaluation import report, run
from SimilarPatientsLib.evaluation.tasks import Task
from SimilarPatientsLib.references import FUSED_CHOICE, fusion_default, fusion_verdict, hit_closeness, rank_labels
from SimilarPatientsLib.references.fused import fused_models, is_fused
from SimilarPatientsLib.search.fusion import RRF_CONSTANT, closeness_percent, fuse, mean_closeness

GROUP = Task("group", "group", positive=("pos",), negative=("neg",), description="planted group")
CENTROID = ("centroid",)
QUICK = evaluation.Settings(
    repeats=1,
    permutations=9,
    retrieval_permutations=99,
    bootstrap=100,
    chance_draws=3,
    classifiers=CENTROID,
    secondary_classifiers=CENTROID,
)
COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "evaluation" / "nlst-sybil" / "fusion.json"


# --- the rule, by hand -------------------------------------------------------------------------------


def test_reciprocal_rank_fusion_by_hand():
    # 2 models, 4 candidates; 0 = the model does not list the candidate
    ranks = np.array([[1, 2, 3, 0], [3, 1, 0, 2]])
    fused = fuse(ranks)
    c = RRF_CONSTANT
    expected = [1 / (c + 1) + 1 / (c + 3), 1 / (c + 2) + 1 / (c + 1), 1 / (c + 3), 1 / (c + 2)]
    np.testing.assert_allclose(fused.scores, expected)
    assert fused.order.tolist() == [1, 0, 3, 2] and fused.listed.tolist() == [2, 2, 1, 1]


def test_ties_go_to_more_models_then_the_best_rank_then_the_candidate_order():
    # constant 1: rank 1 alone scores 1/2, ranks 3 and 3 score 1/4 + 1/4: a tie, broken by more models listing
    fused = fuse(np.array([[1, 3], [0, 3]]), constant=1)
    assert fused.scores[0] == fused.scores[1] and fused.order.tolist() == [1, 0]
    # the same score from one model each, at the same rank: the candidates' order (PatientID) decides
    assert fuse(np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])).order.tolist() == [0, 1, 2]
    # equal percentiles: the better rank first
    closeness = np.array([[50.0, 50.0, 50.0]])
    assert fuse(np.array([[3, 1, 2]]), closeness, "percentile").order.tolist() == [1, 2, 0]


def test_depth_cuts_each_models_list_and_unlisted_candidates_come_last():
    fused = fuse(np.array([[1, 5, 0], [2, 0, 0]]), depth=4)
    assert fused.listed.tolist() == [2, 0, 0] and fused.scores[1] == 0.0  # rank 5 is beyond the depth
    # percentile fusion: a candidate no model lists cannot be a hit, whatever its percentiles
    closeness = np.array([[10.0, 90.0, 99.0], [10.0, 90.0, 99.0]])
    fused = fuse(np.array([[1, 2, 0], [1, 0, 0]]), closeness, "percentile")
    assert fused.order.tolist() == [1, 0, 2]


def test_a_model_that_lacks_a_patient_counts_nothing_for_it():
    # candidate 1 is in model 0 only: RRF adds nothing from model 1; the percentile mean counts model 1 as 0
    closeness = np.array([[80.0, 80.0], [80.0, np.nan]])
    fused = fuse(np.array([[2, 1], [1, 0]]), closeness, "percentile")
    np.testing.assert_allclose(fused.scores, [80.0, 40.0])
    assert fuse(np.array([[2, 1], [1, 0]])).order.tolist() == [0, 1]


def test_one_model_fused_is_that_models_ranking():
    rng = np.random.default_rng(3)
    ranks = rng.permutation(40) + 1
    assert fuse(ranks[None, :], depth=40).order.tolist() == np.argsort(ranks).tolist()
    closeness = np.floor(100 - 2.5 * ranks)[None, :] // 10 * 10  # coarse: many ties
    assert fuse(ranks[None, :], closeness, "percentile", depth=40).order.tolist() == np.argsort(ranks).tolist()


def test_fusion_arguments_are_checked():
    with pytest.raises(SimilarPatientsError, match="Unknown fusion 'max'"):
        fuse(np.ones((1, 2), dtype=int), fusion="max")
    with pytest.raises(SimilarPatientsError, match="at least 1"):
        fuse(np.ones((1, 2), dtype=int), depth=0)
    with pytest.raises(SimilarPatientsError, match="needs each model's closeness"):
        fuse(np.ones((1, 2), dtype=int), fusion="percentile")


def test_closeness_percent_is_the_reference_closeness_formula():
    nearest = np.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(closeness_percent(nearest, [0.05, 0.2, 0.45, np.inf]), [100.0, 50.0, 0.0, np.nan])


# --- the fused search ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Models A and B over 60 patients; patient P007 is missing from B (its rows dropped)."""
    frame = planted_frame(n_patients=60, signal=1.0)
    frame = frame[~((frame.model == "B") & (frame.PatientID == "P007"))]
    return store_frame(frame, tmp_path_factory.mktemp("fusion-home"))


@pytest.mark.parametrize("fusion", ["rrf", "percentile"])
@pytest.mark.parametrize("where", [None, ["histology=adeno,squamous"]])
def test_one_model_fused_gives_the_models_own_hits(two_models, fusion, where):
    for patient in ("P001", "P007"):
        own = two_models.search("A", patient=patient, k=8, where=where, exclude=[patient])
        options = {"k": 8, "where": where, "exclude": [patient], "fusion": fusion}
        fused = two_models.search_fused(patient=patient, models=["A"], **options)
        assert fused.PatientID.tolist() == own.PatientID.tolist()
        for column in ("lesion_id", "query_lesion", "lesions", "SeriesInstanceUID", "viewer_url"):
            assert fused[column].tolist() == own[column].tolist(), column
        assert fused.rank_A.tolist() == own["rank"].tolist() and set(fused.lesion_model) == {"A"}
        np.testing.assert_allclose(fused.distance_A, own.distance)


def test_several_models_fused_as_computed_by_hand(two_models):
    vector = {m: two_models.patient_embeddings(m, "P003").vectors for m in ("A", "B")}
    fused = two_models.search_fused(vector, k=10, depth=30)
    lists = {m: two_models.search(m, embeddings=vector[m], k=30) for m in ("A", "B")}
    ranks = {m: dict(zip(lists[m].PatientID, lists[m]["rank"])) for m in lists}
    listed = set(ranks["A"]) | set(ranks["B"])
    scores = {p: sum(1 / (RRF_CONSTANT + ranks[m][p]) for m in ranks if p in ranks[m]) for p in listed}
    expected = sorted(scores, key=lambda p: (-scores[p], -sum(p in ranks[m] for m in ranks), p))[:10]
    assert fused.PatientID.tolist() == expected
    np.testing.assert_allclose(fused.fused_score, [scores[p] for p in expected])
    for model in ("A", "B"):
        assert fused[f"rank_{model}"].tolist() == [ranks[model].get(p, pd.NA) for p in expected]
    # the lesion columns come from the model that ranks the hit best
    for row in fused.itertuples():
        best = min(("A", "B"), key=lambda m: (ranks[m].get(row.PatientID, 10**9), m))
        assert row.lesion_model == best
        source = lists[best].set_index("PatientID").loc[row.PatientID]
        assert row.lesion_id == source.lesion_id and row.viewer_url == source.viewer_url
    assert fused.model.eq("fused").all() and fused.distance.isna().all() and fused.fusion.eq("rrf").all()
    assert fused.listed_by.tolist() == [sum(p in ranks[m] for m in ranks) for p in expected]


def test_a_patient_missing_from_one_model_is_fused_by_the_others(two_models):
    vector = {m: two_models.patient_embeddings(m, "P004").vectors for m in ("A", "B")}
    vector["A"] = two_models.patient_embeddings("A", "P007").vectors  # P007 is A's nearest; B lacks it
    for fusion in ("rrf", "percentile"):
        fused = two_models.search_fused(vector, k=60, fusion=fusion)
        row = fused.set_index("PatientID").loc["P007"]
        assert row.rank_A == 1 and row.rank_B is pd.NA and np.isnan(row.distance_B) and row.listed_by == 1
        assert rank_labels(fused).set_index(fused.PatientID).loc["P007"].tolist() == ["1", "–"]
        if fusion == "percentile":  # B's share is 0: the mean is half of A's
            assert row.fused_score == pytest.approx(row.closer_than_A / 2)
            assert np.isnan(row.closer_than_B)
        else:
            assert row.fused_score == pytest.approx(1 / (RRF_CONSTANT + 1))


def test_ranks_beyond_the_depth_are_shown_with_their_distance(two_models):
    vector = {m: two_models.patient_embeddings(m, "P010").vectors for m in ("A", "B")}
    fused = two_models.search_fused(vector, k=20, depth=20)
    beyond = fused[fused.rank_B.isna() & fused.distance_B.notna()]
    assert len(beyond) and (rank_labels(fused, 20).loc[beyond.index, "B"] == ">20").all()
    own_b = two_models.search("B", embeddings=vector["B"], k=60).set_index("PatientID")
    np.testing.assert_allclose(beyond.distance_B, own_b.loc[beyond.PatientID, "distance"])
    assert (own_b.loc[beyond.PatientID, "rank"] > 20).all()


def test_percentile_fusion_keeps_the_measured_percentile_beyond_a_models_depth(two_models):
    """The one rule (search/fusion.py): beyond a model's depth its measured percentile counts, not 0; only a
    model that lacks the patient counts 0; the closeness shown beside a fused hit is the same mean."""
    # candidates 0 and 1 both listed by model 0 only; model 1 ranks candidate 0 beyond the depth of 2 and
    # measured it (80%), and lacks candidate 1
    ranks = np.array([[1, 2, 0], [5, 0, 1]])
    closeness = np.array([[90.0, 95.0, 10.0], [80.0, np.nan, 99.0]])
    fused = fuse(ranks, closeness, "percentile", depth=2)
    np.testing.assert_allclose(fused.scores, [85.0, 47.5, 54.5])
    assert fused.order.tolist() == [0, 2, 1]
    np.testing.assert_allclose(mean_closeness(closeness), fused.scores)

    vector = {m: two_models.patient_embeddings(m, "P010").vectors for m in ("A", "B")}
    vector["A"] = two_models.patient_embeddings("A", "P007").vectors  # P007: A's nearest, not in B
    hits = two_models.search_fused(vector, k=10, depth=10, fusion="percentile")
    assert (hits.rank_B.isna() & hits.closer_than_B.notna()).any()  # some hits beyond B's depth, measured
    np.testing.assert_allclose(hits.fused_score, hits[["closer_than_A", "closer_than_B"]].fillna(0).mean(axis=1))
    np.testing.assert_allclose(hit_closeness(two_models, hits, "cosine"), hits.fused_score)


def test_hit_closeness_of_fused_hits_is_the_mean_of_the_models(two_models):
    vector = {m: two_models.patient_embeddings(m, "P002").vectors for m in ("A", "B")}
    fused = two_models.search_fused(vector, k=5)
    expected = fused[["closer_than_A", "closer_than_B"]].fillna(0).mean(axis=1)
    np.testing.assert_allclose(hit_closeness(two_models, fused, "cosine"), expected)
    single = two_models.search("A", embeddings=vector["A"], k=5)
    np.testing.assert_allclose(
        hit_closeness(two_models, single, "cosine"), two_models.closeness("A", "cosine", single.distance)
    )


def test_fused_searches_are_refused_with_what_to_do(two_models):
    vector = {m: two_models.patient_embeddings(m, "P002").vectors for m in ("A", "B")}
    with pytest.raises(SimilarPatientsError, match="no model 'C'"):
        two_models.search_fused(patient="P002", models=["A", "C"])
    with pytest.raises(SimilarPatientsError, match="'all' alone"):
        two_models.search_fused(patient="P002", models=["all", "A"])
    with pytest.raises(SimilarPatientsError, match="named twice"):
        two_models.search_fused(patient="P002", models=["A", "A"])
    with pytest.raises(SimilarPatientsError, match="No query embedding for B"):
        two_models.search_fused({"A": vector["A"]}, models=["A", "B"])
    with pytest.raises(SimilarPatientsError, match="embeddings per model"):
        two_models.search_fused(vector, patient="P002")
    with pytest.raises(SimilarPatientsError, match="Unknown fusion"):
        two_models.search_fused(vector, fusion="borda")
    with pytest.raises(SimilarPatientsError, match="Patient P007 is not in reference"):
        two_models.search_fused(patient="P007")  # the query patient is missing from B


def test_the_fused_choice_names_every_model():
    class Two:
        models = ("A", "B")

    assert fused_models(Two(), FUSED_CHOICE) == fused_models(Two(), "all") == fused_models(Two(), None) == ["A", "B"]
    assert is_fused("all") and is_fused(FUSED_CHOICE) and is_fused(["A"]) and not is_fused("A")


def test_cli_neighbors_with_all_models(two_models, monkeypatch, capsys):
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(two_models.path.parents[2]))
    argv = ["neighbors", "--reference", "synthetic", "--patient", "P001", "-k", "4"]
    assert main([*argv, "--model", "all"]) == 0
    out = capsys.readouterr().out
    assert "2 models fused (A, B; reciprocal rank fusion, 100 patients each)" in out
    assert "rank A" in out and "rank B" in out and "score" in out
    assert main([*argv, "--model", "A", "B", "--fusion", "percentile", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 4 and all(h["fusion"] == "percentile" and "rank_B" in h for h in hits)
    assert main([*argv, "--model", "A", "--json"]) == 0
    assert "rank_A" not in json.loads(capsys.readouterr().out)[0]  # one model: the plain hit table
    assert main([*argv, "--model", "all", "--method", "approximate"]) == 0
    assert "search: approximate for some models (lowest index recall@10 " in capsys.readouterr().out
    hits = two_models.search_fused(patient="P001", k=4, exclude=["P001"], method="approximate")
    recalls = [two_models.approximate_index(m, "cosine").calibration.recall for m in ("A", "B")]
    assert hits.search.eq("approximate").all() and (hits.index_recall == min(recalls)).all()
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--model", "all", "--depth", "0"])
    assert stopped.value.code == 2 and "--depth: must be a whole number of at least 1" in capsys.readouterr().err


def test_nlst_all_six_models_agree_with_their_own_searches(nlst):
    patient = nlst.lesions("CTFM").PatientID.iloc[40]
    fused = nlst.search_fused(patient=patient, k=10, exclude=[patient])
    assert fused.listed_by.between(1, 6).all() and len(fused) == 10
    for model in nlst.models:
        own = nlst.search(model, patient=patient, k=100, exclude=[patient]).set_index("PatientID")["rank"]
        ranks = fused[f"rank_{model}"]
        assert [own.get(p, pd.NA) for p in fused.PatientID] == ranks.tolist()
    assert (np.diff(fused.fused_score) <= 0).all()


# --- the evaluation ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return store_frame(planted_frame(n_patients=60, signal=2.0), tmp_path_factory.mktemp("planted-home"))


@pytest.mark.torch  # the analysis extra
def test_evaluation_reports_the_fused_rankings_as_one_more_model(planted):
    result = evaluation.evaluate(planted, [GROUP], settings=QUICK)
    retrieval = result.retrieval
    for name in ("fused (RRF)", "fused (percentile)"):
        rows = retrieval[retrieval.model == name]
        # like any model: per k, P@k, BP@k and the two classes' P@k; mAP@R and R-precision for the headline
        # rankings (cosine at the mean and nearest-lesion-pair roll-ups)
        assert len(rows) == 6 * 2 * 4 + 2 * 2
        assert rows.p.between(0, 1).all() and (rows.low <= rows.value).all() and (rows.value <= rows.high).all()
    fusion = result.fusion
    assert len(fusion) == 2 * (6 * 2 * 4 + 2 * 2)
    assert (fusion.low <= fusion.difference + 1e-12).all() and (fusion.difference <= fusion.high + 1e-12).all()
    np.testing.assert_allclose(fusion.difference, fusion.fused - fusion.best)
    single = retrieval[~retrieval.model.str.startswith("fused")].set_index(
        ["model", "aggregation", "distance", "measure"]
    )["value"]
    for row in fusion.itertuples():
        same = single.xs((row.aggregation, row.distance, row.measure), level=[1, 2, 3])
        assert row.best == pytest.approx(same.max()) and row.best_model == same.idxmax()


@pytest.mark.torch  # the analysis extra
def test_one_model_fused_in_the_evaluation_is_that_model(planted):
    labels = GROUP.patient_labels(planted.lesions("A"))
    plan = run._TaskPlan.draw(labels, QUICK)
    own = run._evaluate_model(planted, GROUP, "A", plan, QUICK)["retrieval"]
    fused = run._evaluate_fused(planted, GROUP, ("A",), plan, QUICK)
    for name in ("fused (RRF)", "fused (percentile)"):
        rows = [r for r in fused["retrieval"] if r["model"] == name]
        assert [r["value"] for r in rows] == [r["value"] for r in own]
        assert [r["p"] for r in rows] == [r["p"] for r in own]
    assert all(r["difference"] == 0 for r in fused["fusion"])


@pytest.mark.torch  # the analysis extra
def test_verdict_prefers_fusion_only_when_it_is_at_least_as_good(tmp_path):
    frame = planted_frame(n_patients=45, signal=2.0, models=("A",))
    twin = frame.assign(model="B")  # B ranks exactly as A: fusing them changes nothing
    same = store_frame(pd.concat([frame, twin]), tmp_path / "same")
    verdict = report.fusion_verdict(evaluation.evaluate(same, [GROUP], settings=QUICK))
    cosine = verdict["metrics"]["cosine"]
    assert cosine["default"] is True and "so it is preselected" in cosine["reason"]
    noise = planted_frame(n_patients=45, signal=0.0, models=("B",), seed=5)
    mixed = store_frame(pd.concat([frame, noise]), tmp_path / "mixed")
    verdict = report.fusion_verdict(evaluation.evaluate(mixed, [GROUP], settings=QUICK))
    cosine = verdict["metrics"]["cosine"]
    short = [t for t in cosine["tasks"] if t["difference"] < 0]
    assert cosine["default"] is (not short) and (short or "at least as good" in cosine["reason"])
    assert verdict["models"] == ["A", "B"] and verdict["aggregation"] == "lesions" and verdict["k"] == 10


@pytest.mark.torch  # the analysis extra
def test_one_model_has_no_fused_rows_and_no_verdict(tmp_path):
    reference = store_frame(planted_frame(n_patients=45, signal=2.0, models=("A",)), tmp_path)
    result = evaluation.evaluate(reference, [GROUP], settings=QUICK)
    assert result.fusion.empty and report.fusion_verdict(result) is None
    assert not result.retrieval.model.str.startswith("fused").any()


@pytest.mark.torch  # the analysis extra
def test_the_verdict_is_kept_with_the_evaluated_reference_and_read_for_it(tmp_path):
    reference = store_frame(planted_frame(n_patients=45, signal=2.0), tmp_path / "home")
    advice = fusion_default(reference)
    assert advice.default is False and "No evaluation of 'synthetic'" in advice.reason
    result = evaluation.evaluate(reference, [GROUP], settings=QUICK)
    text = report.write(result, tmp_path / "out").read_text(encoding="utf-8")
    written = json.loads((tmp_path / "out" / "fusion.json").read_text(encoding="utf-8"))
    assert fusion_verdict.keep(reference, written) == reference.path / fusion_verdict.VERDICT_FILE
    assert written["fingerprint"] == fusion_verdict.fingerprint(reference)
    advice = fusion_default(reference, "cosine")
    assert advice.default is written["metrics"]["cosine"]["default"] and advice.reason.startswith("On synthetic")
    assert "did not measure the dot distance" in fusion_default(reference, "dot").reason
    assert "## All models at once (fusion)" in text and "#### All models at once, against the best single model" in text
    assert "fused (RRF)" in text and "p (BP@10)" in text


def test_a_published_verdict_is_matched_by_content_not_by_name(tmp_path, monkeypatch):
    frame = planted_frame(n_patients=30, signal=1.0)
    reference = store_frame(frame, tmp_path / "a", name="nlst-sybil")
    verdict = {
        "fingerprint": fusion_verdict.fingerprint(reference),
        "shape": fusion_verdict.shape(reference),
        "models": ["A", "B"],
        "metrics": {"cosine": {"default": True, "reason": "measured"}},
    }
    monkeypatch.setattr(fusion_verdict, "PUBLISHED", [verdict])
    assert fusion_default(reference) == fusion_verdict.FusionAdvice(True, "measured")
    moved = frame.assign(embedding=[v + np.float32(0.01) for v in frame.embedding])
    other = store_frame(moved, tmp_path / "b", name="nlst-sybil")
    assert fusion_verdict.shape(other) == verdict["shape"]
    assert fusion_default(other).default is False  # same name and shape, other vectors
    verdict["models"] = ["A"]
    assert "not all of its models" in fusion_default(reference).reason


def test_the_committed_verdict_is_the_one_the_library_ships_and_it_matches_nlst(nlst):
    if not COMMITTED.is_file():
        pytest.skip("no committed NLST-Sybil report in this checkout")
    committed = json.loads(COMMITTED.read_text(encoding="utf-8"))
    assert committed in fusion_verdict.PUBLISHED
    assert committed["fingerprint"] == fusion_verdict.fingerprint(nlst)
    for metric, verdict in committed["metrics"].items():
        assert fusion_default(nlst, metric) == fusion_verdict.FusionAdvice(verdict["default"], verdict["reason"])


def test_a_label_named_like_a_models_rank_column_gives_way_to_it(tmp_path, caplog):
    frame = planted_frame(n_patients=20, signal=1.0).assign(rank_B="label text")
    reference = store_frame(frame, tmp_path)
    fused = reference.search_fused(patient="P001", k=5, exclude=["P001"])
    own = reference.search("B", patient="P001", k=100, exclude=["P001"]).set_index("PatientID")["rank"]
    assert fused.rank_B.tolist() == [own.get(p, pd.NA) for p in fused.PatientID]
    assert "the label 'rank_B' has the name of a fused hit column" in caplog.text
