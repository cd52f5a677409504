"""``similar-patients index build``: reference rows for many lesions, embedded on Apache Beam."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SimilarPatientsError
from .options import whole

#: The exit status of an `index build` that finished with dead letters (2: refused, 0: every lesion built).
EXIT_DEAD_LETTERS = 3


def add(verbs) -> None:
    index = verbs.add_parser("index", help="build reference rows for many lesions on Apache Beam")
    index_actions = index.add_subparsers(dest="action", required=True)
    build = index_actions.add_parser(
        "build",
        help="embed a manifest's lesions (or IDC's annotations); other --options go to Beam",
        allow_abbrev=False,  # Beam's options pass through untouched
    )
    _build_options(build)
    build.set_defaults(build_options=[name for action in build._actions for name in action.option_strings])


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
    build.add_argument("--batch-size", type=whole(1), default=8, help="crops per forward pass (default 8)")
    build.add_argument(
        "--source-bucket",
        choices=("gcs", "aws"),
        default="gcs",
        help="IDC's copy the workers download from (default gcs: free in Google Cloud, no external IPs needed)",
    )
    build.add_argument("--billing-project", metavar="PROJECT", help="with --bigquery: the project the load bills")


def run(args, beam_args: list[str]) -> int:
    from ..pipeline import annotations, build, fetch, manifest
    from ..util import files
    from ..util.optional import require

    require("pipeline")
    require("embed")
    build.check_beam_options(beam_args, args.build_options)  # before anything is read
    weights = {}
    for item in args.weights:
        model, _, path = item.partition("=")
        if not path:
            raise SimilarPatientsError(f"--weights takes MODEL=FILE, not '{item}'.")
        weights[model] = path
    loader = None
    out = args.out
    if args.bigquery:
        from ..cloud.tables import parse_project, parse_table

        parse_table(args.bigquery)
        if args.billing_project:
            parse_project(args.billing_project)
        if not args.staging:
            raise SimilarPatientsError("--bigquery needs --staging DIR: the shards are written there, then loaded.")
        out, loader = args.staging, build.bigquery_loader(args.billing_project)
    build.check_worker_paths(args.runner, beam_args, out, None, (), weights)  # before a local folder is made
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
