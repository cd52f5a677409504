"""``similar-patients demo``: NLST-Sybil, one patient's nearest patients under every model."""

from __future__ import annotations

import pandas as pd

from .. import demo
from ..references import schema
from ..references.store import ReferenceStore
from ..search.distances import METRICS
from .output import CLOSENESS_LEGEND, table, with_closeness
from .progress import Bars


def add(verbs) -> None:
    demo_parser = verbs.add_parser("demo", help="NLST-Sybil: one patient's nearest patients under every model")
    demo_parser.add_argument("--patient", help="query PatientID (default: a fixed single-lesion patient)")
    demo_parser.add_argument("-k", type=int, default=5, help="patients per model (default 5)")
    demo_parser.add_argument("--metric", choices=METRICS, default="cosine")
    demo_parser.add_argument("--urls", action="store_true", help="add the IDC viewer link to each table")


def run(args, store: ReferenceStore, progress: Bars) -> None:
    result = demo.run(store, patient=args.patient, k=args.k, metric=args.metric, progress=progress)
    progress.close()
    for note in result.notes:
        print(f"note: {note}")
    labels = ", ".join(
        f"{f} {result.query[f]}" for f in result.display_fields if f in result.query and pd.notna(result.query[f])
    )
    print(f"Query patient {result.patient} (NLST-Sybil): {labels}\n")
    reference = store.open(demo.REFERENCE)
    link = ["viewer_url"] if args.urls else []
    for model, hits in result.hits.items():
        space = hits["space"].iloc[0] if len(hits) else "corrected"
        print(f"== {model}: {len(hits)} nearest patients ({args.metric} distance, {space} space)")
        hits = with_closeness(hits, reference, args.metric).rename(columns={"closer_than": "closer than"})
        columns = ["rank", schema.PATIENT, "closer than", "distance", *result.display_fields[:2], *link]
        print(table(hits[columns], digits=4) + "\n")
    print(CLOSENESS_LEGEND + "\n")
    print(result.reading())
