"""BigQuery names, checked before they reach SQL: a table as ``PROJECT.DATASET.TABLE`` (or a reference
named ``bq://PROJECT.DATASET.TABLE``) and the column names a statement quotes.

Names cannot be query parameters in BigQuery, so every name written into a statement passes these
patterns first; anything else a user gives (filter values, the query vector) travels as a parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SimilarPatientsError

#: What names a reference in BigQuery wherever a reference name is accepted.
SCHEME = "bq://"
# project ids: 6-30 lowercase letters, digits, hyphens (optionally behind a domain, "example.com:project")
_PROJECT = r"(?:[a-z][a-z0-9.-]*[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]"
_DATASET = r"[A-Za-z0-9_]{1,1024}"
_TABLE = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,1023}"
_TABLE_PATH = re.compile(rf"^({_PROJECT})\.({_DATASET})\.({_TABLE})$")
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,299}$")


@dataclass(frozen=True)
class TableName:
    """A fully qualified BigQuery table, valid by construction (see :func:`parse_table`)."""

    project: str
    dataset: str
    table: str

    @property
    def path(self) -> str:
        return f"{self.project}.{self.dataset}.{self.table}"

    @property
    def sql(self) -> str:
        """The table as written in a statement: one back-quoted path."""
        return f"`{self.path}`"

    @property
    def url(self) -> str:
        return SCHEME + self.path

    def beside(self, table: str) -> TableName:
        """Another table in the same dataset (checked like any other)."""
        return parse_table(f"{self.project}.{self.dataset}.{table}")


def is_bigquery(name: str) -> bool:
    """Whether a reference name points at BigQuery (``bq://...``) rather than the local store."""
    return isinstance(name, str) and name.startswith(SCHEME)


def parse_table(text: str) -> TableName:
    """``PROJECT.DATASET.TABLE`` or ``bq://PROJECT.DATASET.TABLE`` as a :class:`TableName`, or a clear error."""
    path = text[len(SCHEME) :] if is_bigquery(text) else text
    match = _TABLE_PATH.match(path or "")
    if not match:
        raise SimilarPatientsError(
            f"'{text}' is not a BigQuery table name; write PROJECT.DATASET.TABLE (as reference: "
            f"{SCHEME}PROJECT.DATASET.TABLE), e.g. my-project.embeddings.nlst_sybil: a project id of 6-30 lowercase "
            f"letters, digits and hyphens, a dataset and a table of letters, digits and underscores."
        )
    return TableName(*match.groups())


def parse_project(text: str) -> str:
    """A project id as BigQuery names one (it becomes part of request URLs: nothing else may pass)."""
    if not isinstance(text, str) or not re.fullmatch(_PROJECT, text):
        raise SimilarPatientsError(
            f"'{text}' is not a Google Cloud project id: 6-30 lowercase letters, digits and hyphens, starting with a "
            f"letter (optionally behind a domain, example.com:my-project), e.g. my-project."
        )
    return text


def column(name: str) -> str:
    """A column name as written in a statement (back-quoted), refused unless it is a plain identifier."""
    if not _COLUMN.match(str(name)):
        raise SimilarPatientsError(
            f"The column name '{name}' cannot be used in BigQuery SQL here: use letters, digits and underscores, "
            f"not starting with a digit. Rename the column in the source and import the reference again."
        )
    return f"`{name}`"
