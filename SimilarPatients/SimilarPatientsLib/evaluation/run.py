"""What a reference's embeddings know about a label: retrieval and classification, per model and task.

For every task and model:

- retrieval, leave one patient out: each patient queries all the others; precision@k, class-balanced
  precision@k with a row per class, mAP@R, R-precision and (ordinal labels) nDCG@k; intervals over the
  queries (this reference) and over queries and gallery (a new cohort); verdicts against the permutation
  null (labels shuffled across patients, the rankings kept, which keeps the hubs a random ranking lacks);
- hubness of every ranking (how many top-k lists the commonest patient is in; who is in none);
- anchors on the same folds: what age, sex and smoking (and a lesion-size field, where the reference has
  one) know, each model's paired difference against them;
- same-tumor re-identification across screening rounds (:mod:`lookalike`);
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
from ..references import schema
from ..references.fusion_verdict import SEARCH_AGGREGATION, identity
from ..search.correction import CORRECTED, NEIGHBOURS, RAW, check_space, floor_radii
from ..search.fusion import FUSION_DEPTH, FUSIONS, closeness_percent, fuse
from ..util.optional import optional_import, require
from . import anchors as anchor_module
from . import classifiers as classifier_module
from . import lookalike, metrics
from .cohort import AGGREGATIONS, DISTANCES, Cohort
from .folds import patient_folds
from .tasks import Task

#: Classifiers whose permutation test runs by default: re-fitting them is cheap (the MLP is not).
PERMUTED = ("knn", "centroid", "linear")
#: The ``model`` of the fused rankings in the retrieval table, per fusion.
FUSED_NAMES = {"rrf": "fused (RRF)", "percentile": "fused (percentile)"}
FUSION_COLUMNS = [
    "task", "fusion", "aggregation", "distance", "measure", "fused", "best_model", "best", "difference", "low", "high",
]  # fmt: skip


@dataclass
class Settings:
    """How an evaluation is run; the defaults are those of the committed NLST-Sybil report."""

    folds: int = 5
    repeats: int = 5
    #: Label shuffles of the classifiers' permutation test (each re-runs the cross-validation) and of the
    #: retrieval figures that need whole rankings (mAP@R, R-precision).
    permutations: int = 100
    #: Label shuffles of the retrieval null for P@k, BP@k, per-class P@k and nDCG@k (rankings kept: cheap).
    retrieval_permutations: int = 1000
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
    #: A numeric lesion field holding the lesion's size (e.g. its box's longest side, mm) for the size
    #: anchor and the look-alike benchmark's similar-size gallery; None: the reference has none.
    size_field: str | None = None
    #: Same-tumor re-identification across series (needs SeriesInstanceUID).
    lookalike: bool = True
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
        if (
            self.repeats < 1
            or self.bootstrap < 10
            or self.permutations < 0
            or self.retrieval_permutations < self.permutations
            or min(self.ks) < 1
        ):
            raise SimilarPatientsError(
                "repeats ≥ 1, bootstrap ≥ 10, 0 ≤ permutations ≤ retrieval permutations and every k ≥ 1, please."
            )


@dataclass
class Evaluation:
    """Tables of one evaluation run (one row per measured figure), ready for :mod:`report`."""

    reference: str
    settings: Settings
    tasks: list
    cohorts: pd.DataFrame  # task, model, patients, positives, negatives, lesions, several-lesion patients
    retrieval: (
        pd.DataFrame
    )  # task, model, aggregation, distance, measure, value, low, high, gallery_low/high, chance, null, p
    classification: pd.DataFrame  # task, model, aggregation, classifier, auc(+low/high/p), bacc(+low/high)
    comparisons: pd.DataFrame  # task, best, runner_up, classifier, difference, low, high
    seconds: float = 0.0
    replicates: dict = field(default_factory=dict, repr=False)  # (task, model, aggregation, classifier) -> AUCs
    #: fused retrieval against the best single model: FUSION_COLUMNS, the difference with its paired 95% CI
    fusion: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=FUSION_COLUMNS))
    models: list = field(default_factory=list)  #: the single models evaluated
    identity: dict = field(default_factory=dict)  #: the reference's content digest (``references.fusion_verdict``)
    #: model, space, aggregation, distance, k, largest (share of top-k lists), hub, never (share in none): all patients
    hubness: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: task, anchor, model, patients, measure, value, low, high, difference, difference_low/high, p
    anchors: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: task, model, space, measure, value, raw, difference, low, high: the evaluated space against raw
    spaces: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: same-tumor re-identification (``lookalike.COLUMNS``)
    lookalike: pd.DataFrame = field(default_factory=pd.DataFrame)


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
    if settings.size_field and settings.size_field not in reference.lesions(models[0]).columns:
        raise SimilarPatientsError(
            f"The size field '{settings.size_field}' is not in '{reference.name}'; "
            f"its fields are: {', '.join(reference.label_fields)}."
        )
    started = time.perf_counter()
    jobs = []
    for task in tasks:
        labels = task.patient_labels(reference.lesions(models[0]))
        plan = _TaskPlan.draw(labels, settings, task.patient_grades(reference.lesions(models[0]), labels.index))
        for model in models:
            if not task.patient_labels(reference.lesions(model)).equals(labels):
                raise SimilarPatientsError(
                    f"Model '{model}' covers other patients than '{models[0]}' for task '{task.name}'; "
                    f"evaluate the models separately."
                )
            jobs.append((_evaluate_model, (task, model, plan)))
        if len(models) > 1 and settings.fusions:
            jobs.append((_evaluate_fused, (task, tuple(models), plan)))
        jobs.append((_evaluate_anchors, (task, tuple(models), plan)))
    jobs.append((_evaluate_hubness, (tuple(models),)))
    if settings.lookalike:
        jobs.append((_evaluate_lookalike, (tuple(models),)))
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
    extras = {kind: [r[kind] for r in results if kind in r] for kind in ("hubness", "anchors", "lookalike", "spaces")}
    fused = [result for result in results if "fusion" in result]
    results = [result for result in results if "cohort" in result]
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
        hubness=pd.DataFrame([row for rows in extras["hubness"] for row in rows]),
        anchors=pd.DataFrame([row for rows in extras["anchors"] for row in rows]),
        spaces=pd.DataFrame([row for rows in extras["spaces"] for row in rows]),
        lookalike=pd.concat(extras["lookalike"], ignore_index=True) if extras["lookalike"] else pd.DataFrame(),
    )


@dataclass
class _TaskPlan:
    """What every model of a task shares: labels, folds, bootstrap draws and random rankings."""

    labels: pd.Series
    folds: list
    counts: np.ndarray
    chance_orders: np.ndarray
    #: (retrieval_permutations, n) label shuffles, the same for every model (and the fused rankings)
    shuffles: np.ndarray
    #: (n,) each patient's place on the task's ordinal scale (None: the label is not ordinal)
    grades: np.ndarray | None = None

    @classmethod
    def draw(cls, labels: pd.Series, settings: Settings, grades: np.ndarray | None = None) -> _TaskPlan:
        rng = np.random.default_rng(settings.seed)
        n = len(labels)
        return cls(
            labels=labels,
            folds=patient_folds(labels.to_numpy(), settings.folds, settings.repeats, settings.seed),
            counts=metrics.bootstrap_counts(n, settings.bootstrap, rng),
            chance_orders=metrics.random_rankings(n, n - 1, settings.chance_draws, rng),
            shuffles=np.argsort(
                np.random.default_rng(settings.seed + 2).random((settings.retrieval_permutations, n)), 1
            ),
            grades=grades,
        )


def locally_scaled(matrix: np.ndarray) -> np.ndarray:
    """A cohort's patient distance matrix under local scaling: each distance over the square root of the two
    patients' distances to their ``NEIGHBOURS``-th nearest other patient in the cohort (the search's rule,
    with the cohort as the reference)."""
    others = np.where(np.eye(len(matrix), dtype=bool), np.inf, matrix)
    radii = floor_radii(np.sort(others, axis=1)[:, min(NEIGHBOURS, len(matrix) - 1) - 1])
    scaled = matrix / np.sqrt(np.outer(radii, radii))
    return np.where(np.eye(len(matrix), dtype=bool), matrix, scaled)


def _vectors(reference, model: str, space: str) -> np.ndarray:
    """A model's lesion vectors in ``space`` (z-scored by the reference's statistics if corrected)."""
    vectors = reference.space(model).vectors
    if space == CORRECTED:
        vectors = reference.space(model, space=CORRECTED).correction.transformed(vectors)
    return vectors


def _distances(cohort: Cohort, aggregation: str, distance: str, space: str) -> np.ndarray:
    """A cohort's patient distances in ``space`` (locally scaled within the cohort if corrected)."""
    matrix = cohort.distances(aggregation, distance)
    return locally_scaled(matrix) if space == CORRECTED else matrix


def _spaces(settings: Settings) -> tuple:
    """The evaluated space, and raw beside it where the evaluated one is not raw (hubs, look-alikes)."""
    return (settings.space,) if settings.space == RAW else (settings.space, RAW)


def _space_rows(task, model: str, evaluated: dict, raw: dict, plan, settings: Settings) -> list:
    """The evaluated space against raw at what the search does (nearest lesion pair, cosine): BP@k and the
    per-class precision, paired over the same queries and bootstrap draws."""
    labels = plan.labels.to_numpy()
    k = max(settings.ks)
    here, there = metrics.summarise(evaluated, labels), metrics.summarise(raw, labels)
    gap = metrics.summarise({f"P@{k}": evaluated[f"P@{k}"] - raw[f"P@{k}"]}, labels, plan.counts)
    rows = []
    for measure in (f"BP@{k}", f"P@{k} +", f"P@{k} -"):
        paired = metrics.estimate(float(here[measure] - there[measure]), gap[measure])
        rows.append(
            {"task": task.name, "model": model, "space": settings.space, "measure": measure}
            | {"value": float(here[measure]), "raw": float(there[measure]), "difference": paired.value}
            | {"low": paired.low, "high": paired.high}
        )
    return rows


def _single_threaded() -> None:
    torch = optional_import("torch", "analysis")
    threadpool_limits = optional_import("threadpoolctl", "analysis").threadpool_limits

    threadpool_limits(1)
    torch.set_num_threads(1)


def _evaluate_model(reference, task: Task, model: str, plan: _TaskPlan, settings: Settings) -> dict:
    """Retrieval and classification rows of one model on one task, under every aggregation."""
    reference = _opened(reference)
    cohort = Cohort.build(reference.lesions(model), _vectors(reference, model, settings.space), plan.labels)
    retrieval, classification, replicates, nulls, spaces = [], [], {}, {}, []
    for aggregation in settings.aggregations:
        distances = {d: _distances(cohort, aggregation, d, settings.space) for d in settings.distances}
        for distance, matrix in distances.items():
            rows, found = _retrieval(task, model, aggregation, distance, _full_order(matrix), settings, plan)
            retrieval += rows
            if settings.space != RAW and (aggregation, distance) == (SEARCH_AGGREGATION, "cosine"):
                raw = Cohort.build(reference.lesions(model), _vectors(reference, model, RAW), plan.labels)
                order = _full_order(_distances(raw, aggregation, distance, RAW))
                raw_found = metrics.label_figures(order, raw.labels, settings.ks, plan.grades, ranked=False)
                spaces += _space_rows(task, model, found, raw_found, plan, settings)
        instances = cohort.instances(aggregation)
        rows, row_patient = instances.rows, instances.row_patient
        cosine = (
            distances["cosine"] if "cosine" in distances else _distances(cohort, aggregation, "cosine", settings.space)
        )
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
        "spaces": spaces,
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


def _full_order(distances: np.ndarray) -> np.ndarray:
    """(n, n - 1): each patient's ranking of all the others, nearest first (the diagonal is +inf)."""
    return np.argsort(distances, axis=1, kind="stable")[:, :-1]


def _headline(aggregation: str, distance: str, settings: Settings) -> bool:
    """Whether a ranking gets the measures that cost most (mAP@R and R-precision, which need whole rankings
    under every shuffle; the gallery-resampled interval): the product's cosine, at the primary aggregation
    and at the search's nearest lesion pair. The other rankings get precision, class-balanced precision and
    nDCG with the query bootstrap and the full permutation null."""
    return distance == "cosine" and aggregation in (settings.primary_aggregation, SEARCH_AGGREGATION)


def _retrieval(task, model, aggregation, distance, order, settings, plan) -> tuple:
    """Retrieval rows of one ranking (``order``: each query's ranking of the other patients, best first),
    and its per-query figures (for paired comparisons)."""
    labels = plan.labels.to_numpy()
    full = _headline(aggregation, distance, settings)
    figures = metrics.label_figures(order, labels, settings.ks, plan.grades, ranked=full)
    point = metrics.summarise(figures, labels)
    replicates = metrics.summarise(figures, labels, plan.counts)
    chance = [
        metrics.summarise(metrics.label_figures(o, labels, settings.ks, plan.grades, ranked=full), labels)
        for o in plan.chance_orders
    ]
    null = _retrieval_null(order, plan, settings, full)
    gallery = {}
    if full:
        gallery = metrics.gallery_bootstrap(order, labels, plan.counts, max(settings.ks))
    rows = []
    for measure, value in point.items():
        low, high = np.nanpercentile(replicates[measure], [2.5, 97.5])
        gallery_low, gallery_high = (
            np.nanpercentile(gallery[measure], [2.5, 97.5]) if measure in gallery else (np.nan, np.nan)
        )
        shuffled = null.get(measure, np.empty(0))
        rows.append(
            {
                "task": task.name,
                "model": model,
                "aggregation": aggregation,
                "distance": distance,
                "measure": measure,
                "value": float(value),
                "low": float(low),
                "high": float(high),
                "gallery_low": float(gallery_low),
                "gallery_high": float(gallery_high),
                "chance": float(np.mean([c[measure] for c in chance])),
                "null": float(np.mean(shuffled)) if len(shuffled) else np.nan,
                "p": metrics.permutation_p_value(float(value), shuffled) if len(shuffled) else np.nan,
                "shuffles": len(shuffled),
            }
        )
    return rows, figures


#: Label shuffles scored at a time by the retrieval null (bounds its memory: shuffles × patients × R).
_NULL_CHUNK = 50


def _retrieval_null(order, plan, settings, full: bool = True) -> dict:
    """Retrieval figures with the labels (and grades) shuffled across patients and the rankings kept: what a
    ranking with these very hubs scores when it knows nothing of the label. ``plan.shuffles`` is the same
    for every model (and the fused rankings) of a task. The figures that need whole rankings (mAP@R,
    R-precision) are scored on the first ``permutations`` shuffles only."""
    labels, grades = plan.labels.to_numpy(), plan.grades
    null: dict = {}
    for start in range(0, len(plan.shuffles), _NULL_CHUNK):
        chunk = plan.shuffles[start : start + _NULL_CHUNK]
        ranked = chunk[: max(0, settings.permutations - start)] if full else chunk[:0]
        for part, whole in ((chunk[len(ranked) :], False), (ranked, True)):
            if not len(part):
                continue
            shuffled = labels[part]
            figures = metrics.label_figures(
                order, shuffled, settings.ks, None if grades is None else grades[part], ranked=whole
            )
            for measure, values in metrics.summarise(figures, shuffled).items():
                null.setdefault(measure, []).append(values)
    return {measure: np.concatenate(values) for measure, values in null.items()}


def _evaluate_fused(reference, task: Task, models: tuple, plan: _TaskPlan, settings: Settings) -> dict:
    """Retrieval by every model at once, fused as the search fuses (``search.fusion.fuse``: each model's
    ranking of the other patients, its first ``fusion_depth`` counted), under every aggregation and
    distance; and each fused figure against the best single model's, paired over the same queries."""
    reference = _opened(reference)
    cohorts = [Cohort.build(reference.lesions(m), _vectors(reference, m, settings.space), plan.labels) for m in models]
    labels = cohorts[0].labels
    retrieval, comparisons, spaces = [], [], []
    for aggregation in settings.aggregations:
        for distance in settings.distances:
            matrices = [_distances(cohort, aggregation, distance, settings.space) for cohort in cohorts]
            orders = [_full_order(matrix) for matrix in matrices]
            full = _headline(aggregation, distance, settings)
            singles = [metrics.label_figures(o, labels, settings.ks, plan.grades, ranked=full) for o in orders]
            ranks = np.stack([metrics.ranks_of(order) for order in orders])
            for fusion in settings.fusions:
                closeness = None
                if fusion == "percentile":  # each distance on the model's own nearest-match distribution
                    closeness = np.stack([closeness_percent(np.sort(m.min(axis=1)), m) for m in matrices])
                order = _without_self(fuse(ranks, closeness, fusion, settings.fusion_depth).order)
                name = FUSED_NAMES[fusion]
                rows, found = _retrieval(task, name, aggregation, distance, order, settings, plan)
                retrieval += rows
                if (
                    fusion == "rrf"
                    and settings.space != RAW
                    and (aggregation, distance) == (SEARCH_AGGREGATION, "cosine")
                ):
                    spaces += _space_rows(
                        task, name, found, _raw_fused(reference, models, plan, settings), plan, settings
                    )
                fused_point = metrics.summarise(found, labels)
                single_points = [metrics.summarise(single, labels) for single in singles]
                for measure, value in fused_point.items():
                    means = [single[measure] for single in single_points]
                    best = int(np.argmax(means))
                    source = _source(measure)
                    difference = {source: found[source] - singles[best][source]}
                    replicates = metrics.summarise(difference, labels, plan.counts)[measure]
                    paired = metrics.estimate(float(value - means[best]), replicates)
                    row = (task.name, name, aggregation, distance, measure, float(value), models[best])
                    row += (float(means[best]), paired.value, paired.low, paired.high)
                    comparisons.append(dict(zip(FUSION_COLUMNS, row)))
    return {"retrieval": retrieval, "fusion": comparisons, "spaces": spaces}


def _raw_fused(reference, models: tuple, plan, settings: Settings) -> dict:
    """Per-query figures of the RRF-fused ranking in the raw space, as the search ranks patients."""
    orders = []
    for model in models:
        cohort = Cohort.build(reference.lesions(model), _vectors(reference, model, RAW), plan.labels)
        orders.append(_full_order(_distances(cohort, SEARCH_AGGREGATION, "cosine", RAW)))
    ranks = np.stack([metrics.ranks_of(order) for order in orders])
    order = _without_self(fuse(ranks, None, "rrf", settings.fusion_depth).order)
    return metrics.label_figures(order, plan.labels.to_numpy(), settings.ks, plan.grades, ranked=False)


def _source(measure: str) -> str:
    """The per-query figure a summary measure is made from (BP@10 and "P@10 +" from P@10)."""
    return measure.removeprefix("B").split(" ")[0] if measure.startswith(("BP@", "P@")) else measure


def _without_self(order: np.ndarray) -> np.ndarray:
    """A fused (queries, n) order with each query's own entry (unlisted, so somewhere at the back) removed."""
    keep = order != np.arange(len(order))[:, None]
    return order[keep].reshape(len(order), -1)


def _opened(reference):
    """A reference a worker process opens by its path, or the one given."""
    if isinstance(reference, str):
        from ..references.reference import Reference

        return Reference(reference)
    return reference


def _evaluate_hubness(reference, models: tuple, settings: Settings) -> dict:
    """Per model (and fused) and ranking: the largest share of the top-k lists one patient is in, and the
    share of patients in none, over every patient of the reference (each querying all the others)."""
    reference = _opened(reference)
    k = max(settings.ks)
    rows = []
    patients = pd.Series(0, index=np.unique(reference.lesions(models[0])[schema.PATIENT].astype(str)))
    for space, distance, aggregation in (
        (space, distance, aggregation)
        for space in _spaces(settings)
        for distance in settings.distances
        for aggregation in (settings.primary_aggregation, SEARCH_AGGREGATION)
    ):
        orders = []
        for model in models:
            cohort = Cohort.build(reference.lesions(model), _vectors(reference, model, space), patients)
            orders.append(_full_order(_distances(cohort, aggregation, distance, space)))
        named = list(zip(models, orders))
        if len(models) > 1 and "rrf" in settings.fusions:
            ranks = np.stack([metrics.ranks_of(order) for order in orders])
            named.append((FUSED_NAMES["rrf"], _without_self(fuse(ranks, None, "rrf", settings.fusion_depth).order)))
        for model, order in named:
            largest, never = metrics.hubness(order, k)
            hub = patients.index[metrics.appearances(order, k).argmax()]
            rows.append(
                {"model": model, "space": space, "aggregation": aggregation, "distance": distance}
                | {"k": k, "patients": len(order)}
                | {"largest": largest, "hub": hub, "never": never}
            )
    return {"hubness": rows}


def _evaluate_anchors(reference, task: Task, models: tuple, plan: _TaskPlan, settings: Settings) -> dict:
    """The non-image anchors of a task (:mod:`anchors`) and every model on the same patients and folds:
    linear-probe AUC and BP@k (primary aggregation, cosine), each model's paired difference against the
    anchor, and the anchor's retrieval p from the permutation null."""
    reference = _opened(reference)
    lesions = reference.lesions(models[0])
    patient_ids = plan.labels.index
    rows = []
    k = max(settings.ks)
    for anchor in (
        anchor_module.demographic(lesions, patient_ids),
        anchor_module.size(lesions, patient_ids, settings.size_field),
    ):
        if anchor is None:
            continue
        subset = anchor.patients
        labels = plan.labels.iloc[subset]
        if min(labels.value_counts().reindex([0, 1], fill_value=0)) < settings.folds:
            continue
        where = np.full(len(plan.labels), -1)
        where[subset] = np.arange(len(subset))
        folds = [[np.sort(where[test][where[test] >= 0]) for test in repeat] for repeat in plan.folds]
        counts = metrics.bootstrap_counts(len(subset), settings.bootstrap, np.random.default_rng(settings.seed + 3))
        shuffles = np.argsort(
            np.random.default_rng(settings.seed + 4).random((settings.retrieval_permutations, len(subset))), 1
        )
        y = labels.to_numpy()
        draws = (y, folds, counts, shuffles)
        base = _anchor_measures(anchor.distances, anchor.features, np.arange(len(subset)), draws, settings)
        found = {anchor.name: base}
        for model in models:
            cohort = Cohort.build(reference.lesions(model), _vectors(reference, model, settings.space), labels)
            instances = cohort.instances(settings.primary_aggregation)
            distances = _distances(cohort, settings.primary_aggregation, "cosine", settings.space)
            found[model] = _anchor_measures(distances, instances.rows, instances.row_patient, draws, settings)
        for name, (auc, boot, precision, null) in found.items():
            common = {"task": task.name, "anchor": anchor.name, "model": name, "patients": len(subset)}
            paired = metrics.estimate(auc.value - base[0].value, boot - base[1])
            rows.append(
                common
                | {"measure": "AUC", "value": auc.value, "low": auc.low, "high": auc.high, "p": np.nan}
                | {"difference": paired.value, "difference_low": paired.low, "difference_high": paired.high}
            )
            value = metrics.summarise(precision, y)[f"BP@{k}"]
            interval = metrics.estimate(float(value), metrics.summarise(precision, y, counts)[f"BP@{k}"])
            gap = {f"P@{k}": precision[f"P@{k}"] - base[2][f"P@{k}"]}
            paired = metrics.estimate(
                float(value - metrics.summarise(base[2], y)[f"BP@{k}"]), metrics.summarise(gap, y, counts)[f"BP@{k}"]
            )
            rows.append(
                common
                | {"measure": f"BP@{k}", "value": float(value), "low": interval.low, "high": interval.high}
                | {"p": metrics.permutation_p_value(float(value), null[f"BP@{k}"])}
                | {"difference": paired.value, "difference_low": paired.low, "difference_high": paired.high}
            )
    return {"anchors": rows}


def _anchor_measures(distances, rows, row_patient, draws, settings: Settings) -> tuple:
    """Linear-probe AUC (with its bootstrap replicates), per-query P@k and the BP@k null of one ranking."""
    labels, folds, counts, shuffles = draws
    k = max(settings.ks)
    linear = classifier_module.build(["linear"], settings.knn_k, settings.probe_c)[0]
    scores, decisions = _cross_validate(linear, distances, rows, row_patient, labels, folds, settings.seed)
    auc, _, boot = metrics.classification_estimates(scores, decisions, labels, counts)
    order = _full_order(distances)
    precision = metrics.label_figures(order, labels, (k,), ranked=False)
    shuffled = labels[shuffles]
    null = metrics.summarise(metrics.label_figures(order, shuffled, (k,), ranked=False), shuffled)
    return auc, boot, precision, null


def _evaluate_lookalike(reference, models: tuple, settings: Settings) -> dict:
    """Same-tumor re-identification (:mod:`lookalike`), per model and fused, cosine, in the evaluated space
    and raw. Each model is measured on its own lesions; the fused ranking only where every model has the
    same lesions in the same order (otherwise their rankings do not rank the same things)."""
    reference = _opened(reference)
    lesions = {model: reference.lesions(model) for model in models}
    pairs = {model: lookalike.Pairs.build(lesions[model], settings.size_field) for model in models}
    shared = all(pairs.values()) and _same_lesions(list(lesions.values()))
    rows = []
    for space in _spaces(settings):
        orders = []
        for model in models:
            if pairs[model] is None:
                continue
            order = lookalike.reference_order(reference, model, space)
            orders.append(order)
            rows += lookalike.rows(model, space, order, pairs[model], settings.bootstrap, settings.seed)
        if shared and len(models) > 1 and "rrf" in settings.fusions:
            fused = lookalike.fused_order(orders, settings.fusion_depth)
            rows += lookalike.rows(
                FUSED_NAMES["rrf"], space, fused, pairs[models[0]], settings.bootstrap, settings.seed
            )
    return {"lookalike": pd.DataFrame(rows, columns=lookalike.COLUMNS)}


def _same_lesions(tables: list) -> bool:
    """Whether every model's lesion table lists the same lesions (patient, series, centre) in the same order."""
    keys = [schema.PATIENT, schema.SERIES, *schema.CENTER]
    if not set(keys) <= set(tables[0].columns):
        return False
    first = tables[0][keys].reset_index(drop=True)
    return all(table[keys].reset_index(drop=True).equals(first) for table in tables[1:])


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
