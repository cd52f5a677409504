"""What the honest scoreboard's retrieval figures cost on one NLST-Sybil-sized ranking (464 patients).

Measured in one process, on the real reference's CT-FM ranking of the stage task (nearest lesion pair,
cosine), each against a baseline in the same run:

- the permutation null, 1000 label shuffles with the rankings kept, vectorised (``metrics.label_figures``
  on 50 shuffles at a time) against a Python loop over the shuffles (what the evaluation did before, for
  100 shuffles);
- the gallery-resampled bootstrap (1000 resamples, each query's list walked with the multiplicities)
  against re-building every resampled list by hand (timed on 20 resamples and scaled).

    python benchmarks/retrieval_null.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NLST = ROOT.parent / "shared" / "data" / "nlst-sybil-embeddings"


def main() -> None:
    from SimilarPatientsLib import ReferenceStore
    from SimilarPatientsLib.evaluation import metrics, tasks
    from SimilarPatientsLib.evaluation.cohort import Cohort

    with tempfile.TemporaryDirectory() as home:
        reference = ReferenceStore(Path(home)).import_reference("nlst", str(NLST))
        task = tasks.PRESETS["stage-iii-iv-vs-i-ii"]
        labels = task.patient_labels(reference.lesions("CTFM"))
        cohort = Cohort.build(reference.lesions("CTFM"), reference.space("CTFM").vectors, labels)
        distances = cohort.distances("lesions", "cosine")
        order = np.argsort(distances, axis=1, kind="stable")[:, :-1]
        y = cohort.labels
        rng = np.random.default_rng(0)
        shuffles = np.argsort(rng.random((1000, len(y))), axis=1)

        start = time.perf_counter()
        for chunk in range(0, 1000, 50):
            shuffled = y[shuffles[chunk : chunk + 50]]
            metrics.summarise(metrics.label_figures(order, shuffled, (5, 10), ranked=False), shuffled)
        vectorised = time.perf_counter() - start

        start = time.perf_counter()
        for permutation in shuffles[:100]:
            shuffled = y[permutation]
            for k in (5, 10):
                relevant = shuffled[order[:, :k]] == shuffled[:, None]
                precision = relevant.mean(1)
                [precision[shuffled == c].mean() for c in (0, 1)]
        loop = (time.perf_counter() - start) * 10

        counts = metrics.bootstrap_counts(len(y), 1000, rng)
        start = time.perf_counter()
        metrics.gallery_bootstrap(order, y, counts, 10)
        walked = time.perf_counter() - start
        start = time.perf_counter()
        for drawn in counts[:20].astype(int):
            for q in range(len(y)):
                listed = np.repeat(order[q], drawn[order[q]])[:10]
                np.mean(y[listed] == y[q])
        rebuilt = (time.perf_counter() - start) * 50

    load = os.getloadavg()[0]
    print(f"464 patients; load average {load:.1f} on {os.cpu_count()} cores")
    print("| what | seconds | baseline (same run) | baseline seconds | ratio |")
    print("|---|---|---|---|---|")
    print(f"| null, 1000 shuffles, vectorised | {vectorised:.2f} | Python loop over shuffles | {loop:.2f} | "
          f"{vectorised / loop:.2f} |")  # fmt: skip
    print(f"| gallery bootstrap, 1000 resamples, walked | {walked:.2f} | lists rebuilt per resample | {rebuilt:.1f} | "
          f"{walked / rebuilt:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
