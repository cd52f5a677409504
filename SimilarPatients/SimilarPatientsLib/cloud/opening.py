"""One way to open a reference by name: ``bq://PROJECT.DATASET.TABLE`` is a table in BigQuery, any other
name a reference of the local store. Both answer ``search`` with the same arguments and hit table."""

from __future__ import annotations

from ..references.reference import Reference
from ..references.store import ReferenceStore
from .tables import is_bigquery


def open_reference(name, store: ReferenceStore | None = None, **bigquery):
    """The reference ``name`` names (an opened one is returned as it is). ``bigquery``: options of
    :class:`.remote.BigQueryReference` (client, project, maximum_bytes_billed, fraction_lists_to_search,
    check_recall)."""
    if not isinstance(name, str):
        return name
    if is_bigquery(name):
        from .remote import BigQueryReference

        return BigQueryReference(name, **bigquery)
    reference: Reference = (store or ReferenceStore()).open(name)
    return reference
