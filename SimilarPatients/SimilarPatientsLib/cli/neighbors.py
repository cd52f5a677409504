"""``similar-patients neighbors``: the nearest patients to a patient of a reference."""

from __future__ import annotations

from ..references import fused
from ..references.store import ReferenceStore
from .options import add_model_option, model_argument
from .output import emit, fusion_words, print_hits, with_closeness
from .progress import Bars
from .searching import add_search_options, open_searched, print_similar_by_note, similar_by_options, statement_only


def add(verbs) -> None:
    neighbors = verbs.add_parser("neighbors", help="nearest patients to a patient of a reference")
    neighbors.add_argument("--reference", required=True)
    neighbors.add_argument("--patient", required=True, help="PatientID of the query patient")
    add_model_option(neighbors)
    add_search_options(neighbors)
    neighbors.add_argument("--include-self", action="store_true", help="keep the query patient in the results")


def run(args, store: ReferenceStore, progress: Bars) -> None:
    model = model_argument(args)
    label = similar_by_options(args, model)
    reference = open_searched(args, store)
    exclude = [] if args.include_self else [args.patient]
    if statement_only(args, reference, model, patient=args.patient, exclude=exclude):
        return
    options = {"k": args.k, "metric": args.metric, "where": args.where, "exclude": exclude, "method": args.method}
    options["space"] = args.space
    if args.like or args.unlike:  # "more like these"
        options.update(like=args.like, unlike=args.unlike)
    options.update(label)
    if fused.is_fused(model):
        hits = reference.search_fused(
            patient=args.patient, models=model, fusion=args.fusion, depth=args.depth, progress=progress, **options
        )
        what = fusion_words(args, fused.fused_models(reference, model))
    else:
        hits = reference.search(model, patient=args.patient, progress=progress, **options)
        what = f"model {model}" + (f", similar by {args.similar_by}" if args.similar_by else "")
    hits = with_closeness(hits, reference, args.metric)
    progress.close()

    def human():
        space = hits["space"].iloc[0] if len(hits) else args.space
        print(
            f"Nearest {len(hits)} patients to {args.patient} in '{reference.name}', {what}, {args.metric} distance "
            f"({space} space):"
        )
        print_hits(hits, reference, model, args.metric, max(args.depth, args.k), args.urls)
        print_similar_by_note(args)

    emit(args, hits, human)
