"""The module's application settings: the user's opt-ins (downloads, BigQuery) and a site's choices (a
weights file per model, a local DICOM folder), kept in Slicer's application settings (``qt.QSettings``, or
any store with ``value``/``setValue``), so they hold across sessions and the module shows and revokes them."""

from __future__ import annotations

DOWNLOADS = "SimilarPatients/AllowDownloads"
#: The opt-in to searching BigQuery references, which sends the query tumor's embedding (never the image)
#: to Google; and the BigQuery tables listed (bq://PROJECT.DATASET.TABLE, ';'-separated).
BIGQUERY = "SimilarPatients/AllowBigQuery"
BIGQUERY_REFERENCES = "SimilarPatients/BigQueryReferences"
LOCAL_DICOM_FOLDER = "SimilarPatients/LocalDicomFolder"
WEIGHTS = "SimilarPatients/Weights/"


class ModuleSettings:
    """Typed access to the settings in ``store`` (``qt.QSettings()`` in Slicer)."""

    def __init__(self, store):
        self.store = store

    @property
    def downloads_allowed(self) -> bool:
        return self._flag(DOWNLOADS)

    @downloads_allowed.setter
    def downloads_allowed(self, allowed: bool) -> None:
        self.store.setValue(DOWNLOADS, "true" if allowed else "false")

    @property
    def bigquery_allowed(self) -> bool:
        return self._flag(BIGQUERY)

    @bigquery_allowed.setter
    def bigquery_allowed(self, allowed: bool) -> None:
        self.store.setValue(BIGQUERY, "true" if allowed else "false")

    @property
    def bigquery_references(self) -> list:
        """The BigQuery tables the user listed, as bq://PROJECT.DATASET.TABLE names."""
        return [name for name in self._text(BIGQUERY_REFERENCES).split(";") if name]

    def set_bigquery_references(self, names) -> None:
        """Keep ``names`` (PROJECT.DATASET.TABLE or bq://..., each checked) as the BigQuery references."""
        from ..cloud.tables import parse_table

        urls = [parse_table(str(name).strip()).url for name in names if str(name).strip()]
        self.store.setValue(BIGQUERY_REFERENCES, ";".join(urls))

    @property
    def local_dicom_folder(self) -> str | None:
        """A site's DICOM folder that matches are loaded from instead of being downloaded."""
        return self._text(LOCAL_DICOM_FOLDER) or None

    @local_dicom_folder.setter
    def local_dicom_folder(self, path) -> None:
        self.store.setValue(LOCAL_DICOM_FOLDER, str(path or ""))

    def weights_file(self, model: str) -> str | None:
        """The weights file a site chose for ``model`` (used instead of a download), or None."""
        return self._text(WEIGHTS + model) or None

    def set_weights_file(self, model: str, path) -> None:
        self.store.setValue(WEIGHTS + model, str(path or ""))

    def _flag(self, key: str) -> bool:
        return self._text(key).lower() == "true"

    def _text(self, key: str) -> str:
        return str(self.store.value(key, "") or "")


class MemorySettings:
    """A settings store held in memory (``value``/``setValue`` as ``qt.QSettings``): for scripts, the
    benchmarks and the tests."""

    def __init__(self, values: dict | None = None):
        self.values = dict(values or {})

    def value(self, key, default=None):
        return self.values.get(key, default)

    def setValue(self, key, value) -> None:
        self.values[key] = value
