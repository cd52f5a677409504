"""``similar-patients evaluate``: what the embeddings know, as a retrieval and classification report."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SimilarPatientsError
from ..evaluation import tasks
from ..references.store import ReferenceStore
from ..search.correction import CORRECTED, SPACES
from .progress import Bars


def add(verbs) -> None:
    evaluate = verbs.add_parser("evaluate", help="what the embeddings know: retrieval and classification report")
    evaluate.add_argument("--reference", required=True)
    evaluate.add_argument("--models", nargs="+", metavar="MODEL", help="models to evaluate (default: all)")
    evaluate.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME",
        help=f"a preset task (repeatable): {', '.join(tasks.PRESETS)}; default: the presets this reference has",
    )
    evaluate.add_argument("--label", metavar="FIELD", help="a label field to split into a binary task")
    evaluate.add_argument(
        "--positive", nargs="+", default=[], metavar="VALUE", help="values (or ~TEXT, >=N terms) of the positive class"
    )
    evaluate.add_argument(
        "--negative", nargs="+", metavar="VALUE", help="values of the negative class (default: the rest)"
    )
    evaluate.add_argument(
        "--space",
        choices=SPACES,
        default=CORRECTED,
        help="corrected (default: the search's hub-free space), or raw (plain distance on the stored vectors)",
    )
    evaluate.add_argument("--out", required=True, help="folder to write report.md, CSV tables and PNG charts to")
    evaluate.add_argument("--folds", type=int, default=5)
    evaluate.add_argument("--repeats", type=int, default=5)
    evaluate.add_argument(
        "--permutations",
        type=int,
        default=100,
        help="label shuffles of the classifiers' permutation test (each re-runs the cross-validation) and of mAP@R",
    )
    evaluate.add_argument(
        "--retrieval-permutations",
        type=int,
        default=1000,
        help="label shuffles of the retrieval null (rankings kept), for P@k, class-balanced P@k and nDCG",
    )
    evaluate.add_argument(
        "--size-field",
        metavar="FIELD",
        help="a numeric lesion field with the lesion's size (mm): the size anchor, a similar-size look-alike gallery",
    )
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="patient resamples for the 95%% intervals")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes (default: up to 2)"
    )


def run(args, store: ReferenceStore, progress: Bars) -> None:
    from ..evaluation import report, run
    from ..references import fusion_verdict

    reference = store.open(args.reference)
    chosen = tasks.resolve(args.task)
    if args.label:
        chosen.append(tasks.task_from_arguments(args.label, args.positive, args.negative))
    elif args.positive or args.negative:
        raise SimilarPatientsError("--positive and --negative need --label FIELD.")
    if not chosen:
        fields = set(reference.lesions(reference.models[0]).columns)
        chosen = [t for t in tasks.resolve(tasks.DEFAULT_TASKS) if t.field in fields]
        if not chosen:
            raise SimilarPatientsError(
                f"Name a task: --label FIELD --positive VALUE ... (fields: {', '.join(reference.label_fields)})."
            )
    settings = run.Settings(
        folds=args.folds,
        repeats=args.repeats,
        permutations=args.permutations,
        retrieval_permutations=max(args.retrieval_permutations, args.permutations),
        bootstrap=args.bootstrap,
        seed=args.seed,
        size_field=args.size_field,
        space=args.space,
    )
    result = run.evaluate(reference, chosen, args.models, settings, progress, workers=args.workers)
    progress.close()
    path = report.write(result, Path(args.out))
    for task in chosen:
        print(f"{task.name}: {report.verdict(result, task)}\n")
    decision = report.fusion_verdict(result)
    if decision is not None:  # kept with the evaluated version too: the Slicer module reads it there
        fusion_verdict.keep(reference, decision)
        for distance, verdict in decision["metrics"].items():
            print(f"Fusion ({distance}): {verdict['reason']}\n")
    print(f"Report: {path} ({result.seconds:.0f} s)")
