"""A restricted unpickler for the upstream embedding files: only the numpy/pandas classes they need.

``pickle.load`` on a downloaded file runs whatever code the file names. The upstream format is a dict of
lists of {"feature": ndarray, "row": pandas.Series}; those need a handful of constructors and nothing else,
so every other global is refused before anything is called.
"""

from __future__ import annotations

import importlib
import io
import pickle
from typing import Any

from ..errors import SimilarPatientsError

# (module, name) pairs a numpy array and a pandas Series of numbers and object strings with an Index need,
# across numpy 1.x/2.x and pandas 1.x-3.x module spellings. Arrow-backed strings (pandas 3 defaults) are
# not part of the published format and stay refused.
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("pandas.core.series", "Series"),
    ("pandas", "Series"),
    ("pandas", "Index"),
    ("pandas", "RangeIndex"),
    ("pandas.core.internals.managers", "SingleBlockManager"),
    ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.range", "RangeIndex"),
    ("builtins", "slice"),
}


class RefusedPickle(SimilarPatientsError):
    """The file names a class or function the embedding format does not need."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise RefusedPickle(
                f"Refused to load '{module}.{name}': the embedding file asks for a class outside the "
                f"numpy/pandas ones its format needs. The file is corrupt or not what it claims to be."
            )
        if module.startswith("numpy.core") or module.startswith("numpy._core"):
            # numpy 2 renamed numpy.core to numpy._core; resolve either spelling without the warning shim.
            module = "numpy._core.multiarray" if _has_module("numpy._core") else "numpy.core.multiarray"
        return getattr(importlib.import_module(module), name)


def _has_module(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` allowing only the upstream embedding format's numpy/pandas classes."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except RefusedPickle:
        raise
    except Exception as error:  # truncated or garbled bytes raise many different types
        raise SimilarPatientsError(
            f"The embedding file is not a readable pickle ({type(error).__name__}: {error}); it is probably "
            f"truncated or corrupt. Delete it and download it again."
        ) from error
