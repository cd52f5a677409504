"""What the corrected space costs: per search (exact scan and approximate index, against the raw space on the
same reference, queries and process), and at import (its statistics: mean and deviation, z-scored norms,
every patient's radius, its index and nearest-match distribution).

A search in the corrected space scores the stored matrix as the raw one does (one product per row; the
z-scoring is folded into the query), then multiplies each row's score by its patient's radius factor and,
for a query from outside the reference, finds its own radius among the rows it already scored. The timings
interleave the two spaces query by query, so load on a shared machine falls on both alike; the load average
is printed with each measurement.

The approximate searches are also checked against the exact ones on the same outside queries: the share of
identical top-k lists, and how far the query's own radius (measured among the patients the index proposes)
is from the exact one (it scales the reported distances, not their order).

Synthetic clustered vectors as in ``benchmarks/search.py`` (2 lesions a patient).

    PYTHONPATH=SimilarPatients python benchmarks/space_cost.py --rows 200000
    PYTHONPATH=SimilarPatients python benchmarks/space_cost.py --rows 200000 --profile   # where the time goes
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import _lesions, synthetic  # the same synthetic reference as the search benchmark

K = 10


def load() -> str:
    """The 1-minute load average (a shared machine's other work)."""
    return f"load {os.getloadavg()[0]:.1f}"


def interleaved(calls: dict, queries) -> dict:
    """Median seconds per call name, the calls taking turns on each query."""
    times = {name: [] for name in calls}
    for q in queries:
        for name, call in calls.items():
            started = time.perf_counter()
            call(q)
            times[name].append(time.perf_counter() - started)
    return {name: float(np.median(values)) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--profile", action="store_true", help="also profile the approximate searches")
    args = parser.parse_args()

    from SimilarPatientsLib import ReferenceStore
    from SimilarPatientsLib.references import schema, spaces
    from SimilarPatientsLib.search.nearest import exact_distances, nearest_patients

    home = tempfile.mkdtemp()
    stages: list = []

    def progress(done, total, message):
        if not stages or stages[-1][1] != message:
            stages.append((time.perf_counter(), message))

    table = schema.ReferenceTable(_lesions(0, args.rows), {"M": synthetic(args.rows, args.dim, seed=0)})
    started = time.perf_counter()
    reference = ReferenceStore(Path(home)).write("bench", table, "synthetic", progress=progress)
    written = time.perf_counter() - started
    spent: dict = {}
    for (at, message), until in zip(stages, [s[0] for s in stages[1:]] + [started + written]):
        spent[message] = spent.get(message, 0.0) + until - at
    raw = reference.space("M")
    matrix = np.asarray(raw.vectors)
    started = time.perf_counter()
    correction = spaces.moments_of(matrix)
    moments_s = time.perf_counter() - started
    started = time.perf_counter()
    spaces.corrected_norms(matrix, correction)
    norms_s = time.perf_counter() - started
    print(
        f"{args.rows:,} × {args.dim}, {os.cpu_count()} CPUs (shared), {args.queries} outside queries, k = {K}; {load()}"
    )
    print(f"write {written:.1f} s; its stages (s): " + ", ".join(f"{m}: {v:.1f}" for m, v in spent.items()))
    print(f"the statistics alone: mean and deviation {moments_s:.2f} s, z-scored norms {norms_s:.2f} s")

    corrected = reference.space("M", space="corrected")
    queries = synthetic(args.queries, args.dim, seed=1)
    matrix.sum()  # the memory map in the page cache for both spaces
    exact = interleaved(
        {
            "raw": lambda q: nearest_patients(raw, q, K, "cosine"),
            "corrected": lambda q: nearest_patients(corrected, q, K, "cosine"),
            "corrected, radius given": lambda q: nearest_patients(corrected, q, K, "cosine", query_radius=1.0),
        },
        queries,
    )
    print(
        "exact scan p50: " + ", ".join(f"{name} {1e3 * value:.1f} ms" for name, value in exact.items()) + f"; {load()}"
    )
    print(f"  corrected / raw: {exact['corrected'] / exact['raw']:.3f}")
    started = time.perf_counter()
    raw_index = reference.approximate_index("M", "cosine")
    raw_index_s = time.perf_counter() - started
    corrected_index = reference.approximate_index("M", "cosine", None, "corrected")
    searches = {
        "raw": lambda q: nearest_patients(raw, q, K, "cosine", None, raw_index.candidates),
        "corrected": lambda q: nearest_patients(corrected, q, K, "cosine", None, corrected_index.candidates),
    }
    approximate = interleaved(searches, queries)
    print(
        f"approximate p50: raw {1e3 * approximate['raw']:.2f} ms (index built on first use in {raw_index_s:.0f} s, "
        f"recall {raw_index.calibration.recall:.3f}), corrected {1e3 * approximate['corrected']:.2f} ms "
        f"(recall {corrected_index.calibration.recall:.3f} at effort {corrected_index.calibration.breadth})"
    )
    print(f"  corrected / raw: {approximate['corrected'] / approximate['raw']:.3f}; {load()}")
    agreement(corrected, corrected_index, queries)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.profile:
        for name, call in searches.items():
            profiled(name, call, queries)
        raw_rows = np.arange(4 * K)  # as many rows as the re-ranking gets from the graph
        parts = interleaved(
            {
                "raw graph": lambda q: raw_index.candidates(q[None, :].astype(np.float32), 4 * K, None),
                "corrected graph": lambda q: corrected_index.candidates(q[None, :].astype(np.float32), 4 * K, None),
                "re-ranking 40 rows, raw": lambda q: exact_distances(raw, raw_rows, q[None, :], "cosine"),
                "re-ranking 40 rows, corrected": lambda q: exact_distances(corrected, raw_rows, q[None, :], "cosine"),
            },
            np.repeat(queries, 10, axis=0),
        )
        print("parts p50: " + ", ".join(f"{name} {1e6 * value:.0f} µs" for name, value in parts.items()))


def agreement(corrected, index, queries) -> None:
    """How the approximate corrected answers compare with the exact ones on the outside queries: identical
    top-k lists, and the query radius's ratio to the exact one (from a patient both answers hold)."""
    from SimilarPatientsLib.search.nearest import nearest_patients

    same, ratios = 0, []
    for q in queries:
        exact = nearest_patients(corrected, q, K, "cosine")
        approximated = nearest_patients(corrected, q, K, "cosine", None, index.candidates)
        same += [m.patient for m in exact] == [m.patient for m in approximated]
        by_patient = {m.patient: m.distance for m in exact}
        common = [m for m in approximated if m.patient in by_patient and m.distance > 0]
        if common:  # distance = d / sqrt(r_q r_p): the ratio of the two distances is sqrt of the radii's
            ratios.append((by_patient[common[0].patient] / common[0].distance) ** 2)
    ratios = np.array(ratios)
    print(
        f"approximate vs exact (corrected, {len(queries)} outside queries): identical top-{K} lists {same}; "
        f"query radius / exact: equal (1e-9) in {int((np.abs(ratios - 1) < 1e-9).sum())}, "
        f"median {np.median(ratios):.4f}, max {ratios.max():.4f}"
    )


def profiled(name: str, call, queries, rounds: int = 20) -> None:
    """The functions that took longest over ``rounds`` passes of ``call`` on every query."""
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(rounds):
        for q in queries:
            call(q)
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(8)
    print(f"{name}, {rounds * len(queries)} approximate searches:\n{out.getvalue()}")


if __name__ == "__main__":
    main()
