"""Push a stored reference to a BigQuery table: the same columns as its Parquet, loaded by one load job.

BigQuery has no float32 vectors, so the embedding travels as ``ARRAY<FLOAT64>`` holding the float32
values exactly. The load job truncates the table (``WRITE_TRUNCATE``): BigQuery applies it atomically when
the job succeeds, so a re-push replaces the table whole, and a failed one leaves the previous table as it
was. What the local manifest says (models, recipes, label and display fields, the most lesions of one
patient, the index) is kept in the table's description, which :class:`.remote.BigQueryReference` reads.
A vector index (cosine, ``STORING`` the columns filters use) is created when asked and when the table is
large enough for BigQuery to populate one (10 MB).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import SimilarPatientsError
from ..progress import ProgressCallback, report
from ..references import schema
from ..references.reference import Reference
from . import client as bq
from .sql import ADDED_COLUMNS, INDEX_NAME, index_statement
from .tables import TableName, column

#: BigQuery never populates a vector index on a table smaller than this.
INDEX_MINIMUM_BYTES = 10 * 1000 * 1000
#: The key of the description's JSON that marks a table pushed by this library.
DESCRIPTION_KEY = "similar_patients"
_DESCRIPTION_LIMIT = 16384
_BATCH_ROWS = 16384
log = logging.getLogger(__name__)


@dataclass
class PushResult:
    table: TableName
    rows: int
    bytes: int
    index: str | None  #: the index type created, or None
    notes: list = field(default_factory=list)


def write_upload(reference: Reference, path: Path, models: Sequence[str] | None = None) -> int:
    """Write the Parquet a push loads: the reference's canonical table (``models``: a subset, default all)
    with float64 embeddings, converted batch by batch so that memory stays bounded. Returns its rows."""
    source = pq.ParquetFile(reference.verified("reference.parquet"))  # checked against its digest first
    names = source.schema_arrow.names
    clashing = [c for c in names if c in ADDED_COLUMNS]
    if clashing:
        raise SimilarPatientsError(
            f"Reference '{reference.name}' has column(s) {clashing}, which BigQuery searches add to their results; "
            f"rename them in the source and import it again before pushing."
        )
    for name in names:
        column(name)  # every name must be usable in SQL
    wanted = pa.array(sorted(models or reference.models), type=pa.string())
    for model in wanted.to_pylist():
        reference.model_info(model)  # a clear error for a model it lacks
    position = names.index(schema.EMBEDDING)
    target = source.schema_arrow.set(position, pa.field(schema.EMBEDDING, pa.list_(pa.float64())))
    rows = 0
    with pq.ParquetWriter(path, target) as writer:
        for batch in source.iter_batches(batch_size=_BATCH_ROWS):
            table = pa.Table.from_batches([batch])
            table = table.filter(pc.is_in(table.column(schema.MODEL).cast(pa.string()), value_set=wanted))
            embedding = table.column(schema.EMBEDDING).cast(pa.list_(pa.float64()))
            writer.write_table(table.set_column(position, schema.EMBEDDING, embedding))
            rows += table.num_rows
    return rows


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


def description(reference: Reference, models: Sequence[str], index: Mapping | None = None) -> str:
    """The manifest kept in the table's description: what a search needs before it runs."""
    most = {m: int(reference.lesions(m)[schema.PATIENT].value_counts().max()) for m in models}
    manifest = {
        "name": reference.name,
        "source": reference.manifest.get("source"),
        "created": reference.manifest.get("created"),
        "models": {m: {**reference.manifest["models"][m], "max_lesions": most[m]} for m in sorted(models)},
        "label_fields": reference.label_fields,
        "display_fields": reference.display_fields,
        "index": dict(index) if index else None,
    }
    text = json.dumps({DESCRIPTION_KEY: manifest}, separators=(",", ":"))
    if len(text) > _DESCRIPTION_LIMIT:
        raise SimilarPatientsError(
            f"The reference's manifest takes {len(text)} characters, over BigQuery's {_DESCRIPTION_LIMIT} for a table "
            f"description (too many models or label fields); push fewer models at a time (--model)."
        )
    return text


def index_columns(reference: Reference) -> list[str]:
    """What the index stores: every column but the embedding, so that every filter is a pre-filter."""
    return [c for c in pq.read_schema(reference.verified("reference.parquet")).names if c != schema.EMBEDDING]


def push(
    reference: Reference,
    destination: TableName,
    client,
    *,
    models: Sequence[str] | None = None,
    create_index: bool = False,
    index_type: str = "IVF",
    progress: ProgressCallback | None = None,
) -> PushResult:
    """Load the reference into ``destination`` (replacing it atomically), then create its vector index."""
    module = bq.bigquery()
    models = sorted(models or reference.models)
    lengths = {m: reference.model_info(m).dim for m in models}
    stored = index_columns(reference)
    if create_index:
        index_statement(destination, stored, index_type)  # refuse a bad type before loading
        if len(set(lengths.values())) > 1:
            raise SimilarPatientsError(
                f"A vector index needs embeddings of one length, and these models differ: "
                f"{', '.join(f'{m} {d}' for m, d in sorted(lengths.items()))}. Push one model (or models of one "
                f"length) per table: --model M --bigquery PROJECT.DATASET.TABLE_M --create-index."
            )
    config = module.LoadJobConfig(
        source_format=module.SourceFormat.PARQUET,
        write_disposition=module.WriteDisposition.WRITE_TRUNCATE,
        create_disposition=module.CreateDisposition.CREATE_IF_NEEDED,
        destination_table_description=description(reference, models),
    )
    parquet = module.ParquetOptions()
    parquet.enable_list_inference = True
    config.parquet_options = parquet
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "reference.parquet"
        rows = write_upload(reference, path, models)
        report(progress, 0, 3, f"loading {rows} lesions into {destination.path}")
        with bq.translated(destination), open(path, "rb") as stream:
            job = client.load_table_from_file(stream, destination.path, job_config=config)
            job.result()
    with bq.translated(destination):
        loaded = client.get_table(destination.path)
    result = PushResult(destination, int(loaded.num_rows or rows), int(loaded.num_bytes or 0), None)
    log.info("pushed '%s' to %s: %d rows, %d bytes", reference.name, destination.path, result.rows, result.bytes)
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
        client.query(index_statement(destination, stored, index_type).sql).result()
        loaded.description = description(
            reference, models, {"name": INDEX_NAME, "type": index_type, "distance": "COSINE", "stored": stored}
        )
        client.update_table(loaded, ["description"])
    result.index = index_type
    result.notes.append(
        f"{index_type} vector index '{INDEX_NAME}' created (cosine, storing {len(stored)} columns); BigQuery builds "
        f"it in the background: until it is populated, searches scan exactly and say that the index was not used"
    )
    report(progress, 3, 3, "pushed")
    return result
