"""Turn (CT, tumor) into an embedding comparable with a reference: crop as the model's recipe says, then
encode with the model's encoder (a network with verified weights, or the weight-free descriptor)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SimilarPatientsError
from ..imaging.crop import Crop, crop
from ..imaging.tumor import Tumor
from ..progress import ProgressCallback
from ..util.optional import require
from . import registry
from . import weights as _weights
from .encoders import Encoder, check_precision


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
        check_precision(precision)
        self.spec = registry.get(model)
        require("embed", self.spec.encoder.needs)
        self.recipe = self.spec.with_recipe(recipe)
        path = _weights.resolve(self.spec.name, self.spec.weights, weights, accept_licence, progress)
        self.encoder: Encoder = self.spec.encoder(
            self.spec, path, device=device, precision=precision, batch_size=max(int(batch_size), 1), progress=progress
        )

    @property
    def device(self) -> str:
        return self.encoder.device

    @property
    def load_seconds(self) -> float:
        return self.encoder.load_seconds

    def optimise(self) -> bool:
        """Make the encoder faster for this recipe's crops, one at a time (see :meth:`NetworkEncoder.optimise`):
        worth it in a process that embeds many tumors; True when it did."""
        return self.encoder.optimise((1, 1, *self.recipe.size))

    def crops(self, image, tumors: Tumor | Sequence[Tumor]) -> list[Crop]:
        """The recipe's crops of ``tumors`` (one or several) in ``image`` (a validated CT, see ``ct_image``)."""
        tumors = [tumors] if isinstance(tumors, Tumor) else list(tumors)
        if not tumors:
            raise SimilarPatientsError("No tumor to embed.")
        return [crop(image, t.seed, self.recipe, t.mask, t.box) for t in tumors]

    def embed(self, image, tumors: Tumor | Sequence[Tumor]) -> list[Embedding]:
        """Embeddings of ``tumors`` (one or several) in ``image``."""
        return self.embed_prepared(self.crops(image, tumors))

    def embed_prepared(self, crops: Sequence[Crop]) -> list[Embedding]:
        """Embeddings of crops made by :meth:`crops`, each with its seed."""
        vectors = self.embed_crops(crops)
        return [Embedding(v, self.spec.name, self.recipe.name, c.seed) for v, c in zip(vectors, crops)]

    def embed_crops(self, crops: Sequence[Crop]) -> np.ndarray:
        """The ``(n, dimension)`` float32 embeddings of prepared crops. A NaN, infinite or all-zero vector
        is no embedding: it is refused, naming the tumors it came from (a reference build then dead-letters
        those lesions alone)."""
        vectors = self.encoder.encode(crops)
        if vectors.shape[1] != self.spec.dimension:
            raise SimilarPatientsError(
                f"{self.spec.name} gave {vectors.shape[1]} values per crop, not {self.spec.dimension}: the crop size "
                f"does not fit the model's recipe."
            )
        for broken, what in (
            (~np.isfinite(vectors).all(axis=1), "NaN or infinite values"),
            (~(vectors != 0).any(axis=1), "only zeros"),
        ):
            if broken.any():
                seeds = "; ".join(", ".join(f"{v:.1f}" for v in crops[i].seed) for i in np.flatnonzero(broken))
                raise SimilarPatientsError(
                    f"{self.spec.name} gave {what} for the tumor(s) at LPS ({seeds}) mm: that is no embedding, and "
                    f"nothing was kept. The image there holds values the model cannot take, or its weights are "
                    f"damaged; check both."
                )
        return vectors
