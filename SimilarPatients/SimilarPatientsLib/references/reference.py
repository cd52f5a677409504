"""One stored reference database, opened: its lesion table, per-model memory-mapped matrices, and search.

Files of one version (written once by :mod:`.writer`, never modified; an approximate index or a nearest-match
distribution for another metric may be added beside a model's matrix, and recorded in the manifest)::

    manifest.json              name, source, models (dimension, recipe, counts), label fields, and the size and
                               digest of every other file (see :mod:`.manifest`)
    reference.parquet          the canonical table (interchange format)
    models/<i>/vectors.npy     float32 matrix of model i's lesions, in table order (memory-mapped)
    models/<i>/norms.npy       their float64 L2 norms
    models/<i>/nearest-<metric>.npy  the nearest-match distribution :meth:`Reference.closeness` reads
    models/<i>/hnsw-<metric>.faiss   approximate index (+ its calibration, .json), built for large references
    models/<i>/centre.npy, scale.npy, corrected-norms.npy, radii-<metric>.npy   the corrected space's statistics
                                     (:mod:`.spaces`); its index (rows augmented with the radii, see
                                     :mod:`..search.approximate`) and distribution are named
                                     ``hnsw-corrected-<metric>.faiss`` and ``nearest-corrected-<metric>.npy``

Every file is checked against its digest before anything is read from it (once per process; later opens
compare sizes only), so a changed byte is an error that names the file and says how to repair it, never an
answer computed from it.
"""

from __future__ import annotations

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
from ..progress import ProgressCallback
from ..search import approximate, feedback, filters
from ..search.correction import CORRECTED, RAW, Correction, check_space, resolved_space
from ..search.nearest import EmbeddingSpace, RowMask, nearest_patients
from ..util import digests
from ..util.columns import pandas_array
from ..util.locks import FileLock
from ..util.model_names import canonical
from . import closeness, label_aware, manifest, schema, spaces
from .fused import search_fused
from .hits import hit_table
from .manifest import DamagedFile
from .writer import PARQUET, save_array

METHODS = ("auto", "exact", "approximate")
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

    def model_name(self, model: str) -> str:
        """This reference's name for ``model``, named in any case or by a documented alias (``CT-CLIP`` for
        ``CTClipVit``), or an error that lists its models."""
        found = canonical(model, self.models)
        if found is None:
            raise SimilarPatientsError(
                f"Reference '{self.name}' has no model '{model}'; it has: {', '.join(self.models)}."
            )
        return found

    def model_info(self, model: str) -> ModelInfo:
        model = self.model_name(model)
        info = self.manifest["models"][model]
        return ModelInfo(
            model, int(info["dim"]), int(info["lesions"]), int(info["patients"]), info["recipe"], info.get("folder", "")
        )

    def search_fused(self, embeddings=None, patient=None, models=None, **options) -> pd.DataFrame:
        """Several models at once: each ranks the patients, the rankings are fused (reciprocal rank fusion,
        or ``fusion="percentile"``). ``embeddings``: model → the query's embedding(s) in it; or a reference
        ``patient``; ``models``: None or "all" for every model. See :func:`.fused.search_fused`."""
        if options.get("similar_by") is not None:
            raise SimilarPatientsError("similar_by searches with one model: use search(model, ..., similar_by=...).")
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


def damaged(name: str, problem: str, source: str | None = None) -> SimilarPatientsError:
    """The error for a reference whose files are not what was written: what is wrong, and how to repair it."""
    origin = f" ({source})" if source else ""
    return SimilarPatientsError(
        f"Reference '{name}' is damaged: {problem}. Import it again from the source it was imported from{origin} "
        f"to repair it: `similar-patients references import {name} --source SOURCE` (or delete it: "
        f"`similar-patients references delete {name}`). Other references are not affected."
    )


class Reference(ReferenceManifest):
    """A reference database: lesions of one or more models, searchable by patient or by embedding."""

    def __init__(self, path: Path, lock=None):
        """``path``: a version folder. ``lock``: what keeps it from being deleted while open (see
        :meth:`ReferenceStore.open`), released by :meth:`close` or when the reference is."""
        self.path = Path(path)
        self._lock = lock
        try:
            self.manifest: dict = manifest.read(self.path)
        except DamagedFile as error:
            raise damaged(self.path.parent.name, f"{error} (version {self.path.name})") from None
        self.name: str = self.manifest["name"]
        if "files" not in self.manifest:
            self._adopt()
        self._files = manifest.files(self.manifest)
        for relative, record in self._files.items():  # a missing or cut file shows at once, at the cost of a stat
            problem = digests.size_check(self.path / relative, record)
            if problem:
                raise self._damaged(relative, problem)
        self._table: pd.DataFrame | None = None
        self._model_lesions: dict[str, pd.DataFrame] = {}
        self._lesion_rows: dict[str, pa.Table] = {}
        self._row_masks: OrderedDict = OrderedDict()
        self._spaces: dict[str, EmbeddingSpace] = {}
        self._indexes: dict[tuple, approximate.ApproximateIndex] = {}
        self._nearest: dict[tuple, np.ndarray] = {}
        self._label_fits: dict[tuple, label_aware.LabelFit] = {}  #: (model, label, metric) -> its fit, once read

    def __repr__(self) -> str:
        return f"Reference({self.name!r}, models={self.models})"

    def close(self) -> None:
        """Let writers remove this version once it is replaced (it stays readable while open)."""
        if self._lock is not None:
            self._lock.release()

    def verified(self, relative: str, progress: ProgressCallback | None = None) -> Path:
        """The path of the version's file ``relative`` once it is known to be the file that was written (read
        in full the first time in this process, a size check after)."""
        record = self._files.get(relative)
        problem = "is not recorded in the manifest" if record is None else None
        problem = problem or digests.check(self.path / relative, record, progress)
        if problem:
            raise self._damaged(relative, problem)
        return self.path / relative

    def _damaged(self, relative: str, problem: str) -> SimilarPatientsError:
        parts = relative.split("/")
        owner = {info.get("folder"): model for model, info in self.manifest["models"].items()}
        model = f" (model {owner[parts[1]]})" if len(parts) == 3 and parts[1] in owner else ""
        return damaged(self.name, f"{relative}{model} {problem} (version {self.path.name})", self.manifest["source"])

    def _adopt(self) -> None:
        """A version written before files had digests: record its files as they are now (so a change from now
        on is found; what changed before cannot be), and say so in its notes."""
        records = {
            path.relative_to(self.path).as_posix(): digests.file_record(path)
            for path in sorted(self.path.rglob("*"))
            if path.is_file() and path.name != manifest.NAME and not path.name.startswith(".")
        }
        note = (
            "file digests recorded when first opened by a SimilarPatients that keeps them, not when written: "
            "import it again to have it checked against its source"
        )
        adopted = {
            **self.manifest,
            "notes": [*self.manifest.get("notes", []), note],
            "format": manifest.FORMAT,
            "digests": digests.ALGORITHM,
            "files": {relative: record.as_dict() for relative, record in records.items()},
        }
        self.manifest = adopted
        self._record(list(records), lambda: records, lambda content: content.update(adopted))

    def _record(self, relatives: list, write, update=None, replace: bool = False) -> None:
        """Add files to this version and to its manifest, under the reference's writer lock: ``write()``
        writes them and returns their records by path, ``update(content)`` changes the manifest beside.
        Files another process recorded first are kept (``replace``: replaced). Where the version cannot be
        written (a read-only data home), what was computed serves this process only."""
        try:
            with FileLock(self.path.parent / ".writer.lock"):
                content = manifest.read(self.path)
                if not replace and "files" in content and all(r in content["files"] for r in relatives):
                    self.manifest, self._files = content, manifest.files(content)
                    return
                records = write()
                if update is not None:
                    update(content)
                content["files"] = {**content.get("files", {}), **{r: rec.as_dict() for r, rec in records.items()}}
                manifest.write(self.path, content)
        except DamagedFile as error:
            raise self._damaged(error.relative, error.problem) from None
        except OSError as error:
            log.info("could not add %s to reference '%s': %s", ", ".join(relatives), self.name, error)
            return
        self.manifest, self._files = content, manifest.files(content)

    def lesions(self, model: str | None = None, progress: ProgressCallback | None = None) -> pd.DataFrame:
        """Lesion rows (no vectors): all models, or one model's in the row order of its matrix."""
        if self._table is None:
            path = self.verified(PARQUET, progress)
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

    def space(
        self, model: str, progress: ProgressCallback | None = None, space: str = RAW, metric: str = "cosine"
    ) -> EmbeddingSpace:
        """The model's vectors, memory-mapped read-only, with norms and patient codes: as stored (``raw``), or
        the ``corrected`` space for ``metric`` (its statistics read, or measured and recorded on first use)."""
        if check_space(space, metric) == CORRECTED:
            key = (model, space, metric)
            if key not in self._spaces:
                self._spaces[key] = spaces.with_radii(self._unscaled(model, progress), self._radii(model, metric))
            return self._spaces[key]
        if model not in self._spaces:
            folder = f"models/{self.model_info(model).folder}"
            lesions = self.lesions(model, progress)
            codes, patients = pd.factorize(lesions[schema.PATIENT], sort=True)
            self._spaces[model] = EmbeddingSpace(
                vectors=np.load(self.verified(f"{folder}/vectors.npy", progress), mmap_mode="r"),
                norms=np.load(self.verified(f"{folder}/norms.npy")),
                patient_codes=codes,
                patient_ids=np.asarray(patients, dtype=object),
            )
        return self._spaces[model]

    def _unscaled(self, model: str, progress: ProgressCallback | None = None) -> EmbeddingSpace:
        """The model's z-scored space (no local scaling): its mean, scale and row norms, read or measured."""
        key = (model, "unscaled")
        if key not in self._spaces:
            raw = self.space(model, progress)
            folder = f"models/{self.model_info(model).folder}"
            names = [f"{folder}/{name}" for name in (spaces.CENTRE, spaces.SCALE, spaces.NORMS)]
            if all(name in self._files for name in names):
                centre, scale, norms = (np.load(self.verified(name, progress)) for name in names)
                correction = Correction(centre, scale)
            else:
                correction = spaces.moments_of(raw.vectors, progress)
                norms = spaces.corrected_norms(raw.vectors, correction, progress)

                def save() -> dict:
                    saved = {}
                    for name, array in zip(names, (correction.centre, correction.scale, norms)):
                        saved.update(save_array(self.path, name, array))
                    return saved

                self._record(names, save)
            self._spaces[key] = spaces.unscaled_space(raw, correction, norms)
        return self._spaces[key]

    def _radii(self, model: str, metric: str, progress: ProgressCallback | None = None) -> np.ndarray:
        """Each patient's local-scaling radius for ``metric``, read or measured (and recorded)."""
        folder = f"models/{self.model_info(model).folder}"
        relative = f"{folder}/{spaces.radii_file(metric)}"
        if relative in self._files:
            return np.load(self.verified(relative, progress))
        radii, how, _ = spaces.patient_radii(self._unscaled(model, progress), metric, progress)

        def describe(content: dict) -> None:
            content["models"][model].setdefault("correction", {})[metric] = how

        self._record([relative], lambda: save_array(self.path, relative, radii), describe)
        return radii

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

    def closeness(
        self, model: str, metric: str, distances, progress: ProgressCallback | None = None, space: str = CORRECTED
    ) -> np.ndarray:
        """Each distance placed on this reference's own distribution of nearest-match distances (each
        reference patient's distance to its nearest other patient, in the same ``space``): the percentage of
        those that are larger, so 97 reads "closer than 97% of nearest matches in this reference". The
        distribution (see :mod:`.closeness`) is made when the reference is written for cosine; for another
        metric, or a reference written before, on first use (in one pass over the matrix, with progress),
        and kept. NaN for a model of one patient: there is no other to be near to, so no distribution to read."""
        if self.model_info(model).patients < 2:
            return np.full(np.shape(distances), np.nan)
        nearest = self._nearest_match_distances(model, metric, progress, resolved_space(space, metric))
        return closeness.percent_farther(nearest, distances)

    def _nearest_match_distances(
        self, model: str, metric: str, progress: ProgressCallback | None, space: str = RAW
    ) -> np.ndarray:
        key = (model, metric, space)
        if key in self._nearest:
            return self._nearest[key]
        relative = f"models/{self.model_info(model).folder}/{closeness.file_name(metric, space)}"
        if relative in self._files:
            nearest = np.load(self.verified(relative, progress))
        else:
            index = self._auto_index(model, metric, progress, space)  # measured as ``auto`` searches answer
            searched = self.space(model, progress, space, metric)
            name = f"Reference '{self.name}' ({model})"
            nearest, how = closeness.nearest_match_distances(searched, metric, index, progress, name)

            def save() -> dict:
                return save_array(self.path, relative, nearest)

            def describe(content: dict) -> None:
                name = metric if space == RAW else f"{space}-{metric}"
                content["models"][model].setdefault("closeness", {})[name] = how

            self._record([relative], save, describe)
        self._nearest[key] = nearest
        return nearest

    def _auto_index(
        self, model: str, metric: str, progress: ProgressCallback | None, space: str = RAW
    ) -> approximate.ApproximateIndex | None:
        """The index ``auto`` answers from: the model's, from ``APPROXIMATE_FROM`` rows, where its self-check
        reached its target recall; None where the exact scan answers."""
        if len(self.space(model).norms) < approximate.APPROXIMATE_FROM:
            return None
        index = self.approximate_index(model, metric, progress, space)
        if not index.calibration.reached:
            log.info("'%s' %s: %s; scanning exactly", self.name, model, index.calibration.describe())
            return None
        return index

    def approximate_index(
        self, model: str, metric: str, progress: ProgressCallback | None = None, space: str = RAW
    ) -> approximate.ApproximateIndex:
        """The model's HNSW index for ``metric`` in ``space``: loaded if built, else built now and saved."""
        key = (model, metric, space)
        if key not in self._indexes:
            searched = self.space(model, progress, space, metric)
            folder = f"models/{self.model_info(model).folder}"
            relative = f"{folder}/{approximate.file_name(metric, space)}"
            sidecar = approximate.calibration_path(Path(relative)).as_posix()

            def save() -> dict:
                saved = index.save(self.path / relative)
                return {f"{folder}/{name}": record for name, record in saved.items()}

            index = None
            if relative in self._files:
                for part in (relative, sidecar):
                    if part in self._files:
                        self.verified(part, progress)
                try:
                    index = approximate.ApproximateIndex.load(self.path / relative, metric, searched.correction)
                except approximate.StaleIndex as stale:  # an older version's graph: rebuilt, never searched
                    log.warning("'%s' %s: %s (written by an older version); rebuilding it", self.name, model, stale)
                    index = approximate.ApproximateIndex.build(searched, metric, progress)
                    self._record([relative, sidecar], save, replace=True)
                else:
                    if index.calibration is None:  # built before indexes checked themselves: check it now
                        index.calibrate(searched, progress=progress)
                        self._record([relative, sidecar], save, replace=True)
            if index is None:
                log.info("building the approximate %s index of %s in '%s' (%s)", metric, model, self.name, space)
                index = approximate.ApproximateIndex.build(searched, metric, progress)
                self._record([relative, sidecar], save)
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
        space: str = CORRECTED,
        like: Sequence[str] = (),
        unlike: Sequence[str] = (),
        similar_by: str | None = None,
    ) -> pd.DataFrame:
        """The ``k`` nearest patients to ``embeddings`` (one or several lesions of one patient) or to a
        reference ``patient``'s lesions; ``where`` filters reference lesions (expressions, one expression,
        or a mapping), ``exclude`` drops patients. ``query_lesions`` names the rows of ``embeddings`` in the
        ``query_lesion`` column (default with several rows: "1", "2", ... in their order).

        ``method``: ``exact`` scans; ``approximate`` asks the reference's index; ``auto`` uses the index
        above ``APPROXIMATE_FROM`` rows when its self-check reached the target recall, else scans. The
        ``search`` and ``index_recall`` columns say which answered.

        ``space``: ``corrected`` (hub-free: z-scored and locally scaled, see :mod:`..search.correction`), or
        ``raw`` (plain distance on the stored vectors, as published lists were made); the ``space`` column
        says which answered. The dot score has no corrected space: it answers in ``raw``.

        ``like`` / ``unlike``: hit patients the user marked ("more like these", :mod:`..search.feedback`): the
        query moves towards the liked and away from the unliked; unliked patients are left out of the answer,
        liked ones marked ``like`` in its ``feedback`` column.

        ``similar_by``: a label of the reference (``stage``, ``histology``, or a label field): the visual
        ranking blended with closeness on a direction fitted on the reference's own labels (see
        :mod:`.label_aware`); the ``similar_by`` column says so. It is not combined with ``like`` / ``unlike``."""
        check_search(embeddings, patient, method)
        marks = feedback.judged(like, unlike, patient)
        model = self.model_name(model)
        space = resolved_space(space, metric)
        if similar_by is not None:
            if marks:
                raise SimilarPatientsError(
                    "Search similar by a label or with like / unlike marks, not both at once: the label-aware "
                    "ranking was measured for the query as given (clear the marks, or choose 'appearance')."
                )
            options = {"metric": metric, "where": where, "exclude": exclude, "method": method, "space": space}
            options.update(progress=progress, query_lesions=query_lesions)
            return label_aware.search(self, model, similar_by, embeddings, patient, k, **options)
        if marks:
            feedback.check_space(space, metric)
        searched = self.space(model, progress, space, metric)
        query_radius = None
        if patient is not None:
            own = self.patient_embeddings(model, str(patient))
            embeddings, query_lesions = own.vectors, own.lesion_ids
            if searched.scaled:
                query_radius = float(searched.correction.radii[searched.patient_code(str(patient))])
        else:
            query_lesions = query_lesion_names(embeddings, query_lesions)
        if marks:  # a new query: its radius is measured in its own search
            embeddings, query_radius = self.feedback_query(model, embeddings, marks), None
            exclude = [*exclude, *marks.unlike]
        allowed = self.row_mask(model, where) if where else None
        # excluded patients are dropped from the answer, not masked: a mask per query would cost the whole
        # reference; asking for as many more patients as are excluded gives the same k
        excluded = {str(p) for p in exclude if searched.patient_code(str(p)) is not None}
        index = None
        if method == "approximate":
            index = self.approximate_index(model, metric, progress, space)
        elif method == "auto":
            index = self._auto_index(model, metric, progress, space)
        candidates = index.candidates if index else None
        matches = nearest_patients(
            searched, embeddings, k + len(excluded), metric, allowed, candidates, progress, query_radius
        )
        matches = [m for m in matches if m.patient not in excluded][:k]
        counts = {m.patient: int(searched.lesion_counts[searched.patient_codes[m.row]]) for m in matches}
        recall = index.calibration.recall if index is not None else None
        rows = self.lesion_rows(model, [m.row for m in matches])
        hits = hit_table(matches, rows, counts, metric, query_lesions, self.label_fields, recall, space)
        return feedback.marked(hits, marks) if marks else hits

    def feedback_query(self, model: str, embeddings: np.ndarray, marks: feedback.Judged) -> np.ndarray:
        """``embeddings`` moved by the marked patients (:func:`..search.feedback.moved_query`), in the stored
        space; a marked patient the model lacks is refused by name."""
        searched = self.space(model, space=CORRECTED)

        def lesions(patient: str, side: str) -> np.ndarray:
            if searched.patient_code(patient) is None:
                raise SimilarPatientsError(
                    f"Patient {patient} (marked {side}) is not in reference '{self.name}' for model '{model}': "
                    f"mark patients of this reference's hits."
                )
            return self.patient_embeddings(model, patient).vectors

        liked = [lesions(p, "like") for p in marks.like]
        unliked = [lesions(p, "unlike") for p in marks.unlike]
        return feedback.moved_query(searched.correction, embeddings, liked, unliked)
