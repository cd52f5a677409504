"""The one exception type for errors a user can cause (its message says what to do next), and the one
for work the user stopped."""

from __future__ import annotations


class SimilarPatientsError(Exception):
    """Bad input, missing data or an unreachable source: the message tells the user how to fix it."""


class Cancelled(SimilarPatientsError):
    """The user stopped the work (a progress callback raised it, or a GUI's Cancel ended a child process).

    Raise it from a progress callback to stop any library call that reports progress; nothing it was
    writing is left behind half-done."""

    def __init__(self, message: str = "Cancelled."):
        super().__init__(message)
