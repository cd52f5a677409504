"""Evaluation benchmark: the NLST-Sybil report's run (6 models × 2 tasks) timed end to end.

Each configuration runs as the CLI in a fresh process (imports and report writing included) on the
reference imported from ``../shared/data/nlst-sybil-embeddings``. The default
configuration is the CLI's (2 workers, 5×5-fold CV, 100 permutations, 1000 bootstrap samples); the others
show what each part costs, as a ratio to it measured in the same run.

    python benchmarks/evaluate.py
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NLST = ROOT.parent / "shared" / "data" / "nlst-sybil-embeddings"
TASKS = ["adeno-vs-squamous", "stage-iii-iv-vs-i-ii"]
CONFIGURATIONS = {
    "default (2 workers)": [],
    "1 worker": ["--workers", "1"],
    "no permutation test": ["--permutations", "0"],
    "1 repeat": ["--repeats", "1"],
}


def main() -> None:
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "SIMILARPATIENTS_HOME": home}
        command = [sys.executable, "-m", "SimilarPatientsLib"]
        subprocess.run([*command, "references", "import", "nlst", "--source", str(NLST)], env=env, check=True,
                       capture_output=True)  # fmt: skip
        rows = []
        for name, extra in CONFIGURATIONS.items():
            tasks = [a for t in TASKS for a in ("--task", t)]
            started = time.perf_counter()
            subprocess.run(
                [*command, "evaluate", "--reference", "nlst", *tasks, "--out", str(Path(home) / "out"), *extra],
                env=env, check=True, capture_output=True,
            )  # fmt: skip
            seconds = time.perf_counter() - started
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            rows.append((name, seconds, peak))
    baseline = rows[0][1]
    print(f"evaluate, NLST-Sybil, 6 models x {len(TASKS)} tasks, {os.cpu_count()} CPUs")
    print(f"{'configuration':<22} {'seconds':>8} {'ratio':>6} {'peak RSS MB (max so far)':>25}")
    for name, seconds, peak in rows:
        print(f"{name:<22} {seconds:8.1f} {seconds / baseline:6.2f} {peak:25.0f}")


if __name__ == "__main__":
    main()
