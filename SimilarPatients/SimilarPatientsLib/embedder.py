"""Turn (CT, tumor) into an embedding comparable with a reference: crop as the model's recipe says, run
the network (batched, on CUDA when present, falling back to CPU when the GPU runs out of memory)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checkpoints, descriptor, models, weights
from .crop import Crop, crop
from .errors import SimilarPatientsError
from .progress import ProgressCallback, report
from .tumor import Tumor


@dataclass
class Embedding:
    """One tumor's embedding and where it came from (the model and recipe name the space it lives in)."""

    vector: np.ndarray
    model: str
    recipe: str
    seed: tuple[float, float, float]


class Embedder:
    """One model, loaded once, that embeds tumors.

    Args:
        model: a registry name (``similar-patients models list``).
        recipe: the recipe to run (default: the one the model's NLST-Sybil embeddings were made with).
        weights: a weights file or folder to use instead of the cache or a download.
        accept_licence: accept a non-commercial weight licence for this download.
        device: ``"cuda"``, ``"cpu"`` or None for CUDA when present.
        batch_size: crops per forward pass.
        precision: ``"fp32"``, or ``"bf16"`` (autocast; for throughput on GPUs, embeddings then differ
            from fp32 ones by about 1e-2 relative).
    """

    def __init__(
        self,
        model: str,
        recipe: str | None = None,
        weights: Path | str | None = None,
        accept_licence: bool = False,
        device: str | None = None,
        batch_size: int = 8,
        precision: str = "fp32",
        progress: ProgressCallback | None = None,
    ):
        if precision not in ("fp32", "bf16"):
            raise SimilarPatientsError(f"Precision '{precision}' is not one of fp32, bf16.")
        self.precision = precision
        self.spec = models.get(model)
        self.recipe = self.spec.with_recipe(recipe)
        self.batch_size = max(int(batch_size), 1)
        self.network = None
        self.device = "cpu"
        self.load_seconds = 0.0
        if self.spec.build is not None:
            self._load(weights, accept_licence, device, progress)

    def _load(self, given, accept_licence: bool, device: str | None, progress: ProgressCallback | None) -> None:
        import torch

        path = weights.resolve(self.spec.name, self.spec.weights, given, accept_licence, progress)
        start = time.perf_counter()
        report(progress, 0, 1, f"loading {self.spec.name}")
        network = _skeleton(self.spec.build)
        state = checkpoints.encoder_state(checkpoints.read_tensors(path), self.spec.checkpoint)
        checkpoints.load_strict(network, state, str(path))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.network = network.eval().to(self.device)
        self.load_seconds = time.perf_counter() - start

    def embed(self, image, tumors: Tumor | Sequence[Tumor]) -> list[Embedding]:
        """Embeddings of ``tumors`` (one or several) in ``image`` (a validated CT, see ``ct_image``)."""
        tumors = [tumors] if isinstance(tumors, Tumor) else list(tumors)
        if not tumors:
            raise SimilarPatientsError("No tumor to embed.")
        crops = [crop(image, t.seed, self.recipe, t.mask, t.box) for t in tumors]
        vectors = self.embed_crops(crops)
        return [Embedding(v, self.spec.name, self.recipe.name, t.seed) for v, t in zip(vectors, tumors)]

    def embed_crops(self, crops: Sequence[Crop]) -> np.ndarray:
        """The ``(n, dimension)`` float32 embeddings of prepared crops."""
        if self.network is None:
            return np.stack(
                [
                    descriptor.describe(
                        c.image, None if c.mask_is_box else c.mask, c.mask if c.mask_is_box else None, c.seed_index
                    )
                    for c in crops
                ]
            )
        batch = np.stack([c.image for c in crops])[:, None]
        return np.concatenate(
            [self.forward(batch[i : i + self.batch_size]) for i in range(0, len(batch), self.batch_size)]
        )

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Run the network on a ``(B, 1, X, Y, Z)`` batch; on CUDA out-of-memory, move to CPU and retry."""
        import torch

        reduced = (
            torch.autocast(torch.device(self.device).type, torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        try:
            with torch.inference_mode(), reduced:
                output = self.network(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            self.network = self.network.to("cpu")
            self.device = "cpu"
            return self.forward(batch)
        vectors = output.float().cpu().numpy()
        if vectors.shape[1] != self.spec.dimension:
            raise SimilarPatientsError(
                f"{self.spec.name} gave {vectors.shape[1]} values per crop, not {self.spec.dimension}: the crop size "
                f"does not fit the model's recipe."
            )
        return vectors


def _skeleton(build):
    """The network without initialised weights (on the meta device: no time spent drawing random weights
    that the checkpoint replaces), or built normally where the constructor computes with its tensors."""
    import torch

    try:
        with torch.device("meta"):
            return build()
    except (RuntimeError, NotImplementedError):
        return build()
