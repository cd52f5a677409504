"""Push a stored reference to a BigQuery table: the same columns as its Parquet, loaded by one load job.

BigQuery has no float32 vectors, so the embedding travels as ``ARRAY<FLOAT64>`` holding the float32
values exactly. The Parquet is loaded into a new staging table beside the destination, then one
``CREATE OR REPLACE TABLE … CLUSTER BY model, PatientID OPTIONS(description=…) AS SELECT * FROM staging``
statement replaces the destination whole: a query job's DDL is applied atomically when it succeeds, so a
reader sees the old table or the new one, never a mix, and a failed push leaves the old one in use. A
load job cannot do it: its description is "only used if the destination table is newly created. If the
table already exists and a value different than the current description is provided, the job will fail"
(BigQuery REST reference, ``DestinationTableProperties.description``), and the description changes with
every re-push. The manifest (models, recipes, label and display fields, the most lesions of one patient,
the index) is kept in that description, which :class:`.remote.BigQueryReference` reads. The table is
clustered by (model, PatientID), so a search by one patient reads that patient's blocks only.

A vector index (cosine, ``STORING`` every other column) is made per model — one model per indexed table,
since k-means lists over several models' embedding spaces would mix them — when asked and when the table
is large enough for BigQuery to populate one (10 MB).
"""

from __future__ import annotations

import datetime
import json
import logging
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import SimilarPatientsError
from ..progress import ProgressCallback, report
from ..references import schema
from ..references.reference import Reference
from ..references.writer import PARQUET
from ..search.correction import CORRECTED, RAW, SPACES
from . import client as bq
from . import corrected
from .sql import ADDED_COLUMNS, INDEX_NAME, drop_index_statement, index_statement
from .tables import TableName, column

#: BigQuery never populates a vector index on a table smaller than this.
INDEX_MINIMUM_BYTES = 10 * 1000 * 1000
#: The key of the description's JSON that marks a table pushed by this library.
DESCRIPTION_KEY = "similar_patients"
_DESCRIPTION_LIMIT = 16384
_BATCH_ROWS = 16384
#: The columns the table is clustered by: a search reads one model, a search by patient one patient.
CLUSTER_COLUMNS = (schema.MODEL, schema.PATIENT)
#: A staging table left by a killed push expires by itself after this long.
STAGING_HOURS = 24
log = logging.getLogger(__name__)


@dataclass
class PushResult:
    table: TableName
    rows: int
    bytes: int
    index: str | None  #: the index type created, or None
    notes: list = field(default_factory=list)


def write_upload(reference: Reference, path: Path, models: Sequence[str] | None = None) -> tuple[int, dict]:
    """Write the Parquet a push loads: the reference's canonical table (``models``: a subset, default all)
    with float64 embeddings, converted batch by batch so that memory stays bounded, and each row's corrected
    space (:mod:`.corrected`: its augmented vector and radius, from the reference's recorded statistics).
    Returns its rows and, per model, the statistics (centre, scale, digest, the reference's file records)."""
    source = pq.ParquetFile(reference.verified(PARQUET))  # checked against its digest first
    names = source.schema_arrow.names
    clashing = [c for c in names if c in (*ADDED_COLUMNS, corrected.COLUMN, corrected.RADIUS)]
    if clashing:
        raise SimilarPatientsError(
            f"Reference '{reference.name}' has column(s) {clashing}, which BigQuery searches add to their results; "
            f"rename them in the source and import it again before pushing."
        )
    for name in names:
        column(name)  # every name must be usable in SQL
    wanted = pa.array(sorted(models or reference.models), type=pa.string())
    spaces = {}
    for model in wanted.to_pylist():
        reference.model_info(model)  # a clear error for a model it lacks
        spaces[model] = reference.space(model, space=CORRECTED, metric=corrected.METRIC)
    position = names.index(schema.EMBEDDING)
    target = source.schema_arrow.set(position, pa.field(schema.EMBEDDING, pa.list_(pa.float64())))
    target = target.append(pa.field(corrected.COLUMN, pa.list_(pa.float64()))).append(
        pa.field(corrected.RADIUS, pa.float64())
    )
    rows = 0
    seen = dict.fromkeys(spaces, 0)  # rows of each model written so far: its matrix row of the next one
    with pq.ParquetWriter(path, target) as writer:
        for batch in source.iter_batches(batch_size=_BATCH_ROWS):
            table = pa.Table.from_batches([batch])
            table = table.filter(pc.is_in(table.column(schema.MODEL).cast(pa.string()), value_set=wanted))
            embedding = table.column(schema.EMBEDDING).cast(pa.list_(pa.float64()))
            table = table.set_column(position, schema.EMBEDDING, embedding)
            which = table.column(schema.MODEL).cast(pa.string()).to_numpy(zero_copy_only=False)
            lengths = np.array([spaces[m].dim + 1 for m in which], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            values, radii = np.empty(int(offsets[-1])), np.empty(len(which))
            for model in np.unique(which):  # each row's vector written in place in one flat array
                at = np.flatnonzero(which == model)
                found, radii[at] = corrected.augmented(spaces[model], np.arange(seen[model], seen[model] + len(at)))
                values[offsets[at][:, None] + np.arange(found.shape[1])] = found
                seen[model] += len(at)
            vectors = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
            table = table.append_column(corrected.COLUMN, vectors)
            writer.write_table(table.append_column(corrected.RADIUS, pa.array(radii, type=pa.float64())))
            rows += table.num_rows
    statistics = {}
    for model, space in spaces.items():
        folder = f"models/{reference.model_info(model).folder}"
        files = reference.manifest.get("files", {})
        records = {
            name: files[f"{folder}/{name}"]
            for name in ("centre.npy", "scale.npy", f"radii-{corrected.METRIC}.npy")
            if f"{folder}/{name}" in files
        }
        centre, scale = space.correction.centre, space.correction.scale
        statistics[model] = {
            "centre": centre,
            "scale": scale,
            "digest": corrected.digest(centre, scale),
            "files": records,
            "radius_range": [float(space.correction.radii.min()), float(space.correction.radii.max())],
        }
    return rows, statistics


def write_statistics(path: Path, statistics: Mapping[str, dict]) -> None:
    """The statistics table's Parquet: per model its centre and scale (float64)."""
    models = sorted(statistics)
    table = pa.table(
        {
            "model": pa.array(models, pa.string()),
            "centre": pa.array([statistics[m]["centre"] for m in models], pa.list_(pa.float64())),
            "scale": pa.array([statistics[m]["scale"] for m in models], pa.list_(pa.float64())),
        }
    )
    pq.write_table(table, path)


def bigquery_types(arrow_schema: pa.Schema) -> dict[str, str]:
    """Each column's BigQuery type as a Parquet load creates it (with list inference)."""
    types = {}
    for f in arrow_schema:
        if pa.types.is_floating(f.type):
            types[f.name] = "FLOAT64"
        elif pa.types.is_integer(f.type):
            types[f.name] = "INT64"
        elif pa.types.is_boolean(f.type):
            types[f.name] = "BOOL"
        elif pa.types.is_list(f.type) or pa.types.is_large_list(f.type):
            types[f.name] = "ARRAY"
        elif pa.types.is_timestamp(f.type):
            types[f.name] = "TIMESTAMP"
        else:
            types[f.name] = "STRING"
    return types


def description(
    reference: Reference, models: Sequence[str], index: Mapping | None = None, space: Mapping | None = None
) -> str:
    """The manifest kept in the table's description: what a search needs before it runs (``space``: the
    corrected space's entry, :func:`.corrected.description`)."""
    most = {m: int(reference.lesions(m)[schema.PATIENT].value_counts().max()) for m in models}
    manifest = {
        "name": reference.name,
        "source": reference.manifest.get("source"),
        "created": reference.manifest.get("created"),
        "models": {m: {**reference.manifest["models"][m], "max_lesions": most[m]} for m in sorted(models)},
        "label_fields": reference.label_fields,
        "display_fields": reference.display_fields,
        "index": dict(index) if index else None,
        "corrected": dict(space) if space else None,
    }
    text = json.dumps({DESCRIPTION_KEY: manifest}, separators=(",", ":"))
    if len(text) > _DESCRIPTION_LIMIT:
        raise SimilarPatientsError(
            f"The reference's manifest takes {len(text)} characters, over BigQuery's {_DESCRIPTION_LIMIT} for a table "
            f"description (too many models or label fields); push fewer models at a time (--model)."
        )
    return text


def index_columns(reference: Reference) -> list[str]:
    """What the index stores: every column but the vectors, so that every filter is a pre-filter."""
    vectors = (schema.EMBEDDING, corrected.COLUMN)
    return [c for c in pq.read_schema(reference.verified(PARQUET)).names if c not in vectors] + [corrected.RADIUS]


def push(
    reference: Reference,
    destination: TableName,
    client,
    *,
    models: Sequence[str] | None = None,
    create_index: bool = False,
    index_type: str = "IVF",
    index_space: str = CORRECTED,
    progress: ProgressCallback | None = None,
) -> PushResult:
    """Load the reference into ``destination`` (replacing it atomically), with its corrected space and the
    statistics table beside it, then create its vector index: on the corrected space's vectors
    (``DOT_PRODUCT``, what the default search asks) or, ``index_space="raw"``, on the stored embeddings (cosine)."""
    module = bq.bigquery()
    models = sorted(models or reference.models)
    stored = index_columns(reference)
    if index_space not in SPACES:
        raise SimilarPatientsError(f"Unknown index space '{index_space}'; choose {' or '.join(SPACES)}.")
    indexed, distance = (corrected.COLUMN, "DOT_PRODUCT") if index_space == CORRECTED else (schema.EMBEDDING, "COSINE")
    if index_space == RAW:
        stored = stored[:-1]  # the radius column is read by corrected searches only
    if create_index:
        index_statement(destination, stored, index_type, indexed, distance)  # refuse a bad type before loading
        if len(models) > 1:
            lengths = ", ".join(f"{m} ({reference.model_info(m).dim})" for m in models)
            raise SimilarPatientsError(
                f"A vector index is made per model: its lists are k-means clusters of one embedding space, and "
                f"these models' spaces would be mixed ({lengths}). Push each model to its own table: --model M "
                f"--bigquery PROJECT.DATASET.TABLE_M --create-index."
            )
    previous = _previous_statistics(client, destination)
    staging = destination.beside(f"{destination.table}__staging_{uuid.uuid4().hex[:12]}")
    config = module.LoadJobConfig(
        source_format=module.SourceFormat.PARQUET,
        write_disposition=module.WriteDisposition.WRITE_EMPTY,  # a new table: nothing else writes there
        create_disposition=module.CreateDisposition.CREATE_IF_NEEDED,
    )
    parquet = module.ParquetOptions()
    parquet.enable_list_inference = True
    config.parquet_options = parquet
    space, replaced = None, False
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "reference.parquet"
            rows, statistics = write_upload(reference, path, models)
            space = corrected.description(
                destination,
                {m: {k: v for k, v in s.items() if k not in ("centre", "scale")} for m, s in statistics.items()},
            )
            # the statistics first, under a name of their own: the old table's readers keep theirs
            write_statistics(Path(folder) / "statistics.parquet", statistics)
            report(progress, 0, 3, f"loading {rows} lesions into {destination.path}")
            with bq.translated(destination), open(Path(folder) / "statistics.parquet", "rb") as stream:
                overwrite = module.LoadJobConfig(
                    source_format=module.SourceFormat.PARQUET,
                    write_disposition=module.WriteDisposition.WRITE_TRUNCATE,  # the same statistics: same content
                    create_disposition=module.CreateDisposition.CREATE_IF_NEEDED,
                    parquet_options=parquet,
                )
                client.load_table_from_file(
                    stream, destination.beside(space["table"]).path, job_config=overwrite
                ).result()
            with bq.translated(destination), open(path, "rb") as stream:
                client.load_table_from_file(stream, staging.path, job_config=config).result()
        with bq.translated(destination):
            loaded = client.get_table(staging.path)
            loaded.expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=STAGING_HOURS)
            client.update_table(loaded, ["expires"])  # a killed push leaves nothing for long
            # a query job, billed on the staging table it reads (once per push): limited to exactly that
            limit = max(int(loaded.num_bytes or 0), bq.MINIMUM_BILLED)
            config = module.QueryJobConfig(maximum_bytes_billed=limit)
            text = replace_statement(destination, staging, description(reference, models, space=space))
            client.query(text, job_config=config).result()
            replaced = True
    finally:
        with bq.translated(destination):
            client.delete_table(staging.path, not_found_ok=True)
            if space is not None and not replaced and space["table"] != previous:
                # statistics no table names: a failed push leaves none behind (the old table keeps its own)
                client.delete_table(destination.beside(space["table"]).path, not_found_ok=True)
    if previous is not None and previous != space["table"]:
        with bq.translated(destination):
            client.delete_table(destination.beside(previous).path, not_found_ok=True)
    with bq.translated(destination):
        loaded = client.get_table(destination.path)
    result = PushResult(destination, int(loaded.num_rows or rows), int(loaded.num_bytes or 0), None)
    log.info("pushed '%s' to %s: %d rows, %d bytes", reference.name, destination.path, result.rows, result.bytes)
    if not create_index or result.bytes < INDEX_MINIMUM_BYTES:
        with bq.translated(destination):
            client.query(drop_index_statement(destination).sql).result()
    if not create_index:
        return result
    if result.bytes < INDEX_MINIMUM_BYTES:
        result.notes.append(
            f"no vector index: the table holds {result.bytes / 1e6:.1f} MB, and BigQuery never populates an index "
            f"on a table under {INDEX_MINIMUM_BYTES / 1e6:.0f} MB; searches scan it exactly, which at this size "
            f"costs little (see --dry-run)"
        )
        return result
    report(progress, 1, 3, f"creating the {index_type} vector index")
    with bq.translated(destination):
        client.query(index_statement(destination, stored, index_type, indexed, distance).sql).result()
        loaded = client.get_table(destination.path)  # its etag now: the patch is refused against an older one
        index = {"name": INDEX_NAME, "type": index_type, "distance": distance, "column": indexed, "stored": stored}
        loaded.description = description(reference, models, index, space)
        client.update_table(loaded, ["description"])  # tables.patch may change a description; a load may not
    result.index = index_type
    result.notes.append(
        f"{index_type} vector index '{INDEX_NAME}' created on {indexed} ({distance.lower()}, the {index_space} space; "
        f"storing {len(stored)} columns); BigQuery builds it in the background: until it is populated, searches "
        f"scan exactly and say that the index was not used"
    )
    report(progress, 3, 3, "pushed")
    return result


def _previous_statistics(client, destination: TableName) -> str | None:
    """The statistics table the destination's current description names (deleted once it is replaced)."""
    try:
        with bq.translated(destination):
            text = client.get_table(destination.path).description
    except SimilarPatientsError:  # none yet (or unreadable: the push says why when it loads)
        return None
    try:
        return (json.loads(text or "")[DESCRIPTION_KEY].get("corrected") or {}).get("table")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def replace_statement(destination: TableName, staging: TableName, text: str) -> str:
    """``CREATE OR REPLACE TABLE`` the destination from the staging table, clustered, with its description
    as a string literal (DDL options take constant expressions, not query parameters)."""
    clustering = ", ".join(column(c) for c in CLUSTER_COLUMNS)
    return (
        f"CREATE OR REPLACE TABLE {destination.sql}\nCLUSTER BY {clustering}\n"
        f"OPTIONS(description = {string_literal(text)})\nAS SELECT * FROM {staging.sql}"
    )


def string_literal(text: str) -> str:
    """``text`` as a GoogleSQL double-quoted string literal: backslashes and quotes escaped, ASCII only."""
    if not text.isascii() or any(ord(c) < 32 for c in text):
        raise SimilarPatientsError("A table description must be printable ASCII (the manifest is written as JSON).")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
