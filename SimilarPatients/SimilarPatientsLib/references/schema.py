"""The canonical reference table (one row per lesion per model) and its validation.

In memory a reference is a :class:`ReferenceTable`: the lesion metadata as a DataFrame without the vectors,
plus one float32 matrix per model whose rows follow that model's lesion rows. On disk (Parquet, BigQuery)
it is one table with an ``embedding`` list column; :func:`to_arrow` and :func:`from_arrow` convert.

A table too large to hold twice is checked the same way chunk by chunk (:class:`VectorChecks`,
:func:`check_metadata`, :func:`stored_order`), so a streamed import refuses what a whole one refuses, with the
same words.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from ..errors import SimilarPatientsError
from ..idc.index import COLLECTION, IDC_FIELDS, SERIES, STUDY

MODEL = "model"
PATIENT = "PatientID"
EMBEDDING = "embedding"
LESION = "lesion_id"
RECIPE = "recipe"
CENTER = ("center_x", "center_y", "center_z")  # lesion centre, LPS millimetres

REQUIRED = (MODEL, PATIENT, EMBEDDING)
#: Columns with a fixed meaning; every other column is a label field that rides along into results.
STRUCTURAL = frozenset({MODEL, PATIENT, EMBEDDING, LESION, RECIPE, SERIES, "SOPInstanceUID", *CENTER, *IDC_FIELDS})
UNKNOWN_RECIPE = "unspecified"
#: Names a search computes for every hit: the hit table's own columns (``references/hits.py``), the closeness
#: the Slicer module and worker add (``closer_than``), the fused search's columns (``references/fused.py``;
#: its per-model ``rank_<model>``... are not reserved: a label so named gives way to them, with a warning)
#: the working columns of BigQuery's statements (``cloud/sql.py``) and the corrected space's columns of a
#: pushed table (``cloud/corrected.py``). A label called so would be read as
#: the computed value (a wrong distance, rank or viewer link), so none may take one; compared without case,
#: as BigQuery compares column names.
RESERVED = (
    "rank",
    "distance",
    "metric",
    "space",
    "query_lesion",
    "lesions",
    "viewer_url",
    "search",
    "index_recall",
    "closer_than",
    "fusion",
    "fused_score",
    "listed_by",
    "lesion_model",
    "query_row",
    "patient_lesions",
    "nearest_rank",
    "unscaled",
    "passes",
    "patient_radius",
    "query_radius",
    "corrected_embedding",
    "corrected_radius",
)
#: Model names a search reads as a fused search of every model (``all``, the Slicer module's choice) or
#: writes for fused hits (``fused``), in any case (``references/fused.py``): a model so named could not be
#: searched on its own.
RESERVED_MODELS = ("all", "All models (fused)", "fused")
#: Rows per chunk when a table's vectors are handed over in pieces (a stored reference's Parquet row groups).
CHUNK_ROWS = 65_536


@dataclass
class ReferenceTable:
    """Lesion rows sorted by (model, PatientID, lesion_id), and each model's embedding matrix."""

    lesions: pd.DataFrame
    embeddings: dict[str, np.ndarray]

    @property
    def models(self) -> list:
        return sorted(self.embeddings)

    def model_lesions(self, model: str) -> pd.DataFrame:
        """The lesion rows of ``model``, in the row order of its embedding matrix."""
        return self.lesions[self.lesions[MODEL] == model].reset_index(drop=True)

    @property
    def label_fields(self) -> list:
        return [c for c in self.lesions.columns if c not in STRUCTURAL]

    def vector_chunks(self, rows: int = CHUNK_ROWS) -> Iterator[tuple[str, slice, np.ndarray]]:
        """Each model's matrix in pieces of ``rows``: (model, the rows' positions in it, the rows)."""
        for model in self.models:
            matrix = self.embeddings[model]
            for start in range(0, len(matrix), rows):
                stop = min(len(matrix), start + rows)
                yield model, slice(start, stop), matrix[start:stop]

    def matrix(self, model: str) -> np.ndarray:
        """The model's matrix, held in memory."""
        return self.embeddings[model]


def check_metadata(meta: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """The lesion rows (no vectors) checked and normalised: required columns and ids, one recipe per model,
    centres as numbers, lesion ids filled in, no lesion twice. Also True when lesions have no identity but
    their order (then a patient's equal vectors are one lesion entered twice: see :class:`VectorChecks`)."""
    missing = [c for c in (MODEL, PATIENT) if c not in meta.columns]
    if missing:
        raise SimilarPatientsError(
            f"The table lacks the required column(s) {missing}; a reference needs {list(REQUIRED)} "
            f"(found: {list(meta.columns)[:20]})."
        )
    check_label_names(meta.columns)
    meta = meta.reset_index(drop=True).copy()
    if len(meta) == 0:
        raise SimilarPatientsError("The table has no rows: nothing to import.")
    for column in (MODEL, PATIENT):
        if meta[column].isna().any():
            bad = int(meta[column].isna().sum())
            raise SimilarPatientsError(f"{bad} row(s) have no {column}; every lesion row needs one.")
        meta[column] = meta[column].map(_as_id).astype(str)
        if (meta[column] == "").any():
            raise SimilarPatientsError(f"Some rows have an empty {column}; every lesion row needs one.")
    reserved = {name.lower() for name in RESERVED_MODELS}
    clashing = sorted({m for m in meta[MODEL].unique() if m.strip().lower() in reserved})
    if clashing:
        raise SimilarPatientsError(
            f"The model name '{clashing[0]}' is reserved: a search reads it as every model fused, so that model "
            f"could not be searched on its own. Rename it (e.g. '{clashing[0]}_model') and import again. Reserved "
            f"model names, in any case: {', '.join(RESERVED_MODELS)}."
        )
    return meta, _normalise_metadata(meta)


def stored_order(meta: pd.DataFrame) -> np.ndarray:
    """The row order a reference is stored in: by model, PatientID and lesion id (as text)."""
    keys = [pd.factorize(meta[column].to_numpy(dtype=object), sort=True)[0] for column in (LESION, PATIENT, MODEL)]
    return np.lexsort(keys)


class VectorChecks:
    """The checks of embedding rows (present, one length per model, finite, not all zeros), fed chunk by
    chunk in any order; :meth:`raise_found` then refuses with what a whole table would be refused for."""

    def __init__(self, meta: pd.DataFrame, identified_by_order: bool = False):
        """``meta``: the checked lesion rows the chunks' row numbers refer to."""
        self._patients = meta[PATIENT].to_numpy()
        self._models = meta[MODEL].to_numpy()
        self._lengths: dict = {}  # model -> Counter of lengths
        self._first_of_length: dict = {}  # (model, length) -> first row
        self._found: dict = {}  # what -> [count, first row]
        self._fingerprints = [] if identified_by_order else None

    def add(self, rows: np.ndarray, offsets: np.ndarray, values: np.ndarray, present: np.ndarray | None = None) -> bool:
        """Check rows ``rows`` whose embedding ``i`` is ``values[offsets[i]:offsets[i + 1]]`` (``present``:
        False where a row has none). True when all of them passed."""
        rows = np.asarray(rows)
        if present is not None and not present.all():
            self._note("missing", rows[~present])
            return False
        lengths = np.diff(offsets)
        self._note("empty", rows[lengths == 0])
        for model in np.unique(self._models[rows]):
            mine = self._models[rows] == model
            found, first = np.unique(lengths[mine], return_index=True)
            counts = self._lengths.setdefault(model, Counter())
            for length, at, count in zip(found, first, np.bincount(np.searchsorted(found, lengths[mine]))):
                counts[int(length)] += int(count)
                key = (model, int(length))
                self._first_of_length[key] = min(self._first_of_length.get(key, np.inf), int(rows[mine][at]))
        if (lengths == 0).any():
            return False
        bad = ~np.isfinite(values)
        if bad.any():
            self._note("not finite", rows[np.unique(np.searchsorted(offsets, np.flatnonzero(bad), side="right") - 1)])
        zero = ~np.logical_or.reduceat(values != 0, offsets[:-1]) if len(values) else np.zeros(0, dtype=bool)
        self._note("zeros", rows[zero])
        if self._fingerprints is not None and not bad.any():
            self._fingerprints.append(_row_digests(rows, offsets, values))
        return not bad.any() and not zero.any() and all(len(c) == 1 for c in self._lengths.values())

    def _note(self, what: str, rows: np.ndarray) -> None:
        if len(rows):
            count, first = self._found.get(what, (0, np.inf))
            self._found[what] = (count + len(rows), min(first, int(rows.min())))

    def raise_found(self) -> None:
        """Refuse the table for the first kind of fault found, naming how many rows and the first."""
        if "missing" in self._found:
            count, first = self._found["missing"]
            raise SimilarPatientsError(
                f"{count} row(s) have no embedding; first: row {first}, patient {self._patients[first]}."
            )
        if "empty" in self._found:
            first = self._found["empty"][1]
            raise SimilarPatientsError(f"Row {first} (patient {self._patients[first]}) has an empty embedding.")
        for model, counts in sorted(self._lengths.items()):
            if len(counts) > 1:
                ranked = sorted(counts.items(), key=lambda item: -item[1])
                usual = ranked[0][0]
                odd = min(self._first_of_length[(model, length)] for length in counts if length != usual)
                spread = ", ".join(f"{n} rows of length {length}" for length, n in ranked)
                raise SimilarPatientsError(
                    f"Model '{model}' has embeddings of {len(counts)} lengths ({spread}); one model needs one "
                    f"length. First row of another length than {usual}: row {odd} (patient {self._patients[odd]})."
                )
        if "not finite" in self._found:
            count, first = self._found["not finite"]
            raise SimilarPatientsError(
                f"{count} embedding(s) hold NaN or infinite values (or values beyond float32); first: row "
                f"{first}, patient {self._patients[first]}. Remove or recompute them."
            )
        if "zeros" in self._found:
            count, first = self._found["zeros"]
            raise SimilarPatientsError(
                f"{count} embedding(s) are all zeros; first: row {first}, patient {self._patients[first]}. A zero "
                f"vector is not an embedding (a failed or empty crop): remove or recompute it."
            )

    def duplicates(self) -> np.ndarray:
        """Rows without lesion identity whose vector another row of the same patient and model repeats (one
        lesion entered twice), as a mask over ``meta``'s rows; all False when lesions have an identity.
        (With ids or centres, equal vectors can be real: two seeds 0.6 mm apart may crop alike.)"""
        flags = np.zeros(len(self._patients), dtype=bool)
        if not self._fingerprints:
            return flags
        rows = np.concatenate([f[0] for f in self._fingerprints])
        digests = np.concatenate([f[1] for f in self._fingerprints])
        keys = pd.DataFrame({MODEL: self._models[rows], PATIENT: self._patients[rows], "v": digests})
        flags[rows[keys.duplicated(keep=False).to_numpy()]] = True
        return flags


def _row_digests(rows: np.ndarray, offsets: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, list]:
    """Each row's vector as a 16-byte digest of its float32 bytes (equal digests: equal vectors)."""
    data = np.ascontiguousarray(values, dtype=np.float32).view(np.uint8)
    digests = [hashlib.blake2b(data[4 * a : 4 * b], digest_size=16).digest() for a, b in zip(offsets[:-1], offsets[1:])]
    return rows, digests


def from_parts(meta: pd.DataFrame, offsets: np.ndarray, flat: np.ndarray) -> ReferenceTable:
    """Validate rows whose embedding ``i`` is ``flat[offsets[i]:offsets[i + 1]]`` and build the table."""
    meta, identified_by_order = check_metadata(meta)
    values = np.asarray(flat, dtype=np.float32)
    checks = VectorChecks(meta, identified_by_order)
    checks.add(np.arange(len(meta)), offsets, values)
    checks.raise_found()
    duplicated = checks.duplicates()
    if duplicated.any():
        refuse_duplicates(meta, pd.Series(duplicated, index=meta.index), "identical embeddings")
    lengths = np.diff(offsets)
    order = stored_order(meta)
    meta = meta.iloc[order].reset_index(drop=True)
    embeddings = {}
    for model, rows in meta.groupby(MODEL, sort=True).indices.items():
        embeddings[str(model)] = gather_rows(values, offsets[order[rows]], int(lengths[order[rows[0]]]))
    return ReferenceTable(meta, embeddings)


def check_label_names(columns: Iterable) -> None:
    """Refuse a column named like one a search computes (:data:`RESERVED`), naming it and the list."""
    reserved = {name.lower() for name in RESERVED}
    clashing = [str(c) for c in columns if str(c).lower() in reserved]
    if clashing:
        raise SimilarPatientsError(
            f"The column(s) {', '.join(repr(c) for c in clashing)} have the name of a value every search result "
            f"computes: a label called so would be read as that value. Rename {'it' if len(clashing) == 1 else 'them'} "
            f"(e.g. '{clashing[0]}_label') and import again. Reserved names, in any case: {', '.join(RESERVED)}."
        )


def from_frame(frame: pd.DataFrame) -> ReferenceTable:
    """Build from a DataFrame whose ``embedding`` column holds sequences, or with ``embedding_0..N`` columns."""
    wide = [c for c in frame.columns if str(c).startswith(f"{EMBEDDING}_") and str(c)[10:].isdigit()]
    if EMBEDDING not in frame.columns and wide:
        wide.sort(key=lambda c: int(str(c)[10:]))
        numbers = [int(str(c)[10:]) for c in wide]
        if numbers != list(range(len(numbers))):
            gaps = sorted(set(range(max(numbers) + 1)) - set(numbers))
            raise SimilarPatientsError(
                f"The embedding columns run {EMBEDDING}_0…{EMBEDDING}_{max(numbers)} but "
                f"{', '.join(f'{EMBEDDING}_{g}' for g in gaps[:5]) or 'a repeated number'} "
                f"{'is' if len(gaps) == 1 else 'are'} missing: the table is cut or was exported wrongly. Export "
                f"every component, {EMBEDDING}_0 to {EMBEDDING}_{{D-1}}."
            )
        matrix = frame[wide].to_numpy(dtype=np.float64)
        meta = frame.drop(columns=wide)
        offsets = np.arange(len(frame) + 1, dtype=np.int64) * len(wide)
        return from_parts(meta, offsets, matrix.reshape(-1))
    if EMBEDDING not in frame.columns:
        raise SimilarPatientsError(
            f"The table has no '{EMBEDDING}' column (nor '{EMBEDDING}_0', '{EMBEDDING}_1', ... columns); "
            f"a reference needs {list(REQUIRED)}."
        )
    vectors = [_as_vector(v, i) for i, v in enumerate(frame[EMBEDDING].tolist())]
    lengths = np.array([len(v) for v in vectors], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate(vectors) if vectors else np.zeros(0)
    return from_parts(frame.drop(columns=[EMBEDDING]), offsets, flat)


def from_arrow(table: pa.Table) -> ReferenceTable:
    """Build from an Arrow table with an ``embedding`` list column (as Parquet and BigQuery hold it)."""
    if EMBEDDING not in table.column_names:
        return from_frame(table.to_pandas())
    column = table.column(EMBEDDING).combine_chunks()
    if not (
        pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type)
    ):
        return from_frame(table.to_pandas())
    if column.null_count:
        first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        patients = table.column(PATIENT).to_pylist() if PATIENT in table.column_names else None
        who = f", patient {patients[first]}" if patients is not None else ""
        raise SimilarPatientsError(f"{column.null_count} row(s) have no embedding; first: row {first}{who}.")
    if pa.types.is_fixed_size_list(column.type):
        offsets = np.arange(len(column) + 1, dtype=np.int64) * column.type.list_size
        flat = column.flatten()
    else:
        offsets = column.offsets.to_numpy().astype(np.int64)
        offsets = offsets - offsets[0]
        flat = column.flatten()
    meta = table.drop_columns([EMBEDDING]).to_pandas()
    values = flat.cast(pa.float32()).to_numpy(zero_copy_only=False)  # nulls become NaN: refused as non-finite
    return from_parts(meta, offsets, values)


def to_arrow(table: ReferenceTable) -> pa.Table:
    """The canonical single table: the lesion columns plus ``embedding`` as list<float32>."""
    arrow = pa.Table.from_pandas(table.lesions, preserve_index=False)
    flats, lengths = [], []
    for model in table.models:
        matrix = table.embeddings[model]
        flats.append(matrix.reshape(-1))
        lengths.append(np.full(matrix.shape[0], matrix.shape[1], dtype=np.int32))
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int32)
    vectors = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(flats)))
    return arrow.append_column(EMBEDDING, vectors)


def concat(tables: Sequence[ReferenceTable]) -> ReferenceTable:
    """One table from several (e.g. one per upstream model file), validated together."""
    metas, flats, offsets, start = [], [], [np.zeros(1, dtype=np.int64)], 0
    for table in tables:
        for model in table.models:
            matrix = table.embeddings[model]
            metas.append(table.model_lesions(model))
            flats.append(matrix.reshape(-1))
            ends = start + np.arange(1, matrix.shape[0] + 1, dtype=np.int64) * matrix.shape[1]
            offsets.append(ends)
            start = int(ends[-1]) if len(ends) else start
    return from_parts(pd.concat(metas, ignore_index=True), np.concatenate(offsets), np.concatenate(flats))


def mixed_labels(table: ReferenceTable, shown: int = 3) -> list[str]:
    """A note per label field whose values differ between the lesions of one patient (in any model).

    Whether a field is a patient's (sex, age) or a lesion's (histology of one of two primaries, size) the
    table does not say, so such a table is imported, and said so: each lesion keeps its own value (hits
    show the matched lesion's, filters match lesions), and a patient-level evaluation task on the field is
    refused for the patients concerned. For a patient's own field the table is then wrong."""
    patient_codes, patient_ids = pd.factorize(table.lesions[PATIENT])
    notes = []
    for field in table.label_fields:
        try:
            codes, values = pd.factorize(table.lesions[field])  # a missing value is -1: no conflict
        except TypeError:  # list or mapping values: no equality to compare lesions by
            continue
        known = codes >= 0
        pairs = np.sort(patient_codes[known].astype(np.int64) * len(values) + codes[known])  # patient, value
        pairs = pairs[np.concatenate([[True], pairs[1:] != pairs[:-1]])] if len(pairs) else pairs
        owners = pairs // max(len(values), 1)
        mixed = np.flatnonzero(np.bincount(owners, minlength=len(patient_ids)) > 1)
        if len(mixed) == 0:
            continue
        examples = "; ".join(
            f"{patient_ids[p]}: {', '.join(sorted(str(values[v]) for v in pairs[owners == p] % len(values)))}"
            for p in mixed[:shown]
        )
        notes.append(
            f"'{field}' differs between the lesions of {len(mixed)} patient(s) (e.g. {examples}); each lesion keeps "
            f"its own value. If '{field}' belongs to the patient (sex, age, ...), correct those rows."
        )
    return notes


def _as_id(value) -> str:
    """IDs arrive as int, float (from CSV) or str; keep them as the string IDC uses."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _as_vector(value, row: int) -> np.ndarray:
    if isinstance(value, str):
        text = value.strip().strip("[]").replace(",", " ")
        try:
            return np.array([float(t) for t in text.split()], dtype=np.float64)
        except ValueError:
            raise SimilarPatientsError(
                f"Row {row}: the embedding '{value[:40]}...' is not a list of numbers."
            ) from None
    if value is None or (np.isscalar(value) and pd.isna(value)):
        raise SimilarPatientsError(f"Row {row} has no embedding.")
    try:
        return np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise SimilarPatientsError(f"Row {row}: the embedding is not a list of numbers.") from None


def _normalise_metadata(meta: pd.DataFrame) -> bool:
    """Fill the optional canonical columns and refuse duplicate lesions and mixed recipes. True when lesions
    have no identity but their order (no lesion ids, no centres): then equal vectors mark duplicates."""
    if RECIPE not in meta.columns:
        meta[RECIPE] = UNKNOWN_RECIPE
    meta[RECIPE] = meta[RECIPE].fillna(UNKNOWN_RECIPE).astype(str)
    recipes = meta.groupby(MODEL)[RECIPE].nunique()
    if (recipes > 1).any():
        model = recipes[recipes > 1].index[0]
        found = sorted(meta.loc[meta[MODEL] == model, RECIPE].unique())
        raise SimilarPatientsError(
            f"Model '{model}' rows come from {len(found)} preprocessing recipes {found}; embeddings of "
            f"different recipes are not comparable. Import them as separate references or model names."
        )
    for column in CENTER:
        if column in meta.columns:
            meta[column] = pd.to_numeric(meta[column], errors="raise").astype(float)
    for column in (SERIES, STUDY, COLLECTION):
        if column in meta.columns:
            meta[column] = meta[column].astype("string")
    identified_by_order = LESION not in meta.columns and not all(c in meta.columns for c in CENTER)
    if LESION not in meta.columns:
        meta[LESION] = _derived_lesion_ids(meta)
    meta[LESION] = meta[LESION].map(_as_id).astype(str)

    duplicated = meta.duplicated([MODEL, PATIENT, LESION], keep=False)
    if duplicated.any():
        refuse_duplicates(meta, duplicated, f"the same {LESION}")
    return identified_by_order


def gather_rows(values: np.ndarray, starts: np.ndarray, dim: int, chunk: int = 65536) -> np.ndarray:
    """Rows ``values[s:s + dim]`` for each start, in bounded-memory chunks."""
    matrix = np.empty((len(starts), dim), dtype=np.float32)
    step = np.arange(dim)[None, :]
    for begin in range(0, len(starts), chunk):
        matrix[begin : begin + chunk] = values[starts[begin : begin + chunk, None] + step]
    return matrix


def _derived_lesion_ids(meta: pd.DataFrame) -> Iterable[str]:
    """Without lesion ids: the series and centre name a lesion; failing those, its order in the patient."""
    if all(c in meta.columns for c in CENTER):
        series = meta[SERIES].fillna("") if SERIES in meta.columns else pd.Series("", index=meta.index)
        return [
            f"{s}@{x:.2f},{y:.2f},{z:.2f}"
            for s, x, y, z in zip(series, meta[CENTER[0]], meta[CENTER[1]], meta[CENTER[2]])
        ]
    return (meta.groupby([MODEL, PATIENT]).cumcount() + 1).astype(str)


def refuse_duplicates(meta: pd.DataFrame, duplicated: pd.Series, what: str) -> None:
    first = meta[duplicated].iloc[0]
    raise SimilarPatientsError(
        f"{int(duplicated.sum())} rows are duplicate lesions ({what} for one patient and model); first: model "
        f"'{first[MODEL]}', patient {first[PATIENT]}, lesion {first[LESION]}. Keep one row per lesion."
    )
