"""The ``similar-patients`` command line: references, neighbours, image queries, embedding models,
evaluation, maps and the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__, demo
from .cloud import is_bigquery, open_reference
from .cloud.client import DEFAULT_MAXIMUM_BYTES_BILLED
from .cloud.sql import MAX_K
from .errors import SimilarPatientsError
from .evaluation import tasks
from .maps import projection
from .references import fused, schema
from .references.reference import METHODS
from .references.store import ReferenceStore
from .search.distances import METRICS
from .search.fusion import FUSION_DEPTH, FUSIONS

#: Columns a person reads in a hit table; the rest are in --json.
_HUMAN_HIT_COLUMNS = ["rank", schema.PATIENT, "distance", "lesions", schema.COLLECTION]


class _Bars:
    """A tqdm bar per stage, on stderr, shown only for work that lasts over a second."""

    def __init__(self):
        self.bar = None
        self.message = None

    def __call__(self, done: float, total: float, message: str) -> None:
        from tqdm import tqdm

        if message != self.message:
            self.close()
            self.message = message
            unit = "B" if message.startswith("downloading") else "it"
            self.bar = tqdm(
                total=total or None,
                desc=message,
                unit=unit,
                unit_scale=unit == "B",
                delay=1.0,
                file=sys.stderr,
                leave=False,
            )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="similar-patients", description="Find the IDC patients whose tumor is most like a query tumor."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True)

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
    pushing.add_argument("--billing-project", metavar="PROJECT", help="project that runs the jobs (default: ADC's)")

    neighbors = verbs.add_parser("neighbors", help="nearest patients to a patient of a reference")
    neighbors.add_argument("--reference", required=True)
    neighbors.add_argument("--patient", required=True, help="PatientID of the query patient")
    _model_option(neighbors)
    _search_options(neighbors)
    neighbors.add_argument("--include-self", action="store_true", help="keep the query patient in the results")

    explore = verbs.add_parser("explore", help="interactive HTML map of a reference's embeddings (and a PNG)")
    explore.add_argument("--reference", required=True)
    explore.add_argument("--model", nargs="+", metavar="MODEL", help="models to map (default: all)")
    explore.add_argument("--method", choices=projection.METHODS, default="umap", help="2-D projection (default umap)")
    explore.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine")
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
    evaluate.add_argument("--out", required=True, help="folder to write report.md, CSV tables and PNG charts to")
    evaluate.add_argument("--folds", type=int, default=5)
    evaluate.add_argument("--repeats", type=int, default=5)
    evaluate.add_argument("--permutations", type=int, default=100, help="label shuffles of the permutation test")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="patient resamples for the 95%% intervals")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes (default: up to 2)"
    )

    embed = verbs.add_parser("embed", help="embed a tumor in a CT with one model")
    _image_options(embed)
    embed.add_argument("--model", required=True, help="embedding model (see `similar-patients models list`)")
    embed.add_argument("--patient", default="query", help="PatientID written to --out (default 'query')")
    embed.add_argument(
        "--out", metavar="FILE", help="write the embedding: .json, or .parquet/.csv as a reference row (importable)"
    )

    query = verbs.add_parser("query", help="nearest reference patients to a tumor in a CT")
    _image_options(query)
    _model_option(query)
    query.add_argument("--reference", required=True)
    _search_options(query)

    models_parser = verbs.add_parser("models", help="list the embedding models, or accept a weight licence")
    model_actions = models_parser.add_subparsers(dest="action", required=True)
    models_list = model_actions.add_parser("list", help="models, recipes, licences and whether weights are here")
    models_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    accept = model_actions.add_parser("accept", help="accept a model's weight licence (needed before download)")
    accept.add_argument("name")

    index = verbs.add_parser("index", help="build reference rows for many lesions on Apache Beam")
    index_actions = index.add_subparsers(dest="action", required=True)
    build = index_actions.add_parser(
        "build",
        help="embed a manifest's lesions (or IDC's annotations); other --options go to Beam",
        allow_abbrev=False,  # Beam's options pass through untouched
    )
    _build_options(build)

    demo_parser = verbs.add_parser("demo", help="NLST-Sybil: one patient's nearest patients under every model")
    demo_parser.add_argument("--patient", help="query PatientID (default: a fixed single-lesion patient)")
    demo_parser.add_argument("-k", type=int, default=5, help="patients per model (default 5)")
    demo_parser.add_argument("--metric", choices=METRICS, default="cosine")
    return parser


def _build_options(build: argparse.ArgumentParser) -> None:
    lesions = build.add_mutually_exclusive_group(required=True)
    lesions.add_argument("--manifest", metavar="FILE", help="CSV/Parquet of lesions (see docs/scale.md)")
    lesions.add_argument(
        "--idc", nargs="+", metavar="ANALYSIS", help="IDC analysis results whose SEG/SR lesions to embed (nlstseg...)"
    )
    build.add_argument("--segment-type", help="with --idc: SEG segments of this property type only (e.g. Neoplasm)")
    build.add_argument("--labels", metavar="FILE", help="with --idc: a clinical table by PatientID to join")
    build.add_argument("--limit", type=int, help="with --idc: the first N annotation series only (a trial)")
    build.add_argument("--model", action="append", required=True, help="a model to embed with (repeat for more)")
    out = build.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", metavar="DIR", help="folder of Parquet shards (a reference source)")
    out.add_argument("--bigquery", metavar="TABLE", help="PROJECT.DATASET.TABLE, loaded from the shards")
    build.add_argument("--staging", metavar="DIR", help="with --bigquery: where the shards are written first")
    build.add_argument("--dicom-folder", metavar="DIR", help="find series here instead of downloading from IDC")
    build.add_argument("--cache", metavar="DIR", help="worker-local series cache (default: the data home's)")
    build.add_argument("--runner", choices=("DirectRunner", "DataflowRunner"), default="DirectRunner")
    build.add_argument("--weights", action="append", default=[], metavar="MODEL=FILE", help="a model's weights file")
    build.add_argument("--accept-licence", action="store_true", help="accept the models' weight licences")
    build.add_argument("--device", choices=("cuda", "cpu"), help="default: CUDA where a worker has it")
    build.add_argument("--batch-size", type=_whole(1), default=8, help="crops per forward pass (default 8)")
    build.add_argument(
        "--source-bucket",
        choices=("gcs", "aws"),
        default="gcs",
        help="IDC's copy the workers download from (default gcs: free in Google Cloud, no external IPs needed)",
    )
    build.add_argument("--billing-project", metavar="PROJECT", help="with --bigquery: the project the load bills")


def _image_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", required=True, help="the CT: DICOM series folder (or one of its files), NIfTI, NRRD")
    tumor = parser.add_mutually_exclusive_group(required=True)
    tumor.add_argument("--mask", metavar="PATH", help="tumor mask: labelmap, Slicer .seg.nrrd or DICOM SEG")
    tumor.add_argument(
        "--point", nargs="+", action="append", metavar="X,Y,Z", help="a point on the tumor, LPS mm (repeatable)"
    )
    tumor.add_argument(
        "--box", nargs="+", action="append", metavar="X0,Y0,Z0,X1,Y1,Z1", help="opposite box corners (repeatable)"
    )
    parser.add_argument(
        "--segment",
        action="append",
        help="the mask's segment: name or label value (.seg.nrrd, labelmap), number (DICOM SEG); repeat it for "
        "several tumors of one patient",
    )
    parser.add_argument("--ras", action="store_true", help="--point/--box are RAS mm (as Slicer shows them)")
    parser.add_argument("--recipe", help="preprocessing recipe (default: the model's reference recipe)")
    parser.add_argument("--weights", metavar="PATH", help="weights file or folder to use instead of a download")
    parser.add_argument("--accept-licence", action="store_true", help="accept a non-commercial weight licence")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: CUDA when present")


def _model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        nargs="+",
        metavar="MODEL",
        help="the embedding model; several, or 'all' (every model of the reference), to fuse their rankings",
    )
    fused = parser.add_argument_group("several models (--model A B ... or --model all)")
    fused.add_argument(
        "--fusion",
        choices=FUSIONS,
        default="rrf",
        help="rrf: reciprocal rank fusion (default); percentile: the mean of the models' 'closer than N%%'",
    )
    fused.add_argument(
        "--depth",
        type=_whole(1),
        default=FUSION_DEPTH,
        help=f"patients each model contributes (default {FUSION_DEPTH})",
    )


def _model_argument(args):
    """``--model``: one name, or the models to fuse ("all" stays as it is)."""
    return args.model[0] if len(args.model) == 1 else args.model


def _whole(low: int, high: int | None = None):
    """An argparse type: a whole number from ``low`` (to ``high``), refused at parsing with the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bound = f"from {low:,} to {high:,}" if high is not None else f"of at least {low:,}"
            raise argparse.ArgumentTypeError(f"must be a whole number {bound}, not '{text}'")
        return value

    return parse


def _search_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-k", type=_whole(1, MAX_K), default=5, help="number of patients (default 5)")
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default="cosine",
        help="cosine (1 - cosine similarity, default), euclidean, or dot (negative inner product)",
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
    parser.add_argument("--json", action="store_true", help="print a JSON array of hits")
    cloud = parser.add_argument_group("BigQuery references (--reference bq://PROJECT.DATASET.TABLE)")
    cloud.add_argument("--print-sql", action="store_true", help="print the SQL and its parameters; run nothing")
    cloud.add_argument("--dry-run", action="store_true", help="print the bytes the search would bill; run nothing")
    cloud.add_argument(
        "--maximum-bytes-billed",
        type=_whole(1, 2**63 - 1),
        default=DEFAULT_MAXIMUM_BYTES_BILLED,
        metavar="BYTES",
        help=f"refuse a search that would bill more (default {DEFAULT_MAXIMUM_BYTES_BILLED:,}, 10 GiB)",
    )
    cloud.add_argument("--fraction-lists-to-search", type=float, metavar="F", help="VECTOR_SEARCH option (0 < F <= 1)")
    cloud.add_argument("--billing-project", metavar="PROJECT", help="project that runs the query (default: ADC's)")
    cloud.add_argument(
        "--check-recall",
        action="store_true",
        help="when the vector index is used, also search every row and report the index's recall (bills twice)",
    )


def _open(args, store: ReferenceStore):
    """The reference ``--reference`` names: a stored one, or ``bq://PROJECT.DATASET.TABLE``."""
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


def _statement_only(args, reference, model: str, **query) -> bool:
    """``--print-sql`` / ``--dry-run``: print what the BigQuery search would run or bill, and say so (for
    a fused search, each model's: it asks each model for its first --depth patients)."""
    if not (args.print_sql or args.dry_run):
        return False
    k = max(args.k, args.depth) if fused.is_fused(model) else args.k
    embeddings = query.pop("embeddings", None)
    for name in fused.fused_models(reference, model) if fused.is_fused(model) else [model]:
        if embeddings is not None:
            query["embeddings"] = embeddings[name] if isinstance(embeddings, dict) else embeddings
        statement = reference.statement(name, k=k, metric=args.metric, where=args.where, method=args.method, **query)
        if fused.is_fused(model):
            print(f"-- {name}")
        if args.print_sql:
            print(statement.describe())
        if args.dry_run:
            scanned = reference.dry_run(statement)
            print(f"Dry run: the search would process {scanned:,} bytes ({scanned / 2**30:.3f} GiB); nothing was run.")
    return True


def _table(frame: pd.DataFrame, digits: int = 6) -> str:
    """Left-aligned text columns, the last (a URL) unpadded so lines stay as short as they can. Distances
    get ``digits`` decimals, or as many more as it takes to tell two different distances apart."""
    if not len(frame):
        return "(no patient matches)"
    cells = frame.astype(object).where(frame.notna(), "")
    if "distance" in cells:
        decimals = _decimals(frame["distance"], digits)
        cells["distance"] = frame["distance"].map(lambda d: f"{d:.{decimals}f}")
    cells = cells.astype(str)
    widths = [max(len(str(c)), cells[c].str.len().max()) for c in cells.columns]
    lines = [[str(c) for c in cells.columns], *cells.to_numpy().tolist()]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line[:-1], widths[:-1])) + "  " + line[-1] for line in lines)


def _decimals(values: pd.Series, least: int) -> int:
    """Decimals (``least`` to 12) at which the distinct ``values`` print distinct."""
    distinct = np.unique(values.to_numpy(dtype=float))
    decimals = least
    while decimals < 12 and len({f"{v:.{decimals}f}" for v in distinct}) < len(distinct):
        decimals += 1
    return decimals


def _print_hits(hits: pd.DataFrame, reference, model, metric: str, depth: int = FUSION_DEPTH) -> None:
    shown = [*_HUMAN_HIT_COLUMNS, "viewer_url"]
    labels = [f for f in reference.label_fields if f in hits.columns and f not in shown]
    if fused.is_fused(model):  # the fused score, then each model's rank: which models agree
        ranks = fused.rank_labels(hits, depth).add_prefix("rank ")
        leading = hits[["rank", schema.PATIENT, "fused_score", "lesions", schema.COLLECTION]]
        scores = [f"{v:.1f}%" if f == "percentile" else f"{v:.4f}" for v, f in zip(hits["fused_score"], hits["fusion"])]
        leading = leading.rename(columns={"fused_score": "score"}).assign(score=scores)
        print(_table(pd.concat([leading, ranks, hits[[*labels, "viewer_url"]]], axis=1)))
        print(f"rank MODEL: the patient's rank in that model; >{depth}: farther than its first {depth}; –: not listed")
    else:
        print(_table(hits[[*_HUMAN_HIT_COLUMNS, *labels, "viewer_url"]]))
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


def _fusion_words(args, models: list) -> str:
    how = "reciprocal rank fusion" if args.fusion == "rrf" else "the mean of their 'closer than' percentiles"
    return f"{len(models)} models fused ({', '.join(models)}; {how}, {max(args.depth, args.k)} patients each)"


def _json(frame: pd.DataFrame) -> str:
    return json.dumps(json.loads(frame.to_json(orient="records", double_precision=15)), indent=2)


def _neighbors(args, store: ReferenceStore, progress: _Bars) -> None:
    reference = _open(args, store)
    model = _model_argument(args)
    exclude = [] if args.include_self else [args.patient]
    if _statement_only(args, reference, model, patient=args.patient, exclude=exclude):
        return
    options = {"k": args.k, "metric": args.metric, "where": args.where, "exclude": exclude, "method": args.method}
    if fused.is_fused(model):
        hits = reference.search_fused(
            patient=args.patient, models=model, fusion=args.fusion, depth=args.depth, progress=progress, **options
        )
        what = _fusion_words(args, fused.fused_models(reference, model))
    else:
        hits = reference.search(model, patient=args.patient, progress=progress, **options)
        what = f"model {model}"
    progress.close()
    if args.json:
        print(_json(hits))
        return
    print(f"Nearest {len(hits)} patients to {args.patient} in '{reference.name}', {what}, {args.metric} distance:")
    _print_hits(hits, reference, model, args.metric, max(args.depth, args.k))


def _numbers(tokens: list[str], count: int, option: str) -> list[float]:
    values = [t for token in tokens for t in token.split(",") if t.strip()]
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        numbers = []
    if len(numbers) != count:
        raise SimilarPatientsError(f"{option} needs {count} numbers (mm), e.g. {option}=-10.5,20,-130; got {tokens}.")
    return numbers


def _tumors(args) -> list:
    """The query patient's tumors as the options mark them (one per --segment, --point or --box)."""
    from .imaging.tumor import tumors_from

    return tumors_from(
        mask=args.mask,
        segments=args.segment,
        points=[_numbers(p, 3, "--point") for p in args.point or []],
        boxes=[_numbers(b, 6, "--box") for b in args.box or []],
        ras=args.ras,
    )


def _embed(args, progress: _Bars) -> None:
    from .imaging.ct_image import read_ct
    from .models import embedding_file
    from .models.embedder import Embedder

    image, tumors = read_ct(args.image), _tumors(args)
    embedder = Embedder(args.model, args.recipe, args.weights, args.accept_licence, args.device, progress=progress)
    embeddings = embedder.embed(image, tumors)
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


def _query(args, store: ReferenceStore, progress: _Bars) -> None:
    from .query import check_compatible, query_image

    reference = _open(args, store)
    model = _model_argument(args)
    several = fused.is_fused(model)
    if several and (args.recipe or args.weights):
        raise SimilarPatientsError(
            "--recipe and --weights are for one model; with several, each model uses its reference recipe and its "
            "cached weights (or $SIMILARPATIENTS_WEIGHTS_DIR)."
        )
    if args.print_sql or args.dry_run:  # embed here, then show or price the search instead of running it
        from .imaging.ct_image import read_ct
        from .models.embedder import Embedder

        names = fused.fused_models(reference, model) if several else [model]
        embedders = [
            Embedder(m, args.recipe, args.weights, args.accept_licence, args.device, progress=progress) for m in names
        ]
        for embedder in embedders:
            check_compatible(reference, embedder.spec.name, embedder.recipe.name, embedder.spec.dimension)
        image, tumors = read_ct(args.image), _tumors(args)
        vectors = {e.spec.name: np.stack([v.vector for v in e.embed(image, tumors)]) for e in embedders}
        progress.close()
        _statement_only(args, reference, model if several else embedders[0].spec.name, embeddings=vectors)
        return
    result = query_image(
        args.image,
        _tumors(args),
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
    )
    progress.close()
    if args.json:
        print(_json(result.hits))
        return
    tumors = result.embeddings[: len(result.embeddings) // max(len(result.models), 1)]
    seeds = "; ".join(", ".join(f"{v:.1f}" for v in e.seed) for e in tumors)
    what = "the tumor" if len(tumors) == 1 else f"the {len(tumors)} tumors"
    how = _fusion_words(args, list(result.models)) if several else f"model {result.model} ({result.recipe})"
    print(f"Nearest {len(result.hits)} patients to {what} at LPS ({seeds}) mm in '{reference.name}', {how}, "
          f"{args.metric} distance:")  # fmt: skip
    _print_hits(result.hits, reference, model, args.metric, max(args.depth, args.k))


def _push(args, store: ReferenceStore, progress: _Bars) -> None:
    from .cloud.client import connect
    from .cloud.push import push
    from .cloud.tables import parse_table
    from .util.optional import require

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
        progress=progress,
    )
    progress.close()
    for note in result.notes:
        print(f"note: {note}")
    print(
        f"Pushed '{reference.name}' to {table.path}: {result.rows} lesions, {result.bytes / 1e6:.1f} MB. Search it as "
        f"--reference {table.url}"
    )


def _models(args) -> None:
    from .models import registry, weights

    if args.action == "accept":
        spec = registry.get(args.name)
        if spec.weights is None:
            print(f"{spec.name} needs no weights: there is no licence to accept.")
            return
        if not spec.weights.needs_acknowledgement:
            print(
                f"{spec.name}'s weights are published under {spec.weights.licence}, which needs no acceptance: "
                f"nothing to accept, and nothing was recorded."
            )
            return
        weights.acknowledge(spec.name)
        print(f"Accepted for {spec.name}: {spec.weights.licence} ({spec.weights.url}).")
        return
    table = registry.summary()
    if args.json:
        print(_json(table))
    else:
        print(table.to_string(index=False))


def _demo(args, store: ReferenceStore, progress: _Bars) -> None:
    result = demo.run(store, patient=args.patient, k=args.k, metric=args.metric, progress=progress)
    progress.close()
    for note in result.notes:
        print(f"note: {note}")
    labels = ", ".join(
        f"{f} {result.query[f]}" for f in result.display_fields if f in result.query and pd.notna(result.query[f])
    )
    print(f"Query patient {result.patient} (NLST-Sybil): {labels}\n")
    for model, hits in result.hits.items():
        print(f"== {model}: {len(hits)} nearest patients ({args.metric} distance)")
        columns = ["rank", schema.PATIENT, *result.display_fields[:2], "distance", "viewer_url"]
        print(_table(hits[columns], digits=4) + "\n")
    print(result.reading())


def _explore(args, store: ReferenceStore, progress: _Bars) -> None:
    from .maps import embedding_map, figure, page

    if args.png:
        figure.check_format(Path(args.png))  # before minutes of projection, not after
    reference = store.open(args.reference)
    the_map = embedding_map.build(
        reference,
        args.model,
        method=args.method,
        metric=args.metric,
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


def _evaluate(args, store: ReferenceStore, progress: _Bars) -> None:
    from .evaluation import report, run
    from .references import fusion_verdict

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
        folds=args.folds, repeats=args.repeats, permutations=args.permutations, bootstrap=args.bootstrap, seed=args.seed
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


#: The exit status of an `index build` that finished with dead letters (2: refused, 0: every lesion built).
EXIT_DEAD_LETTERS = 3


def _index_build(args, beam_args: list[str]) -> int:
    from .pipeline import annotations, build, fetch, manifest
    from .util import files
    from .util.optional import require

    require("pipeline")
    require("embed")
    weights = {}
    for item in args.weights:
        model, _, path = item.partition("=")
        if not path:
            raise SimilarPatientsError(f"--weights takes MODEL=FILE, not '{item}'.")
        weights[model] = path
    loader = None
    out = args.out
    if args.bigquery:
        from .cloud.tables import parse_project, parse_table

        parse_table(args.bigquery)
        if args.billing_project:
            parse_project(args.billing_project)
        if not args.staging:
            raise SimilarPatientsError("--bigquery needs --staging DIR: the shards are written there, then loaded.")
        out, loader = args.staging, build.bigquery_loader(args.billing_project)
    out = files.check_folder(out, "--staging" if args.bigquery else "--out")  # before anything is read or embedded
    source = fetch.SeriesSource(cache=args.cache, bucket=args.source_bucket)
    if args.idc:
        if args.dicom_folder:
            source = fetch.SeriesSource.local(Path(args.dicom_folder))
        clinical = annotations.read_clinical(Path(args.labels)) if args.labels else None
        lesions = annotations.idc_lesions(args.idc, source, args.segment_type, labels=clinical, limit=args.limit)
        if not lesions:
            raise SimilarPatientsError(f"The annotations of {', '.join(args.idc)} hold no lesion of that type.")
    else:
        lesions = manifest.read_manifest(args.manifest)
        if args.dicom_folder:
            uids = {x.series for x in lesions if x.series} | {x.mark.series for x in lesions if x.mark.series}
            source = fetch.SeriesSource.local(Path(args.dicom_folder), sorted(uids))
    result = build.build_references(
        lesions,
        args.model,
        out,
        source,
        args.runner,
        beam_args,
        weights,
        args.accept_licence,
        args.device,
        args.batch_size,
        loader=loader,
        table=args.bigquery,
    )
    print(
        f"{result.embedded} rows embedded into {len(result.shards)} shard(s) in {out} ({result.added} added, "
        f"{result.replaced} replaced), {result.kept} already there and kept, {result.removed} removed, "
        f"{result.dead} dead letter(s) ({result.seconds:.0f} s)."
    )
    if args.bigquery:
        print(f"Loaded into {args.bigquery}; search it as --reference bq://{args.bigquery}")
    if result.dead:
        print(
            f"The dead letters say why each failed: {out.rstrip('/')}/dead-letters/ (exit status "
            f"{EXIT_DEAD_LETTERS}: the build completed without them; run it again to retry them)."
        )
        return EXIT_DEAD_LETTERS
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, beam_args = parser.parse_known_args(argv)
    if beam_args and (args.verb, getattr(args, "action", None)) != ("index", "build"):
        parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    store = ReferenceStore()
    progress = _Bars()
    try:
        if args.verb == "references":
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
                    print(_json(table))
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
        elif args.verb == "neighbors":
            _neighbors(args, store, progress)
        elif args.verb == "explore":
            _explore(args, store, progress)
        elif args.verb == "evaluate":
            _evaluate(args, store, progress)
        elif args.verb == "embed":
            _embed(args, progress)
        elif args.verb == "query":
            _query(args, store, progress)
        elif args.verb == "models":
            _models(args)
        elif args.verb == "index":
            status = _index_build(args, beam_args)
            sys.stdout.flush()
            return status
        else:
            _demo(args, store, progress)
    except SimilarPatientsError as error:
        progress.close()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other command-line tools do
        _silence_stdout()
        return 0
    except OSError as error:  # a file system that refuses a write the library does not know is ours
        progress.close()
        print(f"error: {error.strerror or error} ({error.filename or 'no file name'}).", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        progress.close()
        print("interrupted", file=sys.stderr)
        return 130
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
