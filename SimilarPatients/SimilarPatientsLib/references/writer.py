"""One version of a reference, written in one streamed pass with every file digested as it is written.

No model's matrix is held twice. Its rows go into ``vectors.npy`` as the source hands them over (at their
stored positions, in any order: a table in memory hands over slices, a folder of Parquet shards its row
groups); then one pass over the stored matrix, block by block, writes the Parquet rows, the norms and, when
the rows came out of order, the matrix's digest. Peak memory is therefore one block plus what the approximate
index needs, beside the matrix itself: the caller's, when it holds the table in memory anyway, or the stored
file's pages, memory-mapped (they count in the resident size, and the kernel takes them back when it needs).

What a first query would otherwise wait for is made here too, for the default search (cosine, in the
corrected space): the corrected space's statistics (mean and deviation, summed in the pass that writes the
table; the z-scored norms, in one more pass; each patient's radius), the approximate index (from
``APPROXIMATE_FROM`` rows, with its recall self-check) and the nearest-match distribution that
:meth:`~.reference.Reference.closeness` reads. The raw space's index and distribution are made on first
use. The manifest comes last and records every file's size and digest: a version is whole when its manifest is there.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..progress import ProgressCallback, report
from ..search import approximate
from ..search.correction import CORRECTED, Correction
from ..search.nearest import EmbeddingSpace
from ..util.atomic import replacing
from ..util.digests import ALGORITHM, BlockDigest, FileRecord, HashingWriter
from . import closeness, manifest, schema, spaces
from .schema import EMBEDDING, MODEL, PATIENT, RECIPE

#: The metric whose index and nearest-match distribution are made at write (the default of every search).
METRIC = "cosine"
PARQUET = "reference.parquet"


def npy_header(shape: tuple, dtype=np.float32) -> bytes:
    """The header ``np.save`` writes before an array of ``shape`` and ``dtype`` (C order)."""
    header = io.BytesIO()
    fields = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(header, fields)
    return header.getvalue()


class MatrixFile:
    """A ``.npy`` matrix of ``rows`` rows written by rows at their positions, in any order and pieces (the
    row length is that of the first piece); digested on the way while the rows come in order."""

    def __init__(self, path: Path, rows: int, dtype=np.float32):
        self.path = Path(path)
        self.rows = rows
        self.dtype = np.dtype(dtype)
        self.header = b""
        self._file = None
        self._digest: BlockDigest | None = BlockDigest()
        self._next = 0  # rows written in order so far
        self._written = 0

    def put(self, positions, block: np.ndarray) -> None:
        """Write ``block``'s rows at ``positions`` (a slice or an array of row numbers)."""
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.header = npy_header((self.rows, block.shape[1]), self.dtype)
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
            self._write(0, self.header)
            self._digest.update(self.header)
        if isinstance(positions, slice):
            positions = np.arange(positions.start, positions.stop)
        positions = np.asarray(positions, dtype=np.int64)
        row_bytes = block.shape[1] * self.dtype.itemsize
        if len(positions) and positions[0] == self._next and (np.diff(positions) == 1).all():
            self._write(len(self.header) + self._next * row_bytes, block)
            if self._digest is not None:
                self._digest.update(block)
            self._next += len(positions)
        else:  # out of order: runs of consecutive positions, each written where it goes
            self._digest = None
            order = np.argsort(positions, kind="stable")
            ordered = positions[order]
            breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
            for run in np.split(np.arange(len(ordered)), breaks):
                if len(run):
                    self._write(len(self.header) + int(ordered[run[0]]) * row_bytes, block[order[run]])
        self._written += len(positions)

    def _write(self, offset: int, data) -> None:
        try:
            self._file.seek(offset)
            self._file.write(memoryview(data).cast("B"))
        except OSError as error:  # a full disk says so with its errno, and with the file's name
            raise OSError(error.errno, error.strerror or str(error), str(self.path)) from error

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def record(self) -> FileRecord | None:
        """The closed file's record when every row came in order (else None: digest it as it is read)."""
        if self._written != self.rows:
            raise RuntimeError(f"{self.path}: {self._written} rows written of {self.rows}")
        return self._digest.record() if self._digest is not None else None


def write_version(
    staging: Path, lesions: pd.DataFrame, table, content: dict, progress: ProgressCallback | None = None
) -> None:
    """Write the version of ``lesions`` (the table's lesion rows, IDC fields added) and the vectors of
    ``table`` (a :class:`~.schema.ReferenceTable`, or a :class:`~.parquet_table.ParquetTable` read by chunks)
    into the new folder ``staging``, with ``content`` (name, source, created, label and display fields,
    notes, IDC index) as the start of its manifest."""
    staging.mkdir(parents=True)
    by_model = np.argsort(lesions[MODEL].to_numpy(dtype=object), kind="stable")
    if (by_model != np.arange(len(lesions))).any():  # each model's rows together, in its matrix's order
        lesions = lesions.iloc[by_model].reset_index(drop=True)
    models = sorted(table.models)
    counts = lesions[MODEL].value_counts()
    folders = {model: f"models/{i}" for i, model in enumerate(models)}
    matrices = {m: MatrixFile(staging / folders[m] / "vectors.npy", int(counts[m])) for m in models}
    try:
        done, total = 0, len(lesions)
        for model, positions, block in table.vector_chunks():
            matrices[model].put(positions, block)
            done += len(block)
            report(progress, done, total, "writing the vectors")
    finally:
        for matrix in matrices.values():
            matrix.close()
    records = {m: matrices[m].record() for m in models}

    files: dict = {}
    infos: dict = {}
    arrow = pa.Table.from_pandas(lesions, preserve_index=False)
    target = arrow.schema.append(pa.field(EMBEDDING, pa.list_(pa.float32())))
    described = list(arrow.column_names)  # dictionaries and statistics: for these, not for the vectors
    first = 0
    with HashingWriter(staging / PARQUET) as out:  # noqa: SIM117 - one statement would need Python 3.10's grammar
        with pq.ParquetWriter(out, target, use_dictionary=described, write_statistics=described) as parquet:
            for model in models:
                n = int(counts[model])
                rows = lesions.iloc[first : first + n]
                matrix = table.matrix(model)
                if matrix is None:
                    matrix = np.load(matrices[model].path, mmap_mode="r")
                header = matrices[model].header if records[model] is None else None
                meta = arrow.slice(first, n)
                norms, correction, record = _store_rows(matrix, meta, parquet, header, progress)
                corrected = spaces.corrected_norms(matrix, correction, progress)
                files[f"{folders[model]}/vectors.npy"] = records[model] or record
                files.update(save_array(staging, f"{folders[model]}/norms.npy", norms))
                files.update(save_array(staging, f"{folders[model]}/{spaces.CENTRE}", correction.centre))
                files.update(save_array(staging, f"{folders[model]}/{spaces.SCALE}", correction.scale))
                files.update(save_array(staging, f"{folders[model]}/{spaces.NORMS}", corrected))
                codes, patients = pd.factorize(rows[PATIENT], sort=True)
                space = EmbeddingSpace(matrix, norms, codes, np.asarray(patients, dtype=object))
                space = spaces.unscaled_space(space, correction, corrected)
                infos[model] = {
                    "folder": folders[model].split("/")[1],
                    "dim": int(space.dim),
                    "lesions": n,
                    "patients": len(patients),
                    "recipe": str(rows[RECIPE].iloc[0]),
                }
                infos[model].update(_first_answers(staging, folders[model], space, files, progress))
                first += n
    files[PARQUET] = out.record()
    content = {
        **content,
        "models": infos,
        "format": manifest.FORMAT,
        "digests": ALGORITHM,
        "files": {relative: record.as_dict() for relative, record in sorted(files.items())},
    }
    manifest.write(staging, content)


def _store_rows(
    matrix: np.ndarray,
    meta: pa.Table,
    parquet: pq.ParquetWriter,
    header: bytes | None,
    progress,
) -> tuple[np.ndarray, Correction, FileRecord | None]:
    """One pass over a model's stored matrix: its Parquet rows, its norms, its mean and deviation (summed
    here, in the stored order, so that they are the same bytes whatever order the source had), and, given
    the ``header`` of a matrix file whose rows were not written in order, that file's digest."""
    n = len(matrix)
    norms = np.empty(n)
    moments = spaces.Moments()
    digest = None
    if header is not None:
        digest = BlockDigest()
        digest.update(header)
    for begin in range(0, n, schema.CHUNK_ROWS):
        end = min(n, begin + schema.CHUNK_ROWS)
        block = np.ascontiguousarray(matrix[begin:end], dtype=np.float32)
        dim = block.shape[1]
        embedding = pa.ListArray.from_arrays(
            pa.array(np.arange(end - begin + 1, dtype=np.int32) * dim), pa.array(block.reshape(-1))
        )
        parquet.write_table(meta.slice(begin, end - begin).append_column(EMBEDDING, embedding), schema.CHUNK_ROWS)
        wide = block.astype(np.float64)
        norms[begin:end] = np.linalg.norm(wide, axis=1)
        moments.add(wide)
        if digest is not None:
            digest.update(block)
        report(progress, end, n, "writing the table and the norms")
    return norms, moments.correction(), digest.record() if digest is not None else None


def _first_answers(staging: Path, folder: str, unscaled: EmbeddingSpace, files: dict, progress) -> dict:
    """The corrected space's radii, its approximate index (for a large model) and its nearest-match
    distribution, saved and recorded in ``files``; what the manifest says of them."""
    if len(unscaled.patient_ids) < 2:
        return {}
    radii, how_radii, graph = spaces.patient_radii(unscaled, METRIC, progress)
    files.update(save_array(staging, f"{folder}/{spaces.radii_file(METRIC)}", radii))
    space = spaces.with_radii(unscaled, radii)
    index = None
    if len(space.norms) >= approximate.APPROXIMATE_FROM:
        # the links of the graph that measured the radii, over the rows augmented with them
        index = approximate.ApproximateIndex.graph(space, METRIC, progress, links=graph)
        index.calibrate(space, progress=progress)
        saved = index.save(staging / folder / approximate.file_name(METRIC, CORRECTED))
        files.update({f"{folder}/{name}": record for name, record in saved.items()})
        if not index.calibration.reached:
            index = None
    nearest, how = closeness.nearest_match_distances(space, METRIC, index, progress)
    files.update(save_array(staging, f"{folder}/{closeness.file_name(METRIC, CORRECTED)}", nearest))
    return {"correction": {METRIC: how_radii}, "closeness": {f"{CORRECTED}-{METRIC}": how}}


def save_array(folder: Path, relative: str, array: np.ndarray) -> dict:
    """``array`` saved as ``.npy`` at ``relative`` under ``folder``, atomically and digested as written: its
    record, by ``relative``."""
    path = Path(folder) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as temporary, HashingWriter(temporary) as out:
        np.save(out, array)
    return {relative: out.record()}
