"""An :class:`~.embedding_map.EmbeddingMap` as a static figure for papers: one panel per
model, points coloured by the map's label field (matplotlib, written atomically; PNG, PDF or SVG by the
file's suffix)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..errors import SimilarPatientsError
from ..util import atomic
from ..util.optional import pyplot
from .embedding_map import EmbeddingMap, is_continuous
from .page import PALETTE

FORMATS = ("png", "pdf", "svg")


def check_format(out: Path) -> str:
    """The figure format named by ``out``'s suffix, or a clear error."""
    suffix = Path(out).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise SimilarPatientsError(
            f"Cannot write a figure as '{Path(out).name}': name it .png, .pdf or .svg (the suffix picks the format)."
        )
    return suffix


def write(embedding_map: EmbeddingMap, out: Path, dpi: int = 200) -> Path:
    plt = pyplot()

    out = Path(out)
    suffix = check_format(out)
    layers = embedding_map.layers
    columns = min(3, len(layers))
    rows = math.ceil(len(layers) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4 * columns, 4 * rows + 0.6), squeeze=False, layout="constrained"
    )
    field = embedding_map.color_by
    values = embedding_map.points[field] if field else pd.Series([None] * len(embedding_map.points))
    numeric = is_continuous(field or "", values, len(PALETTE) - 1)
    categories = values.astype("string").fillna("unknown").value_counts().index.tolist()
    shown = categories[: len(PALETTE) - 1]
    for axis, layer in zip(axes.flat, layers):
        layer_values = values.iloc[layer.rows].reset_index(drop=True)
        if numeric:
            scatter = axis.scatter(*layer.xy.T, c=layer_values.astype(float), cmap="viridis", s=6, linewidths=0)
        else:
            text = layer_values.astype("string").fillna("unknown")
            text = text.where(text.isin(shown), "other")
            colours = {c: ("#CCCCCC" if c == "unknown" else PALETTE[i]) for i, c in enumerate(shown)}
            colours["other"] = PALETTE[-1]
            axis.scatter(*layer.xy.T, c=[colours[t] for t in text], s=6, linewidths=0)
        axis.set_title(layer.model, fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    for axis in list(axes.flat)[len(layers) :]:
        axis.axis("off")
    if numeric:
        figure.colorbar(scatter, ax=axes.ravel().tolist(), shrink=0.6, label=field)
    elif field:
        handles = [
            plt.Line2D([], [], marker="o", linestyle="", color="#CCCCCC" if c == "unknown" else PALETTE[i], label=c)
            for i, c in enumerate(shown)
        ]
        if len(categories) > len(shown):
            handles.append(plt.Line2D([], [], marker="o", linestyle="", color=PALETTE[-1], label="other"))
        figure.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)), fontsize=7, frameon=False)
    figure.suptitle(
        f"{embedding_map.reference}: {embedding_map.method.upper()} of lesion embeddings ({embedding_map.space} space)"
        + (f", coloured by {field}" if field else ""),
        fontsize=11,
    )
    try:
        with atomic.replacing(out) as temporary:
            figure.savefig(temporary, dpi=dpi, format=suffix)
    finally:
        plt.close(figure)
    return out
