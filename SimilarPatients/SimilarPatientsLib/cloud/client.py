"""The google-cloud-bigquery client, used in one place: connecting, running a statement with its typed
parameters (or a dry run), and turning BigQuery's refusals into errors that say what fixes them.

Nothing here runs at import: the client library is imported on first use through ``util.optional``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd

from ..errors import SimilarPatientsError
from ..util.optional import optional_import
from .sql import Statement
from .tables import TableName, parse_project

#: What a query may bill unless told otherwise (10 GiB: a brute-force scan of ~1.3 M 1024-long embeddings).
DEFAULT_MAXIMUM_BYTES_BILLED = 10 * 2**30
#: BigQuery on-demand pricing: "The minimum data processed per table referenced by the query is 10 MB, and
#: the minimum data processed per query is 10 MB" (10 MB = 10,485,760 bytes there).
MINIMUM_BILLED = 10 * 2**20
#: Rows per getQueryResults page.
PAGE_SIZE = 1000
#: ``maximumBytesBilled`` is an int64 (BigQuery REST reference, JobConfigurationQuery).
_INT64_MAX = 2**63 - 1
log = logging.getLogger(__name__)


def bigquery():
    """The ``google.cloud.bigquery`` module (the ``bigquery`` extra)."""
    return optional_import("google.cloud.bigquery", "bigquery")


def check_maximum_bytes_billed(value) -> int | None:
    """A byte limit BigQuery can enforce: a whole number from 1 to 2^63 - 1 (None: no limit)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _INT64_MAX:
        raise SimilarPatientsError(
            f"--maximum-bytes-billed must be a whole number of bytes from 1 to {_INT64_MAX:,} (BigQuery's int64); "
            f"got {value!r}. BigQuery bills at least 10 MB per query, so a limit below 10,485,760 refuses every "
            f"search; the default is {DEFAULT_MAXIMUM_BYTES_BILLED:,} (10 GiB)."
        )
    return value


def connect(table: TableName, project: str | None = None):
    """A client billing ``project`` (default: the credentials' project, else the table's own). With
    ``BIGQUERY_EMULATOR_HOST`` set (an emulator or test server), it connects there without credentials."""
    if project is not None:
        parse_project(project)
    module = bigquery()
    if os.environ.get("BIGQUERY_EMULATOR_HOST"):
        credentials = optional_import("google.auth.credentials", "bigquery").AnonymousCredentials()
        return module.Client(project=project or table.project, credentials=credentials)
    with translated(table):
        try:
            return module.Client(project=project)
        except OSError as error:  # credentials found but no project in the environment
            if "Project" not in str(error):
                raise
            return module.Client(project=table.project)


@dataclass
class QueryResult:
    """The rows of a finished query and what BigQuery said about running it."""

    rows: pd.DataFrame
    bytes_processed: int | None
    bytes_billed: int | None
    index_usage: str | None = None  #: VECTOR_SEARCH: FULLY_USED, PARTIALLY_USED or UNUSED
    index_unused_reasons: list = field(default_factory=list)
    cache_hit: bool = False  #: answered from BigQuery's query cache (nothing billed)
    index_unused_codes: list = field(default_factory=list)  #: IndexUnusedReason codes (BASE_TABLE_TOO_SMALL…)
    #: VECTOR_SEARCH's stored columns' usage (REST StoredColumnsUsage): why filters on them were not
    #: applied before the search, one text per reason; empty when they were
    stored_columns_unused: list = field(default_factory=list)


def is_vector_search(statement: Statement) -> bool:
    return "VECTOR_SEARCH(" in statement.sql


def job_config(statement: Statement, *, dry_run: bool = False, maximum_bytes_billed: int | None = None):
    """A QueryJobConfig carrying the statement's parameters with their BigQuery types. A ``VECTOR_SEARCH``
    is never answered from the query cache: a cached answer says nothing of the index ("QUERY_CACHE_HIT: the
    search index was not used"), so whether it was approximate could not be told."""
    module = bigquery()
    parameters = []
    for p in statement.parameters:
        if p.type.startswith("ARRAY<"):
            parameters.append(module.ArrayQueryParameter(p.name, p.type[6:-1], list(p.value)))
        else:
            parameters.append(module.ScalarQueryParameter(p.name, p.type, p.value))
    cached = not dry_run and not is_vector_search(statement)
    config = module.QueryJobConfig(query_parameters=parameters, dry_run=dry_run, use_query_cache=cached)
    if maximum_bytes_billed is not None:  # None would be sent as the text "None"
        config.maximum_bytes_billed = int(maximum_bytes_billed)
    return config


def dry_run(client, table: TableName, statement: Statement) -> int:
    """The bytes the statement would scan (and bill, before BigQuery's per-query minimum); nothing runs."""
    with translated(table, vector_search=is_vector_search(statement)):
        job = client.query(statement.sql, job_config=job_config(statement, dry_run=True))
        return int(job.total_bytes_processed or 0)


def run(client, table: TableName, statement: Statement, maximum_bytes_billed: int | None) -> QueryResult:
    """Run the statement and read all its rows, page by page."""
    with translated(table, maximum_bytes_billed, is_vector_search(statement)):
        job = client.query(statement.sql, job_config=job_config(statement, maximum_bytes_billed=maximum_bytes_billed))
        rows = job.result(page_size=PAGE_SIZE)
        names = [f.name for f in rows.schema]
        frame = pd.DataFrame([dict(row.items()) for row in rows], columns=names)
    statistics = job._properties.get("statistics", {}).get("query", {})  # the REST resource, as sent
    vector = statistics.get("vectorSearchStatistics") or {}
    result = QueryResult(
        frame,
        job.total_bytes_processed,
        job.total_bytes_billed,
        vector.get("indexUsageMode"),
        [r.get("message") or r.get("code") for r in vector.get("indexUnusedReasons", [])],
        cache_hit=bool(job.cache_hit),
        index_unused_codes=[r.get("code") for r in vector.get("indexUnusedReasons", []) if r.get("code")],
        stored_columns_unused=[
            r.get("message") or r.get("code") or "no reason given"
            for usage in vector.get("storedColumnsUsages", [])
            if not usage.get("isQueryAccelerated", True)
            for r in (usage.get("storedColumnsUnusedReasons") or [{}])
        ],
    )
    log.info("BigQuery job %s: %s bytes processed, %s billed", job.job_id, result.bytes_processed, result.bytes_billed)
    return result


@contextmanager
def translated(
    table: TableName, maximum_bytes_billed: int | None = None, vector_search: bool = False
) -> Iterator[None]:
    """Turn what google-cloud-bigquery and google-auth raise into one clear :class:`SimilarPatientsError`
    (``vector_search``: the statement is a ``VECTOR_SEARCH``, which only the table's project may run)."""
    auth = optional_import("google.auth.exceptions", "bigquery")
    api = optional_import("google.api_core.exceptions", "bigquery")
    try:
        yield
    except auth.DefaultCredentialsError:
        raise SimilarPatientsError(
            "No Google Cloud credentials were found for BigQuery. Run `gcloud auth application-default login` "
            "(a person), or set GOOGLE_APPLICATION_CREDENTIALS to a service account key file (a machine), then try "
            "again."
        ) from None
    except auth.RefreshError as error:
        raise SimilarPatientsError(
            f"The Google Cloud credentials could not be refreshed ({error}); they expired or were revoked. Run "
            f"`gcloud auth application-default login` again, or renew the service account key."
        ) from None
    except api.GoogleAPICallError as error:
        raise explain(error, table, maximum_bytes_billed, vector_search) from None


def explain(
    error, table: TableName, maximum_bytes_billed: int | None = None, vector_search: bool = False
) -> SimilarPatientsError:
    """The clear error for one BigQuery API error (its HTTP status and its first error reason). Another
    billing project is suggested only where it can help: a ``VECTOR_SEARCH`` runs in the table's project
    or not at all."""
    if vector_search:
        elsewhere = (
            f"an approximate search runs only in the table's own project ({table.project}: BigQuery requires it), "
            f"while --method exact can be billed to another project with --billing-project"
        )
    else:
        elsewhere = "bill another project with --billing-project"
    details = [e for e in (getattr(error, "errors", None) or []) if isinstance(e, dict)]
    reason = details[0].get("reason") if details else None
    status = getattr(error, "code", None)
    said = (details[0].get("message") if details else None) or getattr(error, "message", str(error))
    if reason == "bytesBilledLimitExceeded":
        limit = f"{maximum_bytes_billed:,} bytes" if maximum_bytes_billed else "the limit set"
        return SimilarPatientsError(
            f"BigQuery stopped the query before it ran: it would bill more than {limit} ({said}). Nothing was "
            f"billed. See the cost first with --dry-run; search with the vector index (--method approximate, after "
            f"`references push ... --create-index`), or raise --maximum-bytes-billed (filters do not lower the "
            f"bytes BigQuery bills: it bills the columns a query reads)."
        )
    if reason in ("quotaExceeded", "rateLimitExceeded") or status == 429:
        return SimilarPatientsError(
            f"BigQuery quota exceeded for this project ({said}). Wait and try again (rate limits reset within "
            f"minutes, daily query quotas at midnight Pacific time), ask the project's admin to raise the quota, or "
            f"{elsewhere}."
        )
    if reason == "billingNotEnabled":
        return SimilarPatientsError(
            f"Billing is not enabled on the BigQuery project that runs the query ({said}). Enable billing (or use "
            f"the BigQuery sandbox's limits), or {elsewhere}."
        )
    if status == 404 or reason == "notFound":
        return SimilarPatientsError(
            f"BigQuery has no table {table.path}, or its dataset or project does not exist ({said}). Check the "
            f"name, or push a reference there first: `similar-patients references push NAME --bigquery "
            f"{table.path}`."
        )
    if status == 401:
        return SimilarPatientsError(
            f"BigQuery did not accept the credentials ({said}). Run `gcloud auth application-default login` again, "
            f"or point GOOGLE_APPLICATION_CREDENTIALS at a valid service account key."
        )
    if status == 403 or reason == "accessDenied":
        return SimilarPatientsError(
            f"Permission denied on {table.path} ({said}). The account needs BigQuery Data Viewer on the table "
            f"(Data Editor to push, and to create its index) and BigQuery Job User on the project that runs the "
            f"query; ask the project's admin, or {elsewhere}."
        )
    return SimilarPatientsError(f"BigQuery refused the request on {table.path}: {said}")
