"""``similar-patients query``: the nearest reference patients to a tumor marked in a CT."""

from __future__ import annotations

import numpy as np

from ..errors import SimilarPatientsError
from ..references import fused
from ..references.store import ReferenceStore
from .options import add_image_options, add_model_option, model_argument, tumors
from .output import emit, fusion_words, print_hits, with_closeness
from .progress import Bars
from .searching import add_search_options, open_searched, print_similar_by_note, similar_by_options, statement_only


def add(verbs) -> None:
    query = verbs.add_parser("query", help="nearest reference patients to a tumor in a CT")
    add_image_options(query)
    add_model_option(query)
    query.add_argument("--reference", required=True)
    add_search_options(query)


def run(args, store: ReferenceStore, progress: Bars) -> None:
    from ..query import check_compatible, query_image

    model = model_argument(args)
    similar_by = similar_by_options(args, model)
    reference = open_searched(args, store)
    several = fused.is_fused(model)
    if several and (args.recipe or args.weights):
        raise SimilarPatientsError(
            "--recipe and --weights are for one model; with several, each model uses its reference recipe and its "
            "cached weights (or $SIMILARPATIENTS_WEIGHTS_DIR)."
        )
    if args.print_sql or args.dry_run:  # embed here, then show or price the search instead of running it
        from ..imaging.ct_image import read_ct
        from ..models.embedder import Embedder

        names = fused.fused_models(reference, model) if several else [model]
        embedders = [
            Embedder(m, args.recipe, args.weights, args.accept_licence, args.device, progress=progress) for m in names
        ]
        for embedder in embedders:
            check_compatible(reference, embedder.spec.name, embedder.recipe.name, embedder.spec.dimension)
        image, marked = read_ct(args.image), tumors(args)
        vectors = {e.spec.name: np.stack([v.vector for v in e.embed(image, marked)]) for e in embedders}
        progress.close()
        statement_only(args, reference, model if several else embedders[0].spec.name, embeddings=vectors)
        return
    result = query_image(
        args.image,
        tumors(args),
        model,
        reference,
        args.k,
        args.metric,
        args.where,
        args.method,
        recipe=args.recipe,
        weights=args.weights,
        accept_licence=args.accept_licence,
        device=args.device,
        progress=progress,
        fusion=args.fusion,
        depth=args.depth,
        space=args.space,
        like=args.like,
        unlike=args.unlike,
        **similar_by,
    )
    hits = with_closeness(result.hits, reference, args.metric)
    progress.close()
    emit(args, hits, lambda: _print_table(args, result, hits, reference, model, several))


def _print_table(args, result, hits, reference, model, several: bool) -> None:
    queried = result.embeddings[: len(result.embeddings) // max(len(result.models), 1)]
    seeds = "; ".join(", ".join(f"{v:.1f}" for v in e.seed) for e in queried)
    what = "the tumor" if len(queried) == 1 else f"the {len(queried)} tumors"
    how = fusion_words(args, list(result.models)) if several else f"model {result.model} ({result.recipe})"
    how += f", similar by {args.similar_by}" if args.similar_by else ""
    print(f"Nearest {len(hits)} patients to {what} at LPS ({seeds}) mm in '{reference.name}', {how}, "
          f"{args.metric} distance ({args.space} space):")  # fmt: skip
    print_hits(hits, reference, model, args.metric, max(args.depth, args.k), args.urls)
    print_similar_by_note(args)
