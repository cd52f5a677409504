"""Build reference rows for many lesions on Apache Beam: plan what is not embedded yet, then read → crop →
batched embedding (``RunInference``) → Parquet shards, with dead letters for what fails.

``DirectRunner`` runs it here (``--direct_num_workers``, ``--direct_running_mode=multi_processing``);
``DataflowRunner`` runs the same graph on Google Cloud (see docs/scale.md). The output folder is a
reference source: ``similar-patients references import NAME --source OUT``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import SimilarPatientsError
from ..models import registry
from ..util.optional import optional_import
from . import shards
from .fetch import SeriesSource
from .manifest import Lesion

log = logging.getLogger(__name__)

RUNNERS = ("DirectRunner", "DataflowRunner")
STAGES = ("read", "crop", "embed", "write")


class TableLoader(Protocol):
    """Where finished shards go besides the folder: a warehouse table loaded from the Parquet files
    (BigQuery: a load job, see ``cloud/``)."""

    def load_parquet(self, files: Sequence[Path], table: str) -> None: ...


class BigQueryShardLoader:
    """Shards into a BigQuery table exactly as ``references push`` loads a stored reference: the shards are
    imported as one reference (checked like any import, in a temporary data home), then loaded by the
    ``cloud`` package's one Parquet load job (atomic replace, its manifest in the table description).

    Args:
        billing_project: the Google Cloud project billed (default: the table's).
        create_index: create the vector index when the table is large enough.
    """

    def __init__(self, billing_project: str | None = None, create_index: bool = False):
        self.billing_project = billing_project
        self.create_index = create_index

    def load_parquet(self, files: Sequence[Path], table: str) -> None:
        from ..cloud.client import connect
        from ..cloud.push import push
        from ..cloud.tables import parse_table
        from ..references.store import ReferenceStore
        from ..util.optional import require

        require("bigquery")
        folders = {str(Path(f).parent) for f in files}
        if len(folders) != 1:
            raise SimilarPatientsError(f"The shards to load lie in {len(folders)} folders; expected one.")
        destination = parse_table(table)
        with tempfile.TemporaryDirectory(prefix="similar-patients-push-") as home:
            reference = ReferenceStore(Path(home)).import_reference(destination.table, folders.pop())
            result = push(
                reference, destination, connect(destination, self.billing_project), create_index=self.create_index
            )
            del reference  # its reader lock goes before its folder does
        for note in result.notes:
            log.info("BigQuery load of %s: %s", destination.path, note)


def bigquery_loader(billing_project: str | None = None, create_index: bool = False) -> TableLoader:
    """The BigQuery load of finished shards (extra ``bigquery``)."""
    return BigQueryShardLoader(billing_project, create_index)


@dataclass
class BuildResult:
    """What a build did: rows embedded now, lesion-model pairs skipped as already embedded, dead letters,
    the shards written, wall seconds and the workers' seconds per stage (read, crop, embed, write)."""

    embedded: int
    skipped: int
    dead: int
    shards: list = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)


def plan(lesions: Sequence[Lesion], models: dict, out: str) -> tuple[dict, int]:
    """The lesions still to embed, grouped by CT source: {source: [(lesion, models)]}, and how many
    (lesion, model) pairs the shards in ``out`` already hold with the same recipe."""
    done = shards.embedded_keys(str(out))
    todo, skipped = {}, 0
    for lesion in lesions:
        wanted = tuple(m for m, recipe in models.items() if lesion.key(m, recipe.name) not in done)
        skipped += len(models) - len(wanted)
        if wanted:
            todo.setdefault(lesion.source, []).append((lesion, wanted))
    return todo, skipped


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
    ``loader``, into ``table``). Lesions embedded already with the same model and recipe are skipped.

    Args:
        series: where series are found (a local DICOM folder, or IDC into a worker-local cache).
        runner: a Beam runner; ``beam_args``: its options (``--direct_num_workers=2``, ``--project``...).
        weights: model name -> weights file (else the site folder, the cache, or a download on the worker).
    """
    if runner not in RUNNERS:
        raise SimilarPatientsError(f"Unknown runner '{runner}'; use one of {', '.join(RUNNERS)}.")
    specs = [registry.get(m) for m in dict.fromkeys(models)]
    if not specs:
        raise SimilarPatientsError("Name at least one model to build with (--model).")
    recipes = {spec.name: spec.recipe for spec in specs}
    weights = {registry.get(k).name: str(v) for k, v in (weights or {}).items()}
    for name, path in weights.items():
        if not Path(path).exists() and not str(path).startswith("gs://"):
            raise SimilarPatientsError(f"The weights file for {name}, {path}, does not exist.")
    out = str(out)  # a folder, or a URL such as gs://bucket/path on Dataflow
    todo, skipped = plan(lesions, recipes, out)
    if not todo:
        log.info("nothing to build: all %d lesion-model pairs are in %s", skipped, out)
        return BuildResult(0, skipped, 0)
    series = series or SeriesSource()
    start = time.perf_counter()
    result = _run(todo, recipes, out, series, runner, beam_args, weights, accept_licence, device, batch_size, precision)
    result.skipped, result.seconds = skipped, time.perf_counter() - start
    if loader is not None and table:
        loader.load_parquet(shards.shard_files(out), table)
    return result


def _run(todo, recipes, out, series, runner, beam_args, weights, accept_licence, device, batch_size, precision):
    beam = optional_import("apache_beam", "pipeline")
    from . import stages

    options = beam.options.pipeline_options.PipelineOptions([f"--runner={runner}", *beam_args])
    columns = shards.row_schema([lesion for items in todo.values() for lesion, _ in items])
    pipeline = beam.Pipeline(options=options)
    tags = [stages.crops_tag(m) for m in recipes]
    cropped = (
        pipeline
        | "Lesions by series" >> beam.Create(sorted(todo.items(), key=lambda item: item[0]))
        | "Reshuffle" >> beam.Reshuffle()
        | "Read and crop" >> beam.ParDo(stages.ReadAndCrop(recipes, series)).with_outputs(stages.DEAD, *tags)
    )
    rows, dead = [], [cropped[stages.DEAD]]
    for model, recipe in recipes.items():
        handler = inference_handler(stages, model, recipe.name, weights, accept_licence, device, batch_size, precision)
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
    _ = (
        rows
        | "All rows" >> beam.Flatten()
        | "Batch rows" >> beam.BatchElements(min_batch_size=1, max_batch_size=512)
        | "Write shards" >> beam.ParDo(stages.WriteShard(out, columns))
    )
    _ = (
        dead
        | "All dead letters" >> beam.Flatten()
        | "Batch dead letters" >> beam.BatchElements(min_batch_size=1, max_batch_size=1000)
        | "Write dead letters" >> beam.ParDo(stages.WriteDeadLetters(out))
    )
    before = set(shards.shard_files(out))
    state = pipeline.run()
    state.wait_until_finish()
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


def inference_handler(stages, model, recipe, weights, accept_licence, device, batch_size, precision):
    """Our model handler, keyed by lesion, so each embedding comes back with its lesion."""
    handler = stages.EmbedderHandler(
        model, recipe, weights.get(model), accept_licence, device, batch_size=batch_size, precision=precision
    )
    return stages.inference.KeyedModelHandler(handler)
