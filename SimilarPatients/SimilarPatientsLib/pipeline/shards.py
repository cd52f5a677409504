"""The build's output: Parquet shards of reference rows (``references import`` reads the folder), dead letters
(one JSON line per lesion that could not be embedded, with the reason), and what is embedded already.

Each shard is written beside its final name and renamed (``util/atomic.py``), so a killed worker leaves no
half shard. A shard's name is the digest of the lesions it holds: a retried bundle rewrites the same file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..idc.index import SERIES
from ..references import schema
from ..util.atomic import replacing
from .manifest import Lesion

SHARD_GLOB = "embeddings-*.parquet"
DEAD_LETTERS = "dead-letters"
IMAGE_PATH = "image_path"
_KEY = (schema.MODEL, schema.RECIPE, schema.PATIENT, schema.LESION)


def row_schema(lesions: Sequence[Lesion]) -> pa.Schema:
    """The shards' columns: the reference's structural ones, then the manifest's labels with the type
    Arrow infers from all their values (text when they disagree), so every shard has the same schema."""
    fields = [
        pa.field(schema.MODEL, pa.string()),
        pa.field(schema.RECIPE, pa.string()),
        pa.field(schema.PATIENT, pa.string()),
        pa.field(schema.LESION, pa.string()),
        pa.field(SERIES, pa.string()),
        pa.field(IMAGE_PATH, pa.string()),
        *(pa.field(c, pa.float64()) for c in schema.CENTER),
    ]
    names = list(dict.fromkeys(name for lesion in lesions for name, _ in lesion.labels))
    for name in names:
        values = [dict(lesion.labels).get(name) for lesion in lesions]
        try:
            kind = pa.array(values).type
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            kind = pa.string()
        fields.append(pa.field(name, pa.string() if pa.types.is_null(kind) else kind))
    return pa.schema([*fields, pa.field(schema.EMBEDDING, pa.list_(pa.float32()))])


def row(lesion: Lesion, model: str, recipe: str, seed: Sequence[float], vector) -> dict:
    """One reference row: the lesion, where its crop was centred (LPS mm), its labels and embedding."""
    return {
        schema.MODEL: model,
        schema.RECIPE: recipe,
        schema.PATIENT: lesion.patient,
        schema.LESION: lesion.lesion,
        SERIES: lesion.series or None,
        IMAGE_PATH: lesion.image or None,
        **dict(zip(schema.CENTER, (float(v) for v in seed))),
        **dict(lesion.labels),
        schema.EMBEDDING: [float(v) for v in vector],
    }


def write_shard(rows: Sequence[dict], folder: Path, columns: pa.Schema) -> Path:
    """Write ``rows`` as one Parquet shard, atomically; its name is the digest of the lesions it holds."""
    table = _table(rows, columns)
    keys = sorted("\t".join(str(r[k]) for k in _KEY) for r in rows)
    path = Path(folder) / f"embeddings-{_digest(keys)}.parquet"
    with replacing(path) as temporary:
        pq.write_table(table, temporary)
    return path


def write_dead_letters(records: Sequence[dict], folder: Path) -> Path:
    """The lesions that failed, one JSON line each (source, patient, lesion, model, stage, reason)."""
    lines = sorted(json.dumps(r, sort_keys=True) for r in records)
    path = Path(folder) / DEAD_LETTERS / f"dead-{_digest(lines)}.jsonl"
    with replacing(path) as temporary:
        temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def dead_letter(lesion: Lesion, model: str, stage: str, error: BaseException) -> dict:
    reason = str(error) if str(error) else type(error).__name__
    return {
        "source": lesion.source,
        schema.PATIENT: lesion.patient,
        schema.LESION: lesion.lesion,
        schema.MODEL: model,
        "stage": stage,
        "error": type(error).__name__,
        "reason": reason,
    }


def read_dead_letters(folder: Path) -> list[dict]:
    files = sorted((Path(folder) / DEAD_LETTERS).glob("dead-*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines() if line]


def shard_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob(SHARD_GLOB))


def embedded_keys(folder: Path) -> set:
    """(model, recipe, PatientID, lesion_id) of every lesion the shards in ``folder`` hold already."""
    keys = set()
    for path in shard_files(folder):
        table = pq.read_table(path, columns=list(_KEY))
        keys.update(zip(*(table.column(k).to_pylist() for k in _KEY)))
    return keys


def _table(rows: Sequence[dict], columns: pa.Schema) -> pa.Table:
    converted = {}
    for field in columns:
        values = [r.get(field.name) for r in rows]
        if pa.types.is_string(field.type):  # a label of mixed types is kept as text
            values = [None if v is None else str(v) for v in values]
        converted[field.name] = pa.array(values, type=field.type)
    return pa.table(converted, schema=columns)


def _digest(items: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(items).encode("utf-8")).hexdigest()[:16]
