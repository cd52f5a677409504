"""What a reference's embeddings know about a label: retrieval and classification, per model and task.

For every task and model:

- retrieval, leave one patient out: each patient queries all the others; precision@k, AP@k and
  Recall@k against the same metrics on random rankings (chance), with a permutation test (labels shuffled
  across patients, the rankings kept);
- the same retrieval by every model at once, their rankings fused (``search/fusion.py``, the rule the
  fused search uses: reciprocal rank fusion, and the mean of percentiles to compare), reported as one more
  "model", and compared with the best single model by the paired bootstrap;
- classification, repeated stratified cross-validation over patients: k-NN, class mean, linear probe
  and MLP; AUC and balanced accuracy with patient-bootstrap intervals, and a permutation test (labels
  shuffled across patients, the whole cross-validation re-run) for the classifiers cheap enough to
  re-fit hundreds of times;

each under every patient aggregation of :mod:`cohort`. The bootstrap draws the same patients for every
model of a task, so differences between models come with paired intervals.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from ..errors import SimilarPatientsError
from ..progress import ProgressCallback, report
from ..references.fusion_verdict import identity
from ..search.correction import CORRECTED, NEIGHBOURS, RAW, check_space, floor_radii
from ..search.fusion import FUSION_DEPTH, FUSIONS, closeness_percent, fuse
from ..util.optional import optional_import, require
from . import classifiers as classifier_module
from . import metrics
from .cohort import AGGREGATIONS, DISTANCES, Cohort
from .folds import patient_folds
from .tasks import Task

#: Classifiers whose permutation test runs by default: re-fitting them is cheap (the MLP is not).
PERMUTED = ("knn", "centroid", "linear")
#: The ``model`` of the fused rankings in the retrieval table, per fusion.
FUSED_NAMES = {"rrf": "fused (RRF)", "percentile": "fused (percentile)"}
FUSION_COLUMNS = [
    "task", "fusion", "aggregation", "distance", "k", "measure", "fused", "best_model", "best", "difference",
    "low", "high",
]  # fmt: skip


@dataclass
class Settings:
    """How an evaluation is run; the defaults are those of the committed NLST-Sybil report."""

    folds: int = 5
    repeats: int = 5
    permutations: int = 100
    bootstrap: int = 1000
    ks: tuple = (5, 10)
    distances: tuple = DISTANCES
    aggregations: tuple = AGGREGATIONS
    primary_aggregation: str = "mean"
    classifiers: tuple = classifier_module.CLASSIFIERS
    #: Classifiers also run under the other aggregations (the MLP is left to the primary one: it costs most).
    secondary_classifiers: tuple = ("knn", "centroid", "linear")
    knn_k: int = 15
    probe_c: float = 0.01
    chance_draws: int = 20
    seed: int = 0
    #: How the models' rankings are fused into one more "model" (none: no fused rows).
    fusions: tuple = FUSIONS
    fusion_depth: int = FUSION_DEPTH
    #: The space distances are measured in: ``raw`` (the stored vectors; the committed report's), or
    #: ``corrected`` (z-scored by the reference's statistics, retrieval locally scaled: search/correction.py).
    space: str = RAW

    def check(self) -> None:
        check_space(self.space, "cosine")
        unknown = set(self.classifiers) - set(classifier_module.CLASSIFIERS)
        if unknown:
            raise SimilarPatientsError(
                f"Unknown classifier(s) {', '.join(sorted(unknown))}; "
                f"choose from {', '.join(classifier_module.CLASSIFIERS)}."
            )
        if self.primary_aggregation not in self.aggregations:
            raise SimilarPatientsError(f"The primary aggregation '{self.primary_aggregation}' must be evaluated.")
        if self.repeats < 1 or self.bootstrap < 10 or self.permutations < 0 or min(self.ks) < 1:
            raise SimilarPatientsError("repeats ≥ 1, bootstrap ≥ 10, permutations ≥ 0 and every k ≥ 1, please.")


@dataclass
class Evaluation:
    """Tables of one evaluation run (one row per measured figure), ready for :mod:`report`."""

    reference: str
    settings: Settings
    tasks: list
    cohorts: pd.DataFrame  # task, model, patients, positives, negatives, lesions, several-lesion patients
    retrieval: pd.DataFrame  # task, model, aggregation, distance, k, measure, value, low, high, chance, p
    classification: pd.DataFrame  # task, model, aggregation, classifier, auc(+low/high/p), bacc(+low/high)
    comparisons: pd.DataFrame  # task, best, runner_up, classifier, difference, low, high
    seconds: float = 0.0
    replicates: dict = field(default_factory=dict, repr=False)  # (task, model, aggregation, classifier) -> AUCs
    #: fused retrieval against the best single model: FUSION_COLUMNS, the difference with its paired 95% CI
    fusion: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=FUSION_COLUMNS))
    models: list = field(default_factory=list)  #: the single models evaluated
    identity: dict = field(default_factory=dict)  #: the reference's content digest (``references.fusion_verdict``)


def evaluate(
    reference,
    tasks: list,
    models: list | None = None,
    settings: Settings | None = None,
    progress: ProgressCallback | None = None,
    workers: int = 1,
    space: str | None = None,
) -> Evaluation:
    """Evaluate ``models`` (default: all) of an opened :class:`~SimilarPatientsLib.reference.Reference`.

    ``workers`` > 1 evaluates (task, model) pairs in that many processes, each single-threaded; the result
    does not depend on it. ``space``: ``raw`` or ``corrected`` (default: the settings', raw).
    """
    require("analysis")
    settings = settings or Settings()
    if space is not None:
        settings = replace(settings, space=space)
    settings.check()
    models = [reference.model_name(m) for m in models or reference.models]
    started = time.perf_counter()
    jobs = []
    for task in tasks:
        labels = task.patient_labels(reference.lesions(models[0]))
        plan = _TaskPlan.draw(labels, settings)
        for model in models:
            if not task.patient_labels(reference.lesions(model)).equals(labels):
                raise SimilarPatientsError(
                    f"Model '{model}' covers other patients than '{models[0]}' for task '{task.name}'; "
                    f"evaluate the models separately."
                )
            jobs.append((_evaluate_model, (task, model, plan)))
        if len(models) > 1 and settings.fusions:
            jobs.append((_evaluate_fused, (task, tuple(models), plan)))
    results = []
    report(progress, 0, len(jobs), "evaluating")
    if workers > 1:
        with ProcessPoolExecutor(workers, initializer=_single_threaded) as pool:
            futures = [pool.submit(job, str(reference.path), *arguments, settings) for job, arguments in jobs]
            for done, future in enumerate(futures, 1):
                results.append(future.result())
                report(progress, done, len(jobs), "evaluating")
    else:
        for done, (job, arguments) in enumerate(jobs, 1):
            results.append(job(reference, *arguments, settings))
            report(progress, done, len(jobs), "evaluating")
    fused = [result for result in results if "fusion" in result]
    results = [result for result in results if "fusion" not in result]
    classification = pd.DataFrame([row for result in results for row in result["classification"]])
    replicates = {key: value for result in results for key, value in result["replicates"].items()}
    nulls = {key: value for result in results for key, value in result["nulls"].items()}
    primary = classification["aggregation"] == settings.primary_aggregation
    classification.insert(
        classification.columns.get_loc("auc_p") + 1,
        "auc_p_adjusted",
        _adjusted_p_values(classification[primary], nulls).reindex(classification.index),
    )
    return Evaluation(
        reference=reference.name,
        settings=settings,
        tasks=tasks,
        cohorts=pd.DataFrame([result["cohort"] for result in results]),
        retrieval=pd.DataFrame([row for result in results + fused for row in result["retrieval"]]),
        classification=classification,
        comparisons=_comparisons(classification, replicates, settings),
        seconds=time.perf_counter() - started,
        replicates=replicates,
        fusion=pd.DataFrame([row for result in fused for row in result["fusion"]], columns=FUSION_COLUMNS),
        models=models,
        identity=identity(reference),
    )


@dataclass
class _TaskPlan:
    """What every model of a task shares: labels, folds, bootstrap draws and random rankings."""

    labels: pd.Series
    folds: list
    counts: np.ndarray
    chance_orders: np.ndarray

    @classmethod
    def draw(cls, labels: pd.Series, settings: Settings) -> _TaskPlan:
        rng = np.random.default_rng(settings.seed)
        return cls(
            labels=labels,
            folds=patient_folds(labels.to_numpy(), settings.folds, settings.repeats, settings.seed),
            counts=metrics.bootstrap_counts(len(labels), settings.bootstrap, rng),
            chance_orders=metrics.random_rankings(len(labels), max(settings.ks), settings.chance_draws, rng),
        )


def _vectors(reference, model: str, settings: Settings) -> np.ndarray:
    """The model's lesion vectors in the settings' space: as stored, or z-scored by the reference's
    corrected space (local scaling then applies to the cohort's distances, :func:`locally_scaled`)."""
    vectors = reference.space(model).vectors
    if settings.space == CORRECTED:
        return reference.space(model, space=CORRECTED).correction.transformed(vectors)
    return vectors


def locally_scaled(matrix: np.ndarray) -> np.ndarray:
    """A cohort's patient distance matrix under local scaling: each distance over the square root of the two
    patients' distances to their ``NEIGHBOURS``-th nearest other patient in the cohort (the search's rule,
    with the cohort as the reference)."""
    others = np.where(np.eye(len(matrix), dtype=bool), np.inf, matrix)
    radii = floor_radii(np.sort(others, axis=1)[:, min(NEIGHBOURS, len(matrix) - 1) - 1])
    scaled = matrix / np.sqrt(np.outer(radii, radii))
    return np.where(np.eye(len(matrix), dtype=bool), matrix, scaled)


def _single_threaded() -> None:
    torch = optional_import("torch", "analysis")
    threadpool_limits = optional_import("threadpoolctl", "analysis").threadpool_limits

    threadpool_limits(1)
    torch.set_num_threads(1)


def _evaluate_model(reference, task: Task, model: str, plan: _TaskPlan, settings: Settings) -> dict:
    """Retrieval and classification rows of one model on one task, under every aggregation."""
    if isinstance(reference, str):
        from ..references.reference import Reference

        reference = Reference(reference)
    cohort = Cohort.build(reference.lesions(model), _vectors(reference, model, settings), plan.labels)
    retrieval, classification, replicates, nulls = [], [], {}, {}
    for aggregation in settings.aggregations:
        distances = {d: cohort.distances(aggregation, d) for d in settings.distances}
        if settings.space == CORRECTED:
            distances = {d: locally_scaled(matrix) for d, matrix in distances.items()}
        for distance, matrix in distances.items():
            order = np.argsort(matrix, axis=1, kind="stable")[:, : max(settings.ks)]
            retrieval += _retrieval(task, model, aggregation, distance, order, cohort.labels, settings, plan)
        instances = cohort.instances(aggregation)
        rows, row_patient = instances.rows, instances.row_patient
        cosine = distances["cosine"] if "cosine" in distances else cohort.distances(aggregation, "cosine")
        names = [
            c
            for c in settings.classifiers
            if aggregation == settings.primary_aggregation or c in settings.secondary_classifiers
        ]
        for classifier in classifier_module.build(names, settings.knn_k, settings.probe_c):
            scores, decisions = _cross_validate(
                classifier, cosine, rows, row_patient, cohort.labels, plan.folds, settings.seed
            )
            auc, bacc, boot = metrics.classification_estimates(scores, decisions, cohort.labels, plan.counts)
            if aggregation == settings.primary_aggregation and classifier.name in PERMUTED and settings.permutations:
                null = _permutation_null(classifier, cosine, rows, row_patient, cohort.labels, settings)
                auc.p_value = metrics.permutation_p_value(auc.value, null)
                nulls[(task.name, model, classifier.name)] = null
            replicates[(task.name, model, aggregation, classifier.name)] = boot
            classification.append(
                {"task": task.name, "model": model, "aggregation": aggregation, "classifier": classifier.name}
                | {f"auc{s}": v for s, v in _fields(auc).items()}
                | {f"bacc{s}": v for s, v in _fields(bacc).items() if s != "_p"}
                | {"auc_fold_sd": _fold_spread(scores, cohort.labels, plan.folds)}
            )
    return {
        "cohort": _cohort_row(task, model, cohort),
        "retrieval": retrieval,
        "classification": classification,
        "replicates": replicates,
        "nulls": nulls,
    }


def _fields(estimate: metrics.Estimate) -> dict:
    return {"": estimate.value, "_low": estimate.low, "_high": estimate.high, "_p": estimate.p_value}


def _cohort_row(task: Task, model: str, cohort: Cohort) -> dict:
    lesions = np.bincount(cohort.lesion_patient)
    return {
        "task": task.name,
        "model": model,
        "patients": len(cohort.labels),
        "positives": int(cohort.labels.sum()),
        "negatives": int((1 - cohort.labels).sum()),
        "lesions": int(lesions.sum()),
        "several_lesions": int((lesions > 1).sum()),
    }


def _retrieval(task, model, aggregation, distance, order, labels, settings, plan) -> list:
    """Retrieval rows of one ranking (``order``: each query's nearest patients, best first)."""
    found = metrics.retrieval_at_k(order, labels, settings.ks)
    chance = [metrics.retrieval_at_k(o, labels, settings.ks) for o in plan.chance_orders]
    null = _retrieval_null(order, labels, settings)
    rows = []
    for k in settings.ks:
        for measure in ("precision", "ap", "recall"):
            value = metrics.mean_estimate(found[k][measure], plan.counts)
            rows.append(
                {
                    "task": task.name,
                    "model": model,
                    "aggregation": aggregation,
                    "distance": distance,
                    "k": k,
                    "measure": measure,
                    "value": value.value,
                    "low": value.low,
                    "high": value.high,
                    "chance": float(np.mean([c[k][measure].mean() for c in chance])),
                    "p": metrics.permutation_p_value(value.value, null[k][measure]) if null else np.nan,
                }
            )
    return rows


def _retrieval_null(order, labels, settings) -> dict:
    """Mean retrieval figures with the labels shuffled across patients and the rankings kept: what a
    ranking that knows nothing of the label scores. The shuffles depend only on the seed, so every model
    (and the fused rankings) of a task meets the same ones."""
    if not settings.permutations:
        return {}
    rng = np.random.default_rng(settings.seed + 2)
    null = {k: {"precision": [], "ap": [], "recall": []} for k in settings.ks}
    for _ in range(settings.permutations):
        shuffled = metrics.retrieval_at_k(order, rng.permutation(labels), settings.ks)
        for k in settings.ks:
            for measure, values in shuffled[k].items():
                null[k][measure].append(values.mean())
    return null


def _evaluate_fused(reference, task: Task, models: tuple, plan: _TaskPlan, settings: Settings) -> dict:
    """Retrieval by every model at once, fused as the search fuses (``search.fusion.fuse``: each model's
    ranking of the other patients, its first ``fusion_depth`` counted), under every aggregation and
    distance; and each fused figure against the best single model's, paired over the same queries."""
    if isinstance(reference, str):
        from ..references.reference import Reference

        reference = Reference(reference)
    cohorts = [Cohort.build(reference.lesions(m), _vectors(reference, m, settings), plan.labels) for m in models]
    labels, top = cohorts[0].labels, max(settings.ks)
    retrieval, comparisons = [], []
    for aggregation in settings.aggregations:
        for distance in settings.distances:
            matrices = [cohort.distances(aggregation, distance) for cohort in cohorts]
            if settings.space == CORRECTED:
                matrices = [locally_scaled(matrix) for matrix in matrices]
            orders = [np.argsort(matrix, axis=1, kind="stable") for matrix in matrices]
            singles = [metrics.retrieval_at_k(order[:, :top], labels, settings.ks) for order in orders]
            ranks = np.stack([_ranks(order) for order in orders])
            for fusion in settings.fusions:
                closeness = None
                if fusion == "percentile":  # each distance on the model's own nearest-match distribution
                    closeness = np.stack([closeness_percent(np.sort(m.min(axis=1)), m) for m in matrices])
                order = fuse(ranks, closeness, fusion, settings.fusion_depth).order[:, :top]
                name = FUSED_NAMES[fusion]
                retrieval += _retrieval(task, name, aggregation, distance, order, labels, settings, plan)
                found = metrics.retrieval_at_k(order, labels, settings.ks)
                for k in settings.ks:
                    for measure in ("precision", "ap", "recall"):
                        means = [single[k][measure].mean() for single in singles]
                        best = int(np.argmax(means))
                        difference = found[k][measure] - singles[best][k][measure]
                        value = metrics.mean_estimate(difference, plan.counts)
                        row = (task.name, name, aggregation, distance, k, measure, float(found[k][measure].mean()))
                        row += (models[best], float(means[best]), value.value, value.low, value.high)
                        comparisons.append(dict(zip(FUSION_COLUMNS, row)))
    return {"retrieval": retrieval, "fusion": comparisons}


def _ranks(order: np.ndarray) -> np.ndarray:
    """(queries, patients) 1-based rank of each patient in each query's ``order``; 0 for the query itself."""
    ranks = np.empty_like(order)
    ranks[np.arange(len(order))[:, None], order] = np.arange(1, order.shape[1] + 1)[None, :]
    np.fill_diagonal(ranks, 0)
    return ranks


def _cross_validate(classifier, distances, rows, row_patient, labels, folds, seed) -> tuple:
    """Out-of-fold (scores, decisions), each (repeats, patients)."""
    scores = np.zeros((len(folds), len(labels)))
    decisions = np.zeros((len(folds), len(labels)), dtype=bool)
    for r, repeat in enumerate(folds):
        for f, test in enumerate(repeat):
            train = np.setdiff1d(np.arange(len(labels)), test)
            fold = classifier_module.FoldInput(distances, rows, row_patient, train, np.sort(test))
            prediction = classifier(fold, labels, seed + 1000 * r + f)
            scores[r, fold.test], decisions[r, fold.test] = prediction.scores, prediction.decisions
    return scores, decisions


def _fold_spread(scores: np.ndarray, labels: np.ndarray, folds: list) -> float:
    """Standard deviation of the AUC over single test folds: how much one held-out split can vary."""
    per_fold = [metrics.auc(scores[r, test], labels[test]) for r, repeat in enumerate(folds) for test in repeat]
    return float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else float("nan")


def _permutation_null(classifier, cosine, rows, row_patient, labels, settings) -> np.ndarray:
    """AUCs with the labels shuffled across patients, stratified folds re-drawn and one repeat of the
    cross-validation re-run. The shuffles depend only on the seed, so every model of a task sees the same
    ones, which is what the max-statistic adjustment needs."""
    rng = np.random.default_rng(settings.seed + 1)
    null = np.empty(settings.permutations)
    for i in range(settings.permutations):
        shuffled = rng.permutation(labels)
        folds = patient_folds(shuffled, settings.folds, 1, settings.seed + 7919 * (i + 1))
        scores, _ = _cross_validate(classifier, cosine, rows, row_patient, shuffled, folds, settings.seed)
        null[i] = metrics.auc(scores[0], shuffled)
    return null


def _adjusted_p_values(classification: pd.DataFrame, nulls: dict) -> pd.Series:
    """Westfall–Young max-statistic p-values: each model's AUC against the best AUC any model of the task
    reaches under the same shuffles, which controls the chance of any false "beats chance" claim among a
    task's models while keeping the dependence between models."""
    adjusted = pd.Series(np.nan, index=classification.index)
    for (task, classifier), group in classification.groupby(["task", "classifier"], sort=False):
        tested = group[[(task, model, classifier) in nulls for model in group["model"]]]
        if len(tested):
            maximum = np.max([nulls[(task, model, classifier)] for model in tested["model"]], axis=0)
            adjusted[tested.index] = [metrics.permutation_p_value(auc, maximum) for auc in tested["auc"]]
    return adjusted


def _comparisons(classification: pd.DataFrame, replicates: dict, settings: Settings) -> pd.DataFrame:
    """Per task and classifier (primary aggregation): the best model against the runner-up, paired (no rows
    when one model is evaluated)."""
    rows = []
    primary = classification[classification["aggregation"] == settings.primary_aggregation]
    for (task, classifier), group in primary.groupby(["task", "classifier"], sort=False):
        if len(group) < 2:
            continue
        ranked = group.sort_values("auc", ascending=False)
        best, runner = ranked.iloc[0], ranked.iloc[1]
        aggregation = settings.primary_aggregation
        difference = (
            replicates[(task, best.model, aggregation, classifier)]
            - replicates[(task, runner.model, aggregation, classifier)]
        )
        value = metrics.estimate(float(best.auc - runner.auc), difference)
        rows.append(
            {
                "task": task,
                "classifier": classifier,
                "best": best.model,
                "runner_up": runner.model,
                "difference": value.value,
                "low": value.low,
                "high": value.high,
            }
        )
    return pd.DataFrame(rows, columns=["task", "classifier", "best", "runner_up", "difference", "low", "high"])
