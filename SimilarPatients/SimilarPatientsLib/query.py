"""Query a reference with an image: embed the tumor as the reference's model and recipe did, then search.

A reference model's embeddings are comparable with a query only if both were made with the same recipe
and have the same length; anything else is refused before any work is done.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .embedder import Embedder, Embedding
from .errors import SimilarPatientsError
from .reference import Reference
from .tumor import Tumor


def check_compatible(reference: Reference, model: str, recipe: str, dimension: int) -> None:
    """Refuse a model/recipe the reference was not built with, naming the recipes it has."""
    have = ", ".join(f"{m} ({reference.model_info(m)['recipe']})" for m in reference.models)
    if model not in reference.models:
        raise SimilarPatientsError(f"Reference '{reference.name}' has no model '{model}'; it has: {have}.")
    info = reference.model_info(model)
    if info["recipe"] != recipe:
        raise SimilarPatientsError(
            f"Reference '{reference.name}' holds {model} embeddings made with recipe '{info['recipe']}', but the "
            f"query would be made with '{recipe}': they are not comparable. Its models and recipes: {have}."
        )
    if int(info["dim"]) != dimension:
        raise SimilarPatientsError(
            f"Reference '{reference.name}' holds {info['dim']}-long {model} embeddings; the model makes {dimension}."
        )


def search_image(
    reference: Reference,
    embedder: Embedder,
    image,
    tumors: Tumor | Sequence[Tumor],
    k: int = 5,
    metric: str = "cosine",
    where=None,
    method: str = "auto",
) -> tuple[list[Embedding], pd.DataFrame]:
    """The embeddings of the query patient's tumor(s) and its ``k`` nearest reference patients (the
    ``neighbors`` hit table; with several tumors, patients are ranked as in a search by patient)."""
    check_compatible(reference, embedder.spec.name, embedder.recipe.name, embedder.spec.dimension)
    embeddings = embedder.embed(image, tumors)
    vectors = np.stack([e.vector for e in embeddings])
    hits = reference.search(embedder.spec.name, embeddings=vectors, k=k, metric=metric, where=where, method=method)
    return embeddings, hits
