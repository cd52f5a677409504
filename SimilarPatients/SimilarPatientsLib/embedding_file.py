"""Write an embedding to a file: JSON for people and scripts, or one reference row (Parquet/CSV) that
``references import`` accepts, so that embedded tumors can be gathered into a reference."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import schema
from .atomic import replacing
from .embedder import Embedding
from .errors import SimilarPatientsError


def as_record(embedding: Embedding) -> dict:
    return {
        "model": embedding.model,
        "recipe": embedding.recipe,
        "seed_lps": list(embedding.seed),
        "embedding": [float(v) for v in embedding.vector],
    }


def as_reference_row(embedding: Embedding, patient: str) -> pd.DataFrame:
    row = {
        schema.MODEL: embedding.model,
        schema.RECIPE: embedding.recipe,
        schema.PATIENT: str(patient),
        **dict(zip(schema.CENTER, embedding.seed)),
        schema.EMBEDDING: [[float(v) for v in embedding.vector]],
    }
    return pd.DataFrame({k: v if isinstance(v, list) else [v] for k, v in row.items()})


def write(embedding: Embedding, path: Path, patient: str = "query") -> Path:
    """Write atomically; the format follows the suffix (.json, .parquet, .csv)."""
    import json

    suffix = path.suffix.lower()
    if suffix not in (".json", ".parquet", ".csv"):
        raise SimilarPatientsError(f"Write embeddings to .json, .parquet or .csv, not '{path.name}'.")
    with replacing(path) as temporary:
        if suffix == ".json":
            temporary.write_text(json.dumps(as_record(embedding)))
        elif suffix == ".parquet":
            as_reference_row(embedding, patient).to_parquet(temporary, index=False)
        else:
            frame = as_reference_row(embedding, patient)
            frame[schema.EMBEDDING] = frame[schema.EMBEDDING].map(lambda v: " ".join(f"{x:.9g}" for x in v))
            frame.to_csv(temporary, index=False)
    return path
