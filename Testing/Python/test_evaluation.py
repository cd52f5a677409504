"""Evaluation: metrics against hand-computed cases, patient-safe folds, determinism, planted signals,
the report, and the real NLST-Sybil tasks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import planted_frame, store_frame
from SimilarPatientsLib import SimilarPatientsError, evaluation
from SimilarPatientsLib.evaluation import metrics, report, tasks
from SimilarPatientsLib.evaluation.classifiers import FoldInput
from SimilarPatientsLib.evaluation.cohort import Cohort
from SimilarPatientsLib.evaluation.folds import patient_folds
from SimilarPatientsLib.evaluation.tasks import Task

pytestmark = pytest.mark.torch  # the analysis extra (scikit-learn, torch)
roc_auc_score = pytest.importorskip("sklearn.metrics", reason="the analysis extra").roc_auc_score

FAST = evaluation.Settings(repeats=2, permutations=19, retrieval_permutations=99, bootstrap=200, chance_draws=5)
GROUP = Task("group", "group", positive=("pos",), negative=("neg",), description="planted group")

# --- metrics, by hand ---------------------------------------------------------------------------


def test_auc_by_hand_and_with_ties():
    # pairs (pos, neg): (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4) -> 3 of 4
    assert metrics.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # one tie between a positive and a negative counts half: (0.5 = 0.5) -> 0.5 of 1
    assert metrics.auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, size=(3, 40)).astype(float)  # many ties
    labels = rng.integers(0, 2, size=40)
    expected = [roc_auc_score(labels, row) for row in scores]
    np.testing.assert_allclose(metrics.auc(scores, labels), expected, atol=1e-12)


def test_weighted_auc_equals_auc_of_the_resampled_patients():
    rng = np.random.default_rng(2)
    scores = rng.standard_normal((2, 30)).round(1)
    labels = (rng.random(30) < 0.4).astype(int)
    draws = rng.integers(0, 30, size=(5, 30))
    counts = np.stack([np.bincount(d, minlength=30) for d in draws]).astype(float)
    weighted = metrics.auc(scores, labels, counts)  # (repeats, B)
    for b, d in enumerate(draws):
        for r in range(2):
            assert weighted[r, b] == pytest.approx(roc_auc_score(labels[d], scores[r, d]))
    assert metrics.bootstrap_counts(30, 7, rng).sum(axis=1).tolist() == [30] * 7


def test_balanced_accuracy_by_hand():
    # sensitivity 2/3, specificity 1/2
    value = metrics.balanced_accuracy([1, 1, 0, 1, 0], [1, 1, 1, 0, 0])
    assert value == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_random_rankings_never_return_the_query_and_match_the_base_rate():
    rng = np.random.default_rng(3)
    orders = metrics.random_rankings(20, 19, 50, rng)
    assert not (orders == np.arange(20)[None, :, None]).any()
    labels = np.array([1] * 5 + [0] * 15)
    precision = np.mean([metrics.label_figures(o, labels, (5,))["P@5"].mean() for o in orders])
    expected = np.mean([(labels == label).sum() - 1 for label in labels]) / 19
    assert precision == pytest.approx(expected, abs=0.02)


def test_permutation_p_value_counts_the_observed():
    assert metrics.permutation_p_value(0.7, np.array([0.5, 0.6, 0.8])) == pytest.approx(0.5)
    assert metrics.permutation_p_value(0.9, np.zeros(99)) == pytest.approx(0.01)


# --- folds and aggregation -----------------------------------------------------------------------


def test_folds_cover_each_patient_once_stratified_and_seeded():
    labels = np.array([1] * 12 + [0] * 30)
    folds = patient_folds(labels, 4, 3, seed=5)
    for repeat in folds:
        together = np.sort(np.concatenate(repeat))
        assert together.tolist() == list(range(42))
        assert max(labels[t].sum() for t in repeat) - min(labels[t].sum() for t in repeat) <= 1
    again = patient_folds(labels, 4, 3, seed=5)
    assert all(np.array_equal(a, b) for ra, rb in zip(folds, again) for a, b in zip(ra, rb))
    assert not np.array_equal(folds[0][0], folds[1][0])
    with pytest.raises(SimilarPatientsError, match="smaller class has 12"):
        patient_folds(labels, 13, 1, seed=0)


def test_no_fold_splits_a_patient(tmp_path):
    """Every fold's training and test rows come from disjoint patients, lesion by lesion."""
    reference = store_frame(planted_frame(n_patients=30, lesions=(1, 4)), tmp_path)
    labels = GROUP.patient_labels(reference.lesions("A"))
    cohort = Cohort.build(reference.lesions("A"), reference.space("A").vectors, labels)
    instances = cohort.instances("lesions")
    rows, row_patient = instances.rows, instances.row_patient
    assert len(rows) > len(labels)  # several lesions per patient, so the check means something
    for repeat in patient_folds(cohort.labels, 5, 2, seed=0):
        for test in repeat:
            train = np.setdiff1d(np.arange(len(labels)), test)
            fold = FoldInput(cohort.distances("lesions", "cosine"), rows, row_patient, train, np.sort(test))
            train_patients = set(cohort.patient_ids[row_patient[fold.rows_of(fold.train)]])
            test_patients = set(cohort.patient_ids[row_patient[fold.rows_of(fold.test)]])
            assert not train_patients & test_patients
            assert test_patients == set(cohort.patient_ids[test])


def test_copied_lesions_do_not_leak_into_the_score(tmp_path):
    """Each patient's lesions are near-copies and labels are random: a lesion-level split would score
    near 1 (the copy in training gives the answer away); the patient-level split stays at chance."""
    rng = np.random.default_rng(7)
    frame = planted_frame(n_patients=80, signal=0.0, lesions=(3, 3), models=("A",))
    base = {p: rng.standard_normal(24) for p in frame.PatientID.unique()}
    frame["embedding"] = [(base[p] + 0.01 * rng.standard_normal(24)).astype(np.float32) for p in frame.PatientID]
    shuffled = dict(zip(frame.PatientID.unique(), rng.permutation(frame.drop_duplicates("PatientID").group)))
    frame["group"] = frame.PatientID.map(shuffled)
    reference = store_frame(frame, tmp_path)
    settings = evaluation.Settings(
        repeats=2, permutations=0, bootstrap=200, aggregations=("lesions",), primary_aggregation="lesions",
        classifiers=("knn", "linear"), chance_draws=2,
    )  # fmt: skip
    result = evaluation.evaluate(reference, [GROUP], settings=settings)
    assert result.classification.auc.max() < 0.7
    assert (result.classification.auc_low < 0.5).all()

    # the control: the same data split by lesion instead of patient is nearly perfect with 1-NN
    labels = GROUP.patient_labels(reference.lesions("A"))
    cohort = Cohort.build(reference.lesions("A"), reference.space("A").vectors, labels)
    lesion_labels = cohort.labels[cohort.lesion_patient]
    test = np.arange(0, len(lesion_labels), 3)
    train = np.setdiff1d(np.arange(len(lesion_labels)), test)
    nearest = train[
        np.argmin(((cohort.lesion_vectors[test, None] - cohort.lesion_vectors[None, train]) ** 2).sum(-1), 1)
    ]
    assert (lesion_labels[nearest] == lesion_labels[test]).mean() > 0.95


def test_aggregations_by_hand():
    cohort = Cohort(
        patient_ids=np.array(["a", "b"], dtype=object),
        labels=np.array([0, 1]),
        lesion_vectors=np.array([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]]),
        lesion_patient=np.array([0, 0, 1]),
    )
    np.testing.assert_allclose(cohort.instances("mean").rows, [[0.5, 1.5], [2.0, 2.0]])
    np.testing.assert_allclose(cohort.instances("max").rows, [[1.0, 3.0], [2.0, 2.0]])
    # nearest lesion pair under euclidean: |(0,3)-(2,2)| = sqrt(5) < |(1,0)-(2,2)| = sqrt(5)... equal; both sqrt(5)
    distances = cohort.distances("lesions", "euclidean")
    assert distances[0, 1] == pytest.approx(np.sqrt(5))
    assert np.isinf(distances[0, 0])
    cosine = cohort.distances("lesions", "cosine")
    assert cosine[0, 1] == pytest.approx(1 - 6 / (3 * np.sqrt(8)))  # (0,3)·(2,2) / (3·2√2)


# --- tasks ---------------------------------------------------------------------------------------


def test_task_labels_and_errors():
    lesions = pd.DataFrame(
        {"PatientID": ["1", "1", "2", "3", "4", "5"], "stage": ["IA", "IA", "IV", "IIIB", "IB", None]}
    )
    labels = tasks.PRESETS["stage-iii-iv-vs-i-ii"].patient_labels(lesions)
    assert labels.to_dict() == {"1": 0, "2": 1, "3": 1, "4": 0}
    with pytest.raises(SimilarPatientsError, match="needs the label field 'histology_code'"):
        tasks.PRESETS["adeno-vs-squamous"].patient_labels(lesions)
    with pytest.raises(SimilarPatientsError, match="1 positive and 3 negative"):
        Task("x", "stage", positive=("IV",)).patient_labels(lesions)
    mixed = lesions.assign(stage=["IA", "IV", "IV", "IIIB", "IB", "IA"])
    with pytest.raises(SimilarPatientsError, match="different sides"):
        tasks.PRESETS["stage-iii-iv-vs-i-ii"].patient_labels(mixed)
    ages = pd.DataFrame({"PatientID": list("abcdef"), "age": [50, 61, 70, 66, 55, None]})
    assert tasks.task_from_arguments("age", [">=65"]).patient_labels(ages).to_dict() == {
        "a": 0, "b": 0, "c": 1, "d": 1, "e": 0,
    }  # fmt: skip
    with pytest.raises(SimilarPatientsError, match="Unknown task"):
        tasks.resolve(["nope"])


def test_nlst_presets_cover_the_expected_patients(nlst):
    lesions = nlst.lesions("CTFM")
    histology = tasks.PRESETS["adeno-vs-squamous"].patient_labels(lesions)
    assert (len(histology), int(histology.sum())) == (364, 265)
    stage = tasks.PRESETS["stage-iii-iv-vs-i-ii"].patient_labels(lesions)
    assert len(stage) == 464
    nos = tasks.PRESETS["adeno-nos-vs-squamous-nos"].patient_labels(lesions)
    assert set(lesions[lesions.PatientID.isin(nos.index)].histology_code.astype(str)) == {"8140", "8070"}


# --- evaluate ------------------------------------------------------------------------------------


def test_planted_signal_is_found_and_ranked(tmp_path):
    reference = store_frame(planted_frame(n_patients=90, signal=2.5), tmp_path)
    result = evaluation.evaluate(reference, [GROUP], settings=FAST)
    primary = result.classification[result.classification.aggregation == "mean"].set_index(["model", "classifier"])
    assert primary.loc[("A", "linear"), "auc"] > 0.85
    assert primary.loc[("A", "linear"), "auc_p_adjusted"] == pytest.approx(1 / 20)  # beats every shuffle
    assert primary.loc[("A", "linear"), "auc"] > primary.loc[("B", "linear"), "auc"]
    assert (primary.auc_low <= primary.auc).all() and (primary.auc <= primary.auc_high).all()
    precision = result.retrieval.query("model == 'A' and aggregation == 'mean' and measure == 'BP@5'")
    assert (precision.value > precision["null"] + 0.1).all() and np.allclose(precision.p, 1 / 100)
    comparison = result.comparisons.set_index("classifier").loc["linear"]
    assert comparison.best == "A" and comparison.runner_up == "B"
    assert set(result.classification.aggregation) == {"mean", "max", "lesions"}
    assert "mlp" not in set(result.classification.query("aggregation != 'mean'").classifier)


def test_evaluation_is_deterministic_with_a_seed_and_workers(tmp_path):
    reference = store_frame(planted_frame(n_patients=45, signal=1.0), tmp_path)
    settings = evaluation.Settings(repeats=2, permutations=5, retrieval_permutations=20, bootstrap=100, chance_draws=2)
    first = evaluation.evaluate(reference, [GROUP], settings=settings)
    second = evaluation.evaluate(reference, [GROUP], settings=settings, workers=2)
    pd.testing.assert_frame_equal(first.classification, second.classification)
    pd.testing.assert_frame_equal(first.retrieval, second.retrieval)
    other = evaluation.evaluate(reference, [GROUP], settings=evaluation.Settings(**{**settings.__dict__, "seed": 1}))
    assert not np.allclose(first.classification.auc, other.classification.auc)


def test_settings_and_models_are_checked(tmp_path):
    reference = store_frame(planted_frame(n_patients=30), tmp_path)
    with pytest.raises(SimilarPatientsError, match="Unknown classifier"):
        evaluation.evaluate(reference, [GROUP], settings=evaluation.Settings(classifiers=("svm",)))
    with pytest.raises(SimilarPatientsError, match="no model 'C'"):
        evaluation.evaluate(reference, [GROUP], models=["C"])


def test_report_is_written_whole(tmp_path):
    reference = store_frame(planted_frame(n_patients=60, signal=2.0), tmp_path / "home")
    result = evaluation.evaluate(reference, [GROUP], settings=FAST)
    out = tmp_path / "report"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    path = report.write(result, out)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["report.md", "classification.csv", "retrieval.csv", "cohorts.csv", "comparisons.csv",
         "fusion.csv", "fusion.json", "auc-group.png", "retrieval-group.png", "hubness.csv", "lookalike.csv"]
    )  # fmt: skip
    assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names if n.endswith(".png"))
    text = path.read_text(encoding="utf-8")
    assert "**Verdict.**" in text and "**A** ranks first" in text
    assert "2 of 2 models beat chance" in text or "1 of 2 models beat chance" in text
    assert "#### Several lesions per patient" in text
    table = pd.read_csv(out / "classification.csv")
    assert len(table) == len(result.classification)
    assert not list(tmp_path.glob(".report-*"))


def test_nlst_stage_task_end_to_end(nlst, tmp_path):
    """Two models, a short run: the published comparison is made and the figures are sane."""
    settings = evaluation.Settings(
        repeats=2,
        permutations=9,
        retrieval_permutations=49,
        bootstrap=200,
        chance_draws=3,
        classifiers=("centroid", "linear"),
    )
    task = tasks.PRESETS["stage-iii-iv-vs-i-ii"]
    result = evaluation.evaluate(nlst, [task], models=["CTFM", "Merlin"], settings=settings)
    probe = result.classification.query("aggregation == 'mean' and classifier == 'linear'").set_index("model")
    assert probe.auc.between(0.55, 0.72).all()  # a weak, real signal, as published (0.612–0.724)
    assert probe.auc_fold_sd.between(0.02, 0.15).all()
    text = report.write(result, tmp_path / "nlst").read_text(encoding="utf-8")
    assert "#### Against the published figures" in text
    assert "| FMCIB | 0.724 | not in this reference |" in text


def test_evaluate_command(tmp_path, monkeypatch, capsys):
    from SimilarPatientsLib.cli import main

    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(tmp_path / "home"))
    reference = store_frame(planted_frame(n_patients=45, signal=2.0), tmp_path / "home")
    out = tmp_path / "out"
    arguments = ["evaluate", "--reference", "synthetic", "--out", str(out), "--repeats", "1", "--bootstrap", "50"]
    labelled = ["--label", "group", "--positive", "pos", "--permutations", "9", "--retrieval-permutations", "20"]
    code = main([*arguments, *labelled, "--workers", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "group:pos-vs-rest: With the linear probe" in printed and f"Report: {out / 'report.md'}" in printed
    assert (out / "classification.csv").exists()
    # whether to fuse the models: said, written beside the report and kept with the evaluated reference
    assert "Fusion (cosine): On synthetic, reciprocal rank fusion of its 2 models" in printed
    written = (out / "fusion.json").read_text(encoding="utf-8")
    assert (reference.path / "fusion.json").read_text(encoding="utf-8") == written
    assert main([*arguments, "--positive", "pos"]) == 2
    assert "--positive and --negative need --label FIELD" in capsys.readouterr().err
    assert main([*arguments, "--task", "nope"]) == 2
    assert "presets are: adeno-vs-squamous" in capsys.readouterr().err
    assert main(arguments) == 2  # no preset field in this reference, and no --label
    assert "Name a task" in capsys.readouterr().err


def test_one_model_is_evaluated_and_reported(tmp_path, monkeypatch, capsys):
    """Library and CLI, on a one-model reference: no comparison to make, the report is written all the same."""
    from SimilarPatientsLib.cli import main

    frame = planted_frame(n_patients=45, signal=2.0, models=("A",))
    reference = store_frame(frame, tmp_path / "home")
    result = evaluation.evaluate(reference, [GROUP], settings=FAST)
    assert result.comparisons.empty and list(result.comparisons.columns)[:2] == ["task", "classifier"]
    text = report.write(result, tmp_path / "library").read_text(encoding="utf-8")
    assert "**A** (the only model evaluated) reaches AUC" in text
    monkeypatch.setenv("SIMILARPATIENTS_HOME", str(tmp_path / "home"))
    argv = ["evaluate", "--reference", "synthetic", "--label", "group", "--positive", "pos", "--out"]
    argv += [str(tmp_path / "cli"), "--repeats", "2", "--permutations", "9", "--bootstrap", "100", "--workers", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "cli" / "report.md").is_file() and "Report:" in capsys.readouterr().out


def test_the_corrected_space_is_evaluated_as_the_search_measures_it(tmp_path):
    """``evaluate(space="corrected")`` measures retrieval in the reference's corrected space (z-scored, a
    patient distance over the square root of the two 10th-neighbour distances in the cohort), the raw
    default as before; the classifiers see the z-scored vectors."""
    from SimilarPatientsLib.evaluation.run import locally_scaled

    matrix = np.array([[np.inf, 1.0, 2.0], [1.0, np.inf, 4.0], [2.0, 4.0, np.inf]])
    radii = np.array([2.0, 4.0, 4.0])  # each row's largest (its 10th, capped at the other patients)
    expected = matrix / np.sqrt(np.outer(radii, radii))
    np.fill_diagonal(expected, np.inf)
    np.testing.assert_allclose(locally_scaled(matrix), expected)
    reference = store_frame(planted_frame(n_patients=45, signal=1.0), tmp_path)
    settings = evaluation.Settings(repeats=2, permutations=0, bootstrap=100, chance_draws=2, classifiers=("knn",))
    raw = evaluation.evaluate(reference, [GROUP], settings=settings)
    corrected = evaluation.evaluate(reference, [GROUP], settings=settings, space="corrected")
    assert raw.settings.space == "raw" and corrected.settings.space == "corrected"
    for model in ("A", "B", "fused (RRF)"):  # the fused rankings too
        mine = [r.retrieval[r.retrieval.model == model].value.to_numpy() for r in (raw, corrected)]
        assert len(mine[0]) and not np.array_equal(*mine), model
    with pytest.raises(SimilarPatientsError, match="Unknown space"):
        evaluation.evaluate(reference, [GROUP], settings=settings, space="hubless")
