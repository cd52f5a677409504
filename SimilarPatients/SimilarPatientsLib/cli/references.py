"""``similar-patients references import|list|delete|push``: the stored reference databases."""

from __future__ import annotations

import sys

from ..references.store import ReferenceStore
from .output import as_json
from .progress import Bars


def add(verbs) -> None:
    references = verbs.add_parser("references", help="import, list or delete reference databases")
    actions = references.add_subparsers(dest="action", required=True)
    importing = actions.add_parser("import", help="import a reference from a file, folder, URL or 'nlst-sybil'")
    importing.add_argument("name", help="name to store the reference under")
    importing.add_argument(
        "--source",
        required=True,
        help="Parquet/CSV file or URL, folder of Parquet shards (local or gs://), folder of upstream "
        "*_features.pkl files, or 'nlst-sybil'",
    )
    importing.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="import a build folder whose build did not complete (the notes say how much is missing)",
    )
    listing = actions.add_parser("list", help="list the stored references and their models")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    deleting = actions.add_parser("delete", help="delete a stored reference")
    deleting.add_argument("name")
    pushing = actions.add_parser("push", help="push a stored reference to a BigQuery table (a load job; replaces it)")
    pushing.add_argument("name", help="the stored reference")
    pushing.add_argument("--bigquery", required=True, metavar="PROJECT.DATASET.TABLE", help="the table to (re)place")
    pushing.add_argument("--model", nargs="+", metavar="MODEL", help="push these models only (default: all)")
    pushing.add_argument(
        "--create-index",
        action="store_true",
        help="create a cosine vector index storing the filter columns (tables of 10 MB or more, one embedding length)",
    )
    pushing.add_argument("--index-type", choices=("IVF", "TREE_AH"), default="IVF", help="default IVF")
    pushing.add_argument(
        "--index-space",
        choices=("corrected", "raw"),
        default="corrected",
        help="the space the index serves: corrected (default, what searches ask for) or raw (--space raw searches)",
    )
    pushing.add_argument("--billing-project", metavar="PROJECT", help="project that runs the jobs (default: ADC's)")


def run(args, store: ReferenceStore, progress: Bars) -> None:
    if args.action == "import":
        reference = store.import_reference(args.name, args.source, progress, args.allow_incomplete)
        progress.close()
        for note in reference.manifest["notes"]:
            print(f"note: {note}")
        print(f"Imported '{reference.name}' from {reference.manifest['source']}:")
        imported = store.summary().query("reference == @args.name")
        print(imported.drop(columns=["reference", "status"]).to_string(index=False))
    elif args.action == "list":
        table = store.summary()
        usable = table[table.status == "ok"].drop(columns="status")
        if args.json:
            print(as_json(table))
        elif len(table) == 0:
            print("No references yet; try `similar-patients references import nlst-sybil --source nlst-sybil`.")
        else:
            print(usable.to_string(index=False) if len(usable) else "No usable references.")
            for status in table.status[table.status != "ok"]:
                print(f"warning: {status}", file=sys.stderr)
    elif args.action == "push":
        _push(args, store, progress)
    else:
        store.delete(args.name)
        print(f"Deleted '{args.name}'.")


def _push(args, store: ReferenceStore, progress: Bars) -> None:
    from ..cloud.client import connect
    from ..cloud.push import push
    from ..cloud.tables import parse_table
    from ..util.optional import require

    require("bigquery")
    table = parse_table(args.bigquery)
    reference = store.open(args.name)
    result = push(
        reference,
        table,
        connect(table, args.billing_project),
        models=args.model,
        create_index=args.create_index,
        index_type=args.index_type,
        index_space=args.index_space,
        progress=progress,
    )
    progress.close()
    for note in result.notes:
        print(f"note: {note}")
    print(
        f"Pushed '{reference.name}' to {table.path}: {result.rows} lesions, {result.bytes / 1e6:.1f} MB. Search it as "
        f"--reference {table.url}"
    )
