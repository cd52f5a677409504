"""IDC metadata from the index that the ``idc-index-data`` package ships (offline, SQL via DuckDB).

One object, :class:`IDCIndex`, answers series-level questions for lists of UIDs. The column names are
IDC's own, and references use them as they are. Nothing here touches the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pandas as pd

from ..errors import SimilarPatientsError

COLLECTION = "collection_id"
STUDY = "StudyInstanceUID"
SERIES = "SeriesInstanceUID"
#: Series-level metadata a reference takes from the IDC index at import.
IDC_FIELDS = (COLLECTION, STUDY, "Modality", "SeriesDescription", "series_size_MB", "instanceCount")


def _shipped_index() -> tuple[str, str]:
    """The series index the ``idc-index-data`` package ships, and its version, found through the package's
    file list. Importing the package would read its text files in the locale's encoding, which fails where
    the locale is C/ASCII (as in Slicer's process); its file list needs no import."""
    try:
        shipped = distribution("idc_index_data")
    except PackageNotFoundError:
        raise SimilarPatientsError(
            "The package idc-index-data (the IDC index shipped offline) is not installed: pip install idc-index-data."
        ) from None
    for file in shipped.files or ():
        if str(file) == "idc_index_data/idc_index.parquet":
            return str(Path(str(file.locate())).resolve()), f"idc-index-data {shipped.version}"
    raise SimilarPatientsError(f"idc-index-data {shipped.version} holds no idc_index.parquet; reinstall it.")


class IDCIndex:
    """The series index of an IDC release, as shipped by ``idc-index-data``."""

    def __init__(self, parquet_path: str | None = None):
        if parquet_path is None:
            parquet_path, version = _shipped_index()
        else:
            version = f"index {Path(parquet_path).name}"
        self.parquet_path = str(parquet_path)
        self.version = version

    def series(self, series_uids: Sequence[str]) -> pd.DataFrame:
        """One row per known SeriesInstanceUID with its collection, study, modality, description and size."""
        import duckdb

        uids = pd.DataFrame({SERIES: pd.unique(pd.Series(list(series_uids), dtype="string").dropna())})
        columns = ", ".join(f"i.{c}" for c in IDC_FIELDS)
        with duckdb.connect() as connection:
            connection.register("wanted", uids)
            return connection.execute(
                f"SELECT w.{SERIES}, {columns} FROM wanted w JOIN read_parquet($index) i ON i.{SERIES} = w.{SERIES}",
                {"index": self.parquet_path},  # a parameter: any path, quotes included
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
