"""The module's logic: every call from the Slicer module into the library, and the little that touches
Slicer's application (its scene, layout, DICOM database), without Qt.

Long work returns a request to a persistent worker process (``scene/worker.py``) that the GUI polls: model
loads and image queries in one, imports, searches by patient, series downloads and thumbnails in another.
None runs on a thread of Slicer's process: Slicer's idle event loop holds the GIL, so such a thread would
run only while the GUI's timer polls (``benchmarks/gil.py``). The blocking calls a researcher types in
Slicer's Python console (:meth:`find_similar`, :meth:`neighbors`, :meth:`load_matches`) wait on the same
requests. Slicer's own modules (``slicer``, ``DICOMLib``) are imported inside the functions that use them,
so that pytest drives this class on ``slicer-core``'s scene.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Cancelled, SimilarPatientsError
from ..progress import ProgressCallback
from .settings import ModuleSettings

log = logging.getLogger(__name__)
#: The reference the module offers to import (the published NLST-Sybil embeddings).
NLST = "nlst-sybil"


@dataclass(frozen=True)
class ModelChoices:
    """The model list of a reference: its entries, a status line for each, and the one to preselect."""

    names: list
    tooltips: dict
    preferred: str


@dataclass
class QueryFiles:
    """A query's CT and tumor marks as the worker reads them (written from the nodes, in memory only)."""

    folder: str  #: a temporary folder, removed with :meth:`remove`
    image: str | None  #: the CT as NRRD, or None when the worker holds this volume already
    image_key: str  #: names the volume's voxels (node id and modification times)
    tumors: dict  #: ``masks`` (one file per segment), ``boxes`` or ``points`` in LPS mm
    volume: object = field(repr=False, default=None)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class ModuleLogic:
    """The library as the module uses it.

    Args:
        settings: the application settings (:class:`ModuleSettings`).
        home: the data home (default ``$SIMILARPATIENTS_HOME`` or the per-user data folder).
        python: the worker's interpreter (default: Slicer's ``PythonSlicer``).
    """

    def __init__(self, settings: ModuleSettings, home=None, python=None):
        self.settings = settings
        self.home = home
        self.python = python
        self._workers: dict = {}  # role -> WorkerClient: "query" keeps the models, "jobs" does the rest
        self._image_key = None  # the volume whose voxels the worker holds
        self._thumbnails = None  # the folder the worker draws this session's thumbnails in
        self._remote: dict = {}  # BigQuery references opened this session (opening one calls Google)
        self.last_volume = None  # the CT of the last image query
        self.last_seed_lps = None  # the tumor seed of the last image query (LPS mm)
        self.last_thumbnails: list = []  # its tumors' thumbnails (PNG paths)
        self.comparison = None  # the views of the last matches shown (their links end with the next)

    # --- references ------------------------------------------------------------------------------------

    def store(self):
        from ..references.store import ReferenceStore

        return ReferenceStore(self.home)

    def references(self) -> list:
        """The stored references, then the BigQuery tables of the settings once BigQuery searches are allowed."""
        listed = self.settings.bigquery_references if self.settings.bigquery_allowed else []
        return self.store().names() + listed

    def open(self, reference: str):
        """A stored reference, or a BigQuery one (bq://...), refused unless BigQuery searches are allowed;
        a BigQuery reference is opened once per session (opening it calls Google)."""
        from ..cloud import is_bigquery, open_reference

        if not is_bigquery(reference):
            return open_reference(reference, self.store())
        if not self.settings.bigquery_allowed:
            raise SimilarPatientsError(
                f"{reference} is a BigQuery reference: searching it sends the query's embedding to Google. Allow "
                f"BigQuery searches in the module's settings first."
            )
        if reference not in self._remote:
            self._remote[reference] = open_reference(reference, self.store())
        return self._remote[reference]

    def models(self, reference: str) -> list:
        return self.open(reference).models if reference else []

    def model_choices(self, reference: str, metric: str = "cosine") -> ModelChoices:
        """What the model list offers for ``reference``: its models, each with its status line, and, with
        two or more, all of them fused (``FUSED_CHOICE``), preferred only where an evaluation of this
        reference showed fusion at least as good as its best single model (its tooltip says why or why not)."""
        from ..references import FUSED_CHOICE, fusion_default

        opened = self.open(reference)
        names = list(opened.models)
        tooltips = {m: self.model_status(reference, m) for m in names}
        preferred = names[0] if names else ""
        if len(names) > 1:
            advice = fusion_default(opened, metric)
            names.append(FUSED_CHOICE)
            tooltips[FUSED_CHOICE] = f"Every model of the reference, their rankings fused. {advice.reason}"
            preferred = FUSED_CHOICE if advice.default else preferred
        return ModelChoices(names, tooltips, preferred)

    def similar_by_choices(self, reference: str) -> tuple[list, dict]:
        """The "Similar with respect to" choices of ``reference`` and a tooltip each: appearance, then the
        labels a label-aware search accepts there (none for a BigQuery reference: the fit is kept with a
        stored one)."""
        from ..cloud import is_bigquery
        from ..references import label_aware
        from .controller import APPEARANCE

        tooltips = {APPEARANCE: "How the tumors look, alone (the corrected visual distance)."}
        if not reference or is_bigquery(reference):
            return [APPEARANCE], tooltips
        labels = label_aware.offered_labels(self.open(reference))
        for name in labels:
            tooltips[name] = label_aware.describe(name)
        return [APPEARANCE, *labels], tooltips

    def models_of(self, reference: str, choice: str) -> list:
        """The models a choice of the model list runs: every model of the reference for the fused choice."""
        from ..references.fused import fused_models, is_fused

        return fused_models(self.open(reference), choice) if is_fused(choice) else [choice]

    def opened_without_network(self, reference: str) -> bool:
        """True when ``reference``'s models can be listed without calling a service (module entry must not)."""
        from ..cloud import is_bigquery

        return not is_bigquery(reference) or reference in self._remote

    def display_fields(self, reference: str) -> list:
        """The label fields the reference declares for people to see, in order."""
        return self.open(reference).display_fields if reference else []

    def model_status(self, reference: str, model: str) -> str:
        """One line on a reference's model: its recipe, whether it runs from an image here, its licence and
        its weights (here, or how much a first query downloads)."""
        from .. import models

        recipe = self.open(reference).model_info(model).recipe
        try:
            spec = models.get(model)
        except SimilarPatientsError as error:
            return f"{model} ({recipe}): search by patient only; {error}"
        if spec.with_recipe(None).name != recipe and recipe not in [r.name for r in spec.other_recipes]:
            return f"{model} ({recipe}): search by patient only; the reference was built with another recipe"
        state = models.status(model, spec.weights)
        if state.source is None:
            weights = "no weights needed"
        elif state.present is not None or self.settings.weights_file(model):
            weights = "weights on this computer"
        else:
            size = f"{state.source.size / 1e6:.0f} MB" if state.source.size else f"at least {spec.encoder_mb} MB"
            weights = f"a first query downloads {size} of weights"
        licence = "no licence" if state.source is None else state.source.licence
        return f"{model} ({recipe}): {licence}; {weights}; runs on the GPU when there is one, else the CPU"

    def needs_torch(self, models) -> bool:
        """Whether embedding with ``models`` runs a network (torch, MONAI); the weight-free model does not. An
        unknown model is refused here, before anything is installed for it."""
        from ..models import registry

        return any("torch" in registry.get(model).encoder.needs for model in models)

    def runs_from_an_image(self, reference: str, model: str) -> bool:
        """Whether ``model`` of ``reference`` can embed a tumor here (a registry model, the reference's recipe)."""
        return "search by patient only" not in self.model_status(reference, model)

    def nlst_local_copy(self):
        from ..references.nlst_sybil import find_local_copy

        return find_local_copy()

    def start_import_nlst(self, progress: ProgressCallback | None = None):
        """Import the NLST-Sybil reference (a local copy, or a verified download), in the worker."""
        return self.worker("jobs").submit("import", progress, name=NLST, source=NLST)

    def start_neighbors(
        self,
        reference,
        model,
        patient,
        k=5,
        metric="cosine",
        where=None,
        progress=None,
        like=(),
        unlike=(),
        similar_by=None,
    ):
        """A reference patient's nearest patients, each with its similarity (closeness percentile), searched by
        the worker; for the fused choice, ranked by every model together, with each model's rank. A BigQuery
        reference is refused unless BigQuery searches are allowed. ``like`` / ``unlike``: hits marked ("more
        like these"); ``similar_by``: a label for a label-aware search."""
        from ..cloud import is_bigquery

        if is_bigquery(reference) and not self.settings.bigquery_allowed:
            self.open(reference)  # refused, with the reason
        fields = dict(reference=reference, model=model, patient=patient, k=int(k), metric=metric)
        fields.update(like=list(like), unlike=list(unlike))
        if similar_by:
            fields["similar_by"] = similar_by
        return self.worker("jobs").submit("neighbors", progress, where=list(where or []), **fields)

    def neighbors(
        self, reference, model, patient, k=5, metric="cosine", where=None, progress=None, cancelled=None, **options
    ):
        """The Python console's call: :meth:`start_neighbors`, waited for, as the library's hit table
        (``options``: ``like`` / ``unlike`` marks, ``similar_by=LABEL`` for a label-aware search)."""
        job = self.start_neighbors(reference, model, patient, k, metric, where, progress, **options)
        return self.hit_table(job.wait(cancelled))

    @staticmethod
    def hit_table(answer: dict):
        """A worker's answer's hits as the library's hit table."""
        import pandas as pd

        return pd.DataFrame(answer["hits"])

    # --- weights ---------------------------------------------------------------------------------------

    def weight_status(self, model: str):
        from .. import models

        return models.status(model, models.get(model).weights)

    def licence_to_accept(self, model: str) -> str | None:
        """The weight licence the user must accept before ``model``'s weights are fetched, or None."""
        state = self.weight_status(model)
        return state.source.licence if state.needs_acceptance and not self.settings.weights_file(model) else None

    def accept_licence(self, model: str) -> None:
        from ..models import weights

        weights.acknowledge(model)

    def weights_to_download(self, model: str) -> str | None:
        """The URL ``model``'s weights would be downloaded from, or None when they are here (or not needed)."""
        from ..models.weights import download_url

        state = self.weight_status(model)
        if not state.needs_download or self.settings.weights_file(model):
            return None
        return download_url(model, state.source)

    # --- the workers -----------------------------------------------------------------------------------

    def worker(self, role: str = "query"):
        """A persistent worker, started on first use with Slicer's own Python (PythonSlicer): the ``query``
        worker loads the models and answers image queries; the ``jobs`` worker imports, searches by
        patient, fetches series and draws the matches' thumbnails. Two, so that a search never waits behind
        a model being loaded, and cancelling a download (which ends its worker) keeps the loaded models."""
        if role not in self._workers:
            from ..scene.worker import WorkerClient

            python = self.python or shutil.which("PythonSlicer")
            if python is None:
                raise SimilarPatientsError(
                    "PythonSlicer was not found next to Slicer; it runs the queries. Reinstall Slicer."
                )
            environment = dict(os.environ)
            if self.home is not None:
                environment["SIMILARPATIENTS_HOME"] = str(self.home)
            self._workers[role] = WorkerClient(python, environment)
        return self._workers[role]

    def start_open(self, reference: str, model: str, metric: str = "cosine"):
        """Start the jobs worker and open ``reference`` there (its imports paid, the similarity scale of
        ``model`` measured) ahead of the first search by patient."""
        return self.worker("jobs").submit("open", reference=reference, model=model, metric=metric)

    def start_prepare(self, reference: str, model: str, metric: str = "cosine", progress=None):
        """Start the worker, load ``model`` (every model, for the fused choice) and measure ``reference``'s
        similarity scale ahead of the first click (nothing is downloaded: call it only when
        :meth:`weights_to_download` is None for each)."""
        return self.worker().submit(
            "prepare",
            progress,
            model=model,
            reference=reference,
            metric=metric,
            weights=self._weights(reference, model),
        )

    def _weights(self, reference: str, model: str):
        """The site's weights file(s) for a choice: one path, or one per model for the fused choice."""
        from ..references.fused import is_fused

        if is_fused(model):
            return {m: self.settings.weights_file(m) for m in self.models_of(reference, model)}
        return self.settings.weights_file(model)

    def write_query(self, volume, segmentation=None, segments=None, point=None, roi=None) -> QueryFiles:
        """The CT and the tumor marks (each segment of ``segments``, each point of a point list, or an ROI)
        copied out of the nodes into a temporary folder (the nodes and their storage are not touched); the
        CT only when the worker does not hold this volume already."""
        import SimpleITK as sitk

        from ..scene import nodes

        folder = tempfile.mkdtemp(prefix="SimilarPatients-")
        try:
            if segmentation is not None:  # one mask per segment: the worker makes one tumor of each
                ids = [segments] if isinstance(segments, str) or segments is None else list(segments)
                tumors = {"masks": []}
                for index, segment_id in enumerate(ids):
                    tumors["masks"].append(os.path.join(folder, f"mask-{index}.nrrd"))
                    mask = nodes.segment_mask(segmentation, segment_id, volume)
                    sitk.WriteImage(mask, tumors["masks"][-1], False)
            elif roi is not None:
                tumors = {"boxes": [[*low, *high] for low, high in [nodes.roi_tumor(roi).box]]}
            elif point is not None:
                tumors = {"points": [list(t.seed) for t in nodes.point_tumors(point)]}
            else:
                raise SimilarPatientsError("Mark the tumor with a segment, a point list or an ROI.")
            # the CT goes to the worker only when it changed since the last query: its key says which voxels
            key = f"{volume.GetID()}:{volume.GetMTime()}:{volume.GetImageData().GetMTime()}"
            image = None
            if key != self._image_key or not ("query" in self._workers and self._workers["query"].running):
                image = self._write_image(volume, folder)
            return QueryFiles(folder, image, key, tumors, volume)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def with_image(self, files: QueryFiles) -> QueryFiles:
        """``files`` with the CT written too (the worker no longer held it)."""
        files.image = self._write_image(files.volume, files.folder)
        return files

    def _write_image(self, volume, folder: str) -> str:
        import SimpleITK as sitk

        from ..scene import nodes

        path = os.path.join(folder, "image.nrrd")
        sitk.WriteImage(nodes.volume_image(volume), path, False)
        return path

    def start_query(
        self,
        files: QueryFiles,
        reference,
        model,
        k=5,
        metric="cosine",
        where=None,
        progress=None,
        like=(),
        unlike=(),
        similar_by=None,
    ):
        """Send the image query to the worker (the worker downloads missing weights, with progress); ``like`` /
        ``unlike``: hits marked ("more like these"); ``similar_by``: a label for a label-aware search."""
        label = {"similar_by": similar_by} if similar_by else {}
        return self.worker().submit(
            "query",
            progress,
            image=files.image,
            image_key=files.image_key,
            tumors=files.tumors,
            model=model,
            reference=reference,
            k=int(k),
            metric=metric,
            where=list(where or []),
            weights=self._weights(reference, model),
            thumbnail_folder=str(self.thumbnail_folder()),
            like=list(like),
            unlike=list(unlike),
            **label,
        )

    def query_answered(self, files: QueryFiles, result: dict):
        """The worker's answer as the library's hit table; the query's CT, seed and thumbnails are kept for
        loading its matches beside it."""
        self._image_key = files.image_key
        self.last_volume = files.volume
        self.last_seed_lps = result["seeds"][0]
        self.last_thumbnails = result.get("thumbnails") or []
        return self.hit_table(result)

    def find_similar(self, volume, tumor, segment_id=None, model="CTFM", reference=NLST, k=5, **options):
        """The Python console's call: the ``k`` reference patients nearest to the tumor marked by ``tumor``
        (a segmentation: ``segment_id``, or each of its segments; a point list: each point; an ROI) in
        ``volume``, as the library's hit table. ``options``: metric, where, progress, cancelled."""
        from ..scene.worker import ImageNotHeld

        if tumor is None:
            raise SimilarPatientsError("Give the tumor: a segmentation, a point list or an ROI node.")
        cancelled = options.pop("cancelled", None)
        files = self.write_query(volume, **tumor_marks(tumor, segment_id))
        try:
            try:
                result = self.start_query(files, reference, model, k, **options).wait(cancelled)
            except ImageNotHeld:  # a new worker, or another CT since: send the voxels
                result = self.start_query(self.with_image(files), reference, model, k, **options).wait(cancelled)
            return self.query_answered(files, result)
        finally:
            files.remove()

    def thumbnail_folder(self) -> Path:
        """A folder of this session's tumor thumbnails (removed by :meth:`cleanup`)."""
        if self._thumbnails is None:
            self._thumbnails = Path(tempfile.mkdtemp(prefix="SimilarPatients-thumbnails-"))
        return self._thumbnails

    def start_match_thumbnails(self, hits, progress=None):
        """Thumbnails of the matches whose images are on this machine (the site's DICOM folder or the download
        cache), drawn by the worker at each tumor centre; none is downloaded for a picture. None when no
        match has a tumor centre."""
        series = []
        for hit in hits.to_dict("records"):
            centre = [hit.get(f"center_{axis}") for axis in "xyz"]
            if hit.get("SeriesInstanceUID") and all(c is not None and c == c for c in centre):
                series.append({"uid": hit["SeriesInstanceUID"], "centre": centre})
        if not series:
            return None
        local = self.settings.local_dicom_folder
        return self.worker("jobs").submit(
            "thumbnails",
            progress,
            folder=str(self.thumbnail_folder()),
            series=series,
            local_folder=local,
            cache_root=None if local else str(self.series_cache_root()),
        )

    # --- matches beside the query ----------------------------------------------------------------------

    def series_cache_root(self) -> Path:
        """Where matched series are kept: beside Slicer's DICOM database, or in the data home without one
        (found with the standard library alone: the settings show it before the first install)."""
        from ..util.home import data_home

        database = _dicom_database()
        if database is not None and database.isOpen:
            return Path(database.databaseDirectory) / "SimilarPatients-series"
        return Path(self.home or data_home()) / "series"

    def series_cache(self):
        from ..idc.download import SeriesCache

        return SeriesCache(self.series_cache_root())

    def download_size(self, hits) -> float:
        """Megabytes the matches' series need from IDC (0 when all are cached)."""
        return self.series_cache().download_size_mb(_uids(hits))

    def start_fetch(self, hits, progress=None):
        """The matches' series on this machine, by the worker: from the site's DICOM folder (no network, indexed
        once per worker), or the cache, downloading what is not there (after the user agreed; progress in
        bytes). The answer's ``files``: UID → paths. Cancel ends the worker, the download's s5cmd with it,
        and removes what it had staged."""
        uids, local = _uids(hits), self.settings.local_dicom_folder
        if local:
            return self.worker("jobs").submit("fetch", progress, uids=uids, local_folder=local)
        return self._fetch_cached(uids, progress)

    def _fetch_cached(self, uids: list, progress=None):
        """Series ``uids`` from the download cache, by the worker, downloading what is not there."""
        cache, worker = self.series_cache(), self.worker("jobs")
        fields = dict(uids=uids, cache_root=str(cache.root), index=cache.index.parquet_path, bucket=cache.bucket)
        request = worker.submit("fetch", progress, **fields)
        request.on_cancel = functools.partial(cache.discard_partial, worker.pid)  # what that worker staged
        return request

    def sample_size(self) -> float:
        """Megabytes the sample patient's CT needs from IDC (0 once cached)."""
        from .sample import SAMPLE

        return self.series_cache().download_size_mb([SAMPLE.series])

    def start_fetch_sample(self, progress=None):
        """The sample patient's CT from the cache, downloaded from IDC by the worker when not there (the user
        agreed); the answer's ``files`` as :meth:`start_fetch`'s."""
        from .sample import SAMPLE

        return self._fetch_cached([SAMPLE.series], progress)

    def show_sample(self, files) -> tuple:
        """The sample's CT and its tumor point in Slicer's scene: (volume, point list)."""
        import slicer

        from .sample import show_sample

        return show_sample(slicer.mrmlScene, files)

    def show_matches(self, hits, files: dict, query_volume=None, query_centre_lps=None, cancelled=None):
        """Read the fetched series into volume nodes (and into Slicer's DICOM database) and show them beside
        the query (by default the last image query's CT and tumor), each view centred on its tumor.
        ``cancelled()`` is asked between the series' DICOM imports (each spins Qt's event loop, where the
        user may press Cancel): True stops before any volume is loaded (:class:`Cancelled`)."""
        import slicer

        from ..scene import matches

        query_volume = query_volume if query_volume is not None else self.last_volume
        query_centre_lps = query_centre_lps if query_centre_lps is not None else self.last_seed_lps
        if query_volume is None or query_centre_lps is None:
            raise SimilarPatientsError("Find similar patients from an image first: the matches are shown beside it.")
        scene = slicer.mrmlScene
        matches.require_in_scene(scene, query_volume)  # before anything is imported or shown
        from DICOMLib import DICOMUtils

        for paths in files.values():  # the DICOM browser knows them too (importing twice is harmless)
            if cancelled is not None and cancelled():
                raise Cancelled()
            DICOMUtils.importDicom(str(Path(paths[0]).parent))
        volumes = {uid: matches.load_series(scene, paths, f"match {uid[-8:]}") for uid, paths in files.items()}
        if self.comparison is not None:
            self.comparison.remove()  # the previous comparison's links end
        layout_node = slicer.app.layoutManager().layoutLogic().GetLayoutNode()
        self.comparison = matches.show_matches(scene, layout_node, query_volume, query_centre_lps, hits, volumes)
        return self.comparison

    def load_matches(self, hits, query_volume=None, query_centre_lps=None, progress=None, cancelled=None):
        """The Python console's call: fetch the matches' series (cache, site folder, or IDC) and show them
        beside the query; returns the views and their links."""
        files = self.start_fetch(hits, progress).wait(cancelled)["files"]
        return self.show_matches(hits, files, query_volume, query_centre_lps)

    def cache_info(self) -> str:
        """Where the data lives and how much the downloaded series take."""
        from ..util.home import data_home

        cache = self.series_cache_root()
        size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 1e6 if cache.is_dir() else 0.0
        return f"References and weights: {self.home or data_home()}. Downloaded series: {cache} ({size:.0f} MB)."

    def clear_series_cache(self) -> float:
        """Delete the downloaded series, and their entries in Slicer's DICOM database first (they would point
        at deleted files); returns the megabytes freed."""
        root = self.series_cache_root()
        if not root.is_dir():
            return 0.0
        from ..idc.download import cached_uids

        database = _dicom_database()
        if database is not None and database.isOpen:
            for uid in cached_uids(root):
                database.removeSeries(uid)
        return self.series_cache().clear()

    def scene_closed(self) -> None:
        """Forget what names the closed scene's nodes: the last query's CT, seed and thumbnails, the CT the
        worker holds (a new CT may get the old one's node ID) and the comparison, whose links end."""
        if self.comparison is not None:
            self.comparison.remove()
            self.comparison = None
        self.last_volume, self.last_seed_lps, self.last_thumbnails = None, None, []
        self._image_key = None

    def cleanup(self) -> None:
        """End the workers and remove this session's thumbnails (module reload, Slicer closing)."""
        self.scene_closed()
        for worker in self._workers.values():
            worker.stop()
        self._workers = {}
        if self._thumbnails is not None:
            shutil.rmtree(self._thumbnails, ignore_errors=True)
            self._thumbnails = None


def tumor_marks(node, segment_id=None) -> dict:
    """The :meth:`ModuleLogic.write_query` arguments for a tumor node: a segmentation (``segment_id``, or
    each of its segments), a point list or an ROI."""
    if node.IsA("vtkMRMLSegmentationNode"):
        ids = [segment_id] if segment_id else list(node.GetSegmentation().GetSegmentIDs())
        return {"segmentation": node, "segments": ids}
    if node.IsA("vtkMRMLMarkupsROINode"):
        return {"roi": node}
    if node.IsA("vtkMRMLMarkupsNode"):
        return {"point": node}
    raise SimilarPatientsError(f"{node.GetName()} ({node.GetClassName()}) cannot mark a tumor.")


def _uids(hits) -> list:
    return hits.SeriesInstanceUID.dropna().tolist() if "SeriesInstanceUID" in hits else []


def _dicom_database():
    """Slicer's DICOM database, or None (none open, or outside Slicer: a script, the tests)."""
    try:
        import slicer
    except ImportError:
        return None
    return getattr(slicer, "dicomDatabase", None)
