"""The data of an embedding map: per model, every lesion's 2-D position, its nearest lesions and each
patient's nearest patients, by the real high-dimensional distance (never by the 2-D layout), in the space the
search ranks in: by default the corrected one (the layout of the z-scored vectors, edges and neighbours by
the locally scaled distance), so that the map shows the neighbours ``similar-patients neighbors`` prints.

:mod:`.page` turns it into the interactive HTML page, :mod:`.figure` into a static PNG.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import SimilarPatientsError
from ..idc.viewer import viewer_url
from ..progress import ProgressCallback, report
from ..references import schema
from ..search.correction import CORRECTED, resolved_space
from ..search.distances import pairwise_distances
from ..search.nearest import EmbeddingSpace
from ..util.optional import require
from .projection import project

_BLOCK = 2048  # rows of the distance matrix held at once when finding nearest lesions


@dataclass
class ModelMap:
    """One model's layer of the map; ``rows`` index :attr:`EmbeddingMap.points`."""

    model: str
    rows: np.ndarray  # (n,) point index of each lesion of this model
    xy: np.ndarray  # (n, 2)
    edges: np.ndarray  # (e, 2) pairs of positions in ``rows``: a lesion and one of its nearest lesions
    neighbours: dict = field(default_factory=dict)  # PatientID -> nearest PatientIDs, nearest first


@dataclass
class EmbeddingMap:
    """Points (lesions, with patient, labels and viewer URL) shared by every model's layer."""

    reference: str
    method: str
    metric: str
    space: str
    color_by: str
    label_fields: list
    points: pd.DataFrame  # PatientID, lesion_id, url, label fields
    layers: list  # ModelMap per model


def is_continuous(name: str, values: pd.Series, most_categories: int) -> bool:
    """Whether a label is drawn on a colour scale: a number that measures (age, size) and has more values
    than there are colours. A code (ICD-O ``histology_code``, an id) names categories whatever its values:
    8140 is not "more" than 8070."""
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return False
    if name.lower().endswith(("code", "id")):
        return False
    return values.nunique() > most_categories


def build(
    reference,
    models: list | None = None,
    method: str = "umap",
    metric: str = "cosine",
    color_by: str | None = None,
    graph: int = 0,
    neighbours: int = 5,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    space: str = CORRECTED,
) -> EmbeddingMap:
    """A map of ``models`` (default: all) of an opened reference, in ``space`` (``corrected``, the search's
    default, or ``raw``: the stored vectors and plain distances).

    ``graph`` > 0 adds edges from each lesion to its ``graph`` nearest lesions of other patients;
    ``neighbours`` patients per patient are stored for the page's search box (found with the reference's
    own search, so they are the patients ``similar-patients neighbors`` prints).
    """
    if graph < 0 or neighbours < 1:
        raise SimilarPatientsError(f"--graph must be ≥ 0 and --neighbors ≥ 1 (got {graph} and {neighbours}).")
    require("analysis")
    space = resolved_space(space, metric)
    models = [reference.model_name(m) for m in models or reference.models]
    fields = list(reference.label_fields)
    color_by = color_by or next(iter(reference.display_fields), None)
    if color_by is not None and color_by not in fields:
        raise SimilarPatientsError(
            f"Cannot colour by '{color_by}': reference '{reference.name}' has the label fields "
            f"{', '.join(fields) or '(none)'}."
        )
    points = _points(reference, models, fields)
    key = pd.MultiIndex.from_frame(points[[schema.PATIENT, schema.LESION]])
    layers = []
    for i, model in enumerate(models):
        report(progress, i, len(models), f"projecting ({method})")
        lesions = reference.lesions(model)
        embedding_space = reference.space(model, space=space, metric=metric)
        vectors = mapped_vectors(embedding_space)
        radii = embedding_space.row_radii if embedding_space.scaled else None
        rows = key.get_indexer(pd.MultiIndex.from_frame(lesions[[schema.PATIENT, schema.LESION]]))
        patients = lesions[schema.PATIENT].to_numpy()
        layer = ModelMap(
            model=model,
            rows=rows,
            xy=project(vectors, method, metric, seed),
            edges=_nearest_lesion_edges(vectors, patients, graph, metric, radii) if graph else np.zeros((0, 2), int),
        )
        for patient in np.unique(patients):
            hits = reference.search(model, patient=patient, k=neighbours, metric=metric, exclude=[patient], space=space)
            layer.neighbours[str(patient)] = hits[schema.PATIENT].tolist()
        layers.append(layer)
    report(progress, len(models), len(models), f"projecting ({method})")
    return EmbeddingMap(reference.name, method, metric, space, color_by, fields, points, layers)


def mapped_vectors(embedding_space: EmbeddingSpace) -> np.ndarray:
    """Float64 rows as the space measures them: z-scored in the corrected space, as stored in the raw one."""
    correction = embedding_space.correction
    if correction is None:
        return np.asarray(embedding_space.vectors, dtype=np.float64)
    return correction.transformed(embedding_space.vectors)


def _points(reference, models: list, fields: list) -> pd.DataFrame:
    """One row per (patient, lesion) found in any of ``models``, with labels and viewer URL."""
    columns = [schema.PATIENT, schema.LESION, schema.STUDY, schema.SERIES, *fields]
    frames = [reference.lesions(m).reindex(columns=columns) for m in models]
    points = pd.concat(frames).drop_duplicates([schema.PATIENT, schema.LESION]).reset_index(drop=True)
    points["url"] = [viewer_url(s, r) for s, r in zip(points[schema.STUDY], points[schema.SERIES])]
    return points.drop(columns=[schema.STUDY, schema.SERIES])


def _nearest_lesion_edges(
    vectors: np.ndarray, patients: np.ndarray, k: int, metric: str, radii: np.ndarray | None = None
) -> np.ndarray:
    """(n·k, 2) pairs (lesion, one of its k nearest lesions of another patient), exact, in blocks. With
    ``radii`` (each row's patient's), the locally scaled order: the distance over the square root of the
    other lesion's patient's radius (the lesion's own radius is common to the row, and changes no order)."""
    n = len(vectors)
    k = min(k, n - 1)
    metric = "euclidean" if metric == "euclidean" else "cosine"
    edges = []
    for start in range(0, n, _BLOCK):
        block = slice(start, min(start + _BLOCK, n))
        distances = pairwise_distances(vectors[block], vectors, metric)
        if radii is not None:
            distances /= np.sqrt(radii)[None, :]
        distances[patients[block, None] == patients[None, :]] = np.inf  # other patients only
        nearest = np.argpartition(distances, k - 1, axis=1)[:, :k]
        nearest = np.take_along_axis(nearest, np.argsort(np.take_along_axis(distances, nearest, 1), 1), 1)
        finite = np.isfinite(np.take_along_axis(distances, nearest, axis=1))
        sources = np.repeat(np.arange(block.start, block.stop), k).reshape(-1, k)
        edges.append(np.stack([sources[finite], nearest[finite]], axis=1))
    return np.concatenate(edges) if edges else np.zeros((0, 2), int)
