"""IDC metadata from the index that the ``idc-index-data`` package ships (offline, SQL via DuckDB).

One object, :class:`IDCIndex`, answers series-level questions for lists of UIDs; the viewer URL is built
from the UIDs. Nothing here touches the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlencode

import pandas as pd

from . import schema

VIEWER = "https://viewer.imaging.datacommons.cancer.gov/v3/viewer/"


def viewer_url(study_uid: str | None, series_uid: str | None = None) -> str | None:
    """The IDC (OHIF v3) viewer URL of a study, opened on one series when given."""
    if not study_uid or pd.isna(study_uid):
        return None
    query = {"StudyInstanceUIDs": study_uid}
    if series_uid and not pd.isna(series_uid):
        query["SeriesInstanceUIDs"] = series_uid
    return f"{VIEWER}?{urlencode(query)}"


class IDCIndex:
    """The series index of an IDC release, as shipped by ``idc-index-data``."""

    def __init__(self, parquet_path: str | None = None):
        import idc_index_data

        self.parquet_path = str(parquet_path or idc_index_data.IDC_INDEX_PARQUET_FILEPATH)
        self.version = f"idc-index-data {idc_index_data.__version__}"

    def series(self, series_uids: Sequence[str]) -> pd.DataFrame:
        """One row per known SeriesInstanceUID with its collection, study, modality, description and size."""
        import duckdb

        uids = pd.DataFrame({schema.SERIES: pd.unique(pd.Series(list(series_uids), dtype="string").dropna())})
        columns = ", ".join(f"i.{c}" for c in schema.IDC_FIELDS)
        with duckdb.connect() as connection:
            connection.register("wanted", uids)
            return connection.execute(
                f"SELECT w.{schema.SERIES}, {columns} FROM wanted w "
                f"JOIN read_parquet('{self.parquet_path}') i ON i.{schema.SERIES} = w.{schema.SERIES}"
            ).df()

    def enrich(self, lesions: pd.DataFrame) -> pd.DataFrame:
        """Fill the IDC fields of lesion rows from their series; values the table already has are kept."""
        if schema.SERIES not in lesions.columns:
            return lesions
        found = self.series(lesions[schema.SERIES].dropna().tolist()).set_index(schema.SERIES)
        mapped = found.reindex(lesions[schema.SERIES].astype(object).to_numpy())
        out = lesions.copy()
        for column in schema.IDC_FIELDS:
            values = mapped[column].to_numpy()
            out[column] = out[column].where(out[column].notna(), values) if column in out.columns else values
        for column in (schema.COLLECTION, schema.STUDY, "Modality", "SeriesDescription"):
            out[column] = out[column].astype("string")
        out["instanceCount"] = pd.to_numeric(out["instanceCount"]).astype("Int64")
        out["series_size_MB"] = pd.to_numeric(out["series_size_MB"]).astype(float)
        return out
