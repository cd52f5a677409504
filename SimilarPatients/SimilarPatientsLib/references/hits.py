"""Search matches to the hit table a user reads: one row per patient with its IDC and label fields."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..idc.viewer import viewer_url
from ..search.nearest import LesionMatch
from ..util.columns import text_array
from . import schema

log = logging.getLogger(__name__)

_LESION_COLUMNS = (
    schema.SERIES,
    schema.STUDY,
    schema.COLLECTION,
    "Modality",
    "SeriesDescription",
    "series_size_MB",
    "instanceCount",
    *schema.CENTER,
)
#: Leading columns of every hit table (the JSON output has these keys too); label fields follow.
HIT_COLUMNS = (
    "rank",
    schema.PATIENT,
    "distance",
    schema.MODEL,
    "metric",
    "space",
    schema.LESION,
    "query_lesion",
    "lesions",
    *_LESION_COLUMNS,
    "viewer_url",
    "search",
    "index_recall",
)


def hit_table(
    matches: Sequence[LesionMatch],
    rows: Mapping[str, Sequence],
    lesion_counts: Mapping[str, int],
    metric: str,
    query_lesions: Sequence[str] | None = None,
    label_fields: Sequence[str] = (),
    index_recall: float | None = None,
    space: str = "raw",
) -> pd.DataFrame:
    """Rank, distance, the matched lesion's metadata and labels (``rows``: column → the matched lesions'
    values, in match order), and the IDC viewer URL per hit; and on every row how the hits were found:
    ``search`` "exact", or "approximate" with the index's measured ``index_recall`` (given for approximate
    searches only); and the ``space`` the distances were measured in. A label never replaces a computed
    column (imports refuse such names, see
    ``schema.RESERVED``; a reference stored before that keeps the computed value and loses the label here)."""
    missing = np.full(len(matches), None, dtype=object)
    columns = {
        "rank": np.arange(1, len(matches) + 1),
        schema.PATIENT: text_array([m.patient for m in matches]),
        "distance": np.array([m.distance for m in matches], dtype=np.float64),
        schema.MODEL: rows.get(schema.MODEL, missing),
        "metric": text_array([metric] * len(matches)),
        "space": text_array([space] * len(matches)),
        schema.LESION: rows.get(schema.LESION, missing),
        "query_lesion": text_array([query_lesions[m.query_row] for m in matches]) if query_lesions else missing,
        "lesions": np.array([lesion_counts[m.patient] for m in matches], dtype=np.int64),
    }
    for column in _LESION_COLUMNS:
        columns[column] = rows.get(column, missing)
    urls = [viewer_url(s, r) for s, r in zip(_values(columns[schema.STUDY]), _values(columns[schema.SERIES]))]
    columns["viewer_url"] = text_array(urls)
    columns["search"] = text_array(["exact" if index_recall is None else "approximate"] * len(matches))
    columns["index_recall"] = np.full(len(matches), np.nan if index_recall is None else index_recall)
    for name in label_fields:
        if name in columns:
            log.warning("the label '%s' has the name of a computed hit column; the computed value is shown", name)
            continue
        columns[name] = rows.get(name, missing)
    return pd.DataFrame(columns)


def _values(column) -> list:
    """Python values of an array, missing as None (what ``viewer_url`` checks)."""
    return [None if v is None or v != v else v for v in column.tolist()]
