"""Slicer's idle main thread, as the GIL sees it: Slicer's Qt event loop never releases the GIL (PythonQt's
thread support is off), so between two ticks of the module's 50 ms timer no other Python thread of the
process runs. :func:`poll_like_slicer` polls as that timer does, the main thread sleeping each tick in C
with the GIL held (``usleep``, or Windows' ``Sleep``, through ``ctypes.PyDLL``, whose calls keep the GIL,
unlike ``time.sleep``), or, for the free baseline, sleeping with it released."""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable

TICK = 0.05  # the module's timer interval (SimilarPatients.py)
# PyDLL: the GIL is kept during its calls. libc's usleep (the process's own symbols), or Windows' Sleep.
_SLEEP = ctypes.PyDLL("kernel32").Sleep if os.name == "nt" else ctypes.PyDLL(None).usleep
_UNIT = 1e3 if os.name == "nt" else 1e6  # Sleep takes milliseconds, usleep microseconds


def hold_gil(seconds: float) -> None:
    """Sleep ``seconds`` without releasing the GIL, as Slicer's idle event loop waits."""
    _SLEEP(int(seconds * _UNIT))


def poll_like_slicer(poll: Callable[[], bool], gil_held: bool = True, timeout: float = 120.0) -> float:
    """Call ``poll()`` once a tick until it returns True; between ticks the main thread sleeps holding the
    GIL (``gil_held``) or not. Returns the seconds it took; TimeoutError after ``timeout``."""
    started = time.perf_counter()
    while not poll():
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"not done after {timeout:.0f} s of polling like Slicer")
        if gil_held:
            hold_gil(TICK)
        else:
            time.sleep(TICK)
    return time.perf_counter() - started
