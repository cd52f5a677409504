"""Build reference rows for many lesions on Apache Beam: plan what the output folder lacks (from the shards'
key files, never their embeddings), then read → crop → batched embedding (``RunInference``) → Parquet
shards named by their lesions, with dead letters for what fails, and record the build.

The lesions to embed travel as a file beside the shards (``_build/plan-<build>.jsonl.gz``) that the
pipeline reads, not in its graph: Dataflow refuses a job graph over 10 MB (about 12,000 lesions inside a
``beam.Create``). ``DirectRunner`` runs it here (``--direct_num_workers``,
``--direct_running_mode=multi_processing``); ``DataflowRunner`` runs the same graph on Google Cloud (see
docs/scale.md). The output folder is a reference source: ``similar-patients references import NAME
--source OUT``.

A folder follows its manifest: a lesion whose CT, mark or labels changed is embedded again and its old row
removed; a lesion no longer in the manifest is removed; the rest is kept. One build writes a folder at a
time (a lock), and the record ``_build.json`` says whether the last one completed.
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import gzip
import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import SimilarPatientsError
from ..models import registry
from ..models import weights as model_weights
from ..references import schema
from ..util import files
from ..util.optional import optional_import
from . import shards
from .fetch import SeriesSource
from .manifest import Lesion

log = logging.getLogger(__name__)

RUNNERS = ("DirectRunner", "DataflowRunner")
STAGES = ("read", "crop", "embed", "write")
#: Rows per shard (about; shards are filled by a hash of the lesion).
SHARD_ROWS = 256
PLANS = "_build"


class TableLoader(Protocol):
    """Where finished shards go besides the folder: a warehouse table loaded from the folder's shards
    (BigQuery: a load job, see ``cloud/``)."""

    def load_folder(self, folder: str, table: str) -> None: ...


class BigQueryShardLoader:
    """Shards into a BigQuery table exactly as ``references push`` loads a stored reference: the folder (a
    local one or ``gs://``) is imported as one reference (checked like any import, in a temporary data
    home), then loaded by the ``cloud`` package's push (atomic replace, its manifest in the description).

    Args:
        billing_project: the Google Cloud project billed (default: the table's).
        create_index: create the vector index when the table is large enough.
    """

    def __init__(self, billing_project: str | None = None, create_index: bool = False):
        self.billing_project = billing_project
        self.create_index = create_index

    def load_folder(self, folder: str, table: str) -> None:
        from ..cloud.client import connect
        from ..cloud.push import push
        from ..cloud.tables import parse_table
        from ..references.store import ReferenceStore
        from ..util.optional import require

        require("bigquery")
        destination = parse_table(table)
        with tempfile.TemporaryDirectory(prefix="similar-patients-push-") as home:
            reference = ReferenceStore(Path(home)).import_reference(destination.table, folder)
            result = push(
                reference, destination, connect(destination, self.billing_project), create_index=self.create_index
            )
            del reference  # its reader lock goes before its folder does
        for note in result.notes:
            log.info("BigQuery load of %s: %s", destination.path, note)


def check_beam_options(beam_args: Sequence[str], ours: Sequence[str] = ()) -> None:
    """Refuse an option Beam's own parser does not know (Beam would drop it with a log line, and a misspelt
    ``--dicom-foldr`` would build without the folder), naming the closest of ``ours`` and Beam's options."""
    beam = optional_import("apache_beam", "pipeline")
    options = beam.options.pipeline_options
    quiet = logging.getLogger(options.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "Discarding unparseable args" line: the refusal below says it
    try:
        known = options.PipelineOptions(list(beam_args)).get_all_options()
        every = options.PipelineOptions(list(beam_args)).get_all_options(retain_unknown_options=True)
    except SystemExit:  # Beam's parser refused a value (``--direct_num_workers=abc``), printing its usage
        raise SimilarPatientsError(
            f"Beam cannot read its options ({' '.join(beam_args)}); its message is above."
        ) from None
    finally:
        quiet.setLevel(level)
    unknown = set(every) - set(known)
    for arg in beam_args:
        name = arg.split("=", 1)[0]
        if name.startswith("-") and name.lstrip("-").replace("-", "_") in unknown:
            choices = [*ours, *(f"--{option}" for option in known)]
            close = difflib.get_close_matches(name, choices, n=1, cutoff=0.7)
            hint = f"; did you mean {close[0]}?" if close else "."
            raise SimilarPatientsError(
                f"Unknown option {name}{hint} It is neither `index build`'s nor Beam's (Beam would drop it and "
                f"build without it)."
            )


def bigquery_loader(billing_project: str | None = None, create_index: bool = False) -> TableLoader:
    """The BigQuery load of finished shards (extra ``bigquery``)."""
    return BigQueryShardLoader(billing_project, create_index)


@dataclass
class BuildResult:
    """What a build did: rows embedded now (``added`` new lesions, ``replaced`` changed ones), rows
    ``kept`` from earlier builds, rows ``removed`` (lesions no longer in the manifest, or changed ones of
    models not built now), dead letters, the shards written, wall seconds and the workers' seconds per
    stage (read, crop, embed, write). ``skipped`` is ``kept`` (its older name)."""

    embedded: int
    skipped: int
    dead: int
    shards: list = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)
    added: int = 0
    replaced: int = 0
    removed: int = 0
    build: str = ""

    @property
    def kept(self) -> int:
        return self.skipped


@dataclass
class Plan:
    """What a build must do to make the folder follow the manifest."""

    todo: dict  #: CT source -> [(lesion, models)]
    kept: int
    added: int
    replaced: int
    stale: dict  #: shard -> the row keys to drop from it (None: drop the whole shard)
    removed: int
    rebuilt: set = field(default_factory=set)  #: (patient, lesion, model) of the ``replaced`` pairs

    def built(self, dead: Sequence[dict]) -> tuple[int, int]:
        """(added, replaced): the pairs to embed that were embedded, not dead-lettered."""
        failed = {(d[schema.PATIENT], d[schema.LESION], d[schema.MODEL]) for d in dead}
        lost = len(failed & self.rebuilt)
        return self.added - (len(failed) - lost), self.replaced - lost


def plan(lesions: Sequence[Lesion], models: dict, out: str) -> Plan:
    """Compare the manifest with the rows the shards in ``out`` hold (read from their key files only)."""
    wanted = {(lesion.patient, lesion.lesion): lesion.digest() for lesion in lesions}
    rows, stale, removed = {}, {}, 0
    for shard, keys in shards.shard_keys(str(out)).items():
        if keys is None:  # a shard whose key file was lost: its rows' definitions are unknown
            stale[shard] = None
            continue
        for model, recipe, patient, lesion, digest in keys:
            same_recipe = model not in models or models[model].name == recipe  # another model's rows stay
            current = wanted.get((patient, lesion)) == digest and same_recipe
            if current and (model, recipe, patient, lesion) not in rows:
                rows[model, recipe, patient, lesion] = shard
            else:
                stale.setdefault(shard, set()).add((model, recipe, patient, lesion))
                removed += (patient, lesion) not in wanted or model not in models
    was_built = {(*key[2:], key[0]) for shard in stale for key in (stale[shard] or ())}
    todo, kept, added, rebuilt = {}, 0, 0, set()
    for lesion in lesions:
        missing = tuple(m for m, recipe in models.items() if lesion.key(m, recipe.name) not in rows)
        kept += len(models) - len(missing)
        for model in missing:
            if (lesion.patient, lesion.lesion, model) in was_built:
                rebuilt.add((lesion.patient, lesion.lesion, model))
            else:
                added += 1
        if missing:
            todo.setdefault(lesion.source, []).append((lesion, missing))
    return Plan(todo, kept, added, len(rebuilt), stale, removed, rebuilt)


def build_references(
    lesions: Sequence[Lesion],
    models: Sequence[str],
    out: Path | str,
    series: SeriesSource | None = None,
    runner: str = "DirectRunner",
    beam_args: Sequence[str] = (),
    weights: dict | None = None,
    accept_licence: bool = False,
    device: str | None = None,
    batch_size: int = 8,
    precision: str = "fp32",
    loader: TableLoader | None = None,
    table: str | None = None,
) -> BuildResult:
    """Embed ``lesions`` with every model of ``models`` into Parquet shards under ``out`` (then, with a
    ``loader``, into ``table``, also when nothing was left to embed: a failed load is retried). Rows
    already there with the same model, recipe and lesion definition are kept.

    Args:
        series: where series are found (a local DICOM folder, or IDC into a worker-local cache).
        runner: a Beam runner; ``beam_args``: its options (``--direct_num_workers=2``, ``--project``...).
        weights: model name -> weights file (else the site folder, the cache, or a download).
    """
    if runner not in RUNNERS:
        raise SimilarPatientsError(f"Unknown runner '{runner}'; use one of {', '.join(RUNNERS)}.")
    check_beam_options(beam_args)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SimilarPatientsError(
            f"--batch-size is the crops per forward pass: a whole number of 1 or more, not {batch_size!r}."
        )
    specs = [registry.get(m) for m in dict.fromkeys(models)]
    if not specs:
        raise SimilarPatientsError("Name at least one model to build with (--model).")
    if not lesions:
        raise SimilarPatientsError("The manifest has no lesions: nothing to build.")
    recipes = {spec.name: spec.recipe for spec in specs}
    given = {registry.get(k).name: str(v) for k, v in (weights or {}).items()}
    check_worker_paths(runner, beam_args, str(out), series, lesions, given)
    weights = _weights(specs, given, runner, accept_licence)
    device = worker_device(device, beam_args)
    out = files.check_folder(str(out), "The output folder (--out)")
    start = time.perf_counter()
    build = shards.new_build_id()
    with shards.BuildLock(out, build):
        shards.remove_temporaries(out)
        planned = plan(lesions, recipes, out)
        pairs = sum(len(m) for items in planned.todo.values() for _, m in items)
        record = {
            "build": build,
            "status": "running",
            "started": _now(),
            "models": {m: r.name for m, r in recipes.items()},
            "lesions": len(lesions),
            "pairs": len(lesions) * len(recipes),
            "to_embed": pairs,
            "kept": planned.kept,
        }
        shards.write_record(out, record)
        _prune(planned.stale, build)
        shards.clear_dead_letters(out)
        result = BuildResult(0, planned.kept, 0, build=build)
        if planned.todo:
            series = series or SeriesSource()
            run = _run(planned.todo, pairs, recipes, out, build, series, runner, beam_args, weights, accept_licence)
            result = run(device, batch_size, precision)
            result.skipped, result.build = planned.kept, build
        (result.added, result.replaced), result.removed = planned.built(shards.read_dead_letters(out)), planned.removed
        shards.remove_temporaries(out)
        record.update(
            status="complete",
            finished=_now(),
            embedded=result.embedded,
            dead=result.dead,
            added=result.added,
            replaced=result.replaced,
            removed=planned.removed,
            missing=pairs - result.embedded,
        )
        shards.write_record(out, record)
    result.seconds = time.perf_counter() - start
    if loader is not None and table:
        loader.load_folder(out, table)
    return result


def check_worker_paths(runner: str, beam_args, out: str, series, lesions=(), weights: dict | None = None) -> None:
    """Dataflow's workers read and write buckets, not this machine: local paths (the output folder, a DICOM
    folder, weights, the manifest's images and masks) are refused before anything is submitted, and so is
    a job without a container that carries the worker dependencies (Beam's own image has no torch, and
    the sdist ``--setup_file`` stages is installed without extras)."""
    if runner != "DataflowRunner":
        return
    local = []
    if not files.is_url(out):
        local.append(f"the output folder {out}")
    if series is not None and series.local_files is not None:
        local.append("the DICOM folder (--dicom-folder)")
    local += [f"{model}'s weights {path}" for model, path in (weights or {}).items() if not files.is_url(path)]
    paths = sorted(
        {x.image for x in lesions if x.image and not files.is_url(x.image)}
        | {x.mark.path for x in lesions if x.mark.path and not files.is_url(x.mark.path)}
    )
    if paths:
        local.append(f"{len(paths)} image or mask file(s) of the manifest, e.g. {paths[0]}")
    if local:
        raise SimilarPatientsError(
            f"Dataflow's workers cannot read or write files on this machine: {'; '.join(local)}. Copy them to "
            f"gs://BUCKET/… and name those (--out gs://…, --weights MODEL=gs://…, image/mask columns gs://…), fetch "
            f"the series from IDC (no --dicom-folder), or build here with --runner DirectRunner."
        )
    names = {a.split("=")[0] for a in beam_args}
    if "--setup_file" in names and "--no_use_public_ips" in names:
        raise SimilarPatientsError(
            "--setup_file with --no_use_public_ips: Beam's worker boot runs `pip install` on the staged sdist, which "
            "builds it in an isolated environment that fetches setuptools from PyPI, and workers without public IPs "
            "(and no Cloud NAT) reach no package index. The container (dataflow/Dockerfile) already holds the "
            "package: drop --setup_file, or rebuild the container with your changes."
        )
    if not names & {"--sdk_container_image", "--worker_harness_container_image"}:
        raise SimilarPatientsError(
            "A Dataflow build needs --sdk_container_image: Beam's default worker image has no torch, MONAI, "
            "SimpleITK, pydicom or idc-index, and Beam installs a --setup_file package without its extras. Build "
            "the container of docs/scale.md (dataflow/Dockerfile) and pass it."
        )


def worker_device(device: str | None, beam_args) -> str | None:
    """GPU workers (a ``worker_accelerator`` in the options) embed on CUDA or fail: never silently on the
    CPU while the GPU is billed (the worker's driver may not run the container's CUDA build)."""
    if device is None and any("worker_accelerator" in a for a in beam_args):
        return "cuda"
    return device


def _weights(specs, given: dict, runner: str, accept_licence: bool) -> dict:
    """Each model's weights checked before the build: here, resolved (a download once, verified, with a
    clear error offline); for Dataflow, whose workers fetch them, the licence accepted and a given file
    reachable."""
    resolved = {}
    for spec in specs:
        path = given.get(spec.name)
        if path and files.is_url(path):
            named = path + spec.weights.file_name if path.endswith("/") and spec.weights else path
            if not files.exists(named):
                raise SimilarPatientsError(f"The weights file for {spec.name}, {path}, does not exist.")
            resolved[spec.name] = path  # each worker copies it into its cache (models/weights.py)
            continue
        if path and not Path(path).exists():
            raise SimilarPatientsError(f"The weights file for {spec.name}, {path}, does not exist.")
        if runner == "DataflowRunner" and not path:
            state = model_weights.status(spec.name, spec.weights) if spec.weights else None
            if state is not None and state.needs_acceptance and not accept_licence:
                raise SimilarPatientsError(
                    f"{spec.name}'s weights are published under '{spec.weights.licence}'; accept it with "
                    f"--accept-licence (the workers download them)."
                )
            continue
        found = model_weights.resolve(spec.name, spec.weights, path, accept_licence)
        if found is not None:
            resolved[spec.name] = str(found)
    return resolved


def _prune(stale: dict, build: str) -> None:
    """Remove stale rows before anything is embedded: whole shards, or the stale rows of a shard."""
    for shard, keys in stale.items():
        if keys is None:
            shards.remove_shards([shard])
        else:
            shards.rewrite_without(shard, keys, build)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_plan(todo: dict, folder: str, build: str) -> str:
    """The lesions to embed as a file the pipeline reads (gzip JSON lines: lesion and models)."""
    lines = [
        json.dumps({"lesion": _as_json(lesion), "models": list(m)}) for items in todo.values() for lesion, m in items
    ]
    path = files.join(folder, PLANS, f"plan-{build}.jsonl.gz")
    return files.write(path, gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), compresslevel=5))


def read_plan(path: str):
    """(CT source, (lesion, models)) for every line of a plan file: on a worker, inside the pipeline."""
    for line in gzip.decompress(files.read(path)).decode("utf-8").splitlines():
        if line:
            item = json.loads(line)
            lesion = _from_json(item["lesion"])
            yield lesion.source, (lesion, tuple(item["models"]))


def _as_json(lesion: Lesion) -> dict:
    from dataclasses import asdict

    return asdict(lesion)


def _from_json(data: dict) -> Lesion:
    from .manifest import Mark

    mark = Mark(**{**data["mark"], "values": tuple(data["mark"]["values"])})
    labels = tuple((name, value) for name, value in data["labels"])
    return Lesion(data["patient"], data["lesion"], data["series"], data["image"], mark, labels)


def pipeline_graph(
    plan_path: str,
    pairs: int,
    recipes: dict,
    out: str,
    build: str,
    series,
    runner,
    beam_args,
    weights,
    accept_licence,
    device,
    batch_size,
    precision,
    columns,
):
    """The Beam pipeline of a build (not run): a plan file in, shards and dead letters out."""
    beam = optional_import("apache_beam", "pipeline")
    from . import stages

    options = beam.options.pipeline_options.PipelineOptions([f"--runner={runner}", *beam_args])
    pipeline = beam.Pipeline(options=options)
    tags = [stages.crops_tag(m) for m in recipes]
    share = device == "cuda" or any("worker_accelerator" in a for a in beam_args)
    cropped = (
        pipeline
        | "Plan" >> beam.Create([plan_path])
        | "Read the plan" >> beam.FlatMap(read_plan)
        | "Lesions by CT" >> beam.GroupByKey()
        | "Read and crop" >> beam.ParDo(stages.ReadAndCrop(recipes, series)).with_outputs(stages.DEAD, *tags)
    )
    rows, dead = [], [cropped[stages.DEAD]]
    for model, recipe in recipes.items():
        handler = stages.inference_handler(
            model, recipe.name, weights.get(model), accept_licence, device, batch_size, precision, share
        )
        embedded = (
            cropped[stages.crops_tag(model)]
            | f"Embed {model}" >> stages.inference.RunInference(handler).with_exception_handling()
        )
        main, failed = embedded
        split = main | f"Rows {model}" >> beam.FlatMap(stages.rows_or_dead_letters, model, recipe.name).with_outputs(
            stages.DEAD, main="rows"
        )
        rows.append(split.rows)
        dead.append(split[stages.DEAD])
        dead.append(failed.failed_inferences | f"Failed {model}" >> beam.FlatMap(stages.failed_batch, model))
    groups = max(1, math.ceil(pairs / SHARD_ROWS))
    _ = (
        rows
        | "All rows" >> beam.Flatten()
        | "Shard by lesion" >> beam.Map(stages.keyed_by_lesion, groups)
        | "Group shards" >> beam.GroupByKey()
        | "Write shards" >> beam.ParDo(stages.WriteShard(out, columns, build))
    )
    _ = (
        dead
        | "All dead letters" >> beam.Flatten()
        | "Batch dead letters" >> beam.BatchElements(min_batch_size=1, max_batch_size=1000)
        | "Write dead letters" >> beam.ParDo(stages.WriteDeadLetters(out))
    )
    return pipeline


def _run(todo, pairs, recipes, out, build, series, runner, beam_args, weights, accept_licence):
    def run(device, batch_size, precision) -> BuildResult:
        from . import stages

        columns = shards.row_schema([lesion for items in todo.values() for lesion, _ in items])
        plan_path = write_plan(todo, out, build)
        pipeline = pipeline_graph(
            plan_path,
            pairs,
            recipes,
            out,
            build,
            series,
            runner,
            beam_args,
            weights,
            accept_licence,
            device,
            batch_size,
            precision,
            columns,
        )
        before = set(shards.shard_files(out))
        try:
            with _beam_errors_held():
                state = pipeline.run()
                state.wait_until_finish()
        except Exception as error:  # a worker's error, as Beam wraps it
            raise stages.explained(error, out) from None
        finally:
            files.delete([plan_path])
        return _result(state, stages, out, before)

    return run


class _HeldErrors(logging.Handler):
    """Beam's log records during a run: ERROR and above held, the rest passed on to the root logger's
    handlers as they would have gone."""

    def __init__(self):
        super().__init__()
        self.held: list = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.held.append(record)
        else:
            logging.getLogger().handle(record)


@contextlib.contextmanager
def _beam_errors_held():
    """Beam logs a failing bundle's error with its traceback before it raises it; the build says that
    failure in one line (:func:`stages.explained`), so the user does not read it twice, once as a
    traceback. Held records go to this module's debug log when the run fails, and out as they came when
    it succeeds."""
    beam_log = logging.getLogger("apache_beam")
    holder, propagate = _HeldErrors(), beam_log.propagate
    beam_log.addHandler(holder)
    beam_log.propagate = False
    try:
        yield
    except BaseException:
        for record in holder.held:
            log.debug("Beam logged, before the failure: %s", record.getMessage())
        raise
    else:
        for record in holder.held:
            logging.getLogger().handle(record)
    finally:
        beam_log.removeHandler(holder)
        beam_log.propagate = propagate


def _result(state, stages, out: str, before: set) -> BuildResult:
    metrics = state.metrics().query()
    stage_seconds = {}
    for distribution in metrics["distributions"]:
        name = distribution.key.metric.name.removesuffix("_ms")
        if distribution.key.metric.namespace == stages.NAMESPACE and name in STAGES:
            stage_seconds[name] = stage_seconds.get(name, 0.0) + distribution.committed.sum / 1000
    counts = {stages.ROWS: 0, stages.DEAD_LETTERS: 0}
    for counter in metrics["counters"]:
        if counter.key.metric.namespace == stages.NAMESPACE and counter.key.metric.name in counts:
            counts[counter.key.metric.name] += counter.committed
    new_shards = sorted(set(shards.shard_files(out)) - before)
    log.info(
        "built %d rows in %d shards, %d dead letters, into %s",
        counts[stages.ROWS],
        len(new_shards),
        counts[stages.DEAD_LETTERS],
        out,
    )
    return BuildResult(counts[stages.ROWS], 0, counts[stages.DEAD_LETTERS], new_shards, 0.0, stage_seconds)
