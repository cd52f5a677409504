"""What a search from the command line is asked with (k, distance, filters, method, BigQuery's guards), the
reference it is asked of (stored or ``bq://``), and BigQuery's print-only and dry-run answers."""

from __future__ import annotations

import argparse

from ..cloud import is_bigquery, open_reference
from ..cloud.client import DEFAULT_MAXIMUM_BYTES_BILLED
from ..cloud.sql import MAX_K
from ..errors import SimilarPatientsError
from ..references import fused
from ..references.reference import METHODS
from ..references.store import ReferenceStore
from ..search.correction import CORRECTED, SPACES
from ..search.distances import METRICS
from .options import whole
from .output import add_output_options


def add_search_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-k", type=whole(1, MAX_K), default=5, help="number of patients (default 5)")
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default="cosine",
        help="cosine (1 - cosine similarity, default), euclidean, or dot (negative inner product)",
    )
    parser.add_argument(
        "--space",
        choices=SPACES,
        default=CORRECTED,
        help="corrected (default: z-scored by the reference's statistics and locally scaled, so that no patient "
        "is near every query), or raw (plain distance on the stored vectors, as published neighbour lists were made)",
    )
    parser.add_argument(
        "--similar-by",
        metavar="LABEL",
        help="similar with respect to a label of the reference (stage, histology, or any label field): the corrected "
        "visual distance scaled by closeness on a direction fitted on the reference's own labels (one model, a "
        "stored reference; the hits' similar_by column says so). On NLST-Sybil it helps stage a little (CT-FM, "
        "Merlin); for histology it does not beat age, sex and smoking (docs/search.md)",
    )
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="filter reference lesions: FIELD=V1,V2  FIELD!=V  FIELD>=N  FIELD<N  FIELD~TEXT (repeatable)",
    )
    parser.add_argument(
        "--method", choices=METHODS, default="auto", help="exact scan, approximate index, or auto (by reference size)"
    )
    parser.add_argument(
        "--like",
        action="append",
        default=[],
        metavar="ID",
        help="more like these: a patient of an earlier answer that is like the query; the query moves towards it "
        "(repeatable; corrected space, cosine)",
    )
    parser.add_argument(
        "--unlike",
        action="append",
        default=[],
        metavar="ID",
        help="a patient of an earlier answer that is not like the query; the query moves away from it and it is "
        "left out of the answer (repeatable)",
    )
    add_output_options(parser)
    cloud = parser.add_argument_group("BigQuery references (--reference bq://PROJECT.DATASET.TABLE)")
    cloud.add_argument("--print-sql", action="store_true", help="print the SQL and its parameters; run nothing")
    cloud.add_argument("--dry-run", action="store_true", help="print the bytes the search would bill; run nothing")
    cloud.add_argument(
        "--maximum-bytes-billed",
        type=whole(1, 2**63 - 1),
        default=DEFAULT_MAXIMUM_BYTES_BILLED,
        metavar="BYTES",
        help=f"refuse a search that would bill more (default {DEFAULT_MAXIMUM_BYTES_BILLED:,}, 10 GiB)",
    )
    cloud.add_argument("--fraction-lists-to-search", type=float, metavar="F", help="VECTOR_SEARCH option (0 < F < 1)")
    cloud.add_argument(
        "--billing-project",
        metavar="PROJECT",
        help="project that runs and pays for the query (default: ADC's); approximate searches run in the table's only",
    )
    cloud.add_argument(
        "--check-recall",
        action="store_true",
        help="when the vector index is used, also search every row and report the index's recall (bills twice)",
    )


def similar_by_options(args, model) -> dict:
    """``{"similar_by": LABEL}`` when ``--similar-by`` is given (refused with several models or a BigQuery
    reference), else nothing: the ordinary search's call stays as it was."""
    if not args.similar_by:
        return {}
    if fused.is_fused(model) or is_bigquery(args.reference):
        raise SimilarPatientsError(
            "--similar-by searches one model of a stored reference: name one --model, and a reference imported "
            "here (its label fit is kept with it), not bq://."
        )
    return {"similar_by": args.similar_by}


def print_similar_by_note(args) -> None:
    """Under a label-aware table: what the mode is and what it was measured to be worth."""
    if args.similar_by:
        from ..references.label_aware import describe

        print(f"similar by {args.similar_by}: {describe(args.similar_by)}")


def open_searched(args, store: ReferenceStore):
    """The reference ``--reference`` names: a stored one, or ``bq://PROJECT.DATASET.TABLE``."""
    if is_bigquery(args.reference) and (args.like or args.unlike):
        raise SimilarPatientsError(
            "--like / --unlike read the marked patients' vectors from a stored reference, not from a BigQuery "
            "table: give feedback on a stored reference."
        )
    if not is_bigquery(args.reference):
        if args.print_sql or args.dry_run or args.check_recall:
            raise SimilarPatientsError(
                "--print-sql, --dry-run and --check-recall are for BigQuery references (bq://PROJECT.DATASET.TABLE); "
                "a local approximate search reports the recall its index measured when it was built."
            )
        return store.open(args.reference)
    return open_reference(
        args.reference,
        project=args.billing_project,
        maximum_bytes_billed=args.maximum_bytes_billed,
        fraction_lists_to_search=args.fraction_lists_to_search,
        check_recall=args.check_recall,
    )


def statement_only(args, reference, model: str, **query) -> bool:
    """``--print-sql`` / ``--dry-run``: print what the BigQuery search would run or bill, and say so (for
    a fused search, each model's: it asks each model for its first --depth patients)."""
    if not (args.print_sql or args.dry_run):
        return False
    k = fused.checked_depth(reference, args.depth, args.k) if fused.is_fused(model) else args.k
    embeddings = query.pop("embeddings", None)
    for name in fused.fused_models(reference, model) if fused.is_fused(model) else [model]:
        if embeddings is not None:
            query["embeddings"] = embeddings[name] if isinstance(embeddings, dict) else embeddings
        statement = reference.statement(
            name, k=k, metric=args.metric, where=args.where, method=args.method, space=args.space, **query
        )
        if fused.is_fused(model):
            print(f"-- {name}")
        if args.print_sql:
            print(statement.describe())
        if args.dry_run:
            scanned = reference.dry_run(statement)
            print(f"Dry run: the search would process {scanned:,} bytes ({scanned / 2**30:.3f} GiB); nothing was run.")
    return True
