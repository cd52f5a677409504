"""Links to the IDC viewer, built from DICOM UIDs alone (no index, no network)."""

from __future__ import annotations

from urllib.parse import urlencode

import pandas as pd

VIEWER = "https://viewer.imaging.datacommons.cancer.gov/v3/viewer/"


def viewer_url(study_uid: str | None, series_uid: str | None = None) -> str | None:
    """The IDC (OHIF v3) viewer URL of a study, opened on one series when given."""
    if not study_uid or pd.isna(study_uid):
        return None
    query = {"StudyInstanceUIDs": study_uid}
    if series_uid and not pd.isna(series_uid):
        query["SeriesInstanceUIDs"] = series_uid
    return f"{VIEWER}?{urlencode(query)}"
