"""A persistent worker: one child process, started on first use, that keeps its loaded models between
queries, so a GUI pays torch's import and a model's weights once, not per click; and that does the GUI's
other long work (a GUI may run two: one for queries, one for the rest, ``ui/logic.py``).

The protocol is JSON lines. The client writes one request per line on the worker's stdin::

    {"id": 1, "op": "query", "image": "ct.nrrd", "tumors": {"mask": "m.nrrd", "segments": ["1"]},
     "model": "CTFM", "reference": "nlst-sybil", "k": 5, "metric": "cosine", "where": [], "home": null}

(``tumors`` may instead hold ``masks``, one file per tumor, ``points`` or ``boxes`` in LPS mm.) A fused
query names several models (``"model": ["CTFM", "Merlin"]``, ``"all"`` or ``"All models (fused)"``), with
``"fusion"``, ``"depth"`` and ``"space"`` as :func:`query_image` takes them and ``recipe`` / ``weights`` as mappings
model → value; each model stays loaded (``prepare`` loads them all). Every hit carries ``closer_than``
(blank for a BigQuery table; for a fused hit the mean over the models). ``"like"`` / ``"unlike"`` (PatientID
lists, in a query or a ``neighbors`` request) ask for "more like these" (:mod:`..search.feedback`).

and reads events from its stdout, ending with exactly one ``result`` or ``error`` per request::

    {"id": 1, "event": "progress", "done": 2, "total": 4, "message": "embedding with CTFM"}
    {"id": 1, "event": "result", "hits": [...], "seconds": {...}, "loaded": false, "image_reused": false}
    {"id": 1, "event": "error", "message": "...", "cancelled": false}

A query with ``"thumbnail_folder"`` also writes a picture of each query tumor there (``query-1.png``, ...).
``{"op": "thumbnails", "folder": ..., "series": [{"uid": ..., "centre": [x, y, z]}], "local_folder": ...,
"cache_root": ...}`` draws the matches whose images are on this machine (a series' ``file``, or found by
UID in the site's DICOM folder, indexed once per worker, or in the download cache), each at its tumor
centre (LPS mm); a series that cannot be read is named in ``failed`` with the reason, and the others are
still drawn. ``{"op": "prepare", "model": ..., "reference": ..., "weights": ...}`` loads a model and opens a
reference ahead of the first query (a GUI sends it when its module is entered), so that query pays neither.

The GUI's other long work runs here too, so that no Python thread of Slicer's process does it (Slicer's
idle event loop holds the GIL: such a thread would run only while the GUI's timer polls):
``{"op": "open", "reference": ..., "model": ..., "metric": ...}`` opens a reference and measures its
similarity scale ahead of the first search by patient; ``{"op": "import", "name": ..., "source": ...}``
stores a reference (answer: its ``name``);
``{"op": "neighbors", "reference": ..., "model": ..., "patient": ..., "k": ..., "metric": ..., "where": [...]}``
searches by a reference patient (the fused choice too; answer: ``hits`` with ``closer_than``); with
``"similar_by": LABEL`` (here and in ``query``), similar with respect to a label of the reference;
``{"op": "fetch", "uids": [...], "local_folder": ...}`` or ``{..., "cache_root": ..., "index": ..., "bucket":
...}`` puts the series on this machine (the site's DICOM folder, else the verified download cache; answer:
``files``, UID → paths). Each streams progress events; a download's are bytes done of the series' size.

A GUI never waits in a loop: :meth:`WorkerClient.submit` returns a :class:`PendingRequest` that its timer
polls (progress arrives as it comes; the answer, or the error, once); :meth:`WorkerClient.request` waits
for one, for scripts and the Python console.

Cancel ends the worker's whole process tree (the ``PythonSlicer`` launcher and the Python it starts are
one process group), and the next request starts a fresh worker; so does a worker that died.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from ..errors import Cancelled, SimilarPatientsError
from ..progress import ProgressCallback, report


class ImageNotHeld(SimilarPatientsError):
    """A request named its CT by key only, and the worker (new, or given another CT since) lacks it."""


#: The SimilarPatientsLib folder (imported before any of its modules): its parent goes on the child's path.
_PACKAGE = Path(sys.modules[__name__.split(".")[0]].__file__).resolve().parent


class WorkerClient:
    """The GUI's end: starts the worker when first asked, sends requests, relays progress, cancels.

    Args:
        python: the interpreter to run the worker with (in Slicer: ``PythonSlicer``).
        environment: the worker's environment (default: this process's), e.g. with ``SIMILARPATIENTS_HOME``.
        poll_seconds: how often ``cancelled()`` is asked while waiting (a GUI processes its events there).
    """

    def __init__(self, python: str | None = None, environment: dict | None = None, poll_seconds: float = 0.05):
        self.python = python or sys.executable
        if not Path(self.python).exists():
            raise SimilarPatientsError(
                f"The Python to run queries with was not found ({self.python}); in Slicer it is PythonSlicer, "
                f"next to the Slicer executable. Reinstall Slicer or the extension."
            )
        self.environment = dict(os.environ if environment is None else environment)
        self.environment["PYTHONIOENCODING"] = "utf-8"
        self.environment["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PACKAGE.parent), self.environment.get("PYTHONPATH", "")) if p
        )
        self.poll_seconds = poll_seconds
        self._process: subprocess.Popen | None = None
        self._events: queue.Queue = queue.Queue()
        self._stderr = None
        self._next_id = 0
        self._pending: dict[int, PendingRequest] = {}

    @property
    def pid(self) -> int | None:
        """The worker's process id while it runs."""
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def query(
        self,
        progress: ProgressCallback | None = None,
        cancelled: Callable[[], bool] | None = None,
        **request,
    ) -> dict:
        """Run one query in the worker (``request``: the fields above, without ``id`` and ``op``) and
        return its ``result`` event. Raises our error with the worker's message, :class:`Cancelled` when
        ``cancelled()`` turned True (the worker is then ended), or an error if the worker died."""
        return self.request("query", progress, cancelled, **request)

    def thumbnails(
        self, folder: Path | str, series: list, cancelled: Callable[[], bool] | None = None, **where
    ) -> dict:
        """Pictures of the matches whose series are local (``series``: dicts of ``uid``, ``centre`` in LPS mm
        and, where known, ``file``, one file of the series; ``where``: ``local_folder`` and ``cache_root`` to
        find the others in) written into ``folder``; returns ``thumbnails`` (uid → PNG path) and ``failed``
        (uid → reason)."""
        return self.request("thumbnails", None, cancelled, folder=str(folder), series=series, **where)

    def request(self, op: str, progress=None, cancelled=None, **fields) -> dict:
        """Send one request and wait for its answer (see :meth:`PendingRequest.wait`)."""
        return self.submit(op, progress, **fields).wait(cancelled)

    def submit(self, op: str, progress: ProgressCallback | None = None, **fields) -> PendingRequest:
        """Send one request (starting the worker if it is not running) and return at once; the answer comes
        through the returned :class:`PendingRequest`."""
        self._start()
        self._next_id += 1
        pending = PendingRequest(self, self._next_id, op, progress)
        self._pending[pending.ident] = pending
        try:
            self._process.stdin.write(json.dumps({"id": pending.ident, "op": op, **fields}) + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError):
            self._died()
        return pending

    def _dispatch(self, timeout: float) -> None:
        """Route the worker's next event (waiting up to ``timeout`` s) to its request; a worker that is gone
        fails every request still waiting."""
        try:
            event = self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
        except queue.Empty:
            if self._process is not None and not self.running:
                self._died()
            return
        if event is None:  # the worker's stdout closed: it is gone
            self._died()
        pending = self._pending.get(event.get("id"))
        if pending is not None:
            pending._take(event)

    def stop(self) -> None:
        """End the worker and every process it started; requests still waiting end as cancelled."""
        self._fail_pending(Cancelled())
        if self._process is None:
            return
        if self._process.poll() is None:
            _kill_tree(self._process)
        self._process.wait()
        self._process = None

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = list(self._pending.values()), {}
        for request in pending:
            request._fail(error)

    def _start(self) -> None:
        if self.running:
            return
        self._process = None

        self._stderr = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")  # noqa: SIM115 (kept with the worker)
        self._process = subprocess.Popen(
            [self.python, "-m", "SimilarPatientsLib.scene.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            encoding="utf-8",  # whatever the GUI's locale (Slicer runs in C): the worker speaks UTF-8
            errors="replace",
            bufsize=1,
            env=self.environment,
            **process_group_options(os.name),
        )
        self._events = queue.Queue()
        threading.Thread(target=_read_events, args=(self._process.stdout, self._events), daemon=True).start()

    def _died(self):
        code = self._process.wait() if self._process is not None else None
        self._stderr.seek(0)
        lines = [line for line in self._stderr.read().splitlines() if line.strip()]
        self._process = None
        detail = f": {lines[-1][:300]}" if lines else ""
        error = SimilarPatientsError(
            f"The query worker stopped unexpectedly (exit code {code}){detail}. The next query starts a new one."
        )
        self._fail_pending(error)
        raise error

    def __del__(self):
        with contextlib.suppress(Exception):  # at interpreter shutdown there is nothing more to do
            self.stop()


class PendingRequest:
    """One request sent to the worker, answered later: :meth:`poll` it from a GUI timer, or :meth:`wait`.
    Progress events reach ``progress`` as they come, from the thread that polls."""

    def __init__(self, client: WorkerClient, ident: int, op: str, progress: ProgressCallback | None = None):
        self.client, self.ident, self.op, self.progress = client, ident, op, progress
        #: run once a cancel has ended the worker (a download's staging folders removed, for instance)
        self.on_cancel: Callable[[], None] | None = None
        self._answer: dict | None = None
        self._error: Exception | None = None

    @property
    def done(self) -> bool:
        return self._answer is not None or self._error is not None

    def poll(self, timeout: float = 0.0) -> bool:
        """Take the events that have come (waiting up to ``timeout`` s for one); True once answered."""
        deadline = time.monotonic() + timeout
        while not self.done:
            try:
                self.client._dispatch(max(deadline - time.monotonic(), 0.0))
            except SimilarPatientsError as error:  # the worker died: this request ends with it
                self._fail(error)
            if time.monotonic() >= deadline and self.client._events.empty():
                break
        return self.done

    def result(self) -> dict:
        """The ``result`` event; raises the request's error (our message, :class:`Cancelled`, :class:`ImageNotHeld`)."""
        if self._error is not None:
            raise self._error
        if self._answer is None:
            raise RuntimeError(f"The worker has not answered request {self.ident} ({self.op}) yet.")
        return self._answer

    def wait(self, cancelled: Callable[[], bool] | None = None) -> dict:
        """Wait for the answer, asking ``cancelled()`` between polls: True ends the worker (:class:`Cancelled`)."""
        while not self.poll(self.client.poll_seconds):
            if cancelled is not None and cancelled():
                self.cancel()
        return self.result()

    def cancel(self) -> None:
        """End the worker's whole process tree (and with it this request and any other it was serving)."""
        if not self.done:
            self.client.stop()
            if self.on_cancel is not None:
                self.on_cancel()
        self._fail(Cancelled())

    def _take(self, event: dict) -> None:
        if event["event"] == "progress":
            report(self.progress, event["done"], event["total"], event["message"])
            return
        self.client._pending.pop(self.ident, None)
        if event["event"] == "result":
            self._answer = event
        elif event.get("missing_image"):
            self._error = ImageNotHeld(event["message"])
        else:
            self._error = (Cancelled if event.get("cancelled") else SimilarPatientsError)(event["message"])

    def _fail(self, error: Exception) -> None:
        self.client._pending.pop(self.ident, None)
        if not self.done:
            self._error = error


def process_group_options(os_name: str) -> dict:
    """How the worker is started so that cancel can end it with everything it started: its own session on
    POSIX; on Windows its own process group, and no console window (PythonSlicer is a console program: a
    window would stay open all session, and closing it would kill the worker)."""
    if os_name == "posix":
        return {"start_new_session": True}
    return {"creationflags": _CREATE_NEW_PROCESS_GROUP | _CREATE_NO_WINDOW}


#: Windows' process creation flags (only Windows' subprocess module defines them by name).
_CREATE_NEW_PROCESS_GROUP, _CREATE_NO_WINDOW = 0x00000200, 0x08000000


def _read_events(stream, events: queue.Queue) -> None:
    for line in stream:
        try:
            events.put(json.loads(line))
        except json.JSONDecodeError:
            continue  # a stray print of a third-party package: not an event
    events.put(None)


def _kill_tree(process: subprocess.Popen) -> None:
    if os.name == "posix":
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(process.pid), signal.SIGKILL)
    else:
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True)


# --- the worker's end ---------------------------------------------------------------------------------


#: The fields each request must have (the others have defaults); a series of a thumbnails request: ``uid``, ``centre``.
_NEEDS = {"query": ("reference", "model"), "prepare": ("reference", "model"), "thumbnails": ("folder",)}


def _check_fields(request: dict) -> None:
    """Refuse a request that lacks a field it needs, naming the field (not as a ``KeyError``)."""
    op = request.get("op")
    missing = [name for name in _NEEDS.get(op, ()) if request.get(name) is None]
    if op == "thumbnails":
        for match in request.get("series") or []:
            missing += [
                f"series[].{name}" for name in ("uid", "centre") if not isinstance(match, dict) or name not in match
            ]
    if missing:
        needs = ", ".join(_NEEDS[op]) + (" (and uid, centre in each series)" if op == "thumbnails" else "")
        raise SimilarPatientsError(
            f"The worker's '{op}' request lacks {', '.join(dict.fromkeys(missing))}; it needs {needs}."
        )


class _Worker:
    """Answers requests one at a time, keeping loaded embedders and opened references between them."""

    def __init__(self, out):
        self.out = out
        self._sending = threading.Lock()  # a download's progress comes from a thread that watches its folder
        self.embedders: dict = {}
        self.image: tuple | None = None  # (key, validated CT): the last image, reused while its key holds
        self.folders: dict = {}  # local DICOM folder -> its index of series, kept between requests

    def send(self, **event) -> None:
        line = json.dumps(event, default=_plain) + "\n"
        with self._sending:
            self.out.write(line)
            self.out.flush()

    def handle(self, request: dict) -> None:
        ident = request.get("id")
        importlib.invalidate_caches()  # packages the GUI installed since this worker started are found
        try:
            _check_fields(request)
            if request.get("op") == "ping":
                self.send(id=ident, event="result", pid=os.getpid(), models=sorted(self.embedders))
            elif request.get("op") == "query":
                self.send(id=ident, event="result", **self.query(request, ident))
            elif request.get("op") == "prepare":
                self.send(id=ident, event="result", **self.prepare(request, ident))
            elif request.get("op") == "thumbnails":
                self.send(id=ident, event="result", **self.thumbnails(request))
            elif request.get("op") == "open":
                self.send(id=ident, event="result", **self.open(request, ident))
            elif request.get("op") == "import":
                self.send(id=ident, event="result", **self.import_reference(request, ident))
            elif request.get("op") == "neighbors":
                self.send(id=ident, event="result", **self.neighbors(request, ident))
            elif request.get("op") == "fetch":
                self.send(id=ident, event="result", **self.fetch(request, ident))
            else:
                raise SimilarPatientsError(f"Unknown worker request '{request.get('op')}'.")
        except SimilarPatientsError as error:
            self.send(
                id=ident,
                event="error",
                message=str(error),
                cancelled=isinstance(error, Cancelled),
                missing_image=isinstance(error, ImageNotHeld),
            )
        except Exception as error:  # a bug, not the user's input: say what broke and keep serving
            traceback.print_exc(file=sys.stderr)
            self.send(id=ident, event="error", message=f"The query failed: {type(error).__name__}: {error}")

    def _image(self, request: dict):
        """The request's CT: read from ``image`` (and kept under ``image_key`` when one is given), or the
        kept one when only its key comes (a GUI sends the voxels again only when the volume changed)."""
        from ..imaging.ct_image import read_ct

        key = request.get("image_key")
        if request.get("image") is None:
            if key is None or self.image is None or self.image[0] != key:
                raise ImageNotHeld("The worker does not hold that image any more; send it again.")
            return self.image[1]
        image = read_ct(request["image"])
        self.image = (key, image) if key is not None else None
        return image

    def _progress(self, ident) -> ProgressCallback:
        def progress(done, total, message):
            self.send(id=ident, event="progress", done=done, total=total, message=message)

        return progress

    def _opened(self, request: dict):
        """The request's reference, opened, and the registry entries of its model (of each model, for a
        fused request), every one checked against the reference before any is loaded."""
        from ..cloud import open_reference
        from ..models import registry
        from ..query import check_compatible
        from ..references.fused import fused_models, is_fused
        from ..references.store import ReferenceStore

        reference = open_reference(request["reference"], ReferenceStore(request.get("home")))
        names = fused_models(reference, request["model"]) if is_fused(request["model"]) else [request["model"]]
        specs = [registry.get(name) for name in names]
        for spec in specs:
            recipe = spec.with_recipe(_per_model(request, "recipe", spec.name))
            check_compatible(reference, spec.name, recipe.name, spec.dimension)
        return reference, specs

    def _embedder(self, request: dict, spec, progress) -> tuple:
        """The request's model, loaded now or kept from an earlier request; and the seconds its load took."""
        from ..models.embedder import Embedder

        recipe, weights = _per_model(request, "recipe", spec.name), _per_model(request, "weights", spec.name)
        key = (spec.name, recipe, weights, request.get("device"))
        if key in self.embedders:
            return self.embedders[key], None
        started = time.perf_counter()
        embedder = Embedder(
            spec.name, recipe, weights, bool(request.get("accept_licence")), request.get("device"), progress=progress
        )
        report(progress, 0, 1, f"preparing {spec.name} for this computer")
        embedder.optimise()  # a worker embeds many tumors: a one-time trace pays for itself
        self.embedders[key] = embedder
        return embedder, time.perf_counter() - started

    def prepare(self, request: dict, ident) -> dict:
        """Load the model(s) and measure the reference's nearest-match distributions before the first query."""
        from ..search.correction import CORRECTED

        progress = self._progress(ident)
        reference, specs = self._opened(request)
        loads = [self._embedder(request, spec, progress)[1] for spec in specs]
        if hasattr(reference, "closeness"):  # a local reference: its similarity column is ready too
            for spec in specs:
                metric = request.get("metric", "cosine")
                reference.closeness(spec.name, metric, [], progress, request.get("space", CORRECTED))
        return {"loaded": all(load is None for load in loads), "load_seconds": sum(load or 0.0 for load in loads)}

    def query(self, request: dict, ident) -> dict:
        from ..imaging.tumor import tumors_from
        from ..query import query_image
        from ..references.fused import hit_closeness, is_fused
        from ..search.correction import CORRECTED
        from ..search.fusion import FUSION_DEPTH

        progress = self._progress(ident)
        marks = request.get("tumors") or {}
        if marks.get("masks"):  # one file per tumor (a GUI's segments, each exported on its own)
            tumors = [tumor for path in marks["masks"] for tumor in tumors_from(mask=path)]
        else:
            tumors = tumors_from(
                mask=marks.get("mask"),
                segments=marks.get("segments"),
                points=marks.get("points"),
                boxes=marks.get("boxes"),
            )
        reference, specs = self._opened(request)
        embedders, loads = zip(*(self._embedder(request, spec, progress) for spec in specs))
        image = self._image(request)
        result = query_image(
            image,
            tumors,
            list(embedders) if is_fused(request["model"]) else embedders[0],
            reference,
            k=int(request.get("k", 5)),
            metric=request.get("metric", "cosine"),
            where=request.get("where"),
            method=request.get("method", "auto"),
            progress=progress,
            fusion=request.get("fusion", "rrf"),
            depth=int(request.get("depth", FUSION_DEPTH)),
            space=request.get("space", CORRECTED),
            like=request.get("like") or (),
            unlike=request.get("unlike") or (),
            similar_by=request.get("similar_by") or None,
        )
        seconds = dict(vars(result.seconds), load=sum(load or 0.0 for load in loads))
        tumors_embedded = result.embeddings[: len(result.embeddings) // max(len(result.models), 1)]
        pictures = []
        if request.get("thumbnail_folder"):
            from ..imaging.thumbnail import axial_thumbnail, write_png

            progress(4, 4, "drawing the tumor's thumbnail")
            folder = Path(request["thumbnail_folder"])
            pictures = [
                str(write_png(axial_thumbnail(image, e.seed), folder / f"query-{i + 1}.png"))
                for i, e in enumerate(tumors_embedded)
            ]
        hits = result.hits.assign(closer_than=hit_closeness(reference, result.hits, result.metric))
        return {
            "image_reused": request.get("image") is None,
            "hits": json.loads(hits.to_json(orient="records", double_precision=15)),
            "seconds": seconds,
            "loaded": all(load is None for load in loads),
            "models": [e.model for e in result.embeddings],
            "embeddings": [e.vector.tolist() for e in result.embeddings],
            "seeds": [list(e.seed) for e in tumors_embedded],
            "thumbnails": pictures,
        }

    def thumbnails(self, request: dict) -> dict:
        from ..imaging.ct_image import read_ct
        from ..imaging.thumbnail import axial_thumbnail, write_png

        folder, drawn, failed = Path(request["folder"]), {}, {}
        series = request.get("series") or []
        found = self._local_files([m["uid"] for m in series if not m.get("file")], request)
        for match in series:
            file = match.get("file") or (found.get(match["uid"]) or [None])[0]
            if file is None:
                continue  # not on this machine: nothing is downloaded for a picture
            try:
                picture = axial_thumbnail(read_ct(file), match["centre"])
                drawn[match["uid"]] = str(write_png(picture, folder / f"{match['uid']}.png"))
            except SimilarPatientsError as error:  # one unreadable series costs only its own picture
                failed[match["uid"]] = str(error)
        return {"thumbnails": drawn, "failed": failed}

    def open(self, request: dict, ident) -> dict:
        """Open a reference and measure its similarity scale for ``model`` (each model of the fused choice)
        ahead of the first search by patient, so that it pays neither this nor the imports."""
        from ..cloud import open_reference
        from ..references.fused import fused_models, is_fused
        from ..references.store import ReferenceStore

        reference = open_reference(request["reference"], ReferenceStore(request.get("home")))
        model = request.get("model")
        models = fused_models(reference, model) if is_fused(model or "") else [model] if model else []
        if hasattr(reference, "closeness"):
            for name in models:
                reference.closeness(name, request.get("metric", "cosine"), [], self._progress(ident))
        return {"models": list(reference.models)}

    def import_reference(self, request: dict, ident) -> dict:
        """Store a reference read from ``source`` (a folder, a file, a URL, or ``nlst-sybil``) as ``name``."""
        from ..references.store import ReferenceStore

        store = ReferenceStore(request.get("home"))
        return {"name": store.import_reference(request["name"], request["source"], self._progress(ident)).name}

    def neighbors(self, request: dict, ident) -> dict:
        """A reference patient's nearest patients, each with its similarity (closeness percentile); for the
        fused choice, ranked by every model together, with each model's rank."""
        from ..cloud import open_reference
        from ..references.fused import hit_closeness, is_fused, search_fused
        from ..references.store import ReferenceStore

        opened = open_reference(request["reference"], ReferenceStore(request.get("home")))
        model, patient, metric = request["model"], request["patient"], request.get("metric", "cosine")
        search = dict(k=int(request.get("k", 5)), metric=metric, where=request.get("where") or None, exclude=[patient])
        if request.get("like") or request.get("unlike"):  # "more like these"
            search.update(like=request.get("like") or (), unlike=request.get("unlike") or ())
        if request.get("similar_by"):
            search["similar_by"] = request["similar_by"]
        if is_fused(model):
            hits = search_fused(opened, patient=patient, models=model, **search)
            hits = hits.assign(closer_than=hit_closeness(opened, hits, metric))
        else:
            hits = opened.search(model, patient=patient, **search)
            if hasattr(opened, "closeness"):  # BigQuery: the distribution is not measured there
                hits = hits.assign(closer_than=opened.closeness(model, metric, hits.distance, self._progress(ident)))
            else:
                hits = hits.assign(closer_than=float("nan"))
        return {"hits": json.loads(hits.to_json(orient="records", double_precision=15))}

    def fetch(self, request: dict, ident) -> dict:
        """The series ``uids`` on this machine: from the site's DICOM folder (no network), or the cache,
        downloading what is not there (the GUI asked the user first)."""
        from ..idc import IDCIndex
        from ..idc.download import SeriesCache

        uids, progress = list(request["uids"]), self._progress(ident)
        if request.get("local_folder"):
            report(progress, 0, 1, f"finding the matches' series in {request['local_folder']}")
            found = self._local_files(uids, request)
            if not found:
                raise SimilarPatientsError(f"{request['local_folder']} holds none of the matches' series.")
            return {"files": {uid: [str(p) for p in paths] for uid, paths in found.items()}}
        index = IDCIndex(request.get("index"))
        cache = SeriesCache(request["cache_root"], index, bucket=request.get("bucket", "aws"))
        fetched = cache.fetch(uids, progress)
        return {"files": {uid: [str(p) for p in series.files] for uid, series in fetched.items()}}

    def _local_files(self, uids: list, request: dict) -> dict:
        """Files of the series ``uids`` on this machine: in the site's DICOM folder (indexed once per worker,
        new or changed files read again), else in the download cache (a folder per series)."""
        from ..idc.download import DicomFolderIndex, cached_files

        if not uids:
            return {}
        if request.get("local_folder"):
            folder = str(request["local_folder"])
            if folder not in self.folders:
                self.folders[folder] = DicomFolderIndex(folder)
            return self.folders[folder].files(uids)
        root = Path(request["cache_root"]) if request.get("cache_root") else None
        if root is None:
            return {}
        found = {uid: [str(p) for p in cached_files(root, uid)] for uid in uids}
        return {uid: files for uid, files in found.items() if files}


def _per_model(request: dict, field: str, model: str):
    """A request's ``recipe`` or ``weights`` for one of its models: a fused request gives them per model."""
    from ..references.fused import is_fused

    value = request.get(field) or None
    if isinstance(value, dict):
        return value.get(model)
    if value is not None and is_fused(request["model"]):
        raise SimilarPatientsError(
            f"A query of several models takes {field} per model (a mapping of model to {field}), not one for all."
        )
    return value


def _plain(value):
    """JSON for numpy scalars and paths in events."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_request(line: bytes) -> dict:
    """One line of stdin as a request: a JSON object in UTF-8 whose ``id`` is a number, a text or absent.
    Anything else is our error, which the worker answers (without an id) before it reads the next line."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SimilarPatientsError(
            f"Not a request: the line is not UTF-8 (byte {error.start}: {error.reason})."
        ) from None
    try:
        request = json.loads(text)
    except RecursionError:
        raise SimilarPatientsError("Not a request: the line nests brackets too deeply to read.") from None
    except ValueError:  # JSONDecodeError, and numbers too long to convert
        raise SimilarPatientsError(f"Not a request: {text.strip()[:80]!r} is not JSON.") from None
    if not isinstance(request, dict):
        raise SimilarPatientsError(
            f'Not a request: a request is a JSON object ({{"id": 1, "op": ...}}), not {text.strip()[:40]!r}.'
        )
    ident = request.get("id")
    if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (int, float, str))):
        raise SimilarPatientsError("Not a request: its id must be a number or a text.")
    return request


def main() -> None:
    """Serve requests from stdin until it closes. Only events go to stdout; anything else printed by a
    package goes to stderr. A line that is not a request is answered with an error, and the worker goes on."""
    out = sys.stdout
    sys.stdout = sys.stderr
    worker = _Worker(out)
    for line in sys.stdin.buffer:  # bytes: a line that is not UTF-8 is refused, not fatal
        if not line.strip():
            continue
        try:
            request = read_request(line)
        except SimilarPatientsError as error:
            worker.send(id=None, event="error", message=str(error), cancelled=False)
            continue
        worker.handle(request)


if __name__ == "__main__":
    main()
