"""What the module's widget decides, without Qt: one method per user action, the order of each action's
steps (packages installed with one consent per click, as one plan, the licence, the download opt-in, the size
question before loading), the progress stages and their log, cancel, which buttons are enabled, and one task at a
time.

Each action that waits is a *task*: a generator that yields requests to the worker process
(``scene/worker.py``: it does the long work, so no thread of Slicer's process has to) and receives their
answers. The widget's timer calls :meth:`ModuleController.poll`, which relays progress and resumes the task
when its request is answered. While a task runs, its own button is its Cancel (pressing it again cancels)
and every other action is disabled and refused, so a second click cannot start a nested query. The
progress display stays through every stage, numbered or busy, and logs each new stage in a line.

Cancel always ends the task without an error: a request's worker is ended with its whole process tree (a
download's s5cmd too). A step that runs in the GUI's own thread (a package install, the DICOM import of the
matches) may spin a nested event loop in which Cancel is pressed; it cannot be stopped from there, so the
cancel is noted and takes effect the moment the step returns. A task ends with its result shown, an error
shown once, or, when cancelled, a status line (not an error box).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import Cancelled, SimilarPatientsError
from . import dependencies
from .dependencies import BIGQUERY, DOWNLOAD, IMAGE, SEARCH, InstallPlan
from .logic import NLST, ModuleLogic, tumor_marks
from .results import ResultsTable, filter_terms, results_table

#: What importing NLST-Sybil downloads: the six files measured (CT-CLIP, CT-FM, Merlin, PASTA, SuPreM,
#: VISTA3D: 13,604,676 bytes), the three not at hand estimated by their embedding lengths.
NLST_DOWNLOAD = "13.6 MB for six models' files, about 40 MB more for FMCIB, Models Genesis and VoCo"

log = logging.getLogger(__name__)
#: The actions the widget enables or disables as :meth:`ModuleController.actions` says.
ACTIONS = ("import", "find", "find_image", "load", "clear_cache", "like", "unlike", "more")
#: Matches shown beside the query at most (the layout's limit).
MAX_LOADED = 8
K_RANGE = (1, 100)


@dataclass
class Inputs:
    """What the widgets hold when the user acts."""

    reference: str = ""
    model: str = ""
    k: int = 5
    metric: str = "cosine"
    filters: str = ""
    similar_by: str = ""  #: a label to be similar with respect to; "" for appearance alone
    patient: str = ""
    volume: object = None  #: the CT volume node
    tumor: object = None  #: a segmentation, point list or ROI node
    segment: str | None = None  #: the segment of ``tumor`` (a segmentation), or None for each of its segments
    selected_rows: Sequence[int] = field(default_factory=list)


#: The "Similar with respect to" choice that blends in no label.
APPEARANCE = "appearance"


def similar_by_choice(text: str) -> str:
    """The ``similar_by`` of the choice shown as ``text`` ("" for appearance alone)."""
    return "" if text in ("", APPEARANCE) else text


class View(Protocol):
    """What the controller asks of the widget (Qt in Slicer; a recording stand-in in the tests)."""

    def ask(self, question: str, title: str) -> bool: ...
    def show_error(self, message: str) -> None: ...
    def show_status(self, text: str) -> None: ...
    def show_progress(self, title: str | None) -> None:
        """Start the progress display for a task named ``title`` (its log cleared); None: the task ended (the
        display stays, at rest, with its log)."""

    def update_progress(self, fraction: float | None, message: str) -> None:
        """The bar: ``fraction`` done (None: busy, no count), with ``message``."""

    def log(self, line: str) -> None:
        """One line in the progress display's short log."""

    def show_running(self, action: str | None, cancelling: bool = False) -> None:
        """``action``'s button is the running task's Cancel (None: every button back to its own action);
        ``cancelling``: Cancel was pressed and the task ends when its current step returns."""

    def enable(self, actions: dict) -> None: ...
    def show_references(self, names: list, current: str) -> None: ...
    def show_models(self, names: list, current: str, tooltips: dict) -> None: ...
    def show_results(self, table: ResultsTable) -> None: ...
    def show_thumbnails(self, query: str | None, matches: dict) -> None:
        """The query tumor's picture (a PNG path, or None) and the matches' (row → PNG path)."""

    def show_downloads_allowed(self, allowed: bool) -> None: ...
    def show_sample(self, volume, tumor) -> None:
        """Select the sample patient's CT and tumor point as the query's."""

    def show_bigquery_allowed(self, allowed: bool) -> None:
        """Tick or untick "Allow BigQuery" without calling :meth:`ModuleController.allow_bigquery` again."""

    def open_url(self, url: str) -> None: ...
    def restart(self) -> None:
        """Restart Slicer (after an install that replaced packages it had imported)."""


class ModuleController:
    """The module's behaviour. ``installer`` installs an :class:`~.dependencies.InstallPlan` (Slicer's
    PyTorch extension and pip by default)."""

    def __init__(self, view: View, logic: ModuleLogic, installer=None):
        self.view = view
        self.logic = logic
        self.installer = installer or dependencies.SlicerInstaller()
        self.hits = None  #: the last search's hit table
        self.image_hits = False  #: whether those hits answer an image query (only those can be loaded beside it)
        self.reference = ""  #: the reference those hits come from
        #: "more like these": PatientID -> "like" / "unlike", the marks given since the last new search (an
        #: unliked patient stays marked, so that no later round shows it again)
        self.marks: dict = {}
        self._searched: Inputs | None = None  # what the last new search was asked with
        self._task: Generator | None = None
        self._task_on_scene = False  # whether the running task reads or adds scene nodes
        self._running: str | None = None  # the action whose task runs (its button is the Cancel)
        self._stepping = False  # True while the task's code runs (a step may spin a nested event loop)
        self._cancel_asked = False  # Cancel pressed during such a step: honoured when it returns
        self._stage = ""  # the last stage logged
        self._job = None
        self._warming = None  # the worker's request loading the chosen model ahead of the first click
        self._warmed: tuple | None = None

    # --- state ---------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._task is not None

    def actions(self) -> dict:
        """Which actions are enabled: while a task runs only its own (as its Cancel, until Cancel is pressed);
        loading only after an image query's hits."""
        if self.busy:
            return {action: action == self._running and not self._cancel_asked for action in ACTIONS}
        enabled = dict.fromkeys(ACTIONS, True)
        shown = self.hits is not None and len(self.hits) > 0
        enabled["load"] = self.image_hits and shown
        enabled["like"] = enabled["unlike"] = shown
        enabled["more"] = shown and bool(self.marks)
        return enabled

    def poll(self, timeout: float = 0.0) -> None:
        """Relay progress and resume the task whose job ended (the widget's timer calls this)."""
        if self._warming is not None and self._warming.poll():
            try:
                self._warming.result()
            except SimilarPatientsError as error:  # the click will say it again, with its own context
                log.info("the model was not loaded ahead of the first query: %s", error)
                self._warmed = None
            self._warming = None
        if self._job is not None and self._job.poll(timeout):
            job, self._job = self._job, None
            try:
                value = job.result()
            except BaseException as error:  # handed to the task, which may handle it
                self._resume(error=error)
            else:
                self._resume(value)

    def wait(self, timeout: float = 600.0) -> None:
        """Poll until the task ends (scripts and tests; the widget uses its timer)."""
        import time

        deadline = time.monotonic() + timeout
        while self.busy:
            if time.monotonic() > deadline:
                raise TimeoutError("The task did not end in time.")
            self.poll(0.05)

    def cancel(self) -> None:
        """Stop the running task: its request is ended (the worker's whole process tree) and the task closed;
        the status line says so. Pressed while a step runs in this thread (from its nested event loop),
        the cancel is noted and done when the step returns."""
        if self._task is None:
            return
        if self._stepping:
            if not self._cancel_asked:
                self._cancel_asked = True
                self.view.log("cancelling: the current step finishes first")
                self.view.show_running(self._running, True)
                self._enable()
            return
        if self._job is not None:
            self._job.cancel()
            self._job = None
        self._warmed = None  # a cancelled query ends the query worker, and the model it had loaded with it
        self._task.close()
        self._finish("Cancelled.")

    # --- module lifecycle ------------------------------------------------------------------------------

    def entered(self, inputs: Inputs) -> None:
        """The module was opened (or a scene loaded): list the references, and load the chosen model in the
        background so that the first click does not wait for it."""
        self._enable()
        if dependencies.unmet(SEARCH):
            self.view.show_status("Python packages are installed when you first import or search.")
            return
        self.refresh_references(inputs.reference, inputs.model)
        self.prepare(inputs)

    def refresh_references(self, reference: str = "", model: str = "") -> None:
        """List the references, selecting ``reference`` where it is among them, and its models."""
        try:
            names = self.logic.references()
        except SimilarPatientsError as error:
            self.view.show_error(str(error))
            return
        current = reference if reference in names else (names[0] if names else "")
        self.view.show_references(names, current)
        self.refresh_models(current, model)

    def refresh_models(self, reference: str, model: str = "", chosen: bool = False, metric: str = "cosine") -> None:
        """List ``reference``'s models with a tooltip each; a BigQuery reference not opened yet this session is
        asked for them only when the user ``chosen`` it (entering the module calls no service)."""
        if not reference:
            self.view.show_models([], "", {})
            return
        if not chosen and not self.logic.opened_without_network(reference):
            saved = [model] if model else []
            self.view.show_models(saved, model, dict.fromkeys(saved, "choose the reference again to list its models"))
            return
        try:
            choices = self.logic.model_choices(reference, metric)
        except SimilarPatientsError as error:
            self.view.show_models([], "", {})
            self.view.show_error(str(error))
            return
        self.view.show_models(choices.names, model if model in choices.names else choices.preferred, choices.tooltips)
        self.view.show_similar_by(*self.logic.similar_by_choices(reference))

    def reference_chosen(self, inputs: Inputs) -> None:
        self.refresh_models(inputs.reference, inputs.model, chosen=True, metric=inputs.metric)

    def prepare(self, inputs: Inputs) -> None:
        """Open the reference in the jobs worker (for a search by patient), and start the query worker and
        load ``inputs.model`` (and the reference's similarity scale) in the background, when that needs no
        consent: packages installed, weights here (or none), licence accepted."""
        key = (inputs.reference, inputs.model, inputs.metric)
        if not inputs.reference or not inputs.model or key == self._warmed or self.busy:
            return
        try:
            if dependencies.unmet(SEARCH) or not self.logic.opened_without_network(inputs.reference):
                return
            self.logic.start_open(inputs.reference, inputs.model, inputs.metric)  # its answer: nobody waits
            models = self.logic.models_of(inputs.reference, inputs.model)
            network = self.logic.needs_torch(models)
            ready = (
                not (network and (dependencies.unmet(IMAGE) or dependencies.torch_unmet()))
                and all(self.logic.runs_from_an_image(inputs.reference, m) for m in models)
                and not any(self.logic.licence_to_accept(m) or self.logic.weights_to_download(m) for m in models)
            )
            if ready:
                self._warming = self.logic.start_prepare(inputs.reference, inputs.model, inputs.metric)
                self._warmed = key
        except SimilarPatientsError as error:  # no PythonSlicer, an unknown model: the click says it
            log.info("the model is not loaded ahead of the first query: %s", error)

    def scene_closed(self) -> None:
        """The scene is closing (or the query's CT was removed): the hits, their thumbnails, the comparison and
        the query's CT are dropped, so Load is off until the next image query; a task working on the scene's
        nodes is cancelled."""
        if self.busy and self._task_on_scene:
            self.cancel()
        self.logic.scene_closed()
        self.hits, self.image_hits = None, False
        self.view.show_results(ResultsTable([], []))
        self.view.show_thumbnails(None, {})
        self._enable()

    def node_removed(self, node) -> None:
        """A node left the scene: the query's CT (the node itself, not its ID) ends its results."""
        if node is not None and node is self.logic.last_volume:
            self.scene_closed()

    # --- actions ---------------------------------------------------------------------------------------

    def import_nlst(self) -> None:
        self._run("import", "Importing NLST-Sybil", self._import_nlst)

    def _import_nlst(self):
        if not self._install(SEARCH):
            return
        if not self.logic.nlst_local_copy() and not self._downloads_opt_in(
            "No local copy of the NLST-Sybil embeddings was found: they would be downloaded from GitHub "
            f"(ImagingDataCommons/nlst-sybil-connectome): {NLST_DOWNLOAD}."
        ):
            return
        name = (yield self.logic.start_import_nlst(self._progress))["name"]
        self.refresh_references(name)
        self.view.show_status("NLST-Sybil imported: choose a model and search.")

    def find_by_patient(self, inputs: Inputs) -> None:
        if not self.busy:  # a new search: its marks start empty
            self.marks, self._searched = {}, inputs
        self._run("find", "Searching", self._find_by_patient, inputs)

    def mark(self, rows: Sequence[int], side: str | None) -> None:
        """Mark result rows ``like`` or ``unlike`` (None clears their marks) for "more like these"."""
        if side not in ("like", "unlike", None) or self.hits is None or self.busy:
            return
        for row in rows:
            if 0 <= row < len(self.hits):
                patient = str(self.hits["PatientID"].iloc[row])
                if side is None:
                    self.marks.pop(patient, None)
                else:
                    self.marks[patient] = side
        self._show_table()
        self._enable()

    def more_like_these(self) -> None:
        """Search again from the last search's query, moved towards the liked results and away from the unliked
        (all marks since that search); the unliked are not shown again."""
        on_scene = self.image_hits
        self._run("more", "Searching for more like these", self._more_like_these, on_scene=on_scene)

    def _more_like_these(self):
        like = [p for p, side in self.marks.items() if side == "like"]
        unlike = [p for p, side in self.marks.items() if side == "unlike"]
        if self._searched is None or not (like or unlike):
            raise SimilarPatientsError("Mark results as like or unlike first (select rows, then Like or Unlike).")
        if self.image_hits:
            yield from self._find_from_image(self._searched, like, unlike)
        else:
            yield from self._find_by_patient(self._searched, like, unlike)

    def _find_by_patient(self, inputs: Inputs, like=(), unlike=()):
        self._check_search(inputs)
        if not inputs.patient.strip():
            raise SimilarPatientsError("Type the ID of a patient of the reference to search by patient.")
        if not self._install(SEARCH, *self._service_needs(inputs.reference)):
            return
        answer = yield self.logic.start_neighbors(
            inputs.reference,
            inputs.model,
            inputs.patient.strip(),
            inputs.k,
            inputs.metric,
            filter_terms(inputs.filters),
            self._progress,
            like,
            unlike,
            **self._similar_by(inputs),
        )
        self._show_hits(self.logic.hit_table(answer), inputs.reference, from_image=False)

    @staticmethod
    def _similar_by(inputs: Inputs) -> dict:
        """``{"similar_by": label}`` for a label-aware search (refused with several models), else nothing."""
        from ..references.fused import is_fused

        if not inputs.similar_by:
            return {}
        if is_fused(inputs.model):
            raise SimilarPatientsError(
                f"Similar with respect to {inputs.similar_by} searches with one model: choose one model, or "
                f"'{APPEARANCE}' to search with all of them."
            )
        return {"similar_by": inputs.similar_by}

    def find_from_image(self, inputs: Inputs) -> None:
        if not self.busy:
            self.marks, self._searched = {}, inputs
        self._run("find_image", "Finding similar patients", self._find_from_image, inputs, on_scene=True)

    def _find_from_image(self, inputs: Inputs, like=(), unlike=()):
        from ..scene.worker import ImageNotHeld

        self._check_search(inputs)
        if inputs.volume is None or inputs.tumor is None:
            raise SimilarPatientsError("Choose the CT volume, and the tumor as a segment, a point list or an ROI.")
        model = inputs.model
        try:
            network = self.logic.needs_torch([model])  # a model of the registry: known before any install
        except SimilarPatientsError:  # the fused choice: its models are read from the reference, once readable
            network = bool(dependencies.unmet(SEARCH)) or self.logic.needs_torch(
                self.logic.models_of(inputs.reference, model)
            )
        if not self._install(SEARCH, IMAGE if network else (), *self._service_needs(inputs.reference), torch=network):
            return
        models = self.logic.models_of(inputs.reference, model)
        pending = {name: licence for name in models if (licence := self.logic.licence_to_accept(name))}
        if pending:  # one question for every model of a fused query
            if len(pending) == 1:
                [(name, licence)] = pending.items()
                question = f"{name}'s weights are published under: {licence}.\n\nDo you accept this licence?"
            else:
                listed = "\n".join(f"{name}: {licence}" for name, licence in pending.items())
                question = f"These models' weights are published under:\n{listed}\n\nDo you accept these licences?"
            if not self.view.ask(question, "Weight licence"):
                return
            for name in pending:
                self.logic.accept_licence(name)
        sources = [f"{name}: {url}" for name in models if (url := self.logic.weights_to_download(name))]
        if sources and not self._downloads_opt_in("These weights would be downloaded:\n" + "\n".join(sources)):
            return
        self._progress(0, 0, f"starting the query worker and loading {model}")
        files = self.logic.write_query(inputs.volume, **tumor_marks(inputs.tumor, inputs.segment))
        search = (inputs.reference, model, inputs.k, inputs.metric, filter_terms(inputs.filters), self._progress)
        search += (like, unlike)
        label = self._similar_by(inputs)
        try:
            try:
                result = yield self.logic.start_query(files, *search, **label)
            except ImageNotHeld:  # a new worker, or another CT since: send the voxels
                result = yield self.logic.start_query(self.logic.with_image(files), *search, **label)
        finally:
            files.remove()
        self._warmed = (inputs.reference, model, inputs.metric)
        hits = self.logic.query_answered(files, result)
        self._show_hits(hits, inputs.reference, from_image=True)
        query_picture = self.logic.last_thumbnails[0] if self.logic.last_thumbnails else None
        self.view.show_thumbnails(query_picture, {})
        job = self.logic.start_match_thumbnails(hits, self._progress)
        if job is None:
            return
        self._progress(0, 0, "drawing the matches found on this computer")
        try:
            drawn = yield job
        except SimilarPatientsError as error:  # a picture is a convenience: the results stay
            log.warning("Match thumbnails: %s", error)
            return
        for uid, reason in drawn["failed"].items():
            log.warning("No thumbnail for series %s: %s", uid, reason)
        pictures = drawn["thumbnails"]
        rows = {row: pictures[uid] for row, uid in enumerate(hits.get("SeriesInstanceUID", [])) if uid in pictures}
        self.view.show_thumbnails(query_picture, rows)

    def load_selected(self, inputs: Inputs) -> None:
        self._run("load", "Loading the matches", self._load_selected, inputs, on_scene=True)

    def _load_selected(self, inputs: Inputs):
        if not (self.image_hits and self.hits is not None and len(self.hits)):
            raise SimilarPatientsError("Find similar patients from an image first: the matches are shown beside it.")
        rows = sorted(set(inputs.selected_rows)) or list(range(len(self.hits)))
        chosen = self.hits.iloc[rows[:MAX_LOADED]]
        if not self.logic.settings.local_dicom_folder:  # a site's own copy needs no network; IDC needs these
            if not self._install(DOWNLOAD):
                return
            size = self.logic.download_size(chosen)
            what = (
                f"{size:.0f} MB of CT series would be downloaded from NCI Imaging Data Commons for {len(chosen)} "
                f"patient(s) (their identifiers are sent to IDC's public storage)."
            )
            if size and not self._downloads_opt_in(what, always_ask=True):
                return
        files = (yield self.logic.start_fetch(chosen, self._progress))["files"]
        self._progress(0, 0, "showing the matches beside the query")
        self.logic.show_matches(chosen, files, cancelled=lambda: self._cancel_asked)
        self.view.show_status(f"{len(files)} patient(s) beside the query, each view centred on its tumor.")

    def load_sample(self) -> None:
        """The sample patient (``ui/sample.py``): its CT from IDC, with its tumor marked, as the query."""
        self._run("sample", "Loading the sample patient", self._load_sample, on_scene=True)

    def _load_sample(self):
        from .sample import SAMPLE

        if not self._install(SEARCH, DOWNLOAD):
            return
        size = self.logic.sample_size()
        what = (
            f"The sample patient's CT (NLST patient {SAMPLE.patient}, {SAMPLE.histology}, stage {SAMPLE.stage}: "
            f"{size:.0f} MB) would be downloaded from NCI Imaging Data Commons."
        )
        if size and not self._downloads_opt_in(what, always_ask=True):
            return
        files = (yield self.logic.start_fetch_sample(self._progress))["files"][SAMPLE.series]
        self.view.show_sample(*self.logic.show_sample(files))
        self.view.show_status(
            f"NLST patient {SAMPLE.patient}'s CT, its tumor marked at the reference's lesion centre: import "
            f"NLST-Sybil (or choose it), choose a model and find similar patients."
        )

    def open_viewer(self, row: int) -> None:
        """Open a hit's study in the IDC viewer (the web browser)."""
        if self.hits is None or not 0 <= row < len(self.hits) or "viewer_url" not in self.hits:
            return
        url = self.hits.iloc[row]["viewer_url"]
        if isinstance(url, str) and url.startswith("https://"):
            self.view.open_url(url)

    # --- settings --------------------------------------------------------------------------------------

    def allow_downloads(self, allowed: bool) -> None:
        self.logic.settings.downloads_allowed = bool(allowed)

    def allow_bigquery(self, allowed: bool, inputs: Inputs) -> None:
        """The opt-in to BigQuery searches; allowing them installs google-cloud-bigquery (with consent)."""
        if allowed and not self._guarded(lambda: self._install(BIGQUERY)):
            allowed = False
            self.view.show_bigquery_allowed(False)  # declined or failed: the box says so
        self.logic.settings.bigquery_allowed = bool(allowed)
        if not dependencies.unmet(SEARCH):
            self.refresh_references(inputs.reference, inputs.model)

    def bigquery_references_edited(self, text: str, inputs: Inputs) -> None:
        kept = self._guarded(lambda: self.logic.settings.set_bigquery_references(text.split(";")) or True)
        if kept and self.logic.settings.bigquery_allowed:
            self.refresh_references(inputs.reference, inputs.model)

    def cache_info(self) -> str:
        return self._guarded(self.logic.cache_info) or ""

    def clear_cache(self) -> None:
        if self.view.ask(
            "Delete the downloaded IDC series (and their entries in the DICOM database)? They are downloaded again "
            "when needed.",
            "Clear downloaded series",
        ):
            freed = self._guarded(self.logic.clear_series_cache)
            if freed is not None:
                self.view.show_status(f"{freed:.0f} MB of downloaded series deleted.")

    # --- the steps tasks share -------------------------------------------------------------------------

    def _run(self, action: str, title: str, task, *arguments, on_scene: bool = False) -> None:
        """Start ``task(*arguments)`` for ``action``; a click on the running action's button cancels it.
        ``on_scene``: the task reads or adds scene nodes (a closing scene cancels it)."""
        if self.busy:
            if action == self._running:
                self.cancel()
            else:
                self.view.show_status("Wait for the current task to finish, or cancel it.")
            return
        self._task, self._running, self._cancel_asked, self._stage = task(*arguments), action, False, ""
        self._task_on_scene = on_scene
        self.view.show_progress(title)
        self.view.log(title)
        self.view.show_running(action)
        self._enable()
        self._resume()

    def _resume(self, value=None, error: BaseException | None = None) -> None:
        self._stepping = True
        try:
            job = self._task.send(value) if error is None else self._task.throw(error)
        except StopIteration:
            self._finish()
        except Cancelled:
            self._finish("Cancelled.")
        except SimilarPatientsError as failure:
            self._finish()
            self.view.show_error(str(failure))
        except Exception as failure:  # a bug, not the user's doing: shown once, with its kind
            log.exception("Similar Patients task failed")
            self._finish()
            self.view.show_error(f"Unexpected error ({type(failure).__name__}: {failure}); see the Python console.")
        else:
            self._job = job
        finally:
            self._stepping = False
        if self._cancel_asked and self._task is not None:  # Cancel was pressed during that step
            self.cancel()

    def _finish(self, status: str | None = None) -> None:
        self._task, self._job, self._running, self._cancel_asked = None, None, None, False
        self.view.show_progress(None)
        self.view.show_running(None)
        self._enable()
        if status:
            self.view.show_status(status)
            self.view.log(status)

    def _enable(self) -> None:
        self.view.enable(self.actions())

    def _progress(self, done, total, message) -> None:
        """The bar follows every report; the log gets a line per stage (a message's trailing count in
        brackets, such as a download's "(3.1 of 40.0 MB)", changes without making a new stage)."""
        self.view.update_progress(done / total if total else None, message)
        stage = re.sub(r" \([^()]*\d[^()]*\)$", "", message)
        if stage != self._stage:
            self._stage = stage
            self.view.log(stage)

    def _check_search(self, inputs: Inputs) -> None:
        if not inputs.reference or not inputs.model:
            raise SimilarPatientsError("Choose a reference and one of its models first (or import NLST-Sybil).")
        if not K_RANGE[0] <= int(inputs.k) <= K_RANGE[1]:
            raise SimilarPatientsError(f"Ask for {K_RANGE[0]} to {K_RANGE[1]} patients, not {inputs.k}.")

    def _service_needs(self, reference: str) -> tuple:
        from ..cloud.tables import is_bigquery

        return (BIGQUERY,) if is_bigquery(reference) else ()

    def _install(self, *needs, torch: bool = False) -> bool:
        """Install what ``needs`` (and torch) call for, with what the module needs next (``companions``: one
        pip resolution), after one question; False when the user declined or Slicer restarts. An install that
        would replace packages Slicer has imported happens only with a restart (asked)."""
        if dependencies.plan(*needs, torch=torch).empty:
            return True
        bigquery = self.logic.settings.bigquery_allowed or BIGQUERY in needs
        plan: InstallPlan = dependencies.plan(*needs, *dependencies.companions(bigquery), torch=torch)
        if not self.view.ask(plan.question(), "Install Python packages?"):
            self.view.show_status("Nothing was installed; the packages are asked for again at the next click.")
            return False
        self._progress(0, 0, "checking which versions to install")
        self.installer.resolve(plan)
        if plan.replaces:
            if not self.view.ask(plan.restart_question(), "Restart Slicer after installing?"):
                self.view.show_status("Nothing was installed: the packages in use were kept as they are.")
                return False
            self.installer.install(plan)
            self.view.restart()
            return False
        first = bool(dependencies.unmet(SEARCH))
        self.installer.install(plan)
        if self._cancel_asked:  # pressed during the install (its nested event loop): go no further
            raise Cancelled()
        if first:  # the references can be listed now
            self.refresh_references()
        return True

    def _downloads_opt_in(self, what: str, always_ask: bool = False) -> bool:
        """The opt-in to downloads, asked once and kept in the settings; ``always_ask``: this download is
        confirmed even once downloads are allowed (the size of a load)."""
        allowed = self.logic.settings.downloads_allowed
        if allowed and not always_ask:
            return True
        if allowed:
            return self.view.ask(f"{what}\n\nDownload them?", "Download from IDC?")
        if not self.view.ask(
            f"{what}\n\nAllow Similar Patients to download from the internet (reference embeddings, model weights "
            "and IDC image series)? Nothing about your patient is sent. You can take this back with the "
            "'Allow downloads' box.",
            "Allow downloads?",
        ):
            return False
        self.logic.settings.downloads_allowed = True
        self.view.show_downloads_allowed(True)
        return True

    def _show_hits(self, hits, reference: str, from_image: bool) -> None:
        self.hits, self.image_hits, self.reference = hits, from_image, reference
        self._show_table()
        if len(hits):
            self.view.show_status(
                f"{len(hits)} patients. Double-click a row to open it in the IDC viewer; mark rows Like / Unlike "
                f"and press More like these to search again."
            )
        else:
            self.view.show_status("No patient of the reference passes the filters.")
        self._enable()

    def _show_table(self) -> None:
        self.view.show_results(results_table(self.hits, self.logic.display_fields(self.reference), self.marks))

    def _guarded(self, call):
        """``call()``'s value, or None after showing its error (settings edits, not tasks)."""
        try:
            return call()
        except SimilarPatientsError as error:
            self.view.show_error(str(error))
            return None


__all__ = ["ACTIONS", "NLST", "Inputs", "ModuleController", "View"]
