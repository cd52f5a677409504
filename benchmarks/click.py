"""Click → results table: what a Slicer user waits for after pressing *Find*, outside Slicer.

One "click" is what the module does: write the CT and the tumor mask it has in memory to a temporary
folder (uncompressed NRRD), then query, with the query tumor's thumbnail drawn (the module asks for it).
Three ways, timed in the same run on the same inputs:

- **prepared on entry** (the module's way now): entering the module (or choosing a model) starts the worker
  and loads the model in the background (the worker's ``prepare``); the first click after entry then pays
  only the CT's hand-over, the crop, the embedding and the search. Measured: the entry (worker start to model
  loaded) and the first click after it;
- **worker, started by the first click** (the module's way before): the persistent worker of
  ``scene/worker.py``; the first click starts it (Python, torch and MONAI imports, the weights load), later
  clicks reuse it; the CT's voxels go to it only when the volume changed (a key names them), so a click on
  the same CT writes only the tumor mask;
- **child per click** (the module's way before the worker): ``similar-patients query --json`` in a fresh
  process for every click, paying imports and the weights load each time.

The CT is a synthetic 512 × 512 × 160 chest CT; the reference is the real NLST-Sybil one (CT-FM's 732
lesions) for CT-FM, whose weights are random tensors in the upstream layout in the data home's cache
(timings do not depend on their values), and 40 synthetic tumors for the weight-free model.

``--fusion``: the click of a fused query (the tumor embedded by each model, the rankings fused) over the
NLST-Sybil models, one more model at a time (CT-FM alone first, the baseline of the same run), all six
last, in one worker that keeps the models it loaded (the module's way); each model's weights random, in
its upstream layout.

    python benchmarks/click.py                # CTFM and TumorDescriptor, 10 warm clicks, 3 per-click children
    python benchmarks/click.py --fusion       # fused clicks over 1, 2, ..., 6 NLST-Sybil models, 5 warm each
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "Testing" / "Python"), str(ROOT / "benchmarks")]
NLST = ROOT.parent / "shared" / "data" / "nlst-sybil-embeddings"


def prepare(home: Path, networks: tuple = ("CTFM",)) -> tuple:
    """The query image and mask (in memory, as the module has them) and the two references; random weights
    for ``networks``, and their closeness distributions measured (as a stored reference keeps them)."""
    import SimpleITK as sitk
    from embed import cache_weights
    from SimilarPatientsLib import ReferenceStore
    from SimilarPatientsLib.imaging.tumor import from_binary_mask
    from SimilarPatientsLib.models.embedder import Embedder
    from SimilarPatientsLib.references import schema
    from SimilarPatientsLib.scene.nodes import around_tumor
    from synthetic_ct import KINDS, add_noise, add_tumor, blank_ct, tumor_ct

    os.environ["SIMILARPATIENTS_HOME"] = str(home)
    store = ReferenceStore(home)
    reference = store.import_reference("nlst-sybil", str(NLST))
    for model in networks:
        cache_weights(model)
        reference.closeness(model, "cosine", [0.0])
    embedder, rng, rows = Embedder("TumorDescriptor"), np.random.default_rng(5), []
    for i in range(8):
        for kind in KINDS:
            image, mask, _ = tumor_ct(kind, rng)
            embedding = embedder.embed(image, from_binary_mask(mask))[0]
            rows.append({"model": embedding.model, "recipe": embedding.recipe, "PatientID": f"{kind}-{i}"})
            rows[-1]["embedding"] = embedding.vector
    store.write("tumors", schema.from_frame(pd.DataFrame(rows)), "benchmark")
    image = blank_ct(size=(512, 512, 160), spacing=(0.7, 0.7, 1.25), origin=(-179.0, -179.0, -100.0))
    image, mask = add_tumor(image, "spiculated", (20.0, -30.0, 10.0), 9.0, rng)
    return add_noise(image, rng), around_tumor(sitk.Cast(mask, sitk.sitkUInt8))  # the mask the module writes


def write_inputs(image, mask, folder: Path) -> tuple:
    """What the module does with the nodes' images before a query: temporary uncompressed NRRDs."""
    import SimpleITK as sitk

    sitk.WriteImage(image, str(folder / "ct.nrrd"), False)
    sitk.WriteImage(mask, str(folder / "mask.nrrd"), False)
    return folder / "ct.nrrd", folder / "mask.nrrd"


def click(client, image, mask, model: str, reference: str, folder: Path) -> dict:
    """One click on a new CT: the CT and the mask handed over as files, the query, the tumor's thumbnail."""
    ct, tumor = write_inputs(image, mask, folder)
    return client.query(
        image=str(ct),
        image_key="ct",
        tumors={"mask": str(tumor)},
        model=model,
        reference=reference,
        k=5,
        thumbnail_folder=str(folder),
    )


def time_worker(image, mask, model: str, reference: str, folder: Path, warm: int) -> dict:
    """The first click, then warm clicks that send the CT each time (another volume each click), then warm
    clicks on the same volume (the module sends its voxels only when they changed: a key names them)."""
    import SimpleITK as sitk
    from SimilarPatientsLib.scene.worker import WorkerClient

    client, times, same, hits = WorkerClient(), [], [], None
    try:
        for _ in range(1 + warm):
            started = time.perf_counter()
            result = click(client, image, mask, model, reference, folder)
            times.append(time.perf_counter() - started)
            hits = [h["PatientID"] for h in result["hits"]]
        for _ in range(warm):
            started = time.perf_counter()
            sitk.WriteImage(mask, str(folder / "mask.nrrd"), False)
            kept = client.query(
                image=None,
                image_key="ct",
                tumors={"mask": str(folder / "mask.nrrd")},
                model=model,
                reference=reference,
                thumbnail_folder=str(folder),
            )
            same.append(time.perf_counter() - started)
            assert [h["PatientID"] for h in kept["hits"]] == hits
        return {
            "cold_s": times[0],
            "warm_p50_s": float(np.median(times[1:])),
            "same_ct_p50_s": float(np.median(same)),
            "hits": hits,
            "last": kept,
        }
    finally:
        client.stop()


#: The order models join the fused query in: CT-FM (the single-model baseline) first.
FUSION_ORDER = ("CTFM", "SUPREME", "VISTA3D", "Merlin", "PASTA", "CTClipVit")


def time_fusion(image, mask, folder: Path, warm: int) -> list:
    """Fused clicks over the first 1, 2, ..., 6 models of ``FUSION_ORDER`` in one worker: the first click
    of each set loads its new model; the warm ones (same CT, as the module sends it) are the click a user
    waits for once the models are loaded."""
    from SimilarPatientsLib.scene.worker import WorkerClient

    client, rows = WorkerClient(), []
    try:
        ct, tumor = write_inputs(image, mask, folder)
        for count in range(1, len(FUSION_ORDER) + 1):
            models = list(FUSION_ORDER[:count])
            request = dict(image_key="ct", tumors={"mask": str(tumor)}, model=models, reference="nlst-sybil", k=5)
            started = time.perf_counter()
            first = client.query(image=str(ct), accept_licence=True, **request)
            cold = time.perf_counter() - started
            times, stages = [], []
            for _ in range(warm):
                started = time.perf_counter()
                result = client.query(image=None, **request)
                times.append(time.perf_counter() - started)
                stages.append(result["seconds"])
                assert [h["PatientID"] for h in result["hits"]] == [h["PatientID"] for h in first["hits"]]
            per_model = {m: float(np.median([s["per_model"][m] for s in stages])) for m in models}
            rows.append(
                {
                    "models": count,
                    "added": models[-1],
                    "first click, loads it (s)": cold,
                    "warm click p50 (s)": float(np.median(times)),
                    "crop+embed, all models (s)": float(np.median([s["crop"] + s["embed"] for s in stages])),
                    "crop+embed, the added model (s)": per_model[models[-1]],
                    "search+fusion (s)": float(np.median([s["search"] for s in stages])),
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
        client.stop()  # what a user pays the first time: a fresh worker loading all six for one click
        started = time.perf_counter()
        client.query(image=str(ct), accept_licence=True, **request)
        rows.append({"models": len(FUSION_ORDER), "added": "all, fresh worker", "first click, loads it (s)": 0.0})
        rows[-1]["first click, loads it (s)"] = time.perf_counter() - started
    finally:
        client.stop()
    baseline = rows[0]["warm click p50 (s)"]
    for row in rows:
        row["/ CT-FM alone"] = row.get("warm click p50 (s)", np.nan) / baseline
    return rows


def time_prepared_entry(image, mask, model: str, reference: str, folder: Path) -> dict:
    """Entering the module: the worker started and the model loaded in the background; then the first click."""
    from SimilarPatientsLib.scene.worker import WorkerClient

    client = WorkerClient()
    try:
        started = time.perf_counter()
        client.request("prepare", model=model, reference=reference, metric="cosine")
        entry = time.perf_counter() - started
        started = time.perf_counter()
        result = click(client, image, mask, model, reference, folder)
        first = time.perf_counter() - started
        return {"entry_s": entry, "first_click_s": first, "hits": [h["PatientID"] for h in result["hits"]]}
    finally:
        client.stop()


def time_child_per_click(image, mask, model: str, reference: str, folder: Path, clicks: int) -> dict:
    import json
    import subprocess

    times, hits = [], None
    for _ in range(clicks):
        started = time.perf_counter()
        ct, tumor = write_inputs(image, mask, folder)
        command = [sys.executable, "-m", "SimilarPatientsLib", "query", "--image", str(ct), "--mask", str(tumor)]
        command += ["--model", model, "--reference", reference, "-k", "5", "--json"]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - started)
        hits = [h["PatientID"] for h in json.loads(done.stdout)]
    return {"per_click_p50_s": float(np.median(times)), "hits": hits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["CTFM", "TumorDescriptor"])
    parser.add_argument("--warm", type=int, default=10, help="warm clicks after the first (default 10)")
    parser.add_argument("--children", type=int, default=3, help="clicks of the per-click child (default 3)")
    parser.add_argument("--fusion", action="store_true", help="time fused clicks over 1 to 6 models instead")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        image, mask = prepare(work / "home", FUSION_ORDER if args.fusion else ("CTFM",))
        if args.fusion:
            load = os.getloadavg()[0]
            rows = time_fusion(image, mask, work, min(args.warm, 5))
            print(f"machine: {os.cpu_count()} CPUs, load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at")
            print("the end; 512 x 512 x 160 CT, one tumor, k = 5, NLST-Sybil reference")
            print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
            return
        for model in args.models:
            reference = "nlst-sybil" if model != "TumorDescriptor" else "tumors"
            prepared = time_prepared_entry(image, mask, model, reference, work)
            worker = time_worker(image, mask, model, reference, work, args.warm)
            child = time_child_per_click(image, mask, model, reference, work, args.children)
            assert worker["hits"] == child["hits"] == prepared["hits"], (worker["hits"], child["hits"])  # one answer
            stages = worker["last"]["seconds"]
            rows.append(
                {
                    "model": model,
                    "entry: worker + model (s)": prepared["entry_s"],
                    "first click after entry (s)": prepared["first_click_s"],
                    "worker cold (s)": worker["cold_s"],
                    "worker warm, new CT p50 (s)": worker["warm_p50_s"],
                    "worker warm, same CT p50 (s)": worker["same_ct_p50_s"],
                    "child per click p50 (s)": child["per_click_p50_s"],
                    "per click / warm same CT": child["per_click_p50_s"] / worker["same_ct_p50_s"],
                    "same CT: crop (s)": stages["crop"],
                    "same CT: embed (s)": stages["embed"],
                    "same CT: search (s)": stages["search"],
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"machine: {os.cpu_count()} CPUs; 512 x 512 x 160 CT, one tumor, k = 5; {args.warm} warm clicks")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
