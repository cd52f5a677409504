"""Write an embedding to a file: JSON for people and scripts, or one reference row (Parquet/CSV) that
``references import`` accepts, so that embedded tumors can be gathered into a reference."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..errors import SimilarPatientsError
from ..references import schema
from ..util.atomic import replacing
from .embedder import Embedding


def as_record(embedding: Embedding) -> dict:
    return {
        "model": embedding.model,
        "recipe": embedding.recipe,
        "seed_lps": list(embedding.seed),
        "embedding": [float(v) for v in embedding.vector],
    }


def as_reference_rows(embeddings: Sequence[Embedding], patient: str) -> pd.DataFrame:
    """One reference row per tumor of one patient (lesion ids 1, 2, ...; the seed as the lesion centre)."""
    rows = [
        {
            schema.MODEL: e.model,
            schema.RECIPE: e.recipe,
            schema.PATIENT: str(patient),
            schema.LESION: str(i + 1),
            **dict(zip(schema.CENTER, e.seed)),
            schema.EMBEDDING: [float(v) for v in e.vector],
        }
        for i, e in enumerate(embeddings)
    ]
    return pd.DataFrame(rows)


def write(embeddings: Embedding | Sequence[Embedding], path: Path, patient: str = "query") -> Path:
    """Write one patient's tumor embeddings atomically; the format follows the suffix (.json, .parquet,
    .csv)."""
    import json

    suffix = path.suffix.lower()
    if suffix not in (".json", ".parquet", ".csv"):
        raise SimilarPatientsError(f"Write embeddings to .json, .parquet or .csv, not '{path.name}'.")
    embeddings = [embeddings] if isinstance(embeddings, Embedding) else list(embeddings)
    with replacing(path) as temporary:
        if suffix == ".json":
            records = [as_record(e) for e in embeddings]
            temporary.write_text(json.dumps(records[0] if len(records) == 1 else records), encoding="utf-8")
        elif suffix == ".parquet":
            as_reference_rows(embeddings, patient).to_parquet(temporary, index=False)
        else:
            frame = as_reference_rows(embeddings, patient)
            frame[schema.EMBEDDING] = frame[schema.EMBEDDING].map(lambda v: " ".join(f"{x:.9g}" for x in v))
            frame.to_csv(temporary, index=False)
    return path
