"""IDC access: series metadata from the index shipped with ``idc-index-data``, and viewer links."""

from .index import COLLECTION, IDC_FIELDS, SERIES, STUDY, IDCIndex
from .viewer import viewer_url

__all__ = ["COLLECTION", "IDC_FIELDS", "SERIES", "STUDY", "IDCIndex", "viewer_url"]
