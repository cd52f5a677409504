"""The build's output folder: Parquet shards of reference rows (``references import`` reads the folder), a
key file per shard, dead letters, the build record and the build lock.

- ``embeddings-<digest>.parquet``: rows of one group of lesions; the name is the digest of the lesions it
  holds, and the group is fixed by a ``GroupByKey`` before the write, so a retried write rewrites the same
  file with the same lesions. Its Parquet metadata names the build that wrote it.
- ``_keys/embeddings-<digest>.json``: the shard's rows as (model, recipe, PatientID, lesion_id) and the
  digest of each lesion's manifest definition (CT, mark, labels): what a re-run reads to plan, a few
  hundred bytes per shard instead of the embeddings. A shard without one is unknown and rebuilt.
- ``dead-letters/dead-*.jsonl``: one JSON line per lesion the last build could not embed, with the reason.
- ``_build.json``: the build record (which build, its models, whether it completed, what it added,
  replaced, kept and removed). A folder whose record does not say ``complete`` is refused by an import
  unless asked for explicitly.
- ``.build.lock`` (a local folder: an advisory lock) or ``_build.lock`` (a bucket: an object created only
  if absent): one build at a time writes a folder.

A folder may be a URL (``gs://bucket/path``), read and written through ``util/files.py``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import uuid
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SimilarPatientsError
from ..idc.index import SERIES
from ..references import schema
from ..references.importers import BUILD_RECORD
from ..util import files
from ..util.locks import try_lock
from ..util.optional import optional_import
from .manifest import Lesion

SHARD_GLOB = "embeddings-*.parquet"
DEAD_LETTERS = "dead-letters"
KEYS = "_keys"
RECORD = BUILD_RECORD
LOCAL_LOCK, BUCKET_LOCK = ".build.lock", "_build.lock"
IMAGE_PATH = "image_path"
BUILD_METADATA = b"similar_patients.build"
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
    """One reference row: the lesion, where its crop was centred (LPS mm), its labels and embedding; and,
    under ``_digest``, its manifest definition (kept in the key file, not in the shard)."""
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
        "_digest": lesion.digest(),
    }


def write_shard(rows: Sequence[dict], folder: str, columns: pa.Schema, build: str) -> str:
    """Write ``rows`` as one Parquet shard (named by the lesions it holds), then its key file."""
    rows = sorted(rows, key=lambda r: tuple(str(r[k]) for k in _KEY))
    keys = [[str(r[k]) for k in _KEY] + [r["_digest"]] for r in rows]
    name = "embeddings-" + _digest(["\t".join(k[:4]) for k in keys])
    table = _table(rows, columns).replace_schema_metadata({BUILD_METADATA: build.encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    path = files.write(files.join(folder, f"{name}.parquet"), sink.getvalue().to_pybytes())
    record = {"build": build, "keys": keys}
    files.write(files.join(folder, KEYS, f"{name}.json"), json.dumps(record).encode("utf-8"))
    return path


def write_dead_letters(records: Sequence[dict], folder: str) -> str:
    """The lesions that failed, one JSON line each (source, patient, lesion, model, stage, reason)."""
    lines = sorted(json.dumps(r, sort_keys=True, default=str) for r in records)
    name = f"dead-{_digest(lines)}.jsonl"
    return files.write(files.join(folder, DEAD_LETTERS, name), ("\n".join(lines) + "\n").encode("utf-8"))


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
    found = files.listing(files.join(folder, DEAD_LETTERS), "dead-*.jsonl")
    return [json.loads(line) for f in found for line in files.read(f).decode("utf-8").splitlines() if line]


def clear_dead_letters(folder: str) -> None:
    """A new build retries every lesion not built: the last build's dead letters no longer hold."""
    files.delete(files.listing(files.join(folder, DEAD_LETTERS), "dead-*.jsonl"))


def shard_files(folder: str) -> list[str]:
    return files.listing(str(folder), SHARD_GLOB)


def shard_keys(folder: str) -> dict[str, list | None]:
    """Each shard's rows as [model, recipe, PatientID, lesion_id, definition digest], from its key file
    (None for a shard without one: its rows are of unknown definition)."""
    known = {files.name(p)[: -len(".json")]: p for p in files.listing(files.join(folder, KEYS), "*.json")}
    keys = {}
    for shard in shard_files(folder):
        key_file = known.get(files.name(shard)[: -len(".parquet")])
        keys[shard] = json.loads(files.read(key_file))["keys"] if key_file else None
    return keys


def remove_shards(shards: Sequence[str]) -> None:
    """Remove shards and their key files (the key file first: a shard without one is rebuilt)."""
    for shard in shards:
        folder, name = shard[: -len(files.name(shard)) - 1], files.name(shard)[: -len(".parquet")]
        files.delete([files.join(folder, KEYS, f"{name}.json")])
        files.delete([shard])


def rewrite_without(shard: str, drop: set, build: str) -> None:
    """Rewrite ``shard`` without the rows whose (model, recipe, PatientID, lesion_id) are in ``drop``."""
    table = pq.read_table(pa.BufferReader(files.read(shard)))
    folder = shard[: -len(files.name(shard)) - 1]
    keys = {tuple(k[:4]): k[4] for k in json.loads(files.read(_key_file(shard)))["keys"]}
    rows = [r for r in table.to_pylist() if tuple(str(r[k]) for k in _KEY) not in drop]
    for r in rows:
        r["_digest"] = keys[tuple(str(r[k]) for k in _KEY)]
    if rows:
        write_shard(rows, folder, table.schema.remove_metadata(), build)
    remove_shards([shard])


def _key_file(shard: str) -> str:
    folder, name = shard[: -len(files.name(shard)) - 1], files.name(shard)[: -len(".parquet")]
    return files.join(folder, KEYS, f"{name}.json")


def remove_temporaries(folder: str) -> list[str]:
    """Hidden files a killed writer left (``.embeddings-….parquet`` and the like): never a result."""
    leftovers = [
        p
        for where in (folder, files.join(folder, KEYS), files.join(folder, DEAD_LETTERS))
        for p in files.listing(where, ".*", hidden=True)
        if files.name(p) not in (LOCAL_LOCK,)
    ]
    files.delete(leftovers)
    return leftovers


def read_record(folder: str) -> dict | None:
    path = files.join(folder, RECORD)
    if not files.exists(path):
        return None
    try:
        return json.loads(files.read(path))
    except ValueError:
        return {"status": "damaged"}


def write_record(folder: str, record: dict) -> None:
    files.write(files.join(folder, RECORD), json.dumps(record, indent=1, sort_keys=True).encode("utf-8"))


def new_build_id() -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{uuid.uuid4().hex[:8]}"


class BuildLock:
    """One build at a time in a folder: an advisory lock (local; released if the process dies) or an
    object created only if absent (a bucket; removed when the build ends)."""

    def __init__(self, folder: str, build: str):
        self.folder, self.build, self._lock, self._object = folder, build, None, None
        holder = {"build": build, "host": socket.gethostname(), "pid": os.getpid()}
        if not files.is_url(folder):
            self._lock = try_lock(files.join(folder, LOCAL_LOCK))
            if self._lock is None:
                raise SimilarPatientsError(
                    f"Another build is writing into {folder} now; wait for it to finish (it embeds the same "
                    f"lesions), or build into another folder."
                )
            return
        storage = optional_import("google.cloud.storage", "pipeline")
        exceptions = optional_import("google.api_core.exceptions", "pipeline")
        bucket, _, prefix = folder[len("gs://") :].partition("/")
        blob = storage.Client().bucket(bucket).blob(f"{prefix}/{BUCKET_LOCK}".lstrip("/"))
        try:
            blob.upload_from_string(json.dumps(holder), if_generation_match=0)
        except exceptions.PreconditionFailed:
            raise SimilarPatientsError(
                f"Another build is writing into {folder} ({files.join(folder, BUCKET_LOCK)}: "
                f"{blob.download_as_text()}); wait for it to finish. If none is running (its launcher was killed), "
                f"delete that object and build again."
            ) from None
        self._object = blob

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._object is not None:
            self._object.delete()
            self._object = None

    def __enter__(self) -> BuildLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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
