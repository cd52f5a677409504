"""The one exception type for errors a user can cause; its message says what to do next."""

from __future__ import annotations


class SimilarPatientsError(Exception):
    """Bad input, missing data or an unreachable source: the message tells the user how to fix it."""
