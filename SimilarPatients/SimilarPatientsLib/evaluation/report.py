"""An evaluation, written down: ``report.md`` with plain-words verdicts, CSV tables and PNG bar charts,
and ``fusion.json``: whether fusing all models is at least as good as the best single model (the verdict
a program reads, see ``references/fusion_verdict.py``).

Every sentence of a verdict is computed from the figures, so the report stays true for any reference.
The folder is written beside the target and swapped in, so a failed run never leaves half a report.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..references.fusion_verdict import SEARCH_AGGREGATION, VERDICT_FILE
from ..search.fusion import RRF_CONSTANT
from ..util import atomic
from ..util.optional import pyplot
from . import lookalike
from .run import FUSED_NAMES, PERMUTED, Evaluation

CLASSIFIER_NAMES = {
    "knn": "k-NN",
    "centroid": "class mean",
    "linear": "linear probe",
    "mlp": "MLP",
}
PRIMARY_CLASSIFIER = "linear"
ALPHA = 0.05
_VERDICT_COLUMNS = ["task", "fused", "best_model", "best", "difference", "low", "high"]


def write(evaluation: Evaluation, out: Path) -> Path:
    """Write the report folder ``out`` (replacing one that is there); returns the report's path."""
    out = Path(out)
    with atomic.replacing(out, directory=True) as staging:
        evaluation.cohorts.to_csv(staging / "cohorts.csv", index=False)
        evaluation.classification.to_csv(staging / "classification.csv", index=False, float_format="%.4f")
        evaluation.retrieval.to_csv(staging / "retrieval.csv", index=False, float_format="%.4f")
        evaluation.comparisons.to_csv(staging / "comparisons.csv", index=False, float_format="%.4f")
        for name in ("hubness", "anchors", "lookalike", "spaces"):
            table = getattr(evaluation, name)
            if len(table):
                table.to_csv(staging / f"{name}.csv", index=False, float_format="%.4f")
        decision = fusion_verdict(evaluation)
        if decision is not None:
            evaluation.fusion.to_csv(staging / "fusion.csv", index=False, float_format="%.4f")
            (staging / VERDICT_FILE).write_text(json.dumps(decision, indent=2) + "\n", encoding="utf-8")
        figures = {task.name: _figures(evaluation, task, staging) for task in evaluation.tasks}
        (staging / "report.md").write_text(_markdown(evaluation, figures), encoding="utf-8")
    return out / "report.md"


def fusion_verdict(evaluation: Evaluation) -> dict | None:
    """Whether the fused search (reciprocal rank fusion of every evaluated model, patients by their nearest
    lesion pair, as the search ranks them) is at least as good as the best single model in class-balanced
    precision at the largest k on every task, per distance; with the figures and a reason in words. None
    when no fused rankings were evaluated. (Class-balanced: plain precision rewards a ranking that returns
    the majority class, or one hub, to everyone.)"""
    s = evaluation.settings
    k = max(s.ks)
    rows = _rows(evaluation.fusion, fusion=FUSED_NAMES["rrf"], aggregation=SEARCH_AGGREGATION, measure=f"BP@{k}")
    if not len(rows):
        return None
    metrics = {}
    for distance, group in rows.groupby("distance", sort=False):
        short = group[group["difference"] < -1e-12]
        what = (
            f"On {evaluation.reference}, reciprocal rank fusion of its {len(evaluation.models)} models (each "
            f"model's first {s.fusion_depth} patients, by their nearest lesion pair, {distance} distance, "
            f"{s.space} space)"
        )
        if len(short):
            failures = "; ".join(
                f"{r.task}: {r.fused:.3f} against {r.best_model}'s {r.best:.3f} ({_difference(r)})"
                for r in short.itertuples()
            )
            reason = (
                f"{what} fell short of the best single model in class-balanced precision@{k} on {len(short)} of "
                f"{len(group)} tasks ({failures}), so it is offered but not preselected."
            )
        else:
            reason = (
                f"{what} was at least as good as the best single model in class-balanced precision@{k} on every task "
                f"evaluated ({'; '.join(f'{r.task}: {_difference(r)}' for r in group.itertuples())}), so it is "
                "preselected."
            )
        metrics[distance] = {
            "default": not len(short),
            "reason": reason,
            "tasks": [
                {c: (round(float(v), 6) if isinstance(v, (float, np.floating)) else v) for c, v in row.items()}
                for row in group[_VERDICT_COLUMNS].to_dict("records")
            ],
        }
    return {
        "reference": evaluation.reference,
        **evaluation.identity,
        "models": list(evaluation.models),
        "space": s.space,
        "fusion": "rrf",
        "depth": s.fusion_depth,
        "rrf_constant": RRF_CONSTANT,
        "aggregation": SEARCH_AGGREGATION,
        "measure": "balanced precision",
        "k": k,
        "metrics": metrics,
    }


def _difference(row) -> str:
    return f"{row.difference:+.3f}, paired 95% CI {row.low:+.3f} to {row.high:+.3f}"


def _signed_ci(row) -> str:
    return f"{row.difference:+.3f} [{row.low:+.3f}, {row.high:+.3f}]"


def _fusion_word(row) -> str:
    """How a fused figure stands against the best single model's, by the paired interval."""
    if row.low > 0:
        return "beats it"
    if row.difference >= -1e-12:
        return "at least as good (within the noise)"
    return "worse, within the noise" if row.high >= 0 else "worse"


def _figures(evaluation: Evaluation, task, folder: Path) -> list:
    plt = pyplot()

    primary = evaluation.settings.primary_aggregation
    table = _rows(evaluation.classification, task=task.name, aggregation=primary)
    models = list(dict.fromkeys(table["model"]))
    x = np.arange(len(models))
    figure, axes = plt.subplots(figsize=(1.3 * len(models) + 2.5, 4))
    _grouped_bars(axes, table, models, "classifier", "auc", "auc_low", "auc_high", CLASSIFIER_NAMES)
    published = [task.published.get(m, np.nan) for m in models]
    if np.isfinite(published).any():
        axes.plot(x, published, "kD", markersize=5, label="published (single split)")
    axes.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    axes.set_ylim(0.3, 0.85)
    axes.set_ylabel("AUC (95% bootstrap CI)")
    axes.set_title(f"{task.name}: {task.description}", fontsize=9)
    axes.legend(fontsize=7, ncol=3, loc="upper left")
    auc_file = _save(figure, folder / f"auc-{task.name}.png")

    k = max(evaluation.settings.ks)
    table = _rows(evaluation.retrieval, task=task.name, aggregation=primary, measure=f"BP@{k}")
    models = list(dict.fromkeys(table["model"]))  # the fused rankings too
    figure, axes = plt.subplots(figsize=(1.1 * len(models) + 2.5, 3.5))
    chance = float(table["chance"].iloc[0])
    _grouped_bars(axes, table, models, "distance", "value", "low", "high", {}, bottom=chance)
    axes.axhline(chance, color="grey", linestyle="--", linewidth=1, label="random ranking")
    axes.set_ylim(*near_chance(chance, table["low"], table["high"]))
    axes.set_ylabel(f"class-balanced precision@{k} (95% CI)")
    axes.set_title(f"{task.name}: do the {k} nearest patients share the label?", fontsize=9)
    axes.legend(fontsize=7)
    retrieval_file = _save(figure, folder / f"retrieval-{task.name}.png")
    return [auc_file, retrieval_file]


def near_chance(chance: float, lows, highs) -> tuple[float, float]:
    """The value axis of a chart compared with chance: from a little below chance (or the lowest interval)
    to a little above the highest; an axis from 0 would squeeze the differences that matter into a sliver."""
    low, high = min(chance, float(np.min(lows))), max(chance, float(np.max(highs)))
    margin = 0.1 * max(high - low, 0.02)
    return max(0.0, low - margin), min(1.0, high + margin)


def _grouped_bars(
    axes, table: pd.DataFrame, models: list, group: str, value: str, low: str, high: str, names: dict, bottom=0.0
):
    """One bar per (model, ``group`` value) with its interval as whiskers; models on the x axis. Bars rise
    from ``bottom`` (chance, for a measure compared with it), so one below it points down."""
    groups = list(dict.fromkeys(table[group]))
    width = 0.8 / len(groups)
    x = np.arange(len(models))
    for i, name in enumerate(groups):
        rows = table[table[group] == name].set_index("model").loc[models]
        errors = [rows[value] - rows[low], rows[high] - rows[value]]
        offset = (i - (len(groups) - 1) / 2) * width
        axes.bar(
            x + offset, rows[value] - bottom, width, bottom=bottom, yerr=errors, capsize=2, label=names.get(name, name)
        )
    axes.set_xticks(x, models)


def _save(figure, path: Path) -> str:
    plt = pyplot()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path.name


def _rows(frame: pd.DataFrame, **equal) -> pd.DataFrame:
    """Rows where each column equals the value given (or is in it, for a list)."""
    mask = np.ones(len(frame), dtype=bool)
    for column, value in equal.items():
        mask &= frame[column].isin(value).to_numpy() if isinstance(value, list) else (frame[column] == value).to_numpy()
    return frame[mask]


def _ci(value: float, low: float, high: float) -> str:
    return f"{value:.3f} [{low:.3f}–{high:.3f}]"


def _p(p: float) -> str:
    return "" if not np.isfinite(p) else f"{p:.3f}" if p >= 0.001 else "<0.001"


def verdict(evaluation: Evaluation, task) -> str:
    """What a reader should take from one task, in plain words."""
    settings = evaluation.settings
    primary = _rows(evaluation.classification, task=task.name, aggregation=settings.primary_aggregation)
    probe = primary[primary["classifier"] == PRIMARY_CLASSIFIER].sort_values("auc", ascending=False)
    sentences = []
    if len(probe):
        best = probe.iloc[0]
        place = "ranks first at" if len(probe) > 1 else "(the only model evaluated) reaches"
        sentences.append(
            f"With the linear probe (the pre-declared primary classifier), **{best.model}** {place} "
            f"AUC {_ci(best.auc, best.auc_low, best.auc_high)}."
        )
        comparison = _rows(evaluation.comparisons, task=task.name, classifier=PRIMARY_CLASSIFIER)
        if len(comparison):
            c = comparison.iloc[0]
            separated = c.low > 0
            sentences.append(
                f"It leads {c.runner_up} by {c.difference:.3f} AUC (paired 95% CI {c.low:.3f} to {c.high:.3f}), "
                + (
                    "a lead the bootstrap resolves."
                    if separated
                    else "which is within the noise: the data cannot tell these models apart."
                )
            )
        if probe["auc_p_adjusted"].notna().any():
            adjusted = probe.set_index("model")["auc_p_adjusted"].dropna()
            beating = adjusted[adjusted <= ALPHA].index.tolist()
            sentences.append(
                f"{len(beating)} of {len(adjusted)} models beat chance with the linear probe "
                f"(permutation test, {settings.permutations} permutations, p ≤ {ALPHA} adjusted for the "
                f"{len(adjusted)} models by the max-statistic method)"
                + (f": {', '.join(beating)}." if beating else "; none does.")
            )
        others = [
            f"{CLASSIFIER_NAMES.get(c, c)}: {', '.join(g.model)}"
            for c, g in primary[(primary.classifier != PRIMARY_CLASSIFIER) & (primary.auc_p_adjusted <= ALPHA)].groupby(
                "classifier", sort=False
            )
        ]
        if others:
            sentences.append(f"Other classifiers that beat chance in the same sense: {'; '.join(others)}.")
    overall = primary.sort_values("auc", ascending=False).iloc[0]
    sentences.append(
        f"The best pairing of any classifier and model is {overall.model} with the "
        f"{CLASSIFIER_NAMES.get(overall.classifier, overall.classifier)} (AUC "
        f"{_ci(overall.auc, overall.auc_low, overall.auc_high)}; picked after the fact, so optimistic)."
    )
    sentences += _retrieval_sentences(evaluation, task)
    sentences += _fusion_sentences(evaluation, task)
    return " ".join(sentences)


def _retrieval_sentences(evaluation: Evaluation, task) -> list:
    """The best single model's class-balanced precision, judged against the permutation null (labels
    shuffled, rankings kept: a ranking with the same hubs that knows nothing of the label), and every
    model whose neighbours fall below a random ranking for one class."""
    settings = evaluation.settings
    k = max(settings.ks)
    single = list(evaluation.cohorts["model"].unique())
    table = _rows(evaluation.retrieval, task=task.name, aggregation=settings.primary_aggregation, model=single)
    balanced = table[table.measure == f"BP@{k}"].sort_values("value", ascending=False)
    if not len(balanced):
        return []
    r = balanced.iloc[0]
    significant = np.isfinite(r.p) and r.p <= ALPHA
    sentences = [
        f"In retrieval, {r.model} ({r.distance}) gives the highest class-balanced precision@{k} (the mean of the "
        f"two classes' own precision), {_ci(r.value, r.low, r.high)} over queries"
        + (
            f", [{r.gallery_low:.3f}–{r.gallery_high:.3f}] with the gallery resampled too"
            if np.isfinite(r.gallery_low)
            else ""
        )
        + f", against {r['null']:.3f} under the permutation null ({r.shuffles} label shuffles, rankings kept; "
        f"p {_p(r.p)}): "
        + (
            "its neighbours share the label more often than its own hubs alone would give, but by little."
            if significant and r.value - r["null"] < 0.05
            else "its neighbours share the label clearly more often than its hubs alone would give."
            if significant
            else "not distinguishable from what its hubs alone give."
        )
    ]
    below = []
    for (model, distance), group in table.groupby(["model", "distance"], sort=False):
        for sign, side in (("+", "positive"), ("-", "negative")):
            row = group[group.measure == f"P@{k} {sign}"]
            if len(row) and row.iloc[0].high < row.iloc[0].chance:  # the whole query interval below
                below.append(
                    f"{model} ({distance}) for {side} queries, {row.iloc[0].value:.3f} against {row.iloc[0].chance:.3f}"
                )
    if below:
        sentences.append(
            f"Resolvably below a random ranking for one class (precision@{k}, the interval over queries below it): "
            f"{'; '.join(below)}."
        )
    return sentences


def _fusion_sentences(evaluation: Evaluation, task) -> list:
    """Whether all models at once beat the best single model, in plain words: at the primary aggregation,
    and as the search ranks patients (nearest lesion pair)."""
    s = evaluation.settings
    k = max(s.ks)
    sentences = []
    for aggregation in dict.fromkeys([s.primary_aggregation, SEARCH_AGGREGATION]):
        rows = _rows(
            evaluation.fusion,
            task=task.name,
            fusion=FUSED_NAMES["rrf"],
            aggregation=aggregation,
            distance="cosine",
            measure=f"BP@{k}",
        )
        if not len(rows):
            continue
        r = rows.iloc[0]
        where = "patients by their nearest lesion pair, as the search ranks them" if aggregation == "lesions" else None
        where = where or f"{aggregation} of the lesion vectors"
        beats = "beats" if r.low > 0 else "does not beat"
        sentences.append(
            f"Fusing all {len(evaluation.models)} models (reciprocal rank fusion; {where}; cosine) {beats} the best "
            f"single model, {r.best_model}: class-balanced precision@{k} {r.fused:.3f} against {r.best:.3f}, a "
            f"difference of {_difference(r)} ({_fusion_word(r)})."
        )
    return sentences


def _published(evaluation: Evaluation, task) -> str:
    if not task.published and not task.published_note:
        return ""
    settings = evaluation.settings
    probe = _rows(
        evaluation.classification,
        task=task.name,
        aggregation=settings.primary_aggregation,
        classifier=PRIMARY_CLASSIFIER,
    ).set_index("model")
    lines = ["#### Against the published figures", ""]
    if task.published:
        lines += [
            f"Published: {task.published_note}. Ours: linear probe, {settings.repeats}×{settings.folds}-fold "
            f"cross-validation, mean over repeats with a patient-bootstrap 95% CI; the last column is the "
            f"standard deviation of the AUC over our single {100 // settings.folds}% test folds, i.e. how much "
            f"one held-out split moves.",
            "",
            "| model | published | ours | published inside our CI | SD of one test split |",
            "|---|---|---|---|---|",
        ]
        for model, published in task.published.items():
            if model not in probe.index:
                lines.append(f"| {model} | {published:.3f} | not in this reference | | |")
                continue
            row = probe.loc[model]
            inside = row.auc_low <= published <= row.auc_high
            lines.append(
                f"| {model} | {published:.3f} | {_ci(row.auc, row.auc_low, row.auc_high)} | "
                f"{'yes' if inside else 'no'} | {row.auc_fold_sd:.3f} |"
            )
        shared = [m for m in task.published if m in probe.index]
        if shared:
            gaps = np.array([task.published[m] - probe.loc[m, "auc"] for m in shared])
            sd = float(probe.loc[shared, "auc_fold_sd"].mean())
            inside = sum(probe.loc[m, "auc_low"] <= task.published[m] <= probe.loc[m, "auc_high"] for m in shared)
            lines += [
                "",
                f"{inside} of {len(shared)} published figures fall inside our intervals. The published figures are "
                f"{np.mean(gaps):+.3f} AUC from ours on average (range {gaps.min():+.3f} to {gaps.max():+.3f}). "
                f"A single 20% test split is a draw with a standard deviation of about {sd:.3f} AUC here, so a "
                f"gap of up to about {2 * sd:.2f} is what one split's luck gives; model rankings that rest on "
                f"differences smaller than that, on one split, are not supported by this data.",
            ]
    elif task.published_note:
        row_range = probe["auc"]
        lines += [
            f"Published: {task.published_note}. Ours (linear probe): {row_range.min():.3f} to "
            f"{row_range.max():.3f} across models; single-split SD here about {probe['auc_fold_sd'].mean():.3f}.",
        ]
    return "\n".join(lines) + "\n"


def _markdown(evaluation: Evaluation, figures: dict) -> str:
    s = evaluation.settings
    out = [
        f"# What the embeddings of `{evaluation.reference}` know",
        "",
        f"Space: **{s.space}** ("
        + (
            "the search's default: each model's vectors z-scored by the reference's mean and per-dimension "
            "SD, patient distances locally scaled by the two patients' 10th-neighbour distances within the cohort"
            if s.space == "corrected"
            else "plain distance on the stored vectors, as the published neighbour lists were made"
        )
        + "). "
        f"Models: {', '.join(dict.fromkeys(evaluation.cohorts['model']))}. "
        f"Classification: {s.repeats}× repeated, stratified {s.folds}-fold cross-validation over patients "
        f"(a patient's lesions never straddle folds); AUC and balanced accuracy with {s.bootstrap}-sample "
        f"patient-bootstrap 95% intervals; permutation test ({s.permutations} label shuffles, the whole "
        f"cross-validation re-run) for {', '.join(CLASSIFIER_NAMES[c] for c in PERMUTED)}, with p-values "
        f"adjusted over the models of a task by the Westfall–Young max-statistic method. Retrieval: leave one "
        f"patient out, k = {', '.join(map(str, s.ks))}; class-balanced precision (BP@k: the mean of the two classes' "
        f"own precision, so neither the majority class nor a hub can carry it) with a row per class, mAP@R and "
        f"R-precision, and nDCG@{max(s.ks)} with graded gains for an ordinal label; 95% intervals over the queries "
        f"(what this reference answers) and, for BP@{max(s.ks)} and P@{max(s.ks)} (cosine), with the gallery "
        f"resampled as well (what a new cohort of the same size would show: wider); verdicts against the "
        f"permutation null ({s.retrieval_permutations} label shuffles across patients with the rankings kept, "
        f"{s.permutations} for mAP@R and R-precision), not against random rankings, which have no hubs. Patient "
        f"aggregation of several lesions: **{s.primary_aggregation}** unless said. Seed {s.seed}; "
        f"{evaluation.seconds:.0f} s.",
        "",
        "Classifiers: k-NN = fraction of positives among the "
        f"{s.knn_k} nearest patients (cosine); class mean = cosine similarity to the positive minus the negative "
        f"mean; linear probe = L2 logistic regression, C = {s.probe_c}, standardised features, balanced class "
        "weights; MLP = one hidden layer of 64, dropout 0.5, AdamW with weight decay, 100 epochs.",
        "",
        "## Model × task (linear probe AUC, 95% CI)",
        "",
    ]
    probe = _rows(evaluation.classification, aggregation=s.primary_aggregation, classifier=PRIMARY_CLASSIFIER)
    if len(probe):
        grid = probe.assign(cell=[_ci(r.auc, r.auc_low, r.auc_high) for r in probe.itertuples()])
        grid = grid.pivot(index="model", columns="task", values="cell")[[t.name for t in evaluation.tasks]]
        out += [_md_table(grid.reset_index()), ""]
    out += _lookalike_section(evaluation)
    out += _hubness_section(evaluation)
    out += _space_section(evaluation)
    out += _fusion_summary(evaluation)
    for task in evaluation.tasks:
        cohort = _rows(evaluation.cohorts, task=task.name).iloc[0]
        out += [
            f"## {task.name}",
            "",
            f"{task.description}. {cohort.patients} patients ({cohort.positives} positive, {cohort.negatives} "
            f"negative; base rate {cohort.positives / cohort.patients:.3f}), {cohort.lesions} lesions, "
            f"{cohort.several_lesions} patients with several.",
            "",
            f"**Verdict.** {verdict(evaluation, task)}",
            "",
            f"![AUC by model and classifier]({figures[task.name][0]})",
            "",
            "#### Classification",
            "",
        ]
        rows = _rows(evaluation.classification, task=task.name, aggregation=s.primary_aggregation)
        table = pd.DataFrame(
            {
                "model": rows["model"],
                "classifier": rows["classifier"].map(CLASSIFIER_NAMES),
                "AUC [95% CI]": [_ci(r.auc, r.auc_low, r.auc_high) for r in rows.itertuples()],
                "permutation p": rows["auc_p"].map(_p),
                "p adjusted over models": rows["auc_p_adjusted"].map(_p),
                "balanced accuracy [95% CI]": [_ci(r.bacc, r.bacc_low, r.bacc_high) for r in rows.itertuples()],
            }
        )
        out += [_md_table(table), "", _published(evaluation, task), "#### Retrieval", ""]
        out += [_retrieval_table(evaluation, task), ""]
        out += [f"![precision at k]({figures[task.name][1]})", ""]
        out += [_fusion_section(evaluation, task), ""]
        out += [_aggregation_section(evaluation, task), ""]
        out += [_anchor_section(evaluation, task), ""]
    return "\n".join(out)


def _retrieval_table(evaluation: Evaluation, task) -> str:
    """Per model and distance (primary aggregation): BP@k with both intervals, per class, the other measures,
    the permutation null and p; and a random-ranking row."""
    s = evaluation.settings
    k = max(s.ks)
    table = _rows(evaluation.retrieval, task=task.name, aggregation=s.primary_aggregation).set_index(
        ["model", "distance", "measure"]
    )
    order_of = {
        key: i
        for i, key in enumerate(dict.fromkeys(zip(table.index.get_level_values(0), table.index.get_level_values(1))))
    }
    table = table.sort_index()
    keys = list(order_of)
    others = [m for m in ("nDCG@" + str(k), "mAP@R", "R-precision") if m in set(table.index.get_level_values(2))]
    lines, random_row = [], None
    for model, distance in keys:
        row = table.loc[(model, distance)]
        bp = row.loc[f"BP@{k}"]
        gallery = f"[{bp.gallery_low:.3f}–{bp.gallery_high:.3f}]" if np.isfinite(bp.gallery_low) else ""
        cells = [model, distance, _ci(bp.value, bp.low, bp.high), gallery]
        cells += [f"{row.loc[f'P@{k} {sign}'].value:.3f}" for sign in ("+", "-")]
        cells += [f"{row.loc[f'P@{k}'].value:.3f}"] + [
            f"{row.loc[m].value:.3f}" if m in row.index else "" for m in others
        ]
        cells += [f"{bp['null']:.3f}", _p(bp.p)]
        lines.append(cells)
        if random_row is None:
            random_row = ["random ranking", "", f"{bp.chance:.3f}", ""]
            random_row += [f"{row.loc[f'P@{k} {sign}'].chance:.3f}" for sign in ("+", "-")]
            random_row += [f"{row.loc[f'P@{k}'].chance:.3f}"] + [
                f"{row.loc[m].chance:.3f}" if m in row.index else "" for m in others
            ]
            random_row += ["", ""]
    columns = ["model", "distance", f"BP@{k} [95% CI, queries]", "[95% CI, queries and gallery]"]
    columns += [f"P@{k} positive queries", f"P@{k} negative queries", f"P@{k}", *others]
    columns += [f"BP@{k} null (mean)", f"p (BP@{k})"]
    frame = pd.DataFrame([*lines, random_row], columns=columns)
    return "\n".join(
        [
            _md_table(frame),
            "",
            f"BP@{k}: class-balanced precision@{k}. The null is the mean BP@{k} of the same rankings with the labels "
            f"shuffled across patients ({s.retrieval_permutations} shuffles); p is one-sided, not adjusted over "
            f"models. A random ranking (last row) has no hubs, so it is no verdict's reference. The fused rows "
            f"rank by all models at once (`search.fusion`: each model's first {s.fusion_depth} patients; RRF "
            f"constant {RRF_CONSTANT}). Every figure, P@5 and BP@5 too, is in `retrieval.csv`.",
        ]
    )


def _hubness_section(evaluation: Evaluation) -> list:
    """How often the commonest patient is returned, and how many patients never are, per model."""
    table = evaluation.hubness
    if not len(table):
        return []
    k = int(table["k"].iloc[0])
    rows = table[table.distance == "cosine"]
    cells = rows.assign(cell=[f"{r.largest:.0%} ({r.hub}) / {r.never:.0%}" for r in rows.itertuples()])
    cells = cells.assign(
        column=[
            f"{r.space}: "
            + ("nearest lesion pair (the search)" if r.aggregation == SEARCH_AGGREGATION else r.aggregation)
            for r in cells.itertuples()
        ]
    )
    grid = cells.pivot(index="model", columns="column", values="cell")
    grid = grid.reindex(index=list(dict.fromkeys(rows["model"])), columns=list(dict.fromkeys(cells["column"])))
    return [
        "## Hubs",
        "",
        f"Every one of the {int(rows['patients'].iloc[0])} patients queries all the others (cosine). Each cell: the "
        f"largest share of the {k}-nearest lists one patient is in (that patient), and the share of patients that "
        f"are in no list at all. A good space returns every patient to someone and no patient to most; a hub "
        f"answers every query alike, which a random ranking never does.",
        "",
        _md_table(grid.reset_index(names="model")),
        "",
    ]


def _anchor_section(evaluation: Evaluation, task) -> str:
    """Per anchor: the anchor's own figures and each model's paired difference against it, same patients."""
    table = _rows(evaluation.anchors, task=task.name) if len(evaluation.anchors) else evaluation.anchors
    k = max(evaluation.settings.ks)
    if not len(table):
        return ""
    out = []
    for anchor, group in table.groupby("anchor", sort=False):
        auc = group[group.measure == "AUC"].set_index("model")
        bp = group[group.measure == f"BP@{k}"].set_index("model")
        frame = pd.DataFrame(
            {
                "model": auc.index,
                "linear-probe AUC [95% CI]": [_ci(r.value, r.low, r.high) for r in auc.itertuples()],
                "AUC − anchor [paired CI]": [
                    "" if m == anchor else f"{r.difference:+.3f} [{r.difference_low:+.3f}, {r.difference_high:+.3f}]"
                    for m, r in zip(auc.index, auc.itertuples())
                ],
                f"BP@{k} [95% CI]": [_ci(r.value, r.low, r.high) for r in bp.itertuples()],
                "p (null)": bp["p"].map(_p).to_numpy(),
                f"BP@{k} − anchor [paired CI]": [
                    "" if m == anchor else f"{r.difference:+.3f} [{r.difference_low:+.3f}, {r.difference_high:+.3f}]"
                    for m, r in zip(bp.index, bp.itertuples())
                ],
            }
        )
        models = auc.drop(index=anchor)
        beaten = models[models.difference_low > 0].index.tolist()
        behind = models[models.difference_high < 0].index.tolist()
        out += [
            f"#### Against a non-image anchor: {anchor}",
            "",
            f"The {int(group['patients'].iloc[0])} patients of this task that have {anchor}; the same folds (each "
            f"fold's patients that have it), the same linear probe, and retrieval by {anchor} against each "
            f"model's cosine ranking of the same patients. Differences are paired over the same bootstrap draws. "
            + (
                f"Resolvably better than the anchor (AUC): {', '.join(beaten)}. "
                if beaten
                else "No model's AUC is resolvably above the anchor's. "
            )
            + (f"Resolvably worse: {', '.join(behind)}." if behind else ""),
            "",
            _md_table(frame),
            "",
        ]
    return "\n".join(out)


def _lookalike_section(evaluation: Evaluation) -> list:
    """Same-tumor re-identification: per model and fused, all queries and the cross-exam pairs."""
    table = evaluation.lookalike
    if not len(table):
        return []
    out = [
        "## Look-alike benchmark: the same tumor on another CT series",
        "",
        "Each lesion of a patient with lesions in more than one CT series queries every other lesion of the "
        "reference (cosine, lesion level); its matches are the same patient's lesions in another series (the "
        "same tumor at another screening round, nearly always). R@1: a match ranks first; R@10: one is in the "
        "first 10; mAP over the matches. Cross-exam: only matches whose centres are at least "
        f"{lookalike.CROSS_EXAM_MM:g} mm apart in the scanner frame (another exam, not another reconstruction). "
        "95% intervals resample patients.",
        "",
    ]
    for (space, gallery), by_gallery in table.groupby(["space", "gallery"], sort=False):
        for queries, group in by_gallery.groupby("queries", sort=False):
            indexed = group.set_index(["model", "measure"])
            models = list(dict.fromkeys(group["model"]))
            frame = pd.DataFrame(
                {
                    "model": models,
                    **{
                        f"{m} [95% CI]": [_ci(*indexed.loc[(model, m), ["value", "low", "high"]]) for model in models]
                        for m in ("R@1", "R@10", "mAP")
                    },
                }
            )
            first = group.iloc[0]
            chance = [indexed.loc[(models[0], m), "chance"] for m in ("R@1", "R@10")]
            out += [
                f"**{space} space, {lookalike.QUERIES[queries]} queries, gallery: {lookalike.GALLERIES[gallery]}** — "
                f"{int(first['count'])} queries of {int(first.patients)} patients; a random ranking gives R@1 "
                f"{chance[0]:.3f} and R@10 {chance[1]:.3f}.",
                "",
                _md_table(frame),
                "",
            ]
    return out


def _space_section(evaluation: Evaluation) -> list:
    """The evaluated space against raw, as the search ranks patients: class-balanced and per-class precision."""
    table = evaluation.spaces
    if not len(table):
        return []
    k = max(evaluation.settings.ks)
    space = table["space"].iloc[0]
    lines = [
        f"## The {space} space against raw",
        "",
        f"Patients ranked as the search ranks them (nearest lesion pair, cosine), in the {space} space and on the "
        f"stored vectors (raw); the difference is paired over the same queries and bootstrap draws. (Hubs and "
        f"look-alikes in both spaces: the sections above.)",
        "",
    ]
    for task, group in table.groupby("task", sort=False):
        indexed = group.set_index(["model", "measure"])
        models = list(dict.fromkeys(group["model"]))

        frame = pd.DataFrame(
            {
                "model": models,
                f"BP@{k} raw → {space} (difference [paired CI])": [_space_cell(indexed, m, f"BP@{k}") for m in models],
                f"P@{k} positive queries": [_space_cell(indexed, m, f"P@{k} +") for m in models],
                f"P@{k} negative queries": [_space_cell(indexed, m, f"P@{k} -") for m in models],
            }
        )
        lines += [f"**{task}**", "", _md_table(frame), ""]
    return lines


def _space_cell(indexed: pd.DataFrame, model: str, measure: str) -> str:
    r = indexed.loc[(model, measure)]
    return f"{r.raw:.3f} → {r.value:.3f} ({r.difference:+.3f} [{r.low:+.3f}, {r.high:+.3f}])"


def _fusion_summary(evaluation: Evaluation) -> list:
    """The report's answer to "should all models be asked at once?", and what the Slicer module does."""
    decision = fusion_verdict(evaluation)
    if decision is None:
        return []
    k = decision["k"]
    lines = [
        "## All models at once (fusion)",
        "",
        f"Each patient query is answered by every model, and their rankings fused (reciprocal rank fusion of "
        f"each model's first {decision['depth']} patients; the mean of the models' \"closer than\" percentiles "
        f"to compare). The fused rankings are evaluated like one more model, on the same patients, folds, "
        f"bootstrap samples and label shuffles; each is compared with the best single model of the same "
        f"setting (chosen after the fact, which favours the single model) by the paired bootstrap of the "
        f"per-query difference. Precision@{k}, as the search ranks patients (nearest lesion pair):",
        "",
    ]
    rows = _rows(evaluation.fusion, aggregation=SEARCH_AGGREGATION, measure=f"BP@{k}")
    table = pd.DataFrame(
        {
            "task": rows["task"],
            "fusion": rows["fusion"],
            "distance": rows["distance"],
            f"fused BP@{k}": rows["fused"].map("{:.3f}".format),
            "best single model": [f"{r.best_model} {r.best:.3f}" for r in rows.itertuples()],
            "difference [paired 95% CI]": [_signed_ci(r) for r in rows.itertuples()],
            "verdict": [_fusion_word(r) for r in rows.itertuples()],
        }
    )
    lines += [_md_table(table), ""]
    for distance, verdict in decision["metrics"].items():
        choice = "preselects" if verdict["default"] else "offers, but does not preselect,"
        lines += [f'**{distance}**: the Slicer module {choice} "All models (fused)". {verdict["reason"]}', ""]
    return lines


def _fusion_section(evaluation: Evaluation, task) -> str:
    """Per task: each fusion against the best single model, per aggregation and distance, at the largest k."""
    k = max(evaluation.settings.ks)
    measures = [f"BP@{k}", f"P@{k}", "mAP@R"]
    rows = _rows(evaluation.fusion, task=task.name, measure=measures)
    if not len(rows):
        return ""
    cells = [f"{r.fused:.3f} vs {r.best_model} {r.best:.3f}: {_signed_ci(r)}" for r in rows.itertuples()]
    cells = rows.assign(cell=cells)
    grid = cells.pivot(index=["fusion", "aggregation", "distance"], columns="measure", values="cell")
    grid = grid[measures]
    levels = [list(dict.fromkeys(rows[c])) for c in ("fusion", "aggregation", "distance")]
    levels[1] = [a for a in evaluation.settings.aggregations if a in levels[1]]
    grid = grid.reindex(pd.MultiIndex.from_product(levels, names=["fusion", "aggregation", "distance"]))
    return "\n".join(
        [
            "#### All models at once, against the best single model",
            "",
            "Fused value vs the best single model of the same aggregation and distance (chosen after the fact), "
            "and the paired difference [its 95% bootstrap interval].",
            "",
            _md_table(grid.reset_index()),
        ]
    )


def _aggregation_section(evaluation: Evaluation, task) -> str:
    s = evaluation.settings
    if len(s.aggregations) < 2:
        return ""
    k = max(s.ks)
    rows = _rows(evaluation.classification, task=task.name, classifier=list(s.secondary_classifiers))
    auc = rows.assign(column=rows["classifier"].map(lambda c: f"{CLASSIFIER_NAMES[c]} AUC"))
    auc = auc.pivot(index=["model", "aggregation"], columns="column", values="auc")
    retrieval = _rows(evaluation.retrieval, task=task.name, distance="cosine", measure=f"BP@{k}").set_index(
        ["model", "aggregation"]
    )["value"]
    table = auc.assign(**{f"BP@{k} (cosine)": retrieval}).reindex(
        pd.MultiIndex.from_product([list(dict.fromkeys(rows["model"])), list(s.aggregations)])
    )
    means = table.groupby(level=1).mean().mean(axis=1).reindex(list(s.aggregations))
    summary = ", ".join(f"{aggregation} {value:.3f}" for aggregation, value in means.items())
    return "\n".join(
        [
            "#### Several lesions per patient",
            "",
            "mean = mean of the lesion vectors; max = element-wise max-pooling; lesions = every lesion kept "
            "(patient distance = nearest lesion pair; classifiers trained on lesions, a patient scored by the "
            f"mean of its lesions' scores). Averaged over models and measures: {summary} (best: "
            f"**{means.idxmax()}**). Single-lesion patients are the same under all three, so differences come "
            "from the several-lesion patients only; compare them with the intervals of the tables above.",
            "",
            _md_table(table.reset_index(names=["model", "aggregation"]).round(3)),
        ]
    )


def _md_table(frame: pd.DataFrame) -> str:
    cells = frame.astype(object).where(frame.notna(), "").astype(str)
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells.to_numpy().tolist()]
    return "\n".join(lines)
