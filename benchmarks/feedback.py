""" "More like these" on NLST-Sybil: relevance feedback measured by the residual-collection protocol
(:mod:`SimilarPatientsLib.evaluation.feedback`), per model and task, with the weights chosen by
cross-validation over query folds.

Prints the per-fold weight choices, the weight all queries choose (the product's ``search.feedback.WEIGHTS``,
which this script checks), the table in docs/search.md and docs/evaluation/README.md, and the same protocol on
the same-tumor (look-alike) task with the shipped weights.

    PYTHONPATH=SimilarPatients python benchmarks/feedback.py      # about 2 minutes on 2 cores
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from SimilarPatientsLib.evaluation import feedback
from SimilarPatientsLib.evaluation.tasks import PRESETS
from SimilarPatientsLib.references.store import ReferenceStore
from SimilarPatientsLib.search.feedback import WEIGHTS

NLST = Path(__file__).resolve().parents[2] / "shared" / "data" / "nlst-sybil-embeddings"
TASKS = {"stage III–IV vs I–II": PRESETS["stage-iii-iv-vs-i-ii"], "adeno vs squamous": PRESETS["adeno-vs-squamous"]}


REPEATS = 50


def search_cost(reference) -> tuple:
    """Median seconds of a plain search and of one with feedback (3 liked, 3 unliked), same query, same run."""
    plain = reference.search("CTFM", patient="100242", k=10, exclude=["100242"])
    marks = {"like": list(plain["PatientID"][:3]), "unlike": list(plain["PatientID"][3:6])}
    times = ([], [])
    for _ in range(REPEATS):
        for spent, options in zip(times, ({}, marks)):
            begun = time.perf_counter()
            reference.search("CTFM", patient="100242", k=10, exclude=["100242"], **options)
            spent.append(time.perf_counter() - begun)
    return float(np.median(times[0])), float(np.median(times[1]))


def main() -> int:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as home:
        reference = ReferenceStore(Path(home)).import_reference("nlst-sybil", str(NLST))
        labels = {name: task.patient_labels(reference.lesions(reference.models[0])) for name, task in TASKS.items()}
        cost = search_cost(reference)
        results, same = {}, {}
        for model in reference.models:
            same[model] = feedback.same_tumor(reference, model)
            space = feedback.unit_space(reference, model)
            for name in TASKS:
                results[(model, name)] = feedback.residual(space, labels[name])
                print(f"{model} {name}: {len(results[(model, name)].initial)} queries", file=sys.stderr)
    validated = feedback.cross_validate(results, labels)
    print("weights (α, β, γ) chosen per fold:", ", ".join(str(feedback.GRID[c]) for c in validated.chosen))
    print("chosen on all queries (the product's):", feedback.GRID[validated.overall], "shipped:", WEIGHTS)
    rows = feedback.table(results, labels, validated)
    print()
    print(
        "| model | task | queries | liked | initial BP@10 | feedback BP@10 | gain [95% CI] | minority P@10 | verdict |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows.itertuples():
        print(
            f"| {r.model} | {r.task} | {r.queries} | {r.liked:.2f} | {r.initial:.3f} | {r.feedback:.3f} | "
            f"{r.gain:+.3f} [{r.low:+.3f}, {r.high:+.3f}] | {r[10]:.3f} → {r[11]:.3f} | {r.verdict} |"
        )
    print("\nSame tumor (look-alike task, shipped weights; queries with a match left after the 10 judged):")
    print("| model | queries (patients) | with a match liked | R@1 initial → feedback | R@1 gain [95% CI] "
          "| R@10 initial → feedback | R@10 gain [95% CI] |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for model, table in same.items():
        cells = []
        for measure in ("R@1", "R@10"):
            point, low, high = feedback.clustered_difference(table, measure)
            before, after = table[f"initial {measure}"].mean(), table[f"feedback {measure}"].mean()
            cells.append(f"{before:.3f} → {after:.3f} | {point:+.3f} [{low:+.3f}, {high:+.3f}]")
        liked = (table["liked"] > 0).mean()
        print(f"| {model} | {len(table)} ({table['patient'].nunique()}) | {liked:.2f} | {' | '.join(cells)} |")
    print(f"\nCost (CT-FM, patient 100242, k 10, median of {REPEATS}): plain search {cost[0] * 1e3:.1f} ms, "
          f"with 3 liked and 3 unliked {cost[1] * 1e3:.1f} ms ({cost[1] / cost[0]:.2f}×)")  # fmt: skip
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0 if feedback.GRID[validated.overall] == tuple(WEIGHTS) else 1


if __name__ == "__main__":
    sys.exit(main())
