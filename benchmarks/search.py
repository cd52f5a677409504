"""Search benchmark: exact scan vs the memory floor, and the approximate index's recall and latency.

For each (rows, dim): one process generates a synthetic reference and writes it through the real store
(Parquet, matrices, and the HNSW index when the size calls for one); a fresh process then opens it and
times ``Reference.search`` (the public call, hit table included), so its peak memory is that of searching.

The memory floor is the fastest single pass over the same matrix in the same process: a BLAS matrix-vector
product or a chunked sum, whichever is faster. Synthetic vectors: 2 lesions per patient, drawn from 1,000
clusters in a 64-dimensional latent space mapped linearly to ``dim`` plus isotropic noise (real embeddings
have low intrinsic dimension: 90% of CT-FM's NLST variance lies in 38 components).

Beside each public call, the same search without building the hit table (``nearest_patients``: the scan or
the index, and the float64 re-ranking, nothing after): their ratio is what assembling k rows costs, which
must not grow with the reference. On the approximate path, usearch's default HNSW index (``pip install
usearch``; skipped when absent) runs on the same vectors and queries in the same process, as an outside
yardstick: its p50 per query and its patient recall@10 (its 4k nearest lesions, first k distinct patients).

With ``--data unstructured`` the vectors are isotropic Gaussian noise instead (no cluster structure: the
hardest case for a graph index), which shows the index's self-check at work: the recall it measured on the
reference's own lesions, the search effort it settled on, and what ``auto`` search then does.

    python benchmarks/search.py                 # the full table (about 30 minutes on 2 cores)
    python benchmarks/search.py --sizes 10000x512 100000x512 300000x512 1000000x512   # the assembly table
    python benchmarks/search.py --sizes 200000x512 --data clustered unstructured
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

SIZES = ["10000x512", "100000x512", "1000000x512", "10000x4096", "100000x4096"]
QUERIES = 30
K = 10


def synthetic(n: int, dim: int, seed: int) -> np.ndarray:
    layout = np.random.default_rng(12345)
    latent = 64
    centres = layout.standard_normal((1000, latent)).astype(np.float32) * 2
    mapping = (layout.standard_normal((latent, dim)) / np.sqrt(latent)).astype(np.float32)
    offset = layout.standard_normal(dim).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        z = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, latent), dtype=np.float32)
        out[start : start + m] = z @ mapping + offset + 0.3 * rng.standard_normal((m, dim), dtype=np.float32)
    return out


def unstructured(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)


DATA = {"clustered": synthetic, "unstructured": unstructured}


def build(home: str, n: int, dim: int, data: str) -> dict:
    from SimilarPatientsLib import ReferenceStore
    from SimilarPatientsLib.references import schema

    vectors = DATA[data](n, dim, seed=0)
    lesions = pd.DataFrame(
        {
            "model": "M",
            "PatientID": [f"P{i // 2:07d}" for i in range(n)],
            "lesion_id": [str(i % 2) for i in range(n)],
            "recipe": "synthetic",
        }
    )
    started = time.perf_counter()
    reference = ReferenceStore(Path(home)).write("bench", schema.ReferenceTable(lesions, {"M": vectors}), "synthetic")
    seconds = time.perf_counter() - started
    has_index = (reference.path / "models" / "0" / "hnsw-cosine.faiss").exists()
    return {"write_s": seconds, "index_built_at_write": has_index}


def floor_seconds(matrix: np.ndarray, repeats: int = 5) -> float:
    query = np.ones(matrix.shape[1], dtype=np.float32)
    best = np.inf
    for _ in range(repeats):
        started = time.perf_counter()
        matrix @ query
        best = min(best, time.perf_counter() - started)
        started = time.perf_counter()
        for begin in range(0, matrix.shape[0], 32_768):
            matrix[begin : begin + 32_768].sum(axis=0)
        best = min(best, time.perf_counter() - started)
    return best


def p50(call, queries) -> float:
    """Median seconds of ``call(q)`` over ``queries``."""
    times = []
    for q in queries:
        started = time.perf_counter()
        call(q)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def usearch_row(space, queries, truths) -> dict:
    """usearch's default index on the same vectors: build time, p50 per query, patient recall@K."""
    try:
        from usearch.index import Index
    except ImportError:
        return {}
    started = time.perf_counter()
    index = Index(ndim=space.dim, metric="cos", dtype="f32")
    index.add(np.arange(len(space.norms)), np.ascontiguousarray(space.vectors))
    built = time.perf_counter() - started
    recalls = []
    for q, truth in zip(queries, truths):
        found = index.search(q, 4 * K).keys
        patients = list(dict.fromkeys(space.patient_ids[space.patient_codes[found]]))[:K]
        recalls.append(len(truth & set(patients)) / K)
    return {
        "usearch_build_s": built,
        "usearch_p50_s": p50(lambda q: index.search(q, 4 * K), queries),
        "usearch_recall": float(np.mean(recalls)),
    }


def measure(home: str, dim: int, approximate: bool, data: str) -> dict:
    from SimilarPatientsLib import ReferenceStore
    from SimilarPatientsLib.search.nearest import nearest_patients

    reference = ReferenceStore(Path(home)).open("bench")
    space = reference.space("M")
    np.asarray(space.vectors).sum()  # bring the memory map into the page cache, as a second query finds it
    queries = DATA[data](QUERIES, dim, seed=1)
    result = {"floor_s": floor_seconds(space.vectors)}
    exact_hits = [set(reference.search("M", embeddings=q, k=K, method="exact").PatientID) for q in queries]
    result["exact_p50_s"] = p50(lambda q: reference.search("M", embeddings=q, k=K, method="exact"), queries)
    result["exact_bare_p50_s"] = p50(lambda q: nearest_patients(space, q, K, "cosine"), queries)
    if approximate:
        started = time.perf_counter()
        index = reference.approximate_index("M", "cosine")
        result["index_load_or_build_s"] = time.perf_counter() - started
        recalls = [
            len(truth & set(reference.search("M", embeddings=q, k=K, method="approximate").PatientID)) / K
            for q, truth in zip(queries, exact_hits)
        ]
        result["approx_p50_s"] = p50(lambda q: reference.search("M", embeddings=q, k=K, method="approximate"), queries)
        result["approx_bare_p50_s"] = p50(
            lambda q: nearest_patients(space, q, K, "cosine", None, index.candidates), queries
        )
        result["recall_at_10"] = float(np.mean(recalls))
        calibration = reference.approximate_index("M", "cosine").calibration
        result["self_check_recall"] = calibration.recall
        result["effort"] = calibration.breadth
        methods = {m for q in queries for m in reference.search("M", embeddings=q, k=K).search}
        result["auto_p50_s"] = p50(lambda q: reference.search("M", embeddings=q, k=K), queries)
        result["auto_search"] = "/".join(sorted(methods))
    result["search_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if approximate:  # after the peak memory of searching is read: its own index is another copy
        result.update(usearch_row(space, queries, exact_hits))
    return result


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=SIZES, help="ROWSxDIM, e.g. 100000x512")
    parser.add_argument(
        "--approximate-from", type=int, default=10_000, help="also time the approximate index from this many rows"
    )
    parser.add_argument("--data", nargs="+", choices=list(DATA), default=["clustered"], help="synthetic vectors")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        step, home, n, dim, data = args.child
        n, dim = int(n), int(dim)
        out = build(home, n, dim, data) if step == "build" else measure(home, dim, step == "measure-approx", data)
        print(json.dumps(out))
        return
    rows = []
    for size, data in [(s, d) for s in args.sizes for d in args.data]:
        n, dim = (int(v) for v in size.lower().split("x"))
        with tempfile.TemporaryDirectory() as home:
            built = run_child("--child", "build", home, str(n), str(dim), data)
            step = "measure-approx" if n >= args.approximate_from else "measure"
            measured = run_child("--child", step, home, str(n), str(dim), data)
        row = {"rows": n, "dim": dim, "data": data, **built, **measured}
        row["exact/floor"] = row["exact_p50_s"] / row["floor_s"]
        row["exact public/bare"] = row["exact_p50_s"] / row["exact_bare_p50_s"]
        if "approx_p50_s" in row:
            row["exact/approx"] = row["exact_p50_s"] / row["approx_p50_s"]
            row["approx public/bare"] = row["approx_p50_s"] / row["approx_bare_p50_s"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    for column in (
        "floor_s",
        "exact_p50_s",
        "exact_bare_p50_s",
        "approx_p50_s",
        "approx_bare_p50_s",
        "auto_p50_s",
        "usearch_p50_s",
    ):
        if column in table:
            table[column.replace("_s", "_ms")] = table.pop(column) * 1000
    print(f"machine: {os.cpu_count()} CPUs; k={K}, {QUERIES} queries per size, cosine")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
