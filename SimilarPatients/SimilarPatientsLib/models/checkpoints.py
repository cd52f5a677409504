"""Read upstream checkpoint files and load them strictly into our encoders.

Each upstream publishes its weights in its own layout: a nested dict (``trunk_state_dict``, ``net``,
``state_dict``), key prefixes from the training wrapper (``module.``, ``encoder.``), and the parts of the
network we do not run (decoders, heads). A :class:`CheckpointFormat` names those; what remains must match
the encoder's keys and shapes exactly, or the load fails with the keys that differ.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SimilarPatientsError
from ..util.optional import optional_import

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch colours parts of its messages for terminals


@dataclass(frozen=True)
class CheckpointFormat:
    """How one upstream file holds the encoder.

    Args:
        containers: nested dict keys to descend into, tried in order (the file itself if none is there).
        prefixes: key prefixes before the encoder's own names, tried in order; the first that some key
            has is used, and keys without it belong to other parts of the upstream network.
        ignore: encoder-relative name prefixes of parts we do not run (e.g. a U-Net's decoder).
    """

    containers: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ("",)
    ignore: tuple[str, ...] = ()


def read_tensors(path: Path) -> dict:
    """The tensors of a ``.safetensors`` or a torch checkpoint (read with ``weights_only``: no code runs)."""
    torch = optional_import("torch", "embed")

    path = Path(path)
    if path.stat().st_size == 0:
        raise SimilarPatientsError(
            f"The weights file {path} is empty (0 bytes): a download or copy that failed. Delete it and fetch it again."
        )
    try:
        if path.suffix == ".safetensors":
            return optional_import("safetensors.torch", "embed").load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch/safetensors raise many types for a truncated or foreign file
        text = _ANSI.sub("", str(error))
        if "WeightsUnpickler error:" in text:  # torch's advice (weights_only=False) would run the file's code
            text = text.split("WeightsUnpickler error:", 1)[1]
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            if found:
                raise SimilarPatientsError(
                    f"Cannot read the weights {path}: besides tensors it holds Python objects ({found.group(1)}), "
                    f"and loading those could run code, so only tensors are read. Use the publisher's weights "
                    f"file, or save the network's state dict (tensors only) on a machine you trust."
                ) from error
        raise SimilarPatientsError(
            f"Cannot read the weights {path}: {_first_sentence(text) or type(error).__name__}. The file is corrupt, "
            f"partial or not a checkpoint; delete it and fetch it again."
        ) from error


def _first_sentence(text: str, limit: int = 200) -> str:
    """The first line of an error message up to its first full stop (a whole sentence, never cut inside one
    unless it runs past ``limit`` characters), without its final full stop."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    end = re.search(r"[.!?](\s|$)", line)
    sentence = line[: end.start()] if end else line
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0] + " …"
    return sentence


def encoder_state(checkpoint: dict, layout: CheckpointFormat) -> dict:
    """The encoder's tensors from an upstream checkpoint, under the encoder's own key names."""
    state = checkpoint
    for name in layout.containers:
        if isinstance(state, dict) and isinstance(state.get(name), dict):
            state = state[name]
            break
    if not isinstance(state, dict):
        raise SimilarPatientsError("The weights file holds no state dict.")
    prefix = next((p for p in layout.prefixes if any(str(k).startswith(p) for k in state)), None)
    if prefix is None:
        raise SimilarPatientsError(
            f"No weight in the file has a key under {' or '.join(repr(p) for p in layout.prefixes)}; it is not "
            f"this model's checkpoint (first keys: {list(state)[:5]})."
        )
    selected = {str(k)[len(prefix) :]: v for k, v in state.items() if str(k).startswith(prefix)}
    return {k: v for k, v in selected.items() if not k.startswith(layout.ignore)}


def load_strict(network, state: dict, source: str) -> None:
    """Load ``state`` into ``network`` (which may be a skeleton on the meta device); any missing, unexpected
    or misshapen key is an error listing them."""
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or misshapen:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", misshapen)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        raise SimilarPatientsError(
            f"The weights in {source} do not fit the network: {'; '.join(parts)}. It is another model's "
            f"checkpoint or another version."
        )
    torch = optional_import("torch", "embed")
    check_values(state, {name for name, _ in network.named_parameters()}, source)
    # plain tensors of the network's dtypes (a checkpoint may hold tensor subclasses, e.g. MONAI MetaTensors)
    state = {k: v.as_subclass(torch.Tensor).to(expected[k].dtype) for k, v in state.items()}
    network.load_state_dict(state, strict=True, assign=True)  # the loaded tensors become the weights


def check_values(state: dict, parameters: set, source: str) -> None:
    """Refuse weights that cannot give an embedding: NaN or infinite values anywhere (a damaged file or a
    training run that diverged: every embedding would be NaN), or ``parameters`` that are all zeros (a network
    never trained or wiped: every embedding would be zeros). One summing pass per tensor (about 1.3 GB/s of
    weights per core); an exact look only where a sum is not finite or is zero."""
    torch = optional_import("torch", "embed")
    floating = {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}
    broken, learnt = [], False
    for name, tensor in floating.items():
        total = float(tensor.sum())
        if not math.isfinite(total) and not bool(torch.isfinite(tensor).all()):  # not a float32 sum's overflow
            broken.append(name)
        elif name in parameters and not learnt:
            learnt = total != 0 or bool(tensor.any())
    if broken:
        raise SimilarPatientsError(
            f"The weights in {source} hold NaN or infinite values in {len(broken)} of {len(floating)} tensors "
            f"(first: {broken[0]}): the file is damaged, or its training diverged. Every embedding would be NaN; "
            f"delete it and fetch it again."
        )
    if not learnt and parameters & set(floating):
        raise SimilarPatientsError(
            f"The weights in {source} are all zeros: a network that was never trained, or a wiped file. Every "
            f"embedding would be zeros; use the published weights."
        )
