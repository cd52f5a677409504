"""``similar-patients explore``: an interactive HTML map of a reference's embeddings (and a static figure)."""

from __future__ import annotations

from pathlib import Path

from ..maps import projection
from ..references.store import ReferenceStore
from ..search.correction import CORRECTED, SPACES
from .progress import Bars


def add(verbs) -> None:
    explore = verbs.add_parser("explore", help="interactive HTML map of a reference's embeddings (and a PNG)")
    explore.add_argument("--reference", required=True)
    explore.add_argument("--model", nargs="+", metavar="MODEL", help="models to map (default: all)")
    explore.add_argument("--method", choices=projection.METHODS, default="umap", help="2-D projection (default umap)")
    explore.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine")
    explore.add_argument(
        "--space",
        choices=SPACES,
        default=CORRECTED,
        help="corrected (default: the z-scored vectors laid out, edges and neighbours by the search's hub-free "
        "distance), or raw (the stored vectors and plain distances)",
    )
    explore.add_argument(
        "--color-by", metavar="FIELD", help="label field to colour by (default: the reference's first display field)"
    )
    explore.add_argument(
        "--graph", type=int, default=0, metavar="K", help="draw edges to each lesion's K nearest lesions (default 0)"
    )
    explore.add_argument(
        "--neighbors",
        "--neighbours",
        dest="neighbors",
        type=int,
        default=5,
        help="patients the search box highlights (default 5)",
    )
    explore.add_argument("--seed", type=int, default=0)
    explore.add_argument("--out", required=True, help="the HTML file to write")
    explore.add_argument("--png", metavar="FILE", help="also write a static figure (PNG, PDF or SVG)")


def run(args, store: ReferenceStore, progress: Bars) -> None:
    from ..maps import embedding_map, figure, page

    page.check_out(Path(args.out))  # before minutes of projection, not after
    if args.png:
        figure.check_format(Path(args.png))
    reference = store.open(args.reference)
    the_map = embedding_map.build(
        reference,
        args.model,
        method=args.method,
        metric=args.metric,
        space=args.space,
        color_by=args.color_by,
        graph=args.graph,
        neighbours=args.neighbors,
        seed=args.seed,
        progress=progress,
    )
    progress.close()
    written = page.write(the_map, Path(args.out))
    lesions = sum(len(layer.rows) for layer in the_map.layers)
    print(f"Map of {len(the_map.layers)} model(s), {lesions} points: {written}")
    if args.png:
        print(f"Figure: {figure.write(the_map, Path(args.png))}")
