"""Reference-build throughput: lesions per minute of the Beam pipeline on the DirectRunner (1 worker, and 2
worker processes) against a plain single-process loop over the same manifest, with the time per stage
(read, crop, embed, write).

The data are synthetic chest CTs written as DICOM series (512 x 512 x SLICES at 0.7 x 0.7 x 1.25 mm), each
with tumors at known places, marked in the manifest by their seed; the model is CT-FM with random weights in
its upstream layout (the timings do not depend on the weight values; nothing is downloaded). Every
configuration starts from an empty output folder and includes its start-up (model load, runner start).

    python benchmarks/build.py                       # 40 series x 2 lesions, CT-FM
    python benchmarks/build.py --series 10 --model TumorDescriptor
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "SimilarPatients"), str(ROOT / "Testing" / "Python")]


def make_collection(folder: Path, series: int, per_series: int, slices: int) -> pd.DataFrame:
    """``series`` DICOM CT series with ``per_series`` tumors each; the manifest that marks them by seed."""
    from synthetic_ct import KINDS, add_noise, add_tumor, blank_ct, write_dicom_series

    rows = []
    for s in range(series):
        rng = np.random.default_rng(s)
        half_height = (slices - 1) * 1.25 / 2
        image = blank_ct(size=(512, 512, slices), spacing=(0.7, 0.7, 1.25), origin=(-179.0, -179.0, -half_height))
        centres = []
        for lesion in range(per_series):
            centre = (rng.uniform(-120, 120), rng.uniform(-120, 120), rng.uniform(-0.6, 0.6) * half_height)
            image, _ = add_tumor(image, KINDS[(s + lesion) % len(KINDS)], centre, rng.uniform(6, 12), rng)
            centres.append(centre)
        datasets = write_dicom_series(add_noise(image, rng), folder / f"s{s:03d}", patient=f"P{s:03d}")
        for lesion, centre in enumerate(centres):
            rows.append(
                {"SeriesInstanceUID": str(datasets[0].SeriesInstanceUID), "PatientID": f"P{s:03d}"}
                | {"lesion_id": str(lesion + 1)}
                | dict(zip(("seed_x", "seed_y", "seed_z"), centre))
            )
    return pd.DataFrame(rows)


def random_weights(model: str, folder: Path) -> dict:
    import torch
    from SimilarPatientsLib.models import registry
    from synthetic_weights import upstream_checkpoint

    spec = registry.get(model)
    if spec.weights is None:
        return {}
    torch.manual_seed(0)
    return {model: str(upstream_checkpoint(model, spec.build().eval().state_dict(), folder))}


def plain_loop(lesions, model: str, weights: dict, source, out: Path, batch_size: int) -> dict:
    """The same work without Beam: one process, series after series, the crops of a series in one batch."""
    from SimilarPatientsLib.models.embedder import Embedder
    from SimilarPatientsLib.pipeline import build, shards, stages

    start = time.perf_counter()
    embedder = Embedder(model, weights=weights.get(model), batch_size=batch_size)
    todo, _ = build.plan(lesions, {embedder.spec.name: embedder.recipe}, out)
    seconds = dict.fromkeys(("read", "crop", "embed", "write"), 0.0)
    rows = []
    for source_uid, items in todo.items():
        t = time.perf_counter()
        image, files = stages.read_image(source_uid, True, source)
        seconds["read"] += time.perf_counter() - t
        t = time.perf_counter()
        tumors = [stages.lesion_tumor(lesion, files, source) for lesion, _ in items]
        crops = embedder.crops(image, tumors)
        seconds["crop"] += time.perf_counter() - t
        t = time.perf_counter()
        vectors = embedder.embed_crops(crops)
        seconds["embed"] += time.perf_counter() - t
        rows += [
            shards.row(lesion, embedder.spec.name, embedder.recipe.name, c.seed, v)
            for (lesion, _), c, v in zip(items, crops, vectors)
        ]
    t = time.perf_counter()
    shards.write_shard(rows, out, shards.row_schema(lesions))
    seconds["write"] += time.perf_counter() - t
    return {"seconds": time.perf_counter() - start, "rows": len(rows), "stages": seconds}


def beam_run(lesions, model: str, weights: dict, source, out: Path, batch_size: int, beam_args: list) -> dict:
    from SimilarPatientsLib.pipeline import build_references

    start = time.perf_counter()
    result = build_references(
        lesions, [model], out, source, beam_args=beam_args, weights=weights, batch_size=batch_size
    )
    return {"seconds": time.perf_counter() - start, "rows": result.embedded, "stages": result.stage_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=40)
    parser.add_argument("--lesions-per-series", type=int, default=2)
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--model", default="CTFM")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data", type=Path, help="keep the synthetic collection here (reused when present)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument(
        "--runs", nargs="+", choices=("loop", "direct1", "direct2"), default=["loop", "direct1", "direct2"]
    )
    args = parser.parse_args()

    from SimilarPatientsLib.pipeline import SeriesSource, lesions_from_frame

    work = Path(tempfile.mkdtemp(prefix="build-bench-"))
    os.environ["SIMILARPATIENTS_HOME"] = str(work / "home")
    data = args.data or work / "data"
    manifest = data / "manifest.parquet"
    if not manifest.exists():
        t = time.perf_counter()
        data.mkdir(parents=True, exist_ok=True)
        make_collection(data, args.series, args.lesions_per_series, args.slices).to_parquet(manifest)
        print(f"wrote {args.series} series in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    lesions = lesions_from_frame(pd.read_parquet(manifest))
    (work / "weights").mkdir()
    weights = random_weights(args.model, work / "weights")
    source = SeriesSource.local(data)

    configurations = {
        "plain loop (1 process)": None,
        "DirectRunner, 1 worker": ["--direct_num_workers=1"],
        "DirectRunner, 2 workers (multi_processing)": [
            "--direct_num_workers=2",
            "--direct_running_mode=multi_processing",
        ],
    }
    chosen = dict(zip(("loop", "direct1", "direct2"), configurations))
    configurations = {chosen[run]: configurations[chosen[run]] for run in args.runs}
    results = {}
    for name, beam_args in configurations.items():
        out = work / f"out-{len(results)}"
        if beam_args is None:
            results[name] = plain_loop(lesions, args.model, weights, source, out, args.batch_size)
        else:
            results[name] = beam_run(lesions, args.model, weights, source, out, args.batch_size, beam_args)
        print(name, json.dumps(results[name]), file=sys.stderr)

    loop = results.get("plain loop (1 process)", {}).get("seconds", float("nan"))
    shape = f"512 x 512 x {args.slices}"
    print(f"{len(lesions)} lesions, {args.series} series of {shape}, {args.model}, batch {args.batch_size}")
    print("| configuration | wall s | lesions/min | vs loop | read s | crop s | embed s | write s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        per_minute = 60 * r["rows"] / r["seconds"]
        stage = " | ".join(f"{r['stages'].get(s, 0.0):.1f}" for s in ("read", "crop", "embed", "write"))
        print(f"| {name} | {r['seconds']:.1f} | {per_minute:.0f} | {loop / r['seconds']:.2f}× | {stage} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    shutil.rmtree(work, ignore_errors=True)  # the collection stays when --data named its folder


if __name__ == "__main__":
    main()
