"""IDC metadata from the index that the ``idc-index-data`` package ships (offline, SQL via DuckDB).

One object, :class:`IDCIndex`, answers series-level questions for lists of UIDs. The column names are
IDC's own, and references use them as they are. Nothing here touches the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

COLLECTION = "collection_id"
STUDY = "StudyInstanceUID"
SERIES = "SeriesInstanceUID"
#: Series-level metadata a reference takes from the IDC index at import.
IDC_FIELDS = (COLLECTION, STUDY, "Modality", "SeriesDescription", "series_size_MB", "instanceCount")


class IDCIndex:
    """The series index of an IDC release, as shipped by ``idc-index-data``."""

    def __init__(self, parquet_path: str | None = None):
        import idc_index_data

        self.parquet_path = str(parquet_path or idc_index_data.IDC_INDEX_PARQUET_FILEPATH)
        self.version = f"idc-index-data {idc_index_data.__version__}"

    def series(self, series_uids: Sequence[str]) -> pd.DataFrame:
        """One row per known SeriesInstanceUID with its collection, study, modality, description and size."""
        import duckdb

        uids = pd.DataFrame({SERIES: pd.unique(pd.Series(list(series_uids), dtype="string").dropna())})
        columns = ", ".join(f"i.{c}" for c in IDC_FIELDS)
        with duckdb.connect() as connection:
            connection.register("wanted", uids)
            return connection.execute(
                f"SELECT w.{SERIES}, {columns} FROM wanted w "
                f"JOIN read_parquet('{self.parquet_path}') i ON i.{SERIES} = w.{SERIES}"
            ).df()

    def enrich(self, lesions: pd.DataFrame) -> pd.DataFrame:
        """Fill the IDC fields of lesion rows from their series; values the table already has are kept."""
        if SERIES not in lesions.columns:
            return lesions
        found = self.series(lesions[SERIES].dropna().tolist()).set_index(SERIES)
        mapped = found.reindex(lesions[SERIES].astype(object).to_numpy())
        out = lesions.copy()
        for column in IDC_FIELDS:
            values = mapped[column].to_numpy()
            out[column] = out[column].where(out[column].notna(), values) if column in out.columns else values
        for column in (COLLECTION, STUDY, "Modality", "SeriesDescription"):
            out[column] = out[column].astype("string")
        out["instanceCount"] = pd.to_numeric(out["instanceCount"]).astype("Int64")
        out["series_size_MB"] = pd.to_numeric(out["series_size_MB"]).astype(float)
        return out
