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

__all__ = ["Cancelled", "ImageQuery", "Reference", "ReferenceStore", "SimilarPatientsError", "query_image"]
__version__ = "0.1.0"
#: Public names imported on first use: the package itself needs only the standard library, so that the
#: Slicer module can import its ``ui`` part before pandas and the rest are installed.
_LAZY = {
    "Reference": "references.reference",
    "ReferenceStore": "references.store",
    "query_image": "query",
    "ImageQuery": "query",
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
