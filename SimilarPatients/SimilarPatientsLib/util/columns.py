"""Arrow columns as the arrays pandas itself would make of them, the same on pandas 2 and pandas 3.

pandas 3 reads text as its Arrow-backed ``str`` dtype; building that array directly from Arrow costs
nothing per value, which the hit table relies on. pandas 2 (Slicer 5.8's Python 3.9 gets at most 2.3) makes
``object`` arrays of text: that is what a pandas 2 user expects, so that is what they get.

The choice is made by pandas' major version, not by trying the pandas 3 dtype: pandas 2.3 accepts
``StringDtype("pyarrow", na_value=np.nan)`` but its ``ArrowStringArray`` takes no ``dtype``, so a try passes
there and every read fails later.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

#: pandas >= 3: text in its default ``str`` dtype (Arrow-backed, missing values as NaN); pandas 2: ``object``.
PANDAS_MAJOR = int(pd.__version__.split(".")[0])
_TEXT = pd.StringDtype("pyarrow", na_value=np.nan) if PANDAS_MAJOR >= 3 else None


def pandas_array(column: pa.Array | pa.ChunkedArray):
    """``column`` as pandas' default array for its type; text without converting values one by one
    where pandas keeps text in Arrow."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        if _TEXT is not None:
            return pd.arrays.ArrowStringArray(column, dtype=_TEXT)
        return column.to_numpy(zero_copy_only=False)
    return column.to_pandas().array


def text_array(values: list):
    """Python strings (None for missing) as pandas' default text array."""
    return pandas_array(pa.array(values, pa.string()))
