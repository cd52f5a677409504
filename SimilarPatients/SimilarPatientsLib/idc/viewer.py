"""Links to the IDC viewer, built from DICOM UIDs alone (no index, no network)."""

from __future__ import annotations

from urllib.parse import urlencode

import pandas as pd

VIEWER = "https://viewer.imaging.datacommons.cancer.gov/v3/viewer/"


def viewer_url(study_uid: str | None, series_uid: str | None = None) -> str | None:
    """The IDC (OHIF v3) viewer URL of a study, opened on one series when given (None without a study:
    a series IDC does not hold has no viewer page)."""
    if _missing(study_uid):
        return None
    query = {"StudyInstanceUIDs": study_uid}
    if not _missing(series_uid):
        query["SeriesInstanceUIDs"] = series_uid
    return f"{VIEWER}?{urlencode(query)}"


def _missing(uid) -> bool:
    """None, NaN, pandas' NA (whose truth value is an error) or empty."""
    return uid is None or bool(pd.isna(uid)) or not str(uid)
