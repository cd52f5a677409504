"""Long work off the GUI thread, polled by the GUI's timer: a request to the query worker (a process, see
``scene/worker.py``) or a :class:`ThreadJob` (a Python thread of the GUI's process that touches neither Qt
nor the scene: a download, an import, a search). Both answer the same three calls, so a handler waits on
either the same way; the GUI thread only relays progress and never processes events inside a handler.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

from ..errors import Cancelled
from ..progress import ProgressCallback, report


class Job(Protocol):
    """Work under way: poll it (progress reaches its callback on the polling thread), then take its result."""

    def poll(self, timeout: float = 0.0) -> bool:
        """Take what has happened (waiting up to ``timeout`` s); True once the work has ended."""

    def result(self):
        """The work's value, or its error raised (:class:`Cancelled` when it was cancelled)."""

    def cancel(self) -> None:
        """Stop the work; its result is then :class:`Cancelled`."""


class ThreadJob:
    """``work(progress)`` run in a thread. Cancel takes effect at the work's next progress report (the
    progress-callback convention: the callback raises :class:`Cancelled`); the job ends cancelled at once
    and whatever the thread still returns is dropped.

    Args:
        work: the function to run; it reports through the progress callback it is given.
        progress: where its progress goes, on the thread that polls.
    """

    def __init__(self, work: Callable[[ProgressCallback], object], progress: ProgressCallback | None = None):
        self.progress = progress
        self._events: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self._outcome: tuple | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self._thread.start()

    def _run(self, work) -> None:
        def progress(done, total, message):
            if self._cancelled.is_set():
                raise Cancelled()
            self._events.put(("progress", (done, total, message)))

        try:
            self._events.put(("result", work(progress)))
        except BaseException as error:  # handed to the polling thread, which raises it from result()
            self._events.put(("error", error))

    def poll(self, timeout: float = 0.0) -> bool:
        deadline = time.monotonic() + timeout
        while self._outcome is None:
            try:
                kind, value = self._events.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if kind == "progress":
                report(self.progress, *value)
            else:
                self._outcome = (kind, value)
        return self._outcome is not None

    def result(self):
        if self._outcome is None:
            raise RuntimeError("The job has not ended yet.")
        kind, value = self._outcome
        if kind == "error":
            raise value
        return value

    def cancel(self) -> None:
        self._cancelled.set()
        if self._outcome is None:
            self._outcome = ("error", Cancelled())

    def wait(self, timeout: float | None = None) -> object:
        """Wait for the result (scripts and tests); ``timeout`` None waits as long as the work takes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll(0.05):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("The job did not end in time.")
        return self.result()
