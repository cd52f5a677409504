"""The command line's progress display: the library's progress callbacks drawn as tqdm bars on stderr."""

from __future__ import annotations

import sys


class Bars:
    """A tqdm bar per stage, on stderr, shown only for work that lasts over a second."""

    def __init__(self):
        self.bar = None
        self.message = None

    def __call__(self, done: float, total: float, message: str) -> None:
        from tqdm import tqdm

        if message != self.message:
            self.close()
            self.message = message
            unit = "B" if message.startswith("downloading") else "it"
            self.bar = tqdm(
                total=total or None,
                desc=message,
                unit=unit,
                unit_scale=unit == "B",
                delay=1.0,
                file=sys.stderr,
                leave=False,
            )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
