"""One stored reference database, opened: its lesion table, per-model memory-mapped matrices, and search.

Files of one version (written once by :mod:`store`, never modified, except that an approximate index
may be added beside a model's matrix)::

    manifest.json              name, source, models (dimension, recipe, counts), label fields
    reference.parquet          the canonical table (interchange format)
    models/<i>/vectors.npy     float32 matrix of model i's lesions, in table order (memory-mapped)
    models/<i>/norms.npy       their float64 L2 norms
    models/<i>/hnsw-<metric>.faiss   approximate index, built for large references
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SimilarPatientsError
from ..progress import ProgressCallback, report
from ..search import approximate, filters
from ..search.nearest import EmbeddingSpace, RowMask, nearest_patients
from ..util.atomic import replacing
from ..util.columns import pandas_array
from . import schema
from .fused import search_fused
from .hits import hit_table

METHODS = ("auto", "exact", "approximate")
#: Patients whose nearest-match distance makes the distribution :meth:`Reference.closeness` reads.
CLOSENESS_SAMPLE = 1000
#: Filters whose row masks a reference keeps (most recently used first out last).
KEPT_FILTERS = 16
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """One model of a reference, as its manifest records it."""

    name: str
    dim: int  #: embedding length
    lesions: int
    patients: int
    recipe: str  #: the preprocessing its embeddings were made with (a query must use the same)
    folder: str  #: where its matrix lies, under ``models/``


@dataclass(frozen=True)
class PatientEmbeddings:
    """One reference patient's lesion vectors in one model, and their lesion ids (same order)."""

    vectors: np.ndarray
    lesion_ids: list


class ReferenceManifest:
    """What a reference's manifest says (its models and fields), read the same way for a stored reference
    and for one held elsewhere (BigQuery): the subclass sets ``name`` and ``manifest``."""

    name: str
    manifest: dict

    @property
    def models(self) -> list:
        return list(self.manifest["models"])

    @property
    def label_fields(self) -> list:
        """Every column that is not structural: what rides along into results, filters and evaluation."""
        return list(self.manifest["label_fields"])

    @property
    def display_fields(self) -> list:
        """The label fields a person sees first (hit tables, the demo, a map's colours), as the source
        declared them at import; all label fields when it declared none."""
        return list(self.manifest.get("display_fields") or self.label_fields)

    def model_info(self, model: str) -> ModelInfo:
        if model not in self.manifest["models"]:
            raise SimilarPatientsError(
                f"Reference '{self.name}' has no model '{model}'; it has: {', '.join(self.models)}."
            )
        info = self.manifest["models"][model]
        return ModelInfo(
            model, int(info["dim"]), int(info["lesions"]), int(info["patients"]), info["recipe"], info.get("folder", "")
        )

    def search_fused(self, embeddings=None, patient=None, models=None, **options) -> pd.DataFrame:
        """Several models at once: each ranks the patients, the rankings are fused (reciprocal rank fusion,
        or ``fusion="percentile"``). ``embeddings``: model → the query's embedding(s) in it; or a reference
        ``patient``; ``models``: None or "all" for every model. See :func:`.fused.search_fused`."""
        return search_fused(self, embeddings, patient, models, **options)


def check_search(embeddings, patient, method: str) -> None:
    """Refuse a search that names neither or both of an embedding and a patient, or an unknown method."""
    if (embeddings is None) == (patient is None):
        given = "both an embedding and a patient" if patient is not None else "neither"
        raise SimilarPatientsError(
            f"Search with an embedding (embeddings=...) or a reference patient (patient=...); got {given}."
        )
    if method not in METHODS:
        raise SimilarPatientsError(f"Unknown search method '{method}'; choose one of {', '.join(METHODS)}.")


def query_lesion_names(embeddings, given: Sequence[str] | None) -> Sequence[str] | None:
    """The names of the query's rows in the ``query_lesion`` column: ``given``, or "1", "2", ... when
    several embeddings come unnamed."""
    if given is None and np.ndim(embeddings) == 2 and len(embeddings) > 1:
        return [str(i + 1) for i in range(len(embeddings))]
    return given


class Reference(ReferenceManifest):
    """A reference database: lesions of one or more models, searchable by patient or by embedding."""

    def __init__(self, path: Path, lock=None):
        """``path``: a version folder. ``lock``: what keeps it from being deleted while open (see
        :meth:`ReferenceStore.open`), released when the reference is."""
        self.path = Path(path)
        self._lock = lock
        self.manifest: dict = json.loads((self.path / "manifest.json").read_text(encoding="utf-8"))
        self.name: str = self.manifest["name"]
        self._table: pd.DataFrame | None = None
        self._model_lesions: dict[str, pd.DataFrame] = {}
        self._lesion_rows: dict[str, pa.Table] = {}
        self._row_masks: OrderedDict = OrderedDict()
        self._spaces: dict[str, EmbeddingSpace] = {}
        self._indexes: dict[tuple, approximate.ApproximateIndex] = {}

    def __repr__(self) -> str:
        return f"Reference({self.name!r}, models={self.models})"

    def lesions(self, model: str | None = None) -> pd.DataFrame:
        """Lesion rows (no vectors): all models, or one model's in the row order of its matrix."""
        if self._table is None:
            path = self.path / "reference.parquet"
            columns = [c for c in pq.read_schema(path).names if c != schema.EMBEDDING]
            self._table = pd.read_parquet(path, columns=columns)
        if model is None:
            return self._table
        if model not in self._model_lesions:
            self.model_info(model)
            rows = self._table[schema.MODEL] == model
            self._model_lesions[model] = self._table[rows].reset_index(drop=True)
        return self._model_lesions[model]

    def lesion_rows(self, model: str, rows: Sequence[int], columns: Sequence[str] | None = None) -> dict:
        """The metadata of ``rows`` of one model (positions in its matrix) as column → pandas array: looked
        up by position in one contiguous Arrow table, so it costs the rows asked for, not the reference's
        size (a take on pandas' own chunked columns reads them whole)."""
        if model not in self._lesion_rows:
            table = pa.Table.from_pandas(self.lesions(model), preserve_index=False)
            self._lesion_rows[model] = table.combine_chunks()
        table = self._lesion_rows[model]
        if columns is not None:
            table = table.select([c for c in columns if c in table.column_names])
        taken = table.take(pa.array(np.asarray(rows, dtype=np.int64)))
        return {name: pandas_array(column) for name, column in zip(taken.column_names, taken.columns)}

    def row_mask(self, model: str, where: filters.Filters) -> RowMask:
        """The lesion rows of ``model`` that pass ``where``, computed once and kept for the next query with
        the same filter (the last ``KEPT_FILTERS`` filters)."""
        key = (model, repr(filters.terms(where)))
        if key in self._row_masks:
            self._row_masks.move_to_end(key)
        else:
            self._row_masks[key] = RowMask(filters.row_mask(self.lesions(model), where))
            while len(self._row_masks) > KEPT_FILTERS:
                self._row_masks.popitem(last=False)
        return self._row_masks[key]

    def space(self, model: str) -> EmbeddingSpace:
        """The model's vectors, memory-mapped read-only, with norms and patient codes."""
        if model not in self._spaces:
            folder = self.path / "models" / self.model_info(model).folder
            lesions = self.lesions(model)
            codes, patients = pd.factorize(lesions[schema.PATIENT], sort=True)
            self._spaces[model] = EmbeddingSpace(
                vectors=np.load(folder / "vectors.npy", mmap_mode="r"),
                norms=np.load(folder / "norms.npy"),
                patient_codes=codes,
                patient_ids=np.asarray(patients, dtype=object),
            )
        return self._spaces[model]

    def patient_embeddings(self, model: str, patient: str) -> PatientEmbeddings:
        """One reference patient's lesion vectors and lesion ids in ``model``."""
        space = self.space(model)
        code = space.patient_code(str(patient))
        if code is None:
            raise SimilarPatientsError(
                f"Patient {patient} is not in reference '{self.name}' for model '{model}' "
                f"({self.model_info(model).patients} patients there)."
            )
        rows = space.rows_of(code)
        ids = self.lesion_rows(model, rows, [schema.LESION])[schema.LESION]
        return PatientEmbeddings(np.asarray(space.vectors[rows]), list(ids))

    def closeness(self, model: str, metric: str, distances, progress: ProgressCallback | None = None) -> np.ndarray:
        """Each distance placed on this reference's own distribution of nearest-match distances (each
        reference patient's distance to its nearest other patient): the percentage of those that are
        larger, so 97 reads "closer than 97% of nearest matches in this reference". The distribution is
        computed once per model and metric (on up to 1,000 patients, seeded) and kept with the version."""
        nearest = self._nearest_match_distances(model, metric, progress)
        values = np.asarray(distances, dtype=np.float64)
        return 100.0 * (len(nearest) - np.searchsorted(nearest, values, side="right")) / len(nearest)

    def _nearest_match_distances(self, model: str, metric: str, progress: ProgressCallback | None) -> np.ndarray:
        """Sorted distances from (a sample of) the reference's patients to their nearest other patient."""
        path = self.path / "models" / self.model_info(model).folder / f"nearest-{metric}.npy"
        if path.is_file():
            return np.load(path)
        space = self.space(model)
        patients = len(space.patient_ids)
        if patients < 2:
            raise SimilarPatientsError(f"Reference '{self.name}' has one patient in {model}: nothing to compare with.")
        sample = np.sort(np.random.default_rng(0).choice(patients, size=min(patients, CLOSENESS_SAMPLE), replace=False))
        nearest = np.empty(len(sample))
        for i, code in enumerate(sample):
            report(progress, i, len(sample), "measuring this reference's nearest-match distances")
            match = nearest_patients(space, space.vectors[space.rows_of(code)], 2, metric)
            nearest[i] = next(m.distance for m in match if m.patient != space.patient_ids[code])
        nearest.sort()
        try:
            with replacing(path) as temporary, open(temporary, "wb") as stream:
                np.save(stream, nearest)
        except OSError as error:  # a read-only data home (a site's shared copy): measured again next time
            log.info("could not keep the nearest-match distances in %s: %s", path.parent, error)
        return nearest

    def approximate_index(
        self, model: str, metric: str, progress: ProgressCallback | None = None
    ) -> approximate.ApproximateIndex:
        """The model's HNSW index for ``metric``: loaded if built, else built now and saved."""
        key = (model, metric)
        if key not in self._indexes:
            path = self.path / "models" / self.model_info(model).folder / f"hnsw-{metric}.faiss"
            if path.exists():
                index = approximate.ApproximateIndex.load(path, metric)
                if index.calibration is None:  # built before indexes checked themselves: check it now
                    index.calibrate(self.space(model), progress=progress)
                    index.save(path)
                self._indexes[key] = index
            else:
                log.info("building the approximate %s index of %s in '%s'", metric, model, self.name)
                index = approximate.ApproximateIndex.build(self.space(model), metric, progress)
                index.save(path)
                self._indexes[key] = index
        return self._indexes[key]

    def search(
        self,
        model: str,
        embeddings: np.ndarray | None = None,
        patient: str | None = None,
        k: int = 5,
        metric: str = "cosine",
        where: filters.Filters = None,
        exclude: Sequence[str] = (),
        method: str = "auto",
        progress: ProgressCallback | None = None,
        query_lesions: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """The ``k`` nearest patients to ``embeddings`` (one or several lesions of one patient) or to a
        reference ``patient``'s lesions; ``where`` filters reference lesions (expressions, one expression,
        or a mapping), ``exclude`` drops patients. ``query_lesions`` names the rows of ``embeddings`` in the
        ``query_lesion`` column (default with several rows: "1", "2", ... in their order).

        ``method``: ``exact`` scans; ``approximate`` asks the reference's index; ``auto`` uses the index
        above ``APPROXIMATE_FROM`` rows when its self-check reached the target recall, else scans. The
        ``search`` and ``index_recall`` columns say which answered."""
        check_search(embeddings, patient, method)
        space = self.space(model)
        if patient is not None:
            own = self.patient_embeddings(model, str(patient))
            embeddings, query_lesions = own.vectors, own.lesion_ids
        else:
            query_lesions = query_lesion_names(embeddings, query_lesions)
        allowed = self.row_mask(model, where) if where else None
        # excluded patients are dropped from the answer, not masked: a mask per query would cost the whole
        # reference; asking for as many more patients as are excluded gives the same k
        excluded = {str(p) for p in exclude if space.patient_code(str(p)) is not None}
        index = None
        if method == "approximate" or (method == "auto" and len(space.norms) >= approximate.APPROXIMATE_FROM):
            index = self.approximate_index(model, metric, progress)
            if method == "auto" and not index.calibration.reached:
                log.info("'%s' %s: %s; scanning exactly", self.name, model, index.calibration.describe())
                index = None
        matches = nearest_patients(
            space, embeddings, k + len(excluded), metric, allowed, index.candidates if index else None
        )
        matches = [m for m in matches if m.patient not in excluded][:k]
        counts = {m.patient: int(space.lesion_counts[space.patient_codes[m.row]]) for m in matches}
        recall = index.calibration.recall if index is not None else None
        rows = self.lesion_rows(model, [m.row for m in matches])
        return hit_table(matches, rows, counts, metric, query_lesions, self.label_fields, recall)
