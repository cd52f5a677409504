"""Metadata filters on reference lesions: ``field=value`` expressions or a mapping, to a row mask."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import pandas as pd

from ..errors import SimilarPatientsError

_EXPRESSION = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(!=|>=|<=|=|>|<|~)\s*(.*?)\s*$")

Filters = Union[Mapping[str, Any], Iterable[str], None]


@dataclass(frozen=True)
class FilterTerm:
    """One condition on a label field: ``values`` (a list) for ``=``/``!=``, one text for the others."""

    field: str
    operator: str
    value: Any


def parse(expression: str) -> FilterTerm:
    """``"stage=IA,IB"`` -> FilterTerm("stage", "=", ["IA", "IB"]); operators = != > >= < <= and ~ (substring)."""
    match = _EXPRESSION.match(expression)
    if not match:
        raise SimilarPatientsError(
            f"Cannot read the filter '{expression}'; write FIELD=VALUE[,VALUE...], FIELD!=VALUE, FIELD>=NUMBER, "
            f"FIELD<NUMBER or FIELD~TEXT (case-insensitive substring)."
        )
    field, operator, value = match.groups()
    return FilterTerm(field, operator, [v.strip() for v in value.split(",")] if operator in ("=", "!=") else value)


def row_mask(lesions: pd.DataFrame, filters: Filters) -> np.ndarray:
    """Boolean mask of the lesion rows that pass every filter (all True without filters)."""
    mask = np.ones(len(lesions), dtype=bool)
    if not filters:
        return mask
    if isinstance(filters, Mapping):
        terms = [FilterTerm(f, "=", v if isinstance(v, (list, tuple, set)) else [v]) for f, v in filters.items()]
    else:
        terms = [parse(f) for f in filters]
    for term in terms:
        if term.field not in lesions.columns:
            raise SimilarPatientsError(
                f"No field '{term.field}' to filter on; this reference has: {', '.join(map(str, lesions.columns))}."
            )
        mask &= _term(lesions[term.field], term.operator, term.value)
    return mask


def value_mask(column: pd.Series, values: Iterable[str]) -> np.ndarray:
    """Rows whose value matches any of ``values`` (plain values, or ``~TEXT``, ``!=V``, ``>=N``, ``<N`` ...
    terms); a missing value matches nothing."""
    mask = np.zeros(len(column), dtype=bool)
    for value in values:
        operator = next((o for o in ("!=", ">=", "<=", ">", "<", "~") if str(value).startswith(o)), None)
        if operator is None:
            mask |= _term(column, "=", [value])
        else:
            term = str(value)[len(operator) :].strip()
            mask |= _term(column, operator, [term] if operator == "!=" else term)
    return mask & column.notna().to_numpy()


def _term(column: pd.Series, operator: str, value) -> np.ndarray:
    if operator in ("=", "!="):
        wanted = {str(v) for v in value}
        numeric = pd.to_numeric(column, errors="coerce")
        as_text = column.astype("string").fillna("")
        if pd.api.types.is_numeric_dtype(column):  # "60" matches 60.0
            as_text = numeric.map(lambda x: "" if pd.isna(x) else (str(int(x)) if float(x).is_integer() else str(x)))
        hit = as_text.isin(wanted).to_numpy()
        return hit if operator == "=" else ~hit
    if operator == "~":
        return column.astype("string").str.contains(value, case=False, regex=False).fillna(False).to_numpy(bool)
    try:
        bound = float(value)
    except ValueError:
        raise SimilarPatientsError(f"'{value}' is not a number; {operator} compares numbers.") from None
    numbers = pd.to_numeric(column, errors="coerce").to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        return {">": numbers > bound, ">=": numbers >= bound, "<": numbers < bound, "<=": numbers <= bound}[operator]
