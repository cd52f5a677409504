"""A persistent query worker: one child process, started on first use, that keeps its loaded models
between queries, so a GUI pays torch's import and a model's weights once, not per click.

The protocol is JSON lines. The client writes one request per line on the worker's stdin::

    {"id": 1, "op": "query", "image": "ct.nrrd", "tumors": {"mask": "m.nrrd", "segments": ["1"]},
     "model": "CTFM", "reference": "nlst-sybil", "k": 5, "metric": "cosine", "where": [], "home": null}

(``tumors`` may instead hold ``masks``, one file per tumor, ``points`` or ``boxes`` in LPS mm.)

and reads events from its stdout, ending with exactly one ``result`` or ``error`` per request::

    {"id": 1, "event": "progress", "done": 2, "total": 4, "message": "embedding with CTFM"}
    {"id": 1, "event": "result", "hits": [...], "seconds": {...}, "loaded": false, "image_reused": false}
    {"id": 1, "event": "error", "message": "...", "cancelled": false}

A query with ``"thumbnail_folder"`` also writes a picture of each query tumor there (``query-1.png``, ...).
``{"op": "thumbnails", "folder": ..., "series": [{"uid": ..., "file": ..., "centre": [x, y, z]}]}`` draws
the matches whose images are on this machine, each at its tumor centre (LPS mm); a series that cannot be
read is named in ``failed`` with the reason, and the others are still drawn.

Cancel ends the worker's whole process tree (the ``PythonSlicer`` launcher and the Python it starts are
one process group), and the next request starts a fresh worker; so does a worker that died.
"""

from __future__ import annotations

import contextlib
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

    def thumbnails(self, folder: Path | str, series: list, cancelled: Callable[[], bool] | None = None) -> dict:
        """Pictures of the matches whose series are local (``series``: dicts of ``uid``, ``file`` — one file
        of the series — and ``centre`` in LPS mm) written into ``folder``; returns ``thumbnails`` (uid →
        PNG path) and ``failed`` (uid → reason)."""
        return self.request("thumbnails", None, cancelled, folder=str(folder), series=series)

    def request(self, op: str, progress=None, cancelled=None, **fields) -> dict:
        self._start()
        self._next_id += 1
        ident = self._next_id
        line = json.dumps({"id": ident, "op": op, **fields})
        try:
            self._process.stdin.write(line + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError):
            self._died()
        while True:
            if cancelled is not None and cancelled():
                self.stop()
                raise Cancelled()
            try:
                event = self._events.get(timeout=self.poll_seconds)
            except queue.Empty:
                if not self.running:
                    self._died()
                continue
            if event is None:  # the worker's stdout closed: it is gone
                self._died()
            if event.get("id") != ident:
                continue
            if event["event"] == "progress":
                report(progress, event["done"], event["total"], event["message"])
            elif event["event"] == "result":
                return event
            elif event.get("missing_image"):
                raise ImageNotHeld(event["message"])
            else:
                raise (Cancelled if event.get("cancelled") else SimilarPatientsError)(event["message"])

    def stop(self) -> None:
        """End the worker and every process it started."""
        if self._process is None:
            return
        if self._process.poll() is None:
            _kill_tree(self._process)
        self._process.wait()
        self._process = None

    def _start(self) -> None:
        if self.running:
            return
        self._process = None

        self._stderr = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")  # noqa: SIM115 (kept with the worker)
        group = {"start_new_session": True} if os.name == "posix" else {"creationflags": 0x00000200}
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
            **group,
        )
        self._events = queue.Queue()
        threading.Thread(target=_read_events, args=(self._process.stdout, self._events), daemon=True).start()

    def _died(self):
        code = self._process.wait() if self._process is not None else None
        self._stderr.seek(0)
        lines = [line for line in self._stderr.read().splitlines() if line.strip()]
        self._process = None
        detail = f": {lines[-1][:300]}" if lines else ""
        raise SimilarPatientsError(
            f"The query worker stopped unexpectedly (exit code {code}){detail}. The next query starts a new one."
        )

    def __del__(self):
        with contextlib.suppress(Exception):  # at interpreter shutdown there is nothing more to do
            self.stop()


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


class _Worker:
    """Answers requests one at a time, keeping loaded embedders and opened references between them."""

    def __init__(self, out):
        self.out = out
        self.embedders: dict = {}
        self.image: tuple | None = None  # (key, validated CT): the last image, reused while its key holds

    def send(self, **event) -> None:
        self.out.write(json.dumps(event, default=_plain) + "\n")
        self.out.flush()

    def handle(self, request: dict) -> None:
        ident = request.get("id")
        try:
            if request.get("op") == "ping":
                self.send(id=ident, event="result", pid=os.getpid(), models=sorted(self.embedders))
            elif request.get("op") == "query":
                self.send(id=ident, event="result", **self.query(request, ident))
            elif request.get("op") == "thumbnails":
                self.send(id=ident, event="result", **self.thumbnails(request))
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

    def query(self, request: dict, ident) -> dict:
        from ..cloud import open_reference
        from ..imaging.tumor import tumors_from
        from ..models import registry
        from ..models.embedder import Embedder
        from ..query import check_compatible, query_image
        from ..references.store import ReferenceStore

        def progress(done, total, message):
            self.send(id=ident, event="progress", done=done, total=total, message=message)

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
        reference = open_reference(request["reference"], ReferenceStore(request.get("home")))
        spec = registry.get(request["model"])
        check_compatible(reference, spec.name, spec.with_recipe(request.get("recipe")).name, spec.dimension)
        key = (spec.name, request.get("recipe"), request.get("weights"), request.get("device"))
        loaded = key in self.embedders
        if not loaded:
            started = time.perf_counter()
            self.embedders[key] = Embedder(
                spec.name,
                request.get("recipe"),
                request.get("weights"),
                bool(request.get("accept_licence")),
                request.get("device"),
                progress=progress,
            )
            load = time.perf_counter() - started
        image = self._image(request)
        result = query_image(
            image,
            tumors,
            self.embedders[key],
            reference,
            k=int(request.get("k", 5)),
            metric=request.get("metric", "cosine"),
            where=request.get("where"),
            method=request.get("method", "auto"),
            progress=progress,
        )
        seconds = dict(vars(result.seconds), load=0.0 if loaded else load)
        pictures = []
        if request.get("thumbnail_folder"):
            from ..imaging.thumbnail import axial_thumbnail, write_png

            folder = Path(request["thumbnail_folder"])
            pictures = [
                str(write_png(axial_thumbnail(image, e.seed), folder / f"query-{i + 1}.png"))
                for i, e in enumerate(result.embeddings)
            ]
        closeness = getattr(reference, "closeness", None)  # a BigQuery reference does not measure it
        hits = result.hits.assign(
            closer_than=closeness(spec.name, result.metric, result.hits.distance, progress)
            if closeness
            else float("nan")
        )
        return {
            "image_reused": request.get("image") is None,
            "hits": json.loads(hits.to_json(orient="records", double_precision=15)),
            "seconds": seconds,
            "loaded": loaded,
            "embeddings": [e.vector.tolist() for e in result.embeddings],
            "seeds": [list(e.seed) for e in result.embeddings],
            "thumbnails": pictures,
        }

    def thumbnails(self, request: dict) -> dict:
        from ..imaging.ct_image import read_ct
        from ..imaging.thumbnail import axial_thumbnail, write_png

        folder, drawn, failed = Path(request["folder"]), {}, {}
        for match in request.get("series") or []:
            try:
                picture = axial_thumbnail(read_ct(match["file"]), match["centre"])
                drawn[match["uid"]] = str(write_png(picture, folder / f"{match['uid']}.png"))
            except SimilarPatientsError as error:  # one unreadable series costs only its own picture
                failed[match["uid"]] = str(error)
        return {"thumbnails": drawn, "failed": failed}


def _plain(value):
    """JSON for numpy scalars and paths in events."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def main() -> None:
    """Serve requests from stdin until it closes. Only events go to stdout; anything else printed by a
    package goes to stderr."""
    out = sys.stdout
    sys.stdout = sys.stderr
    worker = _Worker(out)
    for line in sys.stdin:
        if line.strip():
            try:
                request = json.loads(line)
            except json.JSONDecodeError:
                worker.send(id=None, event="error", message=f"Not a request: {line[:80]!r}", cancelled=False)
                continue
            worker.handle(request)


if __name__ == "__main__":
    main()
