"""Encoders: what turns prepared crops into embedding vectors, one kind per way a model computes.

Every registry entry names its encoder class; the :class:`~.embedder.Embedder` opens it once and calls
:meth:`encode` with crops, whatever the model. :class:`NetworkEncoder` runs a torch network with verified
weights (batched, on CUDA when present, on the CPU when the GPU runs out of memory); the weight-free
:class:`~.descriptor.DescriptorEncoder` measures the crop and its mask.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from ..errors import SimilarPatientsError
from ..imaging.crop import Crop
from ..progress import ProgressCallback, report
from ..util.optional import IMAGING, NETWORKS, optional_import
from . import checkpoints
from .checkpoints import CheckpointFormat

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "bf16")


class Encoder(Protocol):
    """Crops in, ``(n, dimension)`` float32 embeddings out."""

    device: str
    load_seconds: float
    needs: Sequence[str]  #: the packages it runs with (checked before it is built)

    def encode(self, crops: Sequence[Crop]) -> np.ndarray: ...

    def optimise(self, shape: tuple) -> bool:
        """Make later calls on inputs of ``shape`` faster where the encoder can; True when it did."""


class NetworkSpec(Protocol):
    """What a network encoder reads of a model's registry entry (:class:`~.registry.ModelSpec` is one): its
    name, how to build the network, and how its checkpoint holds it. Declared here, so that the registry
    imports its encoders and nothing here imports the registry."""

    name: str
    build: Callable | None
    checkpoint: CheckpointFormat | None


class NetworkEncoder:
    """A model's network with its weights loaded strictly, in inference mode on one device.

    Args:
        spec: the registry entry (its ``build`` makes the network, its ``checkpoint`` reads the file).
        weights: the verified weights file.
        device: ``"cuda"``, ``"cpu"`` or None for CUDA when present.
        precision: ``"fp32"``, or ``"bf16"`` (autocast; for throughput on GPUs, embeddings then differ
            from fp32 ones by about 1e-2 relative).
        batch_size: crops per forward pass.
    """

    needs = (*IMAGING, *NETWORKS)  #: the packages it runs with

    def __init__(
        self,
        spec: NetworkSpec,
        weights: Path,
        device: str | None = None,
        precision: str = "fp32",
        batch_size: int = 8,
        progress: ProgressCallback | None = None,
    ):
        torch = optional_import("torch", "embed")
        start = time.perf_counter()
        report(progress, 0, 1, f"loading {spec.name}")
        network = _skeleton(spec.build)
        state = checkpoints.encoder_state(checkpoints.read_tensors(weights), spec.checkpoint)
        checkpoints.load_strict(network, state, str(weights))
        if device == "cuda" and not torch.cuda.is_available():
            raise SimilarPatientsError(cuda_missing(torch))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.required = device == "cuda"  #: asked for CUDA: never moved to the CPU silently
        self.network = network.eval().to(self.device)
        self.precision = precision
        self.batch_size = batch_size
        self._frozen = None  # the network traced and frozen for one input shape (see optimise)
        self._frozen_shape = None
        self.load_seconds = time.perf_counter() - start
        log.info("%s loaded from %s on %s in %.2f s", spec.name, weights, self.device, self.load_seconds)

    def encode(self, crops: Sequence[Crop]) -> np.ndarray:
        batch = np.stack([c.image for c in crops])[:, None]
        return np.concatenate(
            [self.forward(batch[i : i + self.batch_size]) for i in range(0, len(batch), self.batch_size)]
        )

    def optimise(self, shape: tuple) -> bool:
        """Trace and freeze the network for inputs of ``shape`` on the CPU, so that oneDNN runs its fused
        kernels (CT-FM on 2 cores: 0.23 s a crop instead of 0.36 s): kept only where the frozen network gives
        the eager one's values on a test input, and used only for inputs of that shape. On CUDA, or in bf16,
        nothing changes. It costs a trace and three forward passes: for a process that embeds many tumors
        (the Slicer module's worker), not for one query."""
        torch = optional_import("torch", "embed")
        if self.device != "cpu" or self.precision != "fp32":
            return False
        probe = torch.from_numpy(np.random.default_rng(0).random(shape, dtype=np.float32))
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # a trace that had to take a value for a constant could be right on the probe, wrong on a tumor
                warnings.simplefilter("error", torch.jit.TracerWarning)
                frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(self.network, probe)))
                frozen(probe)  # the first call prepares the fused kernels; the second, compared, runs them
                expected, got = self.network(probe), frozen(probe)
        except Exception as error:  # a network a trace cannot follow (control flow on values): stays eager
            log.info("%s stays eager: %s: %s", type(self.network).__name__, type(error).__name__, error)
            return False
        scale = float(expected.abs().max()) or 1.0
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * scale):
            log.warning("%s stays eager: its frozen form differs from it", type(self.network).__name__)
            return False
        self._frozen, self._frozen_shape = frozen, tuple(shape)
        return True

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Run the network on a ``(B, 1, X, Y, Z)`` batch; on CUDA out-of-memory, move to CPU and retry."""
        torch = optional_import("torch", "embed")
        frozen = self._frozen is not None and tuple(batch.shape) == self._frozen_shape
        reduced = (
            torch.autocast(torch.device(self.device).type, torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        try:
            with torch.inference_mode(), reduced:
                network = self._frozen if frozen else self.network
                output = network(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device))
        except torch.cuda.OutOfMemoryError:
            if self.required:
                raise SimilarPatientsError(
                    f"Out of GPU memory on a batch of {len(batch)} crops with --device cuda: lower --batch-size "
                    f"(or leave --device out to let the CPU take over)."
                ) from None
            log.warning("out of GPU memory on a batch of %d: moving the network to the CPU", len(batch))
            torch.cuda.empty_cache()
            self.network = self.network.to("cpu")
            self.device = "cpu"
            self._frozen = None
            return self.forward(batch)
        return output.float().cpu().numpy()


def cuda_missing(torch) -> str:
    """Why ``--device cuda`` cannot run here, and what fixes it (a GPU worker without a usable driver)."""
    built = torch.version.cuda or "none (a CPU build of torch)"
    return (
        f"--device cuda, but this machine has no usable CUDA (torch {torch.__version__}, built for CUDA {built}; "
        f"torch.cuda.is_available() is False). Install a CUDA build of torch and an NVIDIA driver that runs it (on "
        f"Dataflow: --dataflow_service_options 'worker_accelerator=type:nvidia-tesla-t4;count:1;"
        f"install-nvidia-driver:5xx'), or build with --device cpu."
    )


def _skeleton(build):
    """The network without initialised weights (on the meta device: no time spent drawing random weights
    that the checkpoint replaces), or built normally where the constructor computes with its tensors."""
    torch = optional_import("torch", "embed")
    optional_import("monai", "embed")
    try:
        with torch.device("meta"):
            return build()
    except (RuntimeError, NotImplementedError):
        return build()


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise SimilarPatientsError(f"Precision '{precision}' is not one of {', '.join(PRECISIONS)}.")
