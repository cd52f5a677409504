"""An evaluation, written down: ``report.md`` with plain-words verdicts, CSV tables and PNG bar charts.

Every sentence of a verdict is computed from the figures, so the report stays true for any reference.
The folder is written beside the target and swapped in, so a failed run never leaves half a report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..util import atomic
from ..util.optional import pyplot
from .run import PERMUTED, Evaluation

CLASSIFIER_NAMES = {
    "knn": "k-NN",
    "centroid": "class mean",
    "linear": "linear probe",
    "mlp": "MLP",
}
MEASURE_NAMES = {"precision": "P", "ap": "mAP", "recall": "R"}
PRIMARY_CLASSIFIER = "linear"
ALPHA = 0.05


def write(evaluation: Evaluation, out: Path) -> Path:
    """Write the report folder ``out`` (replacing one that is there); returns the report's path."""
    out = Path(out)
    with atomic.replacing(out, directory=True) as staging:
        evaluation.cohorts.to_csv(staging / "cohorts.csv", index=False)
        evaluation.classification.to_csv(staging / "classification.csv", index=False, float_format="%.4f")
        evaluation.retrieval.to_csv(staging / "retrieval.csv", index=False, float_format="%.4f")
        evaluation.comparisons.to_csv(staging / "comparisons.csv", index=False, float_format="%.4f")
        figures = {task.name: _figures(evaluation, task, staging) for task in evaluation.tasks}
        (staging / "report.md").write_text(_markdown(evaluation, figures), encoding="utf-8")
    return out / "report.md"


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
    table = _rows(evaluation.retrieval, task=task.name, aggregation=primary, k=k, measure="precision")
    figure, axes = plt.subplots(figsize=(1.1 * len(models) + 2.5, 3.5))
    _grouped_bars(axes, table, models, "distance", "value", "low", "high", {})
    axes.axhline(table["chance"].iloc[0], color="grey", linestyle="--", linewidth=1, label="chance")
    axes.set_ylabel(f"precision@{k} (95% CI)")
    axes.set_title(f"{task.name}: do the {k} nearest patients share the label?", fontsize=9)
    axes.legend(fontsize=7)
    retrieval_file = _save(figure, folder / f"retrieval-{task.name}.png")
    return [auc_file, retrieval_file]


def _grouped_bars(axes, table: pd.DataFrame, models: list, group: str, value: str, low: str, high: str, names: dict):
    """One bar per (model, ``group`` value) with its interval as whiskers; models on the x axis."""
    groups = list(dict.fromkeys(table[group]))
    width = 0.8 / len(groups)
    x = np.arange(len(models))
    for i, name in enumerate(groups):
        rows = table[table[group] == name].set_index("model").loc[models]
        errors = [rows[value] - rows[low], rows[high] - rows[value]]
        offset = (i - (len(groups) - 1) / 2) * width
        axes.bar(x + offset, rows[value], width, yerr=errors, capsize=2, label=names.get(name, name))
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
    k = max(settings.ks)
    retrieval = _rows(
        evaluation.retrieval, task=task.name, aggregation=settings.primary_aggregation, k=k, measure="precision"
    ).sort_values("value", ascending=False)
    if len(retrieval):
        r = retrieval.iloc[0]
        above = r.low > r.chance
        sentences.append(
            f"In retrieval, {r.model} ({r.distance}) gives the highest precision@{k}, "
            f"{_ci(r.value, r.low, r.high)} against {r.chance:.3f} by chance: "
            + (
                "its neighbours share the label more often than chance, but by little."
                if above and r.value - r.chance < 0.1
                else "its neighbours share the label clearly more often than chance."
                if above
                else "not distinguishable from chance."
            )
        )
    return " ".join(sentences)


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
        f"Models: {', '.join(dict.fromkeys(evaluation.cohorts['model']))}. "
        f"Classification: {s.repeats}× repeated, stratified {s.folds}-fold cross-validation over patients "
        f"(a patient's lesions never straddle folds); AUC and balanced accuracy with {s.bootstrap}-sample "
        f"patient-bootstrap 95% intervals; permutation test ({s.permutations} label shuffles, the whole "
        f"cross-validation re-run) for {', '.join(CLASSIFIER_NAMES[c] for c in PERMUTED)}, with p-values "
        f"adjusted over the models of a task by the Westfall–Young max-statistic method. Retrieval: leave one "
        f"patient out, k = {', '.join(map(str, s.ks))}, against random rankings. Patient aggregation of several "
        f"lesions: **{s.primary_aggregation}** unless said. Seed {s.seed}; {evaluation.seconds:.0f} s.",
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
        retrieval = _rows(evaluation.retrieval, task=task.name, aggregation=s.primary_aggregation)
        retrieval = retrieval.assign(column=[f"{MEASURE_NAMES[m]}@{k}" for m, k in zip(retrieval.measure, retrieval.k)])
        cells = retrieval.assign(cell=retrieval["value"].map("{:.3f}".format))
        grid = cells.pivot(index=["model", "distance"], columns="column", values="cell")
        chance = retrieval.drop_duplicates("column").set_index("column")["chance"].map("{:.3f}".format)
        grid.loc[("chance", "random ranking"), :] = chance
        out += [_md_table(grid[list(dict.fromkeys(retrieval["column"]))].reset_index()), ""]
        out += [f"![precision at k]({figures[task.name][1]})", ""]
        out += [_aggregation_section(evaluation, task), ""]
    return "\n".join(out)


def _aggregation_section(evaluation: Evaluation, task) -> str:
    s = evaluation.settings
    if len(s.aggregations) < 2:
        return ""
    k = max(s.ks)
    rows = _rows(evaluation.classification, task=task.name, classifier=list(s.secondary_classifiers))
    auc = rows.assign(column=rows["classifier"].map(lambda c: f"{CLASSIFIER_NAMES[c]} AUC"))
    auc = auc.pivot(index=["model", "aggregation"], columns="column", values="auc")
    retrieval = _rows(evaluation.retrieval, task=task.name, distance="cosine", k=k, measure="precision").set_index(
        ["model", "aggregation"]
    )["value"]
    table = auc.assign(**{f"P@{k} (cosine)": retrieval}).reindex(
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
