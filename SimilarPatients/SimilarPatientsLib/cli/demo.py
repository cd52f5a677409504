"""``similar-patients demo``: NLST-Sybil, one patient's nearest patients under every model."""

from __future__ import annotations

import pandas as pd

from .. import demo
from ..references import schema
from ..references.store import ReferenceStore
from ..search.distances import METRICS
from .output import table
from .progress import Bars


def add(verbs) -> None:
    demo_parser = verbs.add_parser("demo", help="NLST-Sybil: one patient's nearest patients under every model")
    demo_parser.add_argument("--patient", help="query PatientID (default: a fixed single-lesion patient)")
    demo_parser.add_argument("-k", type=int, default=5, help="patients per model (default 5)")
    demo_parser.add_argument("--metric", choices=METRICS, default="cosine")


def run(args, store: ReferenceStore, progress: Bars) -> None:
    result = demo.run(store, patient=args.patient, k=args.k, metric=args.metric, progress=progress)
    progress.close()
    for note in result.notes:
        print(f"note: {note}")
    labels = ", ".join(
        f"{f} {result.query[f]}" for f in result.display_fields if f in result.query and pd.notna(result.query[f])
    )
    print(f"Query patient {result.patient} (NLST-Sybil): {labels}\n")
    for model, hits in result.hits.items():
        space = hits["space"].iloc[0] if len(hits) else "corrected"
        print(f"== {model}: {len(hits)} nearest patients ({args.metric} distance, {space} space)")
        columns = ["rank", schema.PATIENT, *result.display_fields[:2], "distance", "viewer_url"]
        print(table(hits[columns], digits=4) + "\n")
    print(result.reading())
