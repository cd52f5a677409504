"""SimilarPatients: find the IDC patients whose tumor embedding is nearest to a query tumor.

Plain Python (no Slicer imports). Start with :class:`ReferenceStore`, or query from an image with
:func:`query_image`::

    store = ReferenceStore()
    reference = store.import_reference("nlst-sybil", "nlst-sybil")
    reference.search("CTFM", patient="100242", k=5, exclude=["100242"])

    from SimilarPatientsLib.imaging import from_mask
    result = query_image("ct/", from_mask("tumor.seg.nrrd", "Nodule"), "CTFM", "nlst-sybil")
    result.hits

The subpackages follow a query's data flow: ``imaging`` (CT and tumor in, crop out), ``models``
(crop in, embedding out), ``references`` and ``search`` (embedding in, hits out), ``idc`` (hits to IDC
metadata and viewer links); ``evaluation`` and ``maps`` show what embeddings know; ``util`` holds the
data home, atomic writes, downloads and optional imports. See docs/developers.md.
"""

from __future__ import annotations

from .errors import Cancelled, SimilarPatientsError
from .references.reference import Reference
from .references.store import ReferenceStore

__all__ = ["Cancelled", "ImageQuery", "Reference", "ReferenceStore", "SimilarPatientsError", "query_image"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``query_image`` and ``ImageQuery`` on first use: the image path pulls in SimpleITK and torch users."""
    if name in ("query_image", "ImageQuery"):
        from . import query

        return getattr(query, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
