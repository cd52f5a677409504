"""Run an image query in a child process, so that a GUI (Slicer) stays responsive and can cancel it.

The child is this package's own command line (``python -m SimilarPatientsLib query ... --json``): the
same code path as the CLI, with torch, the model and its memory in a process that ends with the query.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from ..errors import Cancelled, SimilarPatientsError

#: The SimilarPatientsLib folder (imported before any of its modules): its parent goes on the child's
#: path, so that the child runs this same code.
_PACKAGE = Path(sys.modules[__name__.split(".")[0]].__file__).resolve().parent


def query_command(
    image: Path,
    model: str,
    reference: str,
    mask: Path | None = None,
    segment: str | None = None,
    point_ras: Sequence[float] | None = None,
    k: int = 5,
    metric: str = "cosine",
    python: str | None = None,
) -> list:
    """The command line of an image query; the tumor is a ``mask`` file or a point in RAS mm (Slicer's)."""
    if (mask is None) == (point_ras is None):
        raise SimilarPatientsError("Give the tumor as a mask or as a point, not both.")
    command = [python or sys.executable, "-m", "SimilarPatientsLib", "query", "--image", str(image)]
    command += ["--model", model, "--reference", reference, "-k", str(int(k)), "--metric", metric, "--json"]
    if mask is not None:
        command += ["--mask", str(mask)] + (["--segment", str(segment)] if segment is not None else [])
    else:
        command += ["--point=" + ",".join(f"{float(v):.4f}" for v in point_ras), "--ras"]
    return command


def run_query(
    command: Sequence[str],
    cancelled: Callable[[], bool] | None = None,
    environment: dict | None = None,
    poll_seconds: float = 0.1,
) -> pd.DataFrame:
    """Run ``command`` and return its hits; ``cancelled()`` is polled (a GUI processes events there) and
    stops the child when it returns True. Errors come back with the child's own message."""
    package_parent = str(_PACKAGE.parent)
    env = dict(os.environ if environment is None else environment)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
    # Files, not pipes: a child writing more than a pipe holds (progress bars) would block on a full pipe.
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(list(command), stdout=stdout, stderr=stderr, text=True, env=env)
        while child.poll() is None:
            if cancelled is not None and cancelled():
                child.kill()
                child.wait()
                raise Cancelled()
            time.sleep(poll_seconds)
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    if child.returncode != 0:
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        reason = lines[-1][len("error: ") :] if lines else (err.strip().splitlines() or ["no message"])[-1]
        raise SimilarPatientsError(reason)
    return pd.DataFrame(json.loads(out))
