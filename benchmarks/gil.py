"""The module's long jobs under Slicer's GIL: each job polled as the module's 50 ms timer polls it, the main
thread between ticks sleeping either with the GIL released (free) or held, as Slicer's idle Qt event loop
holds it (``Testing/Python/slicer_idle.py``). Two ways, timed in the same run on the same data:

- **worker** (the module's way now): the job is a request to the worker process (``scene/worker.py``),
  started beforehand as entering the module starts it; the GUI process only reads its answer;
- **thread** (the module's way before): the same library work on a Python thread of the GUI's process (the
  ``ThreadJob`` the module used), which runs only while the main thread runs Python.

Jobs: importing NLST-Sybil from the local copy (six models, 734 lesions each), a fused search by patient
(all six models, k = 10) and a CT-FM search by patient (k = 10), each after one untimed run of its kind.

    python benchmarks/gil.py             # 3 runs of each job, each way, free and GIL held; medians
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "Testing" / "Python")]
NLST = ROOT.parent / "shared" / "data" / "nlst-sybil-embeddings"
PATIENT = "100242"


class ThreadRun:
    """``work()`` on a thread of this process, polled as the module polled its ThreadJob."""

    def __init__(self, work):
        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def poll(self, timeout: float = 0.0) -> bool:
        return not self._thread.is_alive()


def jobs(home: Path) -> dict:
    """Each job: how to start it in the worker, and on a thread (the worker's own code, run in this process)."""
    from SimilarPatientsLib.references import FUSED_CHOICE
    from SimilarPatientsLib.scene.worker import WorkerClient, _Worker

    client, local = WorkerClient(), _Worker(io.StringIO())
    search = dict(reference="nlst-sybil", patient=PATIENT, k=10, metric="cosine", where=[], home=str(home))
    requests = {
        "import NLST-Sybil": ("import", dict(name="nlst-sybil", source=str(NLST), home=str(home))),
        "fused search by patient": ("neighbors", dict(search, model=FUSED_CHOICE)),
        "CT-FM search by patient": ("neighbors", dict(search, model="CTFM")),
    }
    methods = {"import": local.import_reference, "neighbors": local.neighbors}
    started = {}
    for name, (op, fields) in requests.items():
        started[name] = {
            "worker": lambda op=op, fields=fields: client.submit(op, **fields),
            "thread": lambda op=op, fields=fields: ThreadRun(lambda: methods[op](dict(fields, id=1), 1)),
        }
    client.request("ping")  # entering the module starts the worker
    return started, client


def main() -> None:
    from slicer_idle import poll_like_slicer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as home:
        os.environ["SIMILARPATIENTS_HOME"] = home
        started, client = jobs(Path(home))
        try:
            for name, ways in started.items():
                for way, start in ways.items():
                    poll_like_slicer(start().poll, gil_held=False)  # one untimed run of its kind
                    seconds = {}
                    for held in (False, True):
                        times = [poll_like_slicer(start().poll, gil_held=held) for _ in range(args.runs)]
                        seconds[held] = float(np.median(times))
                    rows.append({"job": name, "way": way, "free (s)": seconds[False], "GIL held (s)": seconds[True]})
                    rows[-1]["held / free"] = seconds[True] / seconds[False]
                    print(rows[-1], file=sys.stderr, flush=True)
        finally:
            client.stop()
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end;")
    print(f"polled every 50 ms as the module's timer polls; median of {args.runs} runs")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
