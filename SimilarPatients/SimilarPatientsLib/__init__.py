"""SimilarPatients: find the IDC patients whose tumor embedding is nearest to a query tumor.

Plain Python (no Slicer imports). Start with :class:`ReferenceStore`::

    store = ReferenceStore()
    reference = store.import_reference("nlst-sybil", "nlst-sybil")
    reference.search("CTFM", patient="100242", k=5, exclude=["100242"])
"""

from __future__ import annotations

from .errors import SimilarPatientsError
from .reference import Reference
from .store import ReferenceStore

__all__ = ["Reference", "ReferenceStore", "SimilarPatientsError"]
__version__ = "0.1.0"
