"""Progress reporting: library code calls a plain callback; the CLI shows a bar, the Slicer module the bar
and log of its panel."""

from __future__ import annotations

from typing import Callable

#: ``progress(done, total, message)``; ``total`` is 0 when unknown. Raise from it to cancel.
ProgressCallback = Callable[[float, float, str], None]


def report(progress: ProgressCallback | None, done: float, total: float, message: str) -> None:
    """Call ``progress`` if one was given."""
    if progress is not None:
        progress(done, total, message)
