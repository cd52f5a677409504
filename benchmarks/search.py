"""Search benchmark: the write, the first answers, the exact scan vs the memory floor, and the approximate
index's recall and latency.

For each (rows, dim): one process generates a synthetic reference and writes it through the real store
(Parquet, matrices, norms, digests, the nearest-match distribution, and the HNSW index with its recall
self-check when the size calls for one) and reports its peak memory; with ``--source shards`` the vectors
are first written as a folder of Parquet shards (generated chunk by chunk, in a shuffled order, as
``index build`` leaves them) and the reference is imported from it, streamed. A second process builds the
same HNSW index alone from the stored matrix (the yardstick of the write time). The shards are deleted as
soon as the import has read them (it reads its source once, before it writes the table), which keeps the
disk's peak at the reference's own size. A fresh process then opens
the reference and times the first ``closeness`` call, the check of every stored file against its digest (and
a second open's), and ``Reference.search`` (the public call, hit table included), so its peak memory is
that of searching.

The memory floor is the fastest single pass over the same matrix in the same process: a BLAS matrix-vector
product or a chunked sum, whichever is faster. Synthetic vectors: 2 lesions per patient, drawn from 1,000
clusters in a 64-dimensional latent space mapped linearly to ``dim`` plus isotropic noise (real embeddings
have low intrinsic dimension: 90% of CT-FM's NLST variance lies in 38 components).

Beside each public call, the same search without building the hit table (``nearest_patients``: the scan or
the index, and the float64 re-ranking, nothing after): their ratio is what assembling k rows costs, which
must not grow with the reference. On the approximate path, usearch's default HNSW index (``pip install
usearch``; skipped when absent, and above a million rows, where it would be another copy of the matrix)
runs on the same vectors and queries in the same process, as an outside yardstick: its p50 per query and
its patient recall@10 (its 4k nearest lesions, first k distinct patients).

From a million rows the exact scan is also timed cold (the matrix dropped from the page cache first, so it
is read from disk as it is scanned, with a progress report) beside a plain sequential read of the same file:
the disk's speed. Above ``--warm-limit-gb`` the matrix is not brought into memory at all (a 5M × 512
reference on a shared 24 GiB machine): exact search is timed cold only, and the exact answers that recall is
measured against come from one pass for all queries.

With ``--data unstructured`` the vectors are isotropic Gaussian noise instead (no cluster structure: the
hardest case for a graph index), which shows the index's self-check at work: the recall it measured on the
reference's own lesions, the search effort it settled on, and what ``auto`` search then does.

    python benchmarks/search.py                 # the full table (about 30 minutes on 2 cores)
    python benchmarks/search.py --sizes 10000x512 100000x512 300000x512 1000000x512   # the assembly table
    python benchmarks/search.py --sizes 200000x512 --data clustered unstructured
    python benchmarks/search.py --sizes 5000000x512 --source shards   # about 25 GB of disk at its peak
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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
SHARD_ROWS = 250_000
#: From this many rows the exact scan is also timed cold, against the disk's speed.
COLD_FROM = 1_000_000


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


def _lesions(first: int, n: int) -> pd.DataFrame:
    rows = np.arange(first, first + n)
    return pd.DataFrame(
        {
            "model": "M",
            "PatientID": [f"P{i // 2:07d}" for i in rows],
            "lesion_id": [str(i % 2) for i in rows],
            "recipe": "synthetic",
        }
    )


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shards(folder: str, n: int, dim: int, data: str) -> dict:
    """The reference as Parquet shards of SHARD_ROWS rows, generated one at a time (never whole in memory),
    named so that their sorted order is not the order of their rows (as a build's shards come)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.perf_counter()
    for index, first in enumerate(range(0, n, SHARD_ROWS)):
        m = min(SHARD_ROWS, n - first)
        vectors = DATA[data](m, dim, seed=1000 + index)
        offsets = pa.array(np.arange(m + 1, dtype=np.int32) * dim)
        table = pa.Table.from_pandas(_lesions(first, m), preserve_index=False)
        table = table.append_column("embedding", pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1))))
        pq.write_table(table, Path(folder) / f"embeddings-{(index * 7919) % 10007:05d}-{index}.parquet")
    size = sum(f.stat().st_size for f in Path(folder).iterdir())
    return {"shards_s": time.perf_counter() - started, "shards_mb": size / 1e6}


def build(home: str, n: int, dim: int, data: str, source: str) -> dict:
    """Write the reference (from memory, or imported from the shards in ``source``); time, seconds per stage
    (by the progress messages) and peak memory."""
    from SimilarPatientsLib import ReferenceStore
    from SimilarPatientsLib.references import schema

    stages = []

    def progress(done, total, message):
        if not stages or stages[-1][1] != message:
            stages.append((time.perf_counter(), message))
        if message == "writing the table and the norms" and source != "memory" and Path(source).exists():
            shutil.rmtree(source)  # the writer reads its source once, before this stage: from here on it is not read

    store = ReferenceStore(Path(home))
    if source == "memory":
        table = schema.ReferenceTable(_lesions(0, n), {"M": DATA[data](n, dim, seed=0)})
        held = _peak_mb()
        started = time.perf_counter()
        reference = store.write("bench", table, "synthetic", progress=progress)
    else:
        held = _peak_mb()
        started = time.perf_counter()
        reference = store.import_reference("bench", source, progress)
    seconds = time.perf_counter() - started
    spent: dict = {}
    for (at, message), until in zip(stages, [s[0] for s in stages[1:]] + [started + seconds]):
        spent[message] = spent.get(message, 0.0) + until - at
    index = reference.path / "models" / "0" / "hnsw-corrected-cosine.faiss"
    return {
        "write_s": seconds,
        "index_in_write_s": spent.get("building the approximate index", 0.0),
        "stages_s": {message: round(value, 1) for message, value in spent.items()},
        "held_before_write_mb": held,
        "write_peak_rss_mb": _peak_mb(),
        "matrix_mb": n * dim * 4 / 1e6,
        "index_mb": index.stat().st_size / 1e6 if index.exists() else 0.0,
        "index_built_at_write": index.exists(),
        "closeness_at_write": reference.manifest["models"]["M"]["closeness"]["corrected-cosine"]["search"],
    }


def index_alone(home: str) -> dict:
    """The same HNSW index built alone from the stored matrix (no check, no save): the write's yardstick."""
    from SimilarPatientsLib import ReferenceStore
    from SimilarPatientsLib.search.approximate import ApproximateIndex

    space = ReferenceStore(Path(home)).open("bench").space("M")
    started = time.perf_counter()
    ApproximateIndex.graph(space, "cosine")
    return {"index_alone_s": time.perf_counter() - started}


def _drop_from_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages (clean pages go at once), so it is read from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_seconds(path: Path) -> float:
    """One cold sequential read of ``path`` in 64 MiB pieces."""
    _drop_from_cache(path)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as stream:
        buffer = bytearray(64 << 20)
        while stream.readinto(buffer):
            pass
    return time.perf_counter() - started


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


def first_answers(home: str) -> dict:
    """In a fresh process: the first closeness after opening; every stored file checked against its digest
    as a new process checks it (read in full), from disk and from the page cache; the same check on a
    second open (a size check)."""
    from SimilarPatientsLib import ReferenceStore
    from SimilarPatientsLib.util import digests

    started = time.perf_counter()
    reference = ReferenceStore(Path(home)).open("bench")
    reference.closeness("M", "cosine", [0.1])
    first = time.perf_counter() - started
    files = list(reference.manifest["files"])
    size = sum((reference.path / f).stat().st_size for f in files)
    result = {"closeness_first_s": first, "version_GB": size / 1e9}
    for state in ("cold", "warm"):  # cold: read from disk; warm: the same files again, from the page cache
        if state == "cold":
            for relative in files:
                _drop_from_cache(reference.path / relative)
        digests._checked.clear()  # as a new process finds it
        started = time.perf_counter()
        for relative in files:
            reference.verified(relative)
        result[f"verify_{state}_s"] = time.perf_counter() - started
        result[f"verify_{state}_GBps"] = size / result[f"verify_{state}_s"] / 1e9
    started = time.perf_counter()
    again = ReferenceStore(Path(home)).open("bench")
    for relative in files:
        again.verified(relative)
    result["reopen_check_ms"] = (time.perf_counter() - started) * 1000
    return result


def measure(home: str, dim: int, approximate: bool, data: str, warm: bool) -> dict:
    from SimilarPatientsLib import ReferenceStore
    from SimilarPatientsLib.search.nearest import nearest_patients, nearest_patients_many

    reference = ReferenceStore(Path(home)).open("bench")
    space = reference.space("M", space="corrected")  # the default search's space (benchmarks/space_cost.py: vs raw)
    queries = DATA[data](QUERIES, dim, seed=1)
    result = {}
    n = len(space.norms)
    if n >= COLD_FROM:  # before anything brings the matrix into memory
        path = reference.path / "models" / "0" / "vectors.npy"
        result["disk_GBps"] = path.stat().st_size / disk_seconds(path) / 1e9
        _drop_from_cache(path)
        reports = []
        started = time.perf_counter()
        reference.search("M", embeddings=queries[0], k=K, method="exact", progress=lambda *a: reports.append(a))
        result["exact_cold_s"] = time.perf_counter() - started
        result["exact_cold_GBps"] = path.stat().st_size / result["exact_cold_s"] / 1e9
        result["scan_reports"] = len(reports)
    if warm:
        np.asarray(space.vectors).sum()  # bring the memory map into the page cache, as a second query finds it
        result["floor_s"] = floor_seconds(space.vectors)
        exact_hits = [set(reference.search("M", embeddings=q, k=K, method="exact").PatientID) for q in queries]
        result["exact_p50_s"] = p50(lambda q: reference.search("M", embeddings=q, k=K, method="exact"), queries)
        result["exact_bare_p50_s"] = p50(lambda q: nearest_patients(space, q, K, "cosine"), queries)
    else:  # the exact answers from one pass over the matrix for all queries
        truths = nearest_patients_many(space, list(queries), K, "cosine", None, np.ones(len(queries)))
        exact_hits = [{m.patient for m in truth} for truth in truths]
    if approximate:
        started = time.perf_counter()
        index = reference.approximate_index("M", "cosine", None, "corrected")
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
        calibration = index.calibration
        result["self_check_recall"] = calibration.recall
        result["effort"] = calibration.breadth
        methods = {m for q in queries for m in reference.search("M", embeddings=q, k=K).search}
        result["auto_p50_s"] = p50(lambda q: reference.search("M", embeddings=q, k=K), queries)
        result["auto_search"] = "/".join(sorted(methods))
    result["search_peak_rss_mb"] = _peak_mb()
    if approximate and n <= 1_000_000:  # after the peak memory of searching is read: its own index is another copy
        raw = reference.space("M")  # usearch knows plain cosine only: compared in the raw space
        raw_hits = [{m.patient for m in truth} for truth in nearest_patients_many(raw, list(queries), K, "cosine")]
        result.update(usearch_row(raw, queries, raw_hits))
    return result


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{args[1]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=SIZES, help="ROWSxDIM, e.g. 100000x512")
    parser.add_argument(
        "--approximate-from", type=int, default=10_000, help="also time the approximate index from this many rows"
    )
    parser.add_argument("--data", nargs="+", choices=list(DATA), default=["clustered"], help="synthetic vectors")
    parser.add_argument(
        "--source", choices=["memory", "shards"], default="memory", help="write from memory, or import from shards"
    )
    parser.add_argument("--warm-limit-gb", type=float, default=8.0, help="above this matrix size, time exact cold only")
    parser.add_argument("--dir", default=None, help="where the references and shards go (default: the temp folder)")
    parser.add_argument(
        "--index-alone-up-to", type=int, default=2_000_000, help="time the index built alone up to this many rows"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        step, home, *rest = args.child
        if step == "shards":
            out = shards(home, int(rest[0]), int(rest[1]), rest[2])
        elif step == "build":
            out = build(home, int(rest[0]), int(rest[1]), rest[2], rest[3])
        elif step == "index":
            out = index_alone(home)
        elif step == "first":
            out = first_answers(home)
        else:
            out = measure(home, int(rest[0]), step == "measure-approx", rest[1], rest[2] == "warm")
        print(json.dumps(out))
        return
    rows = []
    for size, data in [(s, d) for s in args.sizes for d in args.data]:
        n, dim = (int(v) for v in size.lower().split("x"))
        with tempfile.TemporaryDirectory(dir=args.dir) as home:
            row = {"rows": n, "dim": dim, "data": data, "source": args.source}
            source = "memory"
            if args.source == "shards":
                source = str(Path(home) / "shards")
                Path(source).mkdir()
                row.update(run_child("--child", "shards", source, str(n), str(dim), data))
            row.update(run_child("--child", "build", home, str(n), str(dim), data, source))
            if row["index_built_at_write"] and n <= args.index_alone_up_to:
                row.update(run_child("--child", "index", home))
            row.update(run_child("--child", "first", home))
            step = "measure-approx" if n >= args.approximate_from else "measure"
            warm = "warm" if n * dim * 4 <= args.warm_limit_gb * 1e9 else "cold"
            row.update(run_child("--child", step, home, str(dim), data, warm))
        row["write_rss/goal"] = row["write_peak_rss_mb"] / (1.5 * row["matrix_mb"] + row["index_mb"])
        if "index_alone_s" in row:
            row["write/index_alone"] = row["write_s"] / row["index_alone_s"]
        if row["index_in_write_s"]:
            row["write/index_in_write"] = row["write_s"] / row["index_in_write_s"]
        if "exact_p50_s" in row:
            row["exact/floor"] = row["exact_p50_s"] / row["floor_s"]
            row["exact public/bare"] = row["exact_p50_s"] / row["exact_bare_p50_s"]
        if "approx_p50_s" in row:
            if "exact_p50_s" in row:
                row["exact/approx"] = row["exact_p50_s"] / row["approx_p50_s"]
            row["approx public/bare"] = row["approx_p50_s"] / row["approx_bare_p50_s"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    stages = [(f"{row['rows']}x{row['dim']} {row['data']}", row.pop("stages_s")) for row in rows]
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
    load = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; k={K}, "
        f"{QUERIES} queries per size, cosine"
    )
    print(table.T.to_string(header=False, float_format=lambda v: f"{v:.3g}"))
    for size, spent in stages:
        print(f"write stages, {size} (s): " + "; ".join(f"{message} {value}" for message, value in spent.items()))


if __name__ == "__main__":
    main()
