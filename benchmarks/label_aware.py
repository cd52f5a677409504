""" "Similar with respect to …": the label-aware search under nested 5×5 cross-validation on NLST-Sybil, and
what its fit costs.

Per model and label (stage: scored as stage III–IV vs I–II; histology: adenocarcinoma vs squamous family),
printed as a Markdown table: class-balanced P@10 of the visual search and of the label-aware search (the
query's label never seen: outer folds hold the queries, inner folds choose the penalty and blend weight),
the paired 95% bootstrap interval of the gain (queries resampled within each class), each class's P@10,
the refit permutation p (labels shuffled and the whole nested procedure run again, ``--shuffles``), and
same-tumor R@1 in both modes. For histology, the demographic anchor (same sex, same smoking status,
nearest age) against the label-aware search on the same patients (the gallery being those patients).

Then the fit as a user meets it: ``Reference.search(..., similar_by=LABEL)`` on a fresh import (the fit is
made on first use and recorded), against one ordinary search and the same search once the fit is kept.

    PYTHONPATH=SimilarPatients python benchmarks/label_aware.py --shuffles 100   # numbers in docs/search.md

BLAS runs single-threaded (set before numpy loads): on a shared 2-core machine its threads fight and a
300 × 512 decomposition took 1.8 s instead of 0.02 s.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from SimilarPatientsLib.evaluation import anchors, neighbourhoods  # noqa: E402
from SimilarPatientsLib.evaluation import label_aware as evaluation  # noqa: E402
from SimilarPatientsLib.references import label_aware  # noqa: E402
from SimilarPatientsLib.references.store import ReferenceStore  # noqa: E402
from SimilarPatientsLib.search import label_direction as direction  # noqa: E402

NLST = Path(__file__).resolve().parents[2] / "shared" / "data" / "nlst-sybil-embeddings"


def anchor_row(reference, prepared: evaluation.Prepared, seed: int) -> str:
    """Histology: the demographic anchor against the label-aware search, on the patients with age, sex
    and smoking (the gallery restricted to them in both)."""
    lesions = reference.lesions(prepared.model)
    task = evaluation.PRESETS[evaluation.LABEL_TASKS["histology"]]
    task_labels = task.patient_labels(lesions)
    anchor = anchors.demographic(lesions, task_labels.index)
    subset = task_labels.iloc[anchor.patients]
    top = np.argsort(anchor.distances, axis=1, kind="stable")[:, : direction.K]
    values = subset.to_numpy()
    anchor_precision = (values[top] == values[:, None]).mean(axis=1)
    anchor_bp = direction.balanced(anchor_precision, values)
    label = label_aware.resolve(reference, "histology", lesions)
    labelled, codes = label_aware.patient_codes(label, lesions, prepared.patient_ids)
    outcome = evaluation.nested(evaluation.without_same_tumor(prepared), labelled, codes, subset, seed)
    aware_bp = neighbourhoods.balanced(outcome.precision, subset)
    visual_bp = neighbourhoods.balanced(evaluation.visual_precision(prepared, subset), subset)
    return (
        f"| {prepared.model} | {len(subset)} | {anchor_bp:.3f} | {visual_bp:.3f} | {aware_bp:.3f} | "
        f"{aware_bp - anchor_bp:+.3f} |"
    )


def fit_cost(reference_home: Path, models: list) -> None:
    print("\n| model | label | one search (s) | first label-aware search, fit included (s) | next (s) |")
    print("|---|---|---|---|---|")
    for model in models:
        for name in evaluation.LABEL_TASKS:
            reference = ReferenceStore(reference_home).open("nlst-sybil")
            patient = reference.space(model).patient_ids[0]
            reference.search(model, patient=patient, k=10)  # the corrected space, read or measured, not timed
            started = time.perf_counter()
            reference.search(model, patient=patient, k=10)
            plain = time.perf_counter() - started
            started = time.perf_counter()
            reference.search(model, patient=patient, k=10, similar_by=name)
            first = time.perf_counter() - started
            started = time.perf_counter()
            reference.search(model, patient=patient, k=10, similar_by=name)
            again = time.perf_counter() - started
            print(f"| {model} | {name} | {plain:.3f} | {first:.2f} | {again:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="default: every model of the reference")
    parser.add_argument("--labels", nargs="*", default=list(evaluation.LABEL_TASKS))
    parser.add_argument("--shuffles", type=int, default=0, help="refit permutations per model and label")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cost", action="store_true", help="skip the fit-cost table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder) / "home"
        store = ReferenceStore(home)
        started = time.perf_counter()
        store.import_reference("nlst-sybil", str(NLST))
        print(f"import: {time.perf_counter() - started:.1f} s; load average {os.getloadavg()[0]:.1f}", flush=True)
        reference = store.open("nlst-sybil")
        models = args.models or reference.models
        results, anchors_table = [], []
        for model in models:
            started = time.perf_counter()
            prepared = evaluation.prepare(reference, model)
            for name in args.labels:
                results.append(evaluation.evaluate(reference, prepared, name, args.shuffles, args.seed))
                row = results[-1]
                print(
                    f"{model} {name}: BP@10 {row.visual:.3f} -> {row.aware:.3f} "
                    f"({row.gain[0]:+.3f} [{row.gain[1]:+.3f}, {row.gain[2]:+.3f}]), p {row.p_value:.3f}, "
                    f"same-tumor {row.same_tumor_visual:.3f} -> {row.same_tumor_aware:.3f}",
                    flush=True,
                )
            if "histology" in args.labels:
                anchors_table.append(anchor_row(reference, prepared, args.seed))
            print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
        print_table(results)
        if anchors_table:
            print("\n| model | patients | demographic anchor BP@10 | visual | label-aware | label-aware − anchor |")
            print("|---|---|---|---|---|---|")
            print("\n".join(anchors_table))
        if not args.no_cost:
            fit_cost(home, models)
        print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


def print_table(results: list) -> None:
    print(
        "\n| model | similar by | BP@10 visual | BP@10 label-aware | gain [95% CI] | minority class P@10 "
        "visual → aware (chance) | p (refit, shuffles) | same-tumor R@1 visual → aware | chosen penalty/weight |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        minority = "+" if r.label == "stage" else "-"
        print(
            f"| {r.model} | {r.label} | {r.visual:.3f} | {r.aware:.3f} | {r.gain[0]:+.3f} [{r.gain[1]:+.3f}, "
            f"{r.gain[2]:+.3f}] | {r.per_class[f'visual {minority}']:.3f} → {r.per_class[f'aware {minority}']:.3f} "
            f"({r.chance_minority:.3f}) | {r.p_value:.3f} ({r.shuffles}) | {r.same_tumor_visual:.3f} → "
            f"{r.same_tumor_aware:.3f} | {' '.join(f'{p:g}/{w:g}' for p, w in r.choices)} |"
        )


if __name__ == "__main__":
    main()
