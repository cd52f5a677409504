"""A table in Parquet (one file, or a folder of shards as ``index build`` writes them) read for a streamed
write: the lesion rows whole (they are small: no vectors), checked and put in the stored order first; the
embeddings then one row group at a time, each checked and handed over with the positions its rows take in
their model's matrix. So a reference of millions of rows is imported holding one chunk of vectors, not the
table several times over, and is refused for what a whole table would be refused for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import SimilarPatientsError
from . import schema
from .schema import EMBEDDING, LESION, MODEL, PATIENT, RECIPE

_KEY = (MODEL, RECIPE, PATIENT, LESION)


def streamable(path: Path) -> bool:
    """Whether the Parquet file at ``path`` holds its embeddings as one list column (what streams)."""
    try:
        arrow = pq.read_schema(path)
    except (OSError, ValueError, pa.ArrowInvalid):
        return False
    if EMBEDDING not in arrow.names:
        return False
    kind = arrow.field(EMBEDDING).type
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


class ParquetTable:
    """The lesion rows of Parquet ``files`` (checked, in the stored order) and their embeddings by chunks.

    With ``shards``, a lesion in two files (a retried shard) is kept once when both vectors are equal, and
    refused otherwise; without, any lesion twice is refused.
    """

    def __init__(self, files: list, where: str, shards: bool = False):
        """``where``: how errors name the source (the file, or the folder of shards)."""
        self.files = [Path(f) for f in files]
        self.where = where
        with self._named():
            parts = [pq.read_table(f, columns=[c for c in pq.read_schema(f).names if c != EMBEDDING]) for f in files]
            frame = _concat(parts, self.files).to_pandas()
        self._sizes = [part.num_rows for part in parts]
        key = [c for c in _KEY if c in frame.columns]
        repeated = np.zeros(len(frame), dtype=bool)
        if shards and LESION in key:
            repeated = frame.duplicated(key, keep="first").to_numpy()
        # each row's first occurrence (itself but for a repeat), to compare their vectors when they are read
        self._first = np.arange(len(frame))
        self._firsts_repeated = np.zeros(0, dtype=np.int64)
        self._keys = None
        if repeated.any():
            groups = frame.groupby(key, sort=False, dropna=False).ngroup().to_numpy()
            first_of_group = np.full(groups.max() + 1, -1)
            first_of_group[groups[~repeated]] = np.flatnonzero(~repeated)
            self._first = first_of_group[groups]
            self._firsts_repeated = np.unique(self._first[repeated])
            self._keys = frame[key]
            self._check_repeats_agree(frame, np.flatnonzero(repeated), [c for c in frame.columns if c not in key])
        kept = np.flatnonzero(~repeated)
        with self._named():
            meta, self._identified_by_order = schema.check_metadata(frame.iloc[kept])
        self._meta = meta[[MODEL, PATIENT, LESION]]  # what the checks' messages name
        order = schema.stored_order(meta)
        self.lesions = meta.iloc[order].reset_index(drop=True)
        models = pd.Index(sorted(set(self.lesions[MODEL])))
        self.models = list(models)
        # for each source row: its row among the kept ones (-1: a repeat); for each kept row: its model, and
        # its place in that model's matrix (the stored order is by model first)
        self._kept = np.full(len(frame), -1)
        self._kept[kept] = np.arange(len(kept))
        self._model = models.get_indexer(meta[MODEL])
        stored = models.get_indexer(self.lesions[MODEL])
        self._place = np.empty(len(meta), dtype=np.int64)
        self._place[order] = np.arange(len(order)) - np.searchsorted(stored, np.arange(len(models)))[stored]

    def _check_repeats_agree(self, frame: pd.DataFrame, rows: np.ndarray, columns: list) -> None:
        """Refuse a lesion in two shards whose labels (or series, centre) differ: which value is right, the
        table cannot say (a rebuilt lesion's shards beside the old build's)."""
        firsts = self._first[rows]
        for column in columns:
            again, first = frame[column].iloc[rows].to_numpy(), frame[column].iloc[firsts].to_numpy()
            try:
                differ = ~((again == first) | (pd.isna(again) & pd.isna(first)))
            except (TypeError, ValueError):  # list or mapping values
                differ = np.array([repr(a) != repr(b) for a, b in zip(again, first)])
            if differ.any():
                i = int(np.flatnonzero(differ)[0])
                ends = np.cumsum(self._sizes)
                shard = [self.files[int(np.searchsorted(ends, r, side="right"))].name for r in (firsts[i], rows[i])]
                values = f"{_plain(first[i])!r} in {shard[0]}, {_plain(again[i])!r} in {shard[1]}"
                raise SimilarPatientsError(
                    f"Lesion {tuple(self._keys.iloc[rows[i]])} is in the shards of {self.where} twice with different "
                    f"'{column}': {values} ({int(differ.sum())} lesion(s) differ so); which is right the shards do "
                    f"not say. Remove the shards of one of the builds, or correct the labels and build again."
                )

    @property
    def label_fields(self) -> list:
        return [c for c in self.lesions.columns if c not in schema.STRUCTURAL]

    def matrix(self, model: str) -> None:
        """None: the vectors are not held in memory (the writer reads them back from what it wrote)."""
        return None

    def vector_chunks(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(model, the rows' positions in its matrix, the rows) for each model in each row group read,
        every row checked; after the last, the table is refused if any row failed."""
        checks = schema.VectorChecks(self._meta, self._identified_by_order)
        seen: dict = {}  # first occurrences of repeated lesions: source row -> vector
        base = 0
        with self._named():
            for path, size in zip(self.files, self._sizes):
                end = base + size
                try:
                    batches = pq.ParquetFile(path).iter_batches(batch_size=schema.CHUNK_ROWS, columns=[EMBEDDING])
                    for batch in batches:
                        rows = base + np.arange(batch.num_rows)
                        yield from self._chunk(batch.column(0), rows, checks, seen)
                        base += batch.num_rows
                except (OSError, ValueError, pa.ArrowInvalid) as error:
                    raise SimilarPatientsError(f"Cannot read {path}: {error}") from error
                if base != end:
                    raise SimilarPatientsError(f"{path} changed while it was read; import it again.")
            checks.raise_found()
            duplicated = checks.duplicates()
            if duplicated.any():
                schema.refuse_duplicates(self._meta, pd.Series(duplicated), "identical embeddings")

    def _chunk(self, column: pa.Array, rows: np.ndarray, checks: schema.VectorChecks, seen: dict):
        kept = self._kept[rows]
        if len(self._firsts_repeated):  # a lesion in two shards: kept once if its vectors are equal
            for i in np.flatnonzero(np.isin(rows, self._firsts_repeated)):
                seen[rows[i]] = _vector(column[int(i)])
            for i in np.flatnonzero(kept < 0):
                if _vector(column[int(i)]) != seen.get(self._first[rows[i]]):
                    raise SimilarPatientsError(
                        f"Lesion {tuple(self._keys.iloc[rows[i]])} is in the shards of {self.where} twice with "
                        f"different embeddings; remove the shards of one of the builds."
                    )
            column = pc.filter(column, pa.array(kept >= 0))
            kept = kept[kept >= 0]
        offsets, values, present = _lists(column)
        if not checks.add(kept, offsets, values, present):
            return
        lengths = np.diff(offsets)
        for code in np.unique(self._model[kept]):
            own = self._model[kept] == code
            dim = int(lengths[own][0])
            block = values.reshape(-1, dim) if own.all() else schema.gather_rows(values, offsets[:-1][own], dim)
            yield self.models[code], self._place[kept[own]], block

    def load(self) -> schema.ReferenceTable:
        """The whole table in memory (for tables known to be small)."""
        matrices: dict = {}
        counts = self.lesions[MODEL].value_counts()
        for model, positions, block in self.vector_chunks():
            if model not in matrices:
                matrices[model] = np.empty((int(counts[model]), block.shape[1]), dtype=np.float32)
            matrices[model][positions] = block
        return schema.ReferenceTable(self.lesions, matrices)

    @contextlib.contextmanager
    def _named(self):
        """Errors about the table name it."""
        try:
            yield
        except SimilarPatientsError as error:
            if self.where in str(error):
                raise
            raise SimilarPatientsError(f"{self.where}: {error}") from None
        except (OSError, ValueError, pa.ArrowInvalid) as error:
            raise SimilarPatientsError(f"Cannot read {self.where}: {error}") from error


def _concat(parts: list, files: list) -> pa.Table:
    """The shards' lesion rows as one table, the types that mean the same thing unified: IDs written as
    numbers by one writer and as text by another are text (123.0 as "123"); text (string, large_string) and
    numbers (int64, double) are promoted. A column held as numbers in one shard and as text (or another
    kind) in another is refused by name."""
    unified = []
    for part in parts:
        for name in (MODEL, RECIPE, PATIENT, LESION):
            if name in part.column_names and part.schema.field(name).type != pa.string():
                at = part.column_names.index(name)
                part = part.set_column(at, name, pc.cast(part.column(name), pa.string()))
        unified.append(part)
    try:
        return pa.concat_tables(unified, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        failure = error
    for name in dict.fromkeys(n for part in unified for n in part.column_names):
        kinds = {}  # type -> the first shard that has it
        for part, file in zip(unified, files):
            if name in part.column_names:
                kinds.setdefault(part.schema.field(name).type, Path(file).name)
        try:
            pa.unify_schemas([pa.schema([pa.field(name, kind)]) for kind in kinds], promote_options="permissive")
        except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
            said = ", ".join(f"{kind} in {file}" for kind, file in kinds.items())
            raise SimilarPatientsError(
                f"The column '{name}' has types that do not go together in the shards: {said}. One writer stored "
                f"it as numbers, another as text (or another kind): write it with one type in every shard."
            ) from None
    raise SimilarPatientsError(f"The shards cannot be read as one table: {failure}") from failure


def _plain(value):
    """A cell as a person reads it in a message (3.5, not np.float64(3.5))."""
    return value.item() if isinstance(value, np.generic) else value


def _vector(value: pa.Scalar):
    return None if not value.is_valid else np.asarray(value.values, dtype=np.float32).tobytes()


def _lists(column: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A list column's offsets (from 0), its values as float32, and which rows have a list at all."""
    present = column.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(column.type):
        offsets = np.arange(len(column) + 1, dtype=np.int64) * column.type.list_size
    else:
        offsets = column.offsets.to_numpy().astype(np.int64)
        offsets = offsets - offsets[0]
    values = column.flatten().cast(pa.float32()).to_numpy(zero_copy_only=False)  # null values become NaN: refused
    if not present.all():
        offsets = np.zeros(len(column) + 1, dtype=np.int64)  # no vectors are read from a chunk with a missing one
    return offsets, values, present
