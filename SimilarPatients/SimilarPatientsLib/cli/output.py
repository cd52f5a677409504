"""How the command line prints hit tables: compact aligned text for a person (the viewer link on request),
JSON or CSV for a program, to the terminal or a file."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import SimilarPatientsError
from ..references import fused, schema
from ..search import feedback
from ..search.fusion import FUSION_DEPTH
from ..util import atomic

#: Characters that would break a table's line or column: C0 and C1 controls, and the line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: Columns a person reads in a hit table; the rest are in --json and --csv. "closer than" is the distance
#: placed among the reference's nearest matches, comparable across models (their distances are not).
HUMAN_HIT_COLUMNS = ["rank", schema.PATIENT, "closer than", "distance", "lesions", schema.COLLECTION]
#: What the "closer than" column means, printed under the tables that show it.
CLOSENESS_LEGEND = "closer than N%: nearer than N% of this reference's nearest matches (comparable across models)"


def add_output_options(parser) -> None:
    """--json, --csv, --urls and --out for a command that prints hits."""
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="print a JSON array of hits (every column)")
    shape.add_argument("--csv", action="store_true", help="print the hits as CSV (every column)")
    parser.add_argument("--urls", action="store_true", help="add the IDC viewer link to the table")
    parser.add_argument("--out", metavar="FILE", help="write the table, JSON or CSV to FILE instead of the terminal")


def with_closeness(hits: pd.DataFrame, reference, metric: str) -> pd.DataFrame:
    """``hits`` with ``closer_than``: the percentage of the reference's nearest matches that are farther
    (what the Slicer module shows as Similarity; empty for BigQuery, which does not measure it)."""
    return hits.assign(closer_than=fused.hit_closeness(reference, hits, metric))


def emit(args, hits: pd.DataFrame, human: Callable[[], None]) -> None:
    """Print ``hits`` as --json, --csv or the table ``human`` prints, to the terminal or (--out) a file
    written whole or not at all."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        if args.json:
            print(as_json(hits))
        elif args.csv:
            print(hits.to_csv(index=False), end="")
        else:
            human()
    if not args.out:
        sys.stdout.write(text.getvalue())
        return
    out = Path(args.out)
    if out.is_dir():
        raise SimilarPatientsError(f"--out {out} is a folder; name a file.")
    with atomic.replacing(out) as temporary:
        temporary.write_text(text.getvalue(), encoding="utf-8")
    print(f"Wrote {len(hits)} hits to {out}.")


def table(frame: pd.DataFrame, digits: int = 6) -> str:
    """Left-aligned text columns, the last (a URL) unpadded so lines stay as short as they can. Distances
    get ``digits`` decimals, or as many more as it takes to tell two different distances apart."""
    if not len(frame):
        return "(no patient matches)"
    cells = frame.astype(object).where(frame.notna(), "")
    if "distance" in cells:
        decimals = _decimals(frame["distance"], digits)
        cells["distance"] = frame["distance"].map(lambda d: f"{d:.{decimals}f}")
    if "closer than" in cells:
        cells["closer than"] = frame["closer than"].map(lambda v: "" if pd.isna(v) else f"{v:.0f}%")
    cells = cells.astype(str).apply(lambda column: column.map(_printable))
    cells.columns = [_printable(str(c)) for c in cells.columns]
    widths = [max(len(str(c)), cells[c].str.len().max()) for c in cells.columns]
    lines = [[str(c) for c in cells.columns], *cells.to_numpy().tolist()]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line[:-1], widths[:-1])) + "  " + line[-1] for line in lines)


def _printable(text: str) -> str:
    """``text`` with its control characters (a newline in a PatientID or a label) written as escapes
    (``\\n``), so that one hit stays one line of the table; --json keeps the values exact."""
    return _CONTROL.sub(lambda found: found.group().encode("unicode_escape").decode("ascii"), text)


def _decimals(values: pd.Series, least: int) -> int:
    """Decimals (``least`` to 12) at which the distinct ``values`` print distinct."""
    distinct = np.unique(values.to_numpy(dtype=float))
    decimals = least
    while decimals < 12 and len({f"{v:.{decimals}f}" for v in distinct}) < len(distinct):
        decimals += 1
    return decimals


def print_hits(
    hits: pd.DataFrame, reference, model, metric: str, depth: int = FUSION_DEPTH, urls: bool = False
) -> None:
    """The compact table: rank, patient, "closer than", distance (fused: score and each model's rank), the
    reference's display labels; the viewer link only with ``urls`` (it is 200 characters)."""
    shown = [*HUMAN_HIT_COLUMNS, "viewer_url"]
    labels = [f for f in reference.display_fields if f in hits.columns and f not in shown]
    link = ["viewer_url"] if urls else []
    link = ([feedback.COLUMN] if feedback.COLUMN in hits.columns else []) + link
    hits = hits.rename(columns={"closer_than": "closer than"})
    if fused.is_fused(model):  # the fused score, then each model's rank: which models agree
        ranks = fused.rank_labels(hits, depth).add_prefix("rank ")
        leading = hits[["rank", schema.PATIENT, "closer than", "fused_score", "lesions", schema.COLLECTION]]
        scores = [f"{v:.1f}%" if f == "percentile" else f"{v:.4f}" for v, f in zip(hits["fused_score"], hits["fusion"])]
        leading = leading.rename(columns={"fused_score": "score"}).assign(score=scores)
        print(table(pd.concat([leading, ranks, hits[[*labels, *link]]], axis=1)))
        print(f"rank MODEL: the patient's rank in that model; >{depth}: farther than its first {depth}; –: not listed")
    else:
        print(table(hits[[*HUMAN_HIT_COLUMNS, *labels, *link]]))
    if feedback.COLUMN in hits.columns:
        print("feedback: the query moved towards the liked patients (marked like) and away from the unliked (left out)")
    if len(hits) and hits["closer than"].notna().any():
        print(CLOSENESS_LEGEND)
    if "notes" in hits.attrs:  # a BigQuery search: what it billed, how it searched
        for note in hits.attrs["notes"]:
            print(f"note: {note}")
    elif len(hits) and hits["search"].iloc[0] == "approximate" and fused.is_fused(model):
        recall = float(hits["index_recall"].iloc[0])
        print(f"search: approximate for some models (lowest index recall@10 {recall:.3f}); --method exact compares "
              f"every lesion")  # fmt: skip
    elif len(hits) and hits["search"].iloc[0] == "approximate":
        calibration = reference.approximate_index(model, metric).calibration
        print(f"search: approximate, {calibration.describe()}; --method exact compares every lesion")
    elif len(hits):
        print("search: exact (every lesion compared)")


def fusion_words(args, models: list) -> str:
    how = "reciprocal rank fusion" if args.fusion == "rrf" else "the mean of their 'closer than' percentiles"
    return f"{len(models)} models fused ({', '.join(models)}; {how}, {max(args.depth, args.k)} patients each)"


def as_json(frame: pd.DataFrame) -> str:
    return json.dumps(json.loads(frame.to_json(orient="records", double_precision=15)), indent=2)
