"""``similar-patients embed``: one tumor's embedding by one model, printed or written as a reference row."""

from __future__ import annotations

import json
from pathlib import Path

from .options import add_image_options, tumors
from .progress import Bars


def add(verbs) -> None:
    embed = verbs.add_parser("embed", help="embed a tumor in a CT with one model")
    add_image_options(embed)
    embed.add_argument("--model", required=True, help="embedding model (see `similar-patients models list`)")
    embed.add_argument("--patient", default="query", help="PatientID written to --out (default 'query')")
    embed.add_argument(
        "--out", metavar="FILE", help="write the embedding: .json, or .parquet/.csv as a reference row (importable)"
    )


def run(args, progress: Bars) -> None:
    from ..imaging.ct_image import read_ct
    from ..models import embedding_file
    from ..models.embedder import Embedder

    image, marked = read_ct(args.image), tumors(args)
    embedder = Embedder(args.model, args.recipe, args.weights, args.accept_licence, args.device, progress=progress)
    embeddings = embedder.embed(image, marked)
    progress.close()
    if args.out:
        path = embedding_file.write(embeddings, Path(args.out), args.patient)
        for embedding in embeddings:
            print(
                f"{embedding.model} ({embedding.recipe}), {len(embedding.vector)} values, seed LPS "
                f"{', '.join(f'{v:.1f}' for v in embedding.seed)} mm: {path}"
            )
    else:
        records = [embedding_file.as_record(e) for e in embeddings]
        print(json.dumps(records[0] if len(records) == 1 else records))
