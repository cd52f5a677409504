"""The build's output: Parquet shards of reference rows (``references import`` reads the folder), dead letters
(one JSON line per lesion that could not be embedded, with the reason), and what is embedded already.

Each shard is written beside its final name and renamed (``util/atomic.py``), so a killed worker leaves no
half shard. A shard's name is the digest of the lesions it holds: a retried bundle rewrites the same file.
An output folder may be a URL (``gs://bucket/path`` on Dataflow): it is then written and listed through
Beam's file systems, where an object appears whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..idc.index import SERIES
from ..references import schema
from ..util.atomic import replacing
from ..util.optional import optional_import
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


def write_shard(rows: Sequence[dict], folder: str, columns: pa.Schema) -> str:
    """Write ``rows`` as one Parquet shard, atomically; its name is the digest of the lesions it holds."""
    sink = pa.BufferOutputStream()
    pq.write_table(_table(rows, columns), sink)
    keys = sorted("\t".join(str(r[k]) for k in _KEY) for r in rows)
    return _write(_join(folder, f"embeddings-{_digest(keys)}.parquet"), sink.getvalue().to_pybytes())


def write_dead_letters(records: Sequence[dict], folder: str) -> str:
    """The lesions that failed, one JSON line each (source, patient, lesion, model, stage, reason)."""
    lines = sorted(json.dumps(r, sort_keys=True, default=str) for r in records)
    name = f"dead-{_digest(lines)}.jsonl"
    return _write(_join(folder, DEAD_LETTERS, name), ("\n".join(lines) + "\n").encode("utf-8"))


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


def read_dead_letters(folder: str) -> list[dict]:
    files = _list(_join(folder, DEAD_LETTERS), "dead-*.jsonl")
    return [json.loads(line) for f in files for line in _read(f).decode("utf-8").splitlines() if line]


def shard_files(folder: str) -> list[str]:
    return _list(str(folder), SHARD_GLOB)


def embedded_keys(folder: str) -> set:
    """(model, recipe, PatientID, lesion_id) of every lesion the shards in ``folder`` hold already."""
    keys = set()
    for path in shard_files(folder):
        table = pq.read_table(pa.BufferReader(_read(path)), columns=list(_KEY))
        keys.update(zip(*(table.column(k).to_pylist() for k in _KEY)))
    return keys


def _remote(path: str) -> bool:
    return "://" in str(path)


def _join(folder: str, *parts: str) -> str:
    if _remote(folder):
        return "/".join([str(folder).rstrip("/"), *parts])
    return str(Path(folder, *parts))


def _file_systems():
    return optional_import("apache_beam.io.filesystems", "pipeline").FileSystems


def _write(path: str, data: bytes) -> str:
    """``data`` at ``path``, whole or not at all: written beside it, then renamed over it."""
    if not _remote(path):
        with replacing(Path(path)) as temporary:
            temporary.write_bytes(data)
        return path
    systems = _file_systems()
    folder, _, name = path.rpartition("/")
    temporary = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.part"
    with systems.create(temporary) as stream:
        stream.write(data)
    if systems.exists(path):
        systems.delete([path])
    systems.rename([temporary], [path])
    return path


def _read(path: str) -> bytes:
    if not _remote(path):
        return Path(path).read_bytes()
    with _file_systems().open(path) as stream:
        return stream.read()


def _list(folder: str, pattern: str) -> list[str]:
    if not _remote(folder):
        return sorted(str(p) for p in Path(folder).glob(pattern)) if Path(folder).is_dir() else []
    found = _file_systems().match([f"{folder.rstrip('/')}/{pattern}"])[0].metadata_list
    return sorted(m.path for m in found)


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
