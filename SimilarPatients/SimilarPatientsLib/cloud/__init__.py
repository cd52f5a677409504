"""References in Google BigQuery (the ``bigquery`` extra): push a stored reference to a table, and
search it with ``VECTOR_SEARCH`` or an exact scan through the same ``search`` call as a local one. A
reference named ``bq://PROJECT.DATASET.TABLE`` is opened here (:func:`open_reference`)."""

from .opening import open_reference
from .sql import SearchSpec, Statement
from .tables import SCHEME, TableName, is_bigquery, parse_table

__all__ = ["SCHEME", "SearchSpec", "Statement", "TableName", "is_bigquery", "open_reference", "parse_table"]
