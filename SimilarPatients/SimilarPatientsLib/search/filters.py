"""Metadata filters on reference lesions: ``field=value`` expressions or a mapping, to a row mask.

Equality compares numbers as numbers on numeric fields (``age=65`` and ``age=65.0`` are the same filter)
and text as text elsewhere. A search filter that cannot match (a value the field never holds, a number
asked of a text field, ``==`` or ``=>`` for ``=`` and ``>=``) is refused with what the field holds,
never answered with an empty result.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import pandas as pd

from ..errors import SimilarPatientsError

#: FIELD OPERATOR VALUE; a field's name is any text without an operator's characters (``tumor size>=3``).
_EXPRESSION = re.compile(r"^\s*([^=!<>~]*[^=!<>~\s])\s*(!=|>=|<=|=|>|<|~)\s*(.*?)\s*$")
_NEAR_MISSES = {"=": "=", ">": ">=", "<": "<=", "!": "!=", "~": "~"}
_SHOWN_VALUES = 25

Filters = Union[Mapping[str, Any], Iterable[str], str, None]


@dataclass(frozen=True)
class FilterTerm:
    """One condition on a label field: ``value`` is a list for ``=``/``!=``, one text for the others."""

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
    if operator == "=" and value[:1] in _NEAR_MISSES:
        meant = _NEAR_MISSES[value[:1]]
        raise SimilarPatientsError(
            f"Cannot read the filter '{expression}': '={value[:1]}' is not an operator; write "
            f"{field}{meant}{value[1:].strip()}."
        )
    if operator in ("=", "!="):
        return FilterTerm(field, operator, [v.strip() for v in value.split(",")])
    if operator == "~":
        _substring(field, value)
    else:
        _bound(field, operator, value)  # refused here, before any search (local or BigQuery) runs
    return FilterTerm(field, operator, value)


def terms(filters: Filters) -> list[FilterTerm]:
    """The terms of expressions (one string or several) or of a ``{field: value or values}`` mapping."""
    if not filters:
        return []
    if isinstance(filters, str):
        filters = [filters]
    if isinstance(filters, Mapping):
        return [FilterTerm(f, "=", list(v) if isinstance(v, (list, tuple, set)) else [v]) for f, v in filters.items()]
    return [parse(f) for f in filters]


def row_mask(lesions: pd.DataFrame, filters: Filters) -> np.ndarray:
    """Boolean mask of the lesion rows that pass every filter (all True without filters). A value of an
    ``=``/``!=`` term that no lesion holds is refused, naming the values the field has."""
    mask = np.ones(len(lesions), dtype=bool)
    for term in terms(filters):
        if term.field not in lesions.columns:
            raise SimilarPatientsError(
                f"No field '{term.field}' to filter on; this reference has: {', '.join(map(str, lesions.columns))}."
            )
        column = lesions[term.field]
        if term.operator in ("=", "!="):
            for value in term.value:
                if not _equal(column, [value], term.field).any():
                    raise SimilarPatientsError(_never_holds(column, term.field, value))
        mask &= _term(column, term.operator, term.value, term.field)
    return mask


def value_mask(column: pd.Series, values: Iterable[str]) -> np.ndarray:
    """Rows whose value matches any of ``values`` (plain values, or ``~TEXT``, ``!=V``, ``>=N``, ``<N`` ...
    terms); a missing value matches nothing."""
    mask = np.zeros(len(column), dtype=bool)
    for value in values:
        operator = next((o for o in ("!=", ">=", "<=", ">", "<", "~") if str(value).startswith(o)), None)
        if operator is None:
            mask |= _term(column, "=", [value], str(column.name))
        else:
            term = str(value)[len(operator) :].strip()
            mask |= _term(column, operator, [term] if operator == "!=" else term, str(column.name))
    return mask & column.notna().to_numpy()


def _is_numeric(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _equal(column: pd.Series, values: list, field: str) -> np.ndarray:
    """Rows equal to any of ``values``: as numbers on a numeric field, as text otherwise."""
    if _is_numeric(column):
        numbers = []
        for value in values:
            try:
                numbers.append(float(value))
            except (TypeError, ValueError):
                raise SimilarPatientsError(
                    f"'{field}' holds numbers; '{value}' is not one. Write {field}=NUMBER, or {field}>=NUMBER."
                ) from None
        return np.isin(column.to_numpy(dtype=float, na_value=np.nan), numbers)
    wanted = {str(v).strip() for v in values}
    return column.astype("string").str.strip().isin(wanted).fillna(False).to_numpy(bool)


def _term(column: pd.Series, operator: str, value, field: str) -> np.ndarray:
    if operator in ("=", "!="):
        hit = _equal(column, list(value), field)
        return hit if operator == "=" else ~hit
    if operator == "~":
        text = _substring(field, value)
        return column.astype("string").str.contains(text, case=False, regex=False).fillna(False).to_numpy(bool)
    bound = _bound(field, operator, value)
    numbers = pd.to_numeric(column, errors="coerce").to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        return {">": numbers > bound, ">=": numbers >= bound, "<": numbers < bound, "<=": numbers <= bound}[operator]


def _substring(field: str, value) -> str:
    """The text of a ``~`` term; an empty one would match every lesion, so it is refused."""
    if not str(value).strip():
        raise SimilarPatientsError(
            f"The filter {field}~ has no text: it would match every lesion. Write {field}~TEXT (a case-insensitive "
            f"part of the value), or leave the filter out."
        )
    return str(value)


def _bound(field: str, operator: str, value) -> float:
    """The number a ``>``/``>=``/``<``/``<=`` term compares with; NaN (matches nothing) and infinities are refused."""
    try:
        bound = float(value)
    except ValueError:
        raise SimilarPatientsError(f"'{value}' is not a number; {operator} compares numbers.") from None
    if not np.isfinite(bound):
        raise SimilarPatientsError(
            f"The filter {field}{operator}{value} compares with '{value}', which is not a finite number: it would "
            f"match {'nothing' if bound != bound else 'everything or nothing'}. Write {field}{operator}NUMBER."
        )
    return bound


def _never_holds(column: pd.Series, field: str, value) -> str:
    """The refusal of a value no lesion has, with the values the field does have."""
    present = column.dropna()
    if _is_numeric(column):
        if present.empty:
            return f"No lesion has a value for '{field}'."
        return (
            f"No lesion has {field} = {value}; '{field}' holds numbers from {present.min():g} to {present.max():g} "
            f"({present.nunique()} distinct). Use {field}>=N or {field}<N for a range."
        )
    distinct = sorted(present.astype(str).str.strip().unique())
    same_letters = [d for d in distinct if d.lower() == str(value).strip().lower()]
    hint = (
        f" Did you mean '{same_letters[0]}'? Values are compared exactly; ~TEXT matches any case."
        if same_letters
        else ""
    )
    shown = ", ".join(distinct[:_SHOWN_VALUES]) + (
        f", … ({len(distinct)} in all)" if len(distinct) > _SHOWN_VALUES else ""
    )
    return f"No lesion has {field} = '{value}'.{hint} '{field}' holds: {shown or '(no values)'}."
