"""The corrected (hub-free) space of a pushed table (see :mod:`..search.correction`): what a push adds to the
table, and how a search states a query in it.

Local scaling divides a patient's z-scored cosine distance ``d = 1 − t̂·v̂`` by ``sqrt(r_q · r_p)``. A push
stores, per lesion row, one more vector column, ``v̂`` (the unit z-scored vector) augmented with one value::

    a = [v̂ / sqrt(r_p), −1 / sqrt(r_p)]

and its patient's radius ``r_p``. With the query stated as ``b = [t̂, 1]``, ``−a·b = d / sqrt(r_p)``: a
``VECTOR_SEARCH`` with ``DOT_PRODUCT`` (whose distance is the negative inner product) ranks lesions by the
corrected distance itself, brute force or through a vector index on ``a``. The exact scan reads the same
column: ``cos(a, b) = (t̂·v̂ − 1) / 2`` whatever the radius, so ``d = 2·COSINE_DISTANCE(a, b) − 2``, which it
divides by ``sqrt(r_p · r_q)``. ``r_q`` is a reference patient's stored radius, or a new query's distance to
its ``NEIGHBOURS``-th nearest patient in the z-scored space, measured by the statement over the whole model.

The mean and standard deviation that z-score a query embedding (one value per dimension, too long for the
table's description) are kept in a small table beside it, named after their digest, which the description
records: a search checks what it reads against it.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..errors import SimilarPatientsError
from ..search.correction import NEIGHBOURS, local_scaling_queries, local_scaling_rows
from ..search.distances import unit_rows
from ..search.nearest import EmbeddingSpace
from .tables import TableName

#: The augmented vector column and the radius column a push adds.
COLUMN = "corrected_embedding"
RADIUS = "corrected_radius"
#: The metric whose corrected space a table carries (the vector index's and the default search's).
METRIC = "cosine"
#: Columns of the statistics table.
STATISTICS_COLUMNS = ("model", "centre", "scale")


def augmented(space: EmbeddingSpace, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The augmented vectors ``[v̂/√r, −1/√r]`` (float64) of ``rows`` of a corrected ``space``, and their radii."""
    unit = unit_rows(space.correction.transformed(np.asarray(space.vectors[rows])))
    radii = np.asarray(space.row_radii[rows], dtype=np.float64)
    return local_scaling_rows(unit, radii, METRIC), radii


def query_vectors(unit: np.ndarray) -> np.ndarray:
    """The query side ``[t̂, 1]`` of unit z-scored query rows."""
    return local_scaling_queries(unit, METRIC)


def unit_queries(centre: np.ndarray, scale: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Query embeddings z-scored with the table's statistics and made unit length (a query at the reference
    mean has no direction: refused, as its cosine distance to anything is undefined)."""
    z = (np.asarray(queries, dtype=np.float64) - centre) / scale
    if not z.any(axis=1).all():
        raise SimilarPatientsError(
            "A query embedding equals the reference mean: it has no direction in the corrected space. Search with "
            "space='raw' (CLI: --space raw)."
        )
    return unit_rows(z)


def unit_from_augmented(rows: np.ndarray) -> np.ndarray:
    """A reference patient's unit z-scored vectors from its stored augmented ones (the last value is −1/√r)."""
    rows = np.asarray(rows, dtype=np.float64)
    return rows[:, :-1] / -rows[:, -1:]


def digest(centre: np.ndarray, scale: np.ndarray) -> str:
    """The SHA-256 of a model's statistics as float64 little-endian bytes (what the description records)."""
    data = np.asarray(centre, dtype="<f8").tobytes() + np.asarray(scale, dtype="<f8").tobytes()
    return hashlib.sha256(data).hexdigest()


def statistics_table(table: TableName, digests: dict) -> TableName:
    """The statistics table of ``table`` for these models' digests: named by them, so a re-push with other
    statistics writes another table and a reader of the old description still finds its own."""
    joined = hashlib.sha256("".join(digests[m] for m in sorted(digests)).encode()).hexdigest()[:16]
    return table.beside(f"{table.table}__space_{joined}")


def space_of(manifest: dict, model: str) -> dict | None:
    """What a table's description says of ``model``'s corrected space, or None (a table pushed before)."""
    return (manifest.get("corrected") or {}).get("models", {}).get(model)


def description(table: TableName, models: dict) -> dict:
    """The description's ``corrected`` entry: the statistics table, and per model its digest, columns,
    metric and neighbours, and the reference's own records of the statistics it was made from."""
    digests = {m: info["digest"] for m, info in models.items()}
    return {
        "table": statistics_table(table, digests).table,
        "metric": METRIC,
        "neighbours": NEIGHBOURS,
        "column": COLUMN,
        "radius": RADIUS,
        "models": models,
    }
