"""Text columns as pandas itself makes them, on every pandas the module can meet (2.0 to 3.x).

Needs only pandas, pyarrow and numpy, so that ``scripts/pandas_versions.sh`` runs it in a small virtual
environment per pandas release (2.0, 2.1, 2.2, 2.3 and 3.x); the suite runs it on the installed pandas.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from SimilarPatientsLib.util.columns import pandas_array, text_array


def pandas_own(values: list) -> pd.Series:
    """What pandas makes of these Python strings by itself: the behaviour the columns must match."""
    return pd.Series(values)


@pytest.mark.parametrize("kind", [pa.string(), pa.large_string()])
@pytest.mark.parametrize("chunked", [False, True])
def test_text_column_is_pandas_own_text_array(kind, chunked):
    values = ["adeno", None, "squamous", "small cell"]
    column = pa.array(values, kind)
    if chunked:  # what a Parquet read of several row groups gives
        column = pa.chunked_array([column.slice(0, 2), column.slice(2)])
    series = pd.Series(pandas_array(column))
    expected = pandas_own(values)
    assert series.dtype == expected.dtype, pd.__version__
    assert series.isna().tolist() == [False, True, False, False]
    assert series.dropna().tolist() == ["adeno", "squamous", "small cell"]
    # the column behaves as pandas' own: filtering, string methods, joining with pandas' own text
    assert series.str.upper().dropna().tolist() == ["ADENO", "SQUAMOUS", "SMALL CELL"]
    assert (series == "adeno").tolist() == [True, False, False, False]
    joined = pd.DataFrame({"histology": series, "n": range(4)}).merge(
        pd.DataFrame({"histology": ["squamous"], "label": ["S"]}), on="histology"
    )
    assert joined["n"].tolist() == [2]


def test_text_array_of_python_strings():
    array = text_array(["1.2.840.1", None])
    series = pd.Series(array)
    assert series.dtype == pandas_own(["x"]).dtype
    assert series.iloc[0] == "1.2.840.1" and pd.isna(series.iloc[1])
    assert len(text_array([])) == 0


def test_other_types_keep_pandas_own_arrays():
    numbers = pd.Series(pandas_array(pa.array([1.5, None, 3.0])))
    assert numbers.dtype == np.float64 and np.isnan(numbers.iloc[1])
    integers = pd.Series(pandas_array(pa.chunked_array([pa.array([1, 2], pa.int64())])))
    assert integers.tolist() == [1, 2] and integers.dtype == np.int64
