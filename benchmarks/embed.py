"""Embedding latency per model: read, crop and forward per tumor (p50), model load from cache, peak memory;
and, where CUDA is present, GPU throughput of the embedding path against the bare network.

Each model runs in its own process (so peak memory is that model's), on a synthetic chest CT written as a
DICOM series (512 x 512 x 160 at 0.7 x 0.7 x 1.25 mm) with tumors at several places. The weights are random
tensors in each model's upstream checkpoint layout, put in the cache of a throw-away data home: timings
do not depend on the weight values, and nothing is downloaded.

    python benchmarks/embed.py                    # all models, 2 CPU threads
    python benchmarks/embed.py --models FMCIB CTFM --repeats 30
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

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "SimilarPatients"), str(ROOT / "Testing" / "Python")]

MODELS = ("FMCIB", "CTFM", "VISTA3D", "SUPREME", "ModelsGen", "Voco", "PASTA", "Merlin", "CTClipVit", "TumorDescriptor")


def make_study(folder: Path) -> list:
    """A 512 x 512 x 160 chest-like CT with 6 tumors, as DICOM; returns their (kind, centre, mask path)."""
    import SimpleITK as sitk
    from synthetic_ct import KINDS, add_noise, add_tumor, blank_ct, write_dicom_series

    rng = np.random.default_rng(0)
    image = blank_ct(size=(512, 512, 160), spacing=(0.7, 0.7, 1.25), origin=(-179.0, -179.0, -100.0))
    tumors = []
    for i, kind in enumerate((*KINDS, "smooth")):
        centre = (rng.uniform(-120, 120), rng.uniform(-120, 120), rng.uniform(-80, 80))
        image, mask = add_tumor(image, kind, centre, rng.uniform(6, 12), rng)
        sitk.WriteImage(mask, str(folder / f"mask{i}.nrrd"), True)
        tumors.append((kind, centre, str(folder / f"mask{i}.nrrd")))
    write_dicom_series(add_noise(image, rng), folder / "ct")
    return tumors


def cache_weights(name: str) -> None:
    """Random weights in the model's upstream layout, in the data home's cache (as a download leaves them)."""
    import torch
    from SimilarPatientsLib.models import registry, weights
    from synthetic_weights import upstream_checkpoint

    spec = registry.get(name)
    if spec.weights is None:
        return
    torch.manual_seed(0)
    state = spec.build().state_dict()
    for key, tensor in state.items():  # CT-CLIP's codebook starts at zeros: its embeddings would be all zeros
        if key.endswith("vq._codebook.embed"):
            tensor.normal_(0, 0.05)
    cached = weights.cached_path(name, spec.weights)
    cached.parent.mkdir(parents=True, exist_ok=True)
    os.replace(upstream_checkpoint(name, state, cached.parent), cached)


def run_model(name: str, folder: Path, tumors: list, repeats: int) -> dict:
    """Time one model in this process (called in a child process per model)."""
    import torch
    from SimilarPatientsLib.imaging import ct_image, tumor
    from SimilarPatientsLib.imaging.crop import crop
    from SimilarPatientsLib.models import registry
    from SimilarPatientsLib.models.embedder import Embedder

    torch.set_num_threads(2)
    spec = registry.get(name)
    start = time.perf_counter()
    if spec.build is not None:
        import monai.networks.nets  # noqa: F401  (imported once per process, timed apart from the load)
        import SimilarPatientsLib.models.networks
        import SimilarPatientsLib.models.networks_ctclip
        import SimilarPatientsLib.models.networks_merlin
        import SimilarPatientsLib.models.networks_pasta  # noqa: F401
    imports = time.perf_counter() - start
    start = time.perf_counter()
    embedder = Embedder(name, accept_licence=True)
    load = time.perf_counter() - start

    reads = []
    for _ in range(3):
        start = time.perf_counter()
        image = ct_image.read_ct(folder / "ct")
        reads.append(time.perf_counter() - start)
    marks = [tumor.from_mask(path) for _, _, path in tumors]
    embedder.embed(image, marks[0])  # warm-up
    crops, forwards, totals = [], [], []
    for i in range(repeats):
        mark = marks[i % len(marks)]
        start = time.perf_counter()
        prepared = crop(image, mark.seed, embedder.recipe, mark.mask, mark.box)
        cropped = time.perf_counter()
        embedder.embed_crops([prepared])
        done = time.perf_counter()
        crops.append(cropped - start)
        forwards.append(done - cropped)
        totals.append(done - start)
    return {
        "model": name,
        "dim": spec.dimension,
        "read_s": float(np.median(reads)),
        "crop_s": float(np.median(crops)),
        "forward_s": float(np.median(forwards)),
        "crop_forward_p50_s": float(np.median(totals)),
        "crop_forward_p90_s": float(np.percentile(totals, 90)),
        "import_s": imports,
        "load_s": load,
        "peak_rss_MB": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (reset at exec, unlike ru_maxrss, which a child process
    inherits from the parent that forked it)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bare_forward(network, device_batch, precision: str) -> None:
    import torch

    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, precision == "bf16"):
        network(device_batch).float().cpu()


def _crops_per_second(call, batch: int, seconds: float) -> float:
    import torch

    call()
    torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        count += batch
    torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def reference_pipeline(folder: Path, tumors: list, repeats: int = 3) -> dict:
    """Seconds per crop of TumorImagingBench's MONAI transforms (orient, resample the whole volume, seed
    crop, orient, window, pad; the read excluded) against ours, on the same CT and seeds, one process."""
    import warnings

    from SimilarPatientsLib.imaging import ct_image, recipes, tumor
    from SimilarPatientsLib.imaging.crop import crop
    from test_crop_and_inputs import tumorimagingbench_pipeline

    warnings.filterwarnings("ignore")
    image = ct_image.read_ct(folder / "ct")
    recipe = recipes.tumorimagingbench("SPL")
    seeds = [tumor.from_mask(path).seed for _, _, path in tumors][:repeats]
    times = {"monai": [], "ours": []}
    for seed in seeds:
        start = time.perf_counter()
        expected = tumorimagingbench_pipeline(image, seed, recipe)
        times["monai"].append(time.perf_counter() - start)
        start = time.perf_counter()
        got = crop(image, seed, recipe).image
        times["ours"].append(time.perf_counter() - start)
        assert np.abs(got - expected).max() < 1e-5
    return {label: float(np.median(values)) for label, values in times.items()}


def gpu_throughput(name: str, batches=(1, 32, 128), seconds: float = 3.0) -> list:
    """Crops/s of ``Embedder.forward`` (host array in, host embeddings out) against the bare network on a
    GPU-resident batch, fp32 and bf16, in one process."""
    from functools import partial

    import torch
    from SimilarPatientsLib.models import registry
    from SimilarPatientsLib.models.embedder import Embedder

    spec = registry.get(name)
    rows = []
    for precision in ("fp32", "bf16"):
        embedder = Embedder(name, accept_licence=True, device="cuda", precision=precision, batch_size=max(batches))
        for batch in batches:
            host = np.random.default_rng(0).random((batch, 1, *spec.recipe.size), dtype=np.float32)
            encoder = embedder.encoder  # a NetworkEncoder: the bare network and the embedding path's forward
            bare = _crops_per_second(
                partial(_bare_forward, encoder.network, torch.from_numpy(host).cuda(), precision), batch, seconds
            )
            path = _crops_per_second(partial(encoder.forward, host), batch, seconds)
            rows.append(
                {
                    "model": name,
                    "precision": precision,
                    "batch": batch,
                    "bare_crops_per_s": bare,
                    "embedder_crops_per_s": path,
                    "ratio": path / bare,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=20, help="tumors embedded per model (default 20)")
    parser.add_argument("--gpu-models", nargs="+", default=["FMCIB", "CTFM"])
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        name, folder = args.child[0], Path(args.child[1])
        tumors = json.loads((folder / "tumors.json").read_text())
        result = run_model(name, folder, tumors, args.repeats)
        import torch

        if torch.cuda.is_available() and name in args.gpu_models:
            result["gpu"] = gpu_throughput(name)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        start = time.perf_counter()
        tumors = make_study(folder)
        (folder / "tumors.json").write_text(json.dumps(tumors))
        print(f"study written in {time.perf_counter() - start:.1f} s: 512x512x160 DICOM, {len(tumors)} tumors")
        environment = dict(os.environ, SIMILARPATIENTS_HOME=str(folder / "home"), OMP_NUM_THREADS="2")
        os.environ["SIMILARPATIENTS_HOME"] = environment["SIMILARPATIENTS_HOME"]
        baseline = reference_pipeline(folder, tumors)
        results = []
        for name in args.models:
            cache_weights(name)
            command = [sys.executable, __file__, "--child", name, str(folder), "--repeats", str(args.repeats)]
            command += ["--gpu-models", *args.gpu_models]
            done = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
            if done.returncode:
                print(f"{name}: failed\n{done.stderr[-2000:]}")
                continue
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    print(f"\nCPU, {os.cpu_count()} cores visible, torch threads 2; p50 over {args.repeats} tumors, seconds")
    header = (
        f"{'model':16}{'dim':>6}{'read':>8}{'crop':>8}{'forward':>9}{'crop+fwd':>10}{'p90':>8}"
        f"{'import':>8}{'load':>8}{'peak MB':>9}"
    )
    print(header)
    for r in results:
        print(
            f"{r['model']:16}{r['dim']:>6}{r['read_s']:>8.2f}{r['crop_s']:>8.3f}{r['forward_s']:>9.3f}"
            f"{r['crop_forward_p50_s']:>10.3f}{r['crop_forward_p90_s']:>8.3f}{r['import_s']:>8.2f}{r['load_s']:>8.2f}"
            f"{r['peak_rss_MB']:>9.0f}"
        )
    print(
        f"\nCrop baseline (same CT and seeds, read excluded): TumorImagingBench's MONAI transforms "
        f"{baseline['monai']:.2f} s per crop, ours {baseline['ours']:.3f} s: "
        f"{baseline['monai'] / baseline['ours']:.0f}x faster, the same values (max difference < 1e-5, checked)"
    )
    gpu = [row for r in results for row in r.get("gpu", [])]
    if gpu:
        print("\nGPU throughput, crops/s (embedder path: host array in, host embeddings out)")
        print(f"{'model':10}{'precision':>10}{'batch':>7}{'bare':>10}{'embedder':>10}{'ratio':>7}")
        for row in gpu:
            print(
                f"{row['model']:10}{row['precision']:>10}{row['batch']:>7}{row['bare_crops_per_s']:>10.0f}"
                f"{row['embedder_crops_per_s']:>10.0f}{row['ratio']:>7.2f}"
            )
    else:
        print("\n(no CUDA device: no GPU throughput)")


if __name__ == "__main__":
    main()
