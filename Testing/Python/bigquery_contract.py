"""A loopback HTTP server that holds the BigQuery REST contract against what google-cloud-bigquery sends.

It answers the calls the library makes (tables.get, tables.patch and tables.delete; jobs.insert for
queries, dry runs and DDL; jobs.get; jobs.getQueryResults with paging; load jobs by multipart and resumable
upload) and holds each request to the documented service: every rule the library relies on is enforced
here with the sentence of Google's documentation it comes from beside it (``# doc:``). A request that
breaks the contract is answered 400 and recorded in ``violations``; what the service answers with a failed
job (a load whose description disagrees with an existing table's, a query over its byte limit) is
answered so, as a job with an ``errorResult``.

Queries really run: the statement is transpiled by sqlglot from BigQuery to DuckDB and run on the tables
the load jobs uploaded. ``VECTOR_SEARCH`` has no DuckDB equivalent: its base and query tables are run here
and the search is done in numpy, as BigQuery does it — every row compared when there is no populated index
(or ``use_brute_force``), else an IVF search (rows in lists around k-means centroids; the lists nearest to
each query are searched, ``fraction_lists_to_search`` of them) that applies the base table's filters
before the search, so it can return fewer than ``top_k`` rows. ``vectorSearchStatistics`` says whether the
index was used and why not. :meth:`populate_index` stands for BigQuery finishing its background build.
Bytes are BigQuery's logical bytes (8 per FLOAT64/INT64 value, 2 + length per STRING) of the columns a
statement reads. Errors are injected with :meth:`fail` as BigQuery's error bodies.

Jobs run in the project their request names (the billing project), which need not be the tables' project
(``project``, the one project whose datasets the server holds), except where the documentation says they
must be the same. A job is PENDING when inserted and DONE once polled; identical queries are answered from
the query cache unless ``useQueryCache`` is false; ``edition`` and ``replace_keeps_index`` stand for what
a real project may differ in (the Standard edition; whether ``CREATE OR REPLACE TABLE`` keeps an index,
which the documentation does not say).
"""

from __future__ import annotations

import http.server
import io
import json
import math
import re
import threading
import uuid
from urllib.parse import parse_qs, urlparse

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sqlglot
from sqlglot import exp

# doc (REST reference, QueryParameterType.type): "The top level type of this field."; GoogleSQL data types
_TYPES = {"STRING", "FLOAT64", "INT64", "BOOL", "ARRAY"}
_SERVER_PAGE = 4  #: rows per getQueryResults page at most, to make the client page
_INT64_MAX = 2**63 - 1
# doc (BigQuery pricing, on-demand compute): "The minimum data processed per table referenced by the query
# is 10 MB"; a bytes-billed limit is checked against what would be billed.
_MINIMUM_BILLED = 10 * 2**20
# doc (Manage vector indexes): "If you create a vector index on a table that's smaller than 10 MB, then the
# index isn't populated."
_INDEX_MINIMUM_BYTES = 10 * 1000 * 1000
# doc (VECTOR_SEARCH, Limitations): "The project that runs the query containing VECTOR_SEARCH must match the
# project that contains the base table."
_SAME_PROJECT_RULE = (
    "The project that runs the query containing VECTOR_SEARCH must match the project that contains the base table."
)
# doc (REST reference, Table.description, and the Cloud console's limit): a description holds at most 16,384
# characters.
_DESCRIPTION_LIMIT = 16384
_VECTOR_SEARCH = re.compile(
    r"VECTOR_SEARCH\(\n\s*\((?P<base>.*?)\),\n\s*'(?P<column>\w+)',\n\s*\((?P<query>.*?)\),\n\s*'\w+',\n"
    r"\s*top_k => (?P<top_k>\d+),\n\s*distance_type => '(?P<distance>\w+)'(?:,\n\s*options => '(?P<options>[^']*)')?\)",
    re.S,
)


def _bigquery_type(arrow_type: pa.DataType) -> tuple[str, str]:
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return _bigquery_type(arrow_type.value_type)[0], "REPEATED"
    if pa.types.is_floating(arrow_type):
        return "FLOAT", "NULLABLE"
    if pa.types.is_integer(arrow_type):
        return "INTEGER", "NULLABLE"
    if pa.types.is_boolean(arrow_type):
        return "BOOLEAN", "NULLABLE"
    return "STRING", "NULLABLE"


def _decode(parameter_type: dict, value: dict):
    kind = parameter_type["type"]
    if kind == "ARRAY":
        return [_decode(parameter_type["arrayType"], v) for v in value.get("arrayValues", [])]
    text = value["value"]
    if kind == "FLOAT64":
        return float(text)
    if kind == "INT64":
        return int(text)
    if kind == "BOOL":
        return {"true": True, "false": False}[text.lower()]
    return str(text)


def _cell(value, field_type: str, mode: str):
    if value is None:
        return {"v": None}
    if mode == "REPEATED":
        return {"v": [_cell(v, field_type, "NULLABLE") for v in value]}
    if field_type == "FLOAT":
        return {"v": repr(float(value))}
    if field_type == "BOOLEAN":
        return {"v": "true" if value else "false"}
    return {"v": str(value)}


class ContractError(Exception):
    pass


class BigQueryContractServer:
    """The server's state: tables (in DuckDB), their metadata, jobs, what was asked, what broke the contract."""

    def __init__(self, project: str):
        self.project = project
        self.duck = duckdb.connect()
        self.duck.execute(f"ATTACH ':memory:' AS \"{project}\"")
        self.tables: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self.uploads: dict[str, bytearray] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.violations: list[str] = []
        self.failures: list[tuple[str, int, str, str]] = []
        self.page_tokens: dict[str, int] = {}
        self.searches = 0
        self.cache: dict[tuple, dict] = {}  #: the query cache: (project, statement, parameters, etag) -> job
        self.edition = "ENTERPRISE"  #: "STANDARD": indexes exist but searches cannot use them
        self.replace_keeps_index = False  #: undocumented either way: the tests run both
        self.stored_columns_unused: dict | None = None  #: a storedColumnsUnusedReason to report once
        self.lock = threading.RLock()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.duck.close()

    def fail(self, route: str, status: int, reason: str, message: str) -> None:
        """Answer the next request to ``route`` (e.g. "GET tables", "POST jobs") with BigQuery's error body."""
        self.failures.append((route, status, reason, message))

    def asked(self, method: str, route: str) -> list[dict]:
        return [query for m, r, query in self.requests if m == method and r == route]

    # ---- requests -------------------------------------------------------------------------------------
    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _send(self, status: int, body: dict | None = None, headers: dict | None = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                if body is not None:
                    self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _dispatch(self, method: str) -> None:
                url = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                body = self._body()
                route, groups = server._route(method, url.path, query)
                with server.lock:
                    server.requests.append((method, route, query))
                    failure = next((f for f in server.failures if f[0] == f"{method} {route}"), None)
                    if failure:
                        server.failures.remove(failure)
                if failure:
                    _, status, reason, message = failure
                    self._send(status, _error(status, reason, message))
                    return
                try:
                    with server.lock:  # one DuckDB connection: requests are answered one at a time
                        status, answer, headers = server._answer(method, route, groups, query, body, self.headers)
                except Exception as error:  # a broken contract, or a statement that cannot run: both are answered
                    server.violations.append(f"{method} {url.path}: {type(error).__name__}: {error}")
                    self._send(400, _error(400, "invalid", f"contract: {error}"))
                    return
                self._send(status, answer, headers)

            def do_GET(self):
                self._dispatch("GET")

            def do_POST(self):
                self._dispatch("POST")

            def do_PUT(self):
                self._dispatch("PUT")

            def do_PATCH(self):
                self._dispatch("PATCH")

            def do_DELETE(self):
                self._dispatch("DELETE")

        return Handler

    def _route(self, method: str, path: str, query: dict) -> tuple[str, tuple]:
        patterns = {
            "tables": r"^/bigquery/v2/projects/([^/]+)/datasets/([^/]+)/tables/([^/]+)$",
            "jobs": r"^/bigquery/v2/projects/([^/]+)/jobs$",
            "job": r"^/bigquery/v2/projects/([^/]+)/jobs/([^/]+)$",
            "queries": r"^/bigquery/v2/projects/([^/]+)/queries/([^/]+)$",
            "upload": r"^/upload/bigquery/v2/projects/([^/]+)/jobs$",
        }
        for name, pattern in patterns.items():
            match = re.match(pattern, path)
            if match:
                return name, match.groups()
        return path, ()

    def populate_index(self, path: str, coverage: float = 1.0) -> None:
        """BigQuery has built ``coverage`` of the table's vector index in the background (all of it: finished).
        An index on a table under 10 MB is never populated."""
        with self.lock:
            index = self.tables[path]["index"]
            if self.tables[path]["bytes"] >= _INDEX_MINIMUM_BYTES:
                index["populated"], index["coverage"] = True, float(coverage)

    def _answer(self, method, route, groups, query, body, headers):
        if route == "tables" and method in ("GET", "PATCH", "DELETE"):
            if groups[0] != self.project:
                return 404, _error(404, "notFound", f"Not found: Project {groups[0]}"), None
            path = ".".join(groups)
            if path not in self.tables:
                return 404, _error(404, "notFound", f"Not found: Table {groups[0]}:{groups[1]}.{groups[2]}"), None
            if method == "DELETE":
                del self.tables[path]
                self.duck.execute(f"DROP TABLE {self._duck_name(path)}")
                return 204, None, None
            if method == "PATCH":
                # doc (google-cloud-bigquery, Client.update_table): "If table.etag is not None, the update will
                # only succeed if the table on the server has the same ETag." (sent as If-Match; HTTP 412 else)
                expected = headers.get("If-Match")
                if expected is not None and expected != self.tables[path]["etag"]:
                    return 412, _error(412, "conditionNotMet", "Precondition check failed."), None
                change = json.loads(body)
                # doc (tables.patch): "This method supports RFC5789 patch semantics": only the fields sent change.
                if set(change) - {"description", "expirationTime", "tableReference", "etag"}:
                    raise ContractError(f"tables.patch sent fields it did not mean to change: {sorted(change)}")
                if "description" in change:
                    self._check_description(change["description"])
                    self.tables[path]["description"] = change["description"]
                if "expirationTime" in change:
                    if not re.fullmatch(r"\d+", str(change["expirationTime"])):
                        raise ContractError(f"expirationTime is milliseconds since the epoch: {change!r}")
                    self.tables[path]["expires"] = int(change["expirationTime"])
                self.tables[path]["etag"] = uuid.uuid4().hex
            return 200, self._table_resource(path), None
        if route == "jobs" and method == "POST":
            return 200, self._insert(json.loads(body), groups[0]), None
        if route in ("job", "queries") and method == "GET":
            job = self.jobs.get(groups[1])
            # doc (jobs.get, location): "The geographic location of the job. ... required except for US and EU";
            # a job asked for in another location, or in another project, is not found.
            if (
                job is None
                or job["resource"]["jobReference"]["projectId"] != groups[0]
                or query.get("location", job["resource"]["jobReference"]["location"])
                != job["resource"]["jobReference"]["location"]
            ):
                return 404, _error(404, "notFound", f"Not found: Job {groups[0]}:{groups[1]}"), None
            job["resource"]["status"]["state"] = "DONE"  # polled: it has run
            if route == "job":
                return 200, job["resource"], None
            return 200, self._results(groups[1], query), None
        if route == "upload":
            return self._upload(method, query, body, headers)
        raise ContractError(f"no such BigQuery v2 method: {method} {route}")

    @staticmethod
    def _check_description(text) -> None:
        if text is not None and len(text) > _DESCRIPTION_LIMIT:
            raise ContractError(f"a table description holds at most {_DESCRIPTION_LIMIT} characters; got {len(text)}")

    # ---- tables and load jobs -------------------------------------------------------------------------
    def _table_resource(self, path: str) -> dict:
        project, dataset, table = path.split(".")
        meta = self.tables[path]
        resource = {
            "kind": "bigquery#table",
            "id": f"{project}:{dataset}.{table}",
            "etag": meta["etag"],
            "tableReference": {"projectId": project, "datasetId": dataset, "tableId": table},
            "schema": {"fields": meta["fields"]},
            "numRows": str(meta["rows"]),
            "numBytes": str(meta["bytes"]),
            "type": "TABLE",
            "location": "US",
        }
        if meta.get("description") is not None:
            resource["description"] = meta["description"]
        return resource

    def _upload(self, method, query, body, headers):
        if query.get("uploadType") == "multipart" and method == "POST":
            boundary = re.search(r'boundary="?([^";]+)"?', headers["Content-Type"]).group(1).encode()
            parts = [p for p in body.split(b"--" + boundary) if p.strip() not in (b"", b"--")]
            if len(parts) != 2:
                raise ContractError(f"a multipart upload has 2 parts (metadata, data); got {len(parts)}")
            metadata = json.loads(parts[0].split(b"\r\n\r\n", 1)[1].strip())
            data = parts[1].split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")
            return 200, self._load(metadata, data), None
        if query.get("uploadType") == "resumable" and method == "POST" and "upload_id" not in query:
            session = uuid.uuid4().hex
            self.uploads[session] = bytearray()
            self.uploads[session + ":meta"] = json.loads(body)
            location = f"{self.url}/upload/bigquery/v2/projects/{self.project}/jobs?uploadType=resumable"
            return 200, None, {"Location": f"{location}&upload_id={session}"}
        if query.get("uploadType") == "resumable" and method == "PUT":
            session = query["upload_id"]
            span = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", headers.get("Content-Range", ""))
            if span is None or int(span.group(1)) != len(self.uploads[session]):
                raise ContractError(f"resumable chunk out of order: {headers.get('Content-Range')}")
            self.uploads[session] += body
            if span.group(3) != "*" and len(self.uploads[session]) == int(span.group(3)):
                return 200, self._load(self.uploads.pop(session + ":meta"), bytes(self.uploads.pop(session))), None
            return 308, None, {"Range": f"bytes=0-{len(self.uploads[session]) - 1}"}
        raise ContractError(f"unknown upload: {method} {query}")

    def _load(self, resource: dict, data: bytes) -> dict:
        load = resource.get("configuration", {}).get("load")
        if load is None:
            raise ContractError("an upload's job resource has no configuration.load")
        if load.get("sourceFormat") != "PARQUET":
            raise ContractError(f"sourceFormat must be PARQUET, got {load.get('sourceFormat')}")
        if not load.get("parquetOptions", {}).get("enableListInference"):
            raise ContractError("without parquetOptions.enableListInference the embedding loads as a STRUCT")
        destination = load["destinationTable"]
        path = f"{destination['projectId']}.{destination['datasetId']}.{destination['tableId']}"
        description = load.get("destinationTableProperties", {}).get("description")
        self._check_description(description)
        existing = self.tables.get(path)
        # doc (REST reference, DestinationTableProperties.description): "This will only be used if the destination
        # table is newly created. If the table already exists and a value different than the current description
        # is provided, the job will fail."
        if existing is not None and description is not None and description != existing.get("description"):
            failed = {"reason": "invalid", "message": f"Cannot change the description of existing table {path}"}
            return self._job(resource, "LOAD", error=failed)
        # doc (JobConfigurationLoad.writeDisposition): "WRITE_EMPTY: If the table already exists and contains
        # data, a 'duplicate' error is returned in the job result." (the default); "WRITE_TRUNCATE: If the table
        # already exists, BigQuery overwrites the data"; "WRITE_APPEND: ... appends the data to the table".
        disposition = load.get("writeDisposition", "WRITE_EMPTY")
        if disposition not in ("WRITE_EMPTY", "WRITE_TRUNCATE", "WRITE_APPEND"):
            raise ContractError(f"unknown writeDisposition {disposition}")
        if existing is not None and existing["rows"] and disposition == "WRITE_EMPTY":
            return self._job(resource, "LOAD", error={"reason": "duplicate", "message": f"Already Exists: {path}"})
        if disposition == "WRITE_APPEND":
            raise ContractError("the library never appends to a reference table")
        table = pq.read_table(io.BytesIO(data))
        self.duck.execute(f'CREATE SCHEMA IF NOT EXISTS "{destination["projectId"]}"."{destination["datasetId"]}"')
        self.duck.register("upload", table)
        self.duck.execute(f"CREATE OR REPLACE TABLE {self._duck_name(path)} AS SELECT * FROM upload")
        self.duck.unregister("upload")
        self._record(path, description if existing is None else existing.get("description"), None)
        return self._job(resource, "LOAD", statistics={"load": {"outputRows": str(table.num_rows)}})

    def _record(self, path: str, description: str | None, clustering: list | None) -> None:
        """A table's metadata after DuckDB holds its rows: schema, rows, logical bytes; no index yet."""
        schema = self.duck.sql(f"SELECT * FROM {self._duck_name(path)} LIMIT 0").to_arrow_table().schema
        fields = []
        for f in schema:
            field_type, mode = _bigquery_type(f.type)
            fields.append({"name": f.name, "type": field_type, "mode": mode})
        rows = self.duck.execute(f"SELECT COUNT(*) FROM {self._duck_name(path)}").fetchall()[0][0]
        column_bytes = self._column_bytes(path, fields)
        self.tables[path] = {
            "fields": fields,
            "rows": int(rows),
            "bytes": sum(column_bytes.values()),
            "column_bytes": column_bytes,
            "description": description,
            "clustering": clustering,
            "etag": uuid.uuid4().hex,
            "index": None,
        }

    def _duck_name(self, path: str) -> str:
        return ".".join(f'"{part}"' for part in path.split("."))

    def _column_bytes(self, path: str, fields: list) -> dict:
        """BigQuery's logical bytes per column."""
        sizes = {}
        for f in fields:
            name = f'"{f["name"]}"'
            if f["mode"] == "REPEATED":
                expression = f"8 * COALESCE(SUM(len({name})), 0)"
            elif f["type"] == "STRING":
                expression = f"COALESCE(SUM(2 + strlen(CAST({name} AS VARCHAR))), 0)"
            else:
                expression = f"8 * COUNT({name})"
            total = self.duck.execute(f"SELECT {expression} FROM {self._duck_name(path)}").fetchall()[0][0]
            sizes[f["name"]] = int(total)
        return sizes

    # ---- query jobs -----------------------------------------------------------------------------------
    def _job(
        self,
        resource: dict,
        kind: str,
        statistics: dict | None = None,
        error: dict | None = None,
        project: str | None = None,
        state: str = "PENDING",
    ) -> dict:
        """A job run in ``project`` (the billing project its request named). It is PENDING until polled
        (doc, JobStatus.state: "Running state of the job. Valid states include 'PENDING', 'RUNNING', and
        'DONE'."), so a client must wait for it; a dry run is answered DONE at once."""
        project = project or self.project
        reference = resource.get("jobReference") or {}
        job_id = reference.get("jobId") or uuid.uuid4().hex
        # doc (jobs.insert, projectId): "Project ID of project that will be billed for the job."
        if reference.get("projectId", project) != project:
            raise ContractError(f"jobReference.projectId {reference.get('projectId')} is not the billed project")
        job = {
            "kind": "bigquery#job",
            "id": f"{project}:{reference.get('location', 'US')}.{job_id}",
            "jobReference": {"projectId": project, "jobId": job_id, "location": reference.get("location", "US")},
            "configuration": {**resource.get("configuration", {}), "jobType": kind},
            "status": {"state": state},
            "statistics": {"creationTime": "1", "startTime": "2", "endTime": "3", **(statistics or {})},
        }
        if error:  # a job that fails validation is DONE at once, with its error
            job["status"]["state"] = "DONE"
            job["status"]["errorResult"] = error
            job["status"]["errors"] = [error]
        self.jobs[job_id] = {"resource": job}
        return job

    def _insert(self, resource: dict, project: str) -> dict:
        configuration = resource.get("configuration", {})
        query = configuration.get("query")
        if query is None:
            raise ContractError("jobs.insert without a body upload must be a query job (configuration.query)")
        # doc (BigQuery locations): "you can't query a dataset in one location and write the results to a table
        # in another location", and a job runs in its datasets' location: every dataset here is in US, so a
        # query job asked to run elsewhere finds none of them.
        location = (resource.get("jobReference") or {}).get("location", "US")
        if location != "US":
            missing = {"reason": "notFound", "message": f"Not found: Dataset was not found in location {location}"}
            return self._job(resource, "QUERY", None, missing, project)
        if query.get("useLegacySql") is not False:
            raise ContractError("queries must set useLegacySql: false (GoogleSQL)")
        limit = query.get("maximumBytesBilled")
        # doc (JobConfigurationQuery.maximumBytesBilled): "string (int64 format) ... Limits the bytes billed for
        # this job. Queries that will have bytes billed beyond this limit will fail (without incurring a charge)."
        if limit is not None and (not re.fullmatch(r"\d+", str(limit)) or not 0 < int(limit) <= _INT64_MAX):
            raise ContractError(f"maximumBytesBilled is a positive int64 string, got {limit!r}")
        sql = query["query"]
        parameters = self._parameters(query)
        if sql.startswith("CREATE OR REPLACE VECTOR INDEX"):
            return self._create_index(resource, sql, project)
        if sql.startswith("DROP VECTOR INDEX"):
            return self._drop_index(resource, sql, project)
        if sql.startswith("CREATE OR REPLACE TABLE"):
            return self._replace_table(resource, sql, parameters, project, limit)
        tree = sqlglot.parse_one(sql, read="bigquery", error_level=sqlglot.ErrorLevel.RAISE)
        if not isinstance(tree, exp.Select):
            raise ContractError("a search statement must parse as a GoogleSQL SELECT")
        used = {p.name for p in tree.find_all(exp.Parameter)} | {p.name for p in tree.find_all(exp.Placeholder)}
        if used != set(parameters):
            raise ContractError(f"@names {sorted(used)} and parameters {sorted(parameters)} differ")
        path, read_bytes = self._bytes_read(tree)
        statistics = {"query": {"totalBytesProcessed": str(read_bytes), "statementType": "SELECT"}}
        statistics["totalBytesProcessed"] = str(read_bytes)
        calls = list(_VECTOR_SEARCH.finditer(sql))
        refused = self._check_vector_search(calls, path, project)
        if refused:
            return self._job(
                resource, "QUERY", statistics, refused, project, "DONE" if configuration.get("dryRun") else "PENDING"
            )
        if configuration.get("dryRun"):
            return self._job(resource, "QUERY", statistics, project=project, state="DONE")
        # doc (Using cached query results): "When query results are retrieved from a cached results table, the job
        # statistics property statistics.query.cacheHit returns as true, and you are not charged for the query";
        # (JobConfigurationQuery.useQueryCache): "The default value is true." A changed table invalidates it.
        key = (project, sql, json.dumps(query.get("queryParameters", []), sort_keys=True), self.tables[path]["etag"])
        if query.get("useQueryCache", True) and key in self.cache:
            cached = self.cache[key]
            statistics["query"].update({"cacheHit": True, "totalBytesProcessed": "0", "totalBytesBilled": "0"})
            statistics["totalBytesProcessed"] = "0"
            if calls:  # doc (IndexUnusedReason): "QUERY_CACHE_HIT: Indicates that the query was cached, and thus
                # the search index was not used."
                statistics["query"]["vectorSearchStatistics"] = {
                    "indexUsageMode": "UNUSED",
                    "indexUnusedReasons": [{"code": "QUERY_CACHE_HIT", "message": "The query was cached."}],
                }
            job = self._job(resource, "QUERY", statistics, project=project)
            self.jobs[job["jobReference"]["jobId"]]["result"] = cached
            return job
        # doc (BigQuery pricing, on-demand compute): "The minimum data processed per table referenced by the query
        # is 10 MB, and the minimum data processed per query is 10 MB." (one table is referenced here)
        billed = max(read_bytes, _MINIMUM_BILLED)
        if limit is not None and billed > int(limit):
            error = {
                "reason": "bytesBilledLimitExceeded",
                "message": f"Query exceeded limit for bytes billed: {limit}. {billed} or higher required.",
            }
            return self._job(resource, "QUERY", statistics, error, project)
        if calls:
            usage = []
            for call in calls:
                name, mode, reasons, index_bytes, stored = self._vector_search(path, call, parameters)
                sql = sql.replace(call.group(0), name)
                usage.append((mode, reasons, stored))
                # doc (Introduction to vector search, Pricing): "You are charged for the amount of bytes scanned in
                # the base table, the index, and the search query." How much of the index a search scans is not
                # said; the stand-in bills the share of its lists searched.
                read_bytes += index_bytes
            mode, reasons, stored = usage[0]
            billed = max(read_bytes, _MINIMUM_BILLED)
            statistics["query"]["totalBytesProcessed"] = statistics["totalBytesProcessed"] = str(read_bytes)
            statistics["query"]["vectorSearchStatistics"] = {"indexUsageMode": mode}
            if reasons:
                statistics["query"]["vectorSearchStatistics"]["indexUnusedReasons"] = reasons
            if stored:
                statistics["query"]["vectorSearchStatistics"]["storedColumnsUsages"] = [stored]
        statistics["query"]["totalBytesBilled"] = str(billed)
        statistics["query"]["cacheHit"] = False
        result = self._subquery(sql, parameters)
        job = self._job(resource, "QUERY", statistics, project=project)
        self.jobs[job["jobReference"]["jobId"]]["result"] = result
        self.cache[key] = result
        return job

    def _check_vector_search(self, calls: list, path: str, project: str) -> dict | None:
        """The job error for a ``VECTOR_SEARCH`` BigQuery does not run (None: it runs)."""
        for call in calls:
            if project != path.split(".")[0]:
                return {"reason": "invalidQuery", "message": f"{_SAME_PROJECT_RULE} (job: {project}; table: {path})"}
            options = json.loads(call["options"] or "{}")
            fraction = options.get("fraction_lists_to_search")
            # doc (VECTOR_SEARCH, options): "The fraction_lists_to_search value must be in the range 0.0 to 1.0,
            # exclusive."
            if fraction is not None and not 0.0 < float(fraction) < 1.0:
                return {"reason": "invalidQuery", "message": f"fraction_lists_to_search must be in (0, 1): {fraction}"}
            # doc (VECTOR_SEARCH, base_table query statement): "Only SELECT, FROM, and WHERE clauses are allowed
            # in this query."
            base = sqlglot.parse_one(call["base"], read="bigquery")
            extra = sorted(k for k, v in base.args.items() if v and k not in ("expressions", "from", "from_", "where"))
            if not isinstance(base, exp.Select) or extra:
                return {"reason": "invalidQuery", "message": f"the base table query has {extra or type(base)}"}
        return None

    def _replace_table(self, resource: dict, sql: str, parameters: dict, project: str, limit=None) -> dict:
        """``CREATE OR REPLACE TABLE t [CLUSTER BY ...] OPTIONS(description=...) AS SELECT ...``, applied whole."""
        tree = sqlglot.parse_one(sql, read="bigquery", error_level=sqlglot.ErrorLevel.RAISE)
        if not isinstance(tree, exp.Create) or not isinstance(tree.expression, exp.Select):
            raise ContractError("CREATE OR REPLACE TABLE must be CREATE ... AS SELECT here")
        target = tree.this if isinstance(tree.this, exp.Table) else tree.this.this
        path = ".".join(p for p in (target.catalog, target.db, target.name) if p)
        sources = {".".join(p for p in (t.catalog, t.db, t.name) if p) for t in tree.expression.find_all(exp.Table)}
        if len(sources) != 1 or not sources <= set(self.tables):
            raise ContractError(f"CREATE TABLE ... AS SELECT from an unknown table: {sql[:160]}")
        # doc (DDL, column_name and OPTIONS): option values are constant expressions; query parameters stand for
        # values in queries, not in a table's options.
        if parameters:
            raise ContractError("a CREATE TABLE statement takes no query parameters")
        description, clustering = None, None
        for prop in tree.find_all(exp.Property):
            key = prop.name.lower() if isinstance(prop.this, (str, exp.Identifier, exp.Var)) else str(prop.this).lower()
            if key == "description":
                if not isinstance(prop.args.get("value"), exp.Literal) or not prop.args["value"].is_string:
                    raise ContractError("OPTIONS(description = ...) must be a string literal")
                description = prop.args["value"].this
        cluster = tree.find(exp.ClusterProperty)
        if cluster is not None:
            clustering = [c.name for c in cluster.expressions]
        self._check_description(description)
        # doc (BigQuery pricing): on-demand compute covers "certain ... data definition language (DDL)
        # statements": CREATE TABLE ... AS SELECT is billed on what its SELECT reads (here the whole source).
        (source,) = sources
        billed = max(self.tables[source]["bytes"], _MINIMUM_BILLED)
        if limit is not None and billed > int(limit):
            error = {"reason": "bytesBilledLimitExceeded", "message": f"{billed} or higher required."}
            return self._job(resource, "QUERY", None, error, project)
        select = sqlglot.transpile(tree.expression.sql(dialect="bigquery"), read="bigquery", write="duckdb")[0]
        project, dataset, _ = path.split(".")
        self.duck.execute(f'CREATE SCHEMA IF NOT EXISTS "{project}"."{dataset}"')
        self.duck.execute(f"CREATE OR REPLACE TABLE {self._duck_name(path)} AS {select}")
        kept = self.tables[path]["index"] if path in self.tables and self.replace_keeps_index else None
        self._record(path, description, clustering)
        self.tables[path]["index"] = kept
        if clustering is not None:
            fields = {f["name"]: f for f in self.tables[path]["fields"]}
            # doc (REST reference, Clustering.fields): "One or more fields on which data should be clustered. Only
            # top-level, non-repeated, simple-type fields are supported."; (Introduction to clustered tables): "You
            # can specify up to four clustering columns."
            bad = [c for c in clustering if c not in fields or fields[c]["mode"] == "REPEATED"]
            if bad or not 1 <= len(clustering) <= 4:
                raise ContractError(f"CLUSTER BY needs 1-4 top-level, non-repeated columns; got {clustering}")
        statistics = {"query": {"statementType": "CREATE_TABLE_AS_SELECT", "totalBytesBilled": str(billed)}}
        return self._job(resource, "QUERY", statistics, project=project)

    def _parameters(self, query: dict) -> dict:
        values = {}
        declared = query.get("queryParameters", [])
        if declared and query.get("parameterMode") != "NAMED":
            raise ContractError("named parameters need parameterMode NAMED")
        for parameter in declared:
            kind = parameter.get("parameterType", {})
            if kind.get("type") not in _TYPES or (kind["type"] == "ARRAY" and "arrayType" not in kind):
                raise ContractError(f"parameter {parameter.get('name')}: bad parameterType {kind}")
            try:
                values[parameter["name"]] = _decode(kind, parameter["parameterValue"])
            except (KeyError, ValueError) as error:
                raise ContractError(f"parameter {parameter.get('name')}: value does not parse as {kind}") from error
        return values

    def _bytes_read(self, tree: exp.Expression) -> tuple[str, int]:
        tables = {_path(t) for t in tree.find_all(exp.Table)}
        known = [t for t in tables if t in self.tables]
        if len(known) != 1:
            raise ContractError(f"a statement reads one reference table; found {sorted(tables)}")
        path = known[0]
        columns = self.tables[path]["column_bytes"]
        # doc (Best practices for controlling costs): "Control projection by querying only the columns that you
        # need"; "Use SELECT * EXCEPT to exclude one or more columns from the results": a star over the table
        # reads its columns but those excepted; a star over a subquery, a CTE or VECTOR_SEARCH's output reads
        # what they read. COUNT(*) reads none.
        read = set()
        for star in tree.find_all(exp.Star):
            select = star.find_ancestor(exp.Select)
            source = select.args.get("from") or select.args.get("from_") if select is not None else None
            over = source.this if source is not None else None
            if isinstance(star.parent, exp.Count) or not isinstance(over, exp.Table) or _path(over) != path:
                continue
            read |= set(columns) - {c.name for c in star.args.get("except_") or star.args.get("except") or []}
        read |= {c.name for c in tree.find_all(exp.Column) if not isinstance(c.parent, exp.Star)}
        return path, sum(size for name, size in columns.items() if name in read)

    def _drop_index(self, resource: dict, sql: str, project: str) -> dict:
        # doc (DDL, DROP VECTOR INDEX): "DROP VECTOR INDEX [ IF EXISTS ] index_name ON table_name"
        match = re.fullmatch(r"DROP VECTOR INDEX IF EXISTS `(\w+)` ON `([\w.-]+)`", sql)
        if match is None or match.group(2) not in self.tables:
            raise ContractError(f"DROP VECTOR INDEX of another shape, or on an unknown table: {sql[:160]}")
        index = self.tables[match.group(2)]["index"]
        if index is not None and index["name"] == match.group(1):
            self.tables[match.group(2)]["index"] = None
        return self._job(resource, "QUERY", {"query": {"statementType": "DROP_VECTOR_INDEX"}}, project=project)

    def _create_index(self, resource: dict, sql: str, project: str) -> dict:
        shape = (
            r"CREATE OR REPLACE VECTOR INDEX `(\w+)` ON `([\w.-]+)`\(`(\w+)`\)(?: STORING\(([^)]*)\))?\n"
            r"OPTIONS\(index_type = '(\w+)', distance_type = '(\w+)'\)$"
        )
        match = re.match(shape, sql)
        if match is None or match.group(2) not in self.tables:
            raise ContractError(f"CREATE VECTOR INDEX on an unknown table, or of another shape: {sql[:160]}")
        name, path, indexed, storing, index_type, distance = match.groups()
        meta = self.tables[path]
        # doc (CREATE VECTOR INDEX, column_name): "The column must have a type of ARRAY<FLOAT64> ... All elements in
        # the array must be non-NULL, and all values in the column must have the same array dimensions."
        field = next((f for f in meta["fields"] if f["name"] == indexed), None)
        if field is None or (field["type"], field["mode"]) != ("FLOAT", "REPEATED"):
            raise ContractError(f"a vector index is on an ARRAY<FLOAT64> column; {indexed} is {field}")
        lengths = self.duck.execute(f"SELECT DISTINCT len({indexed}) FROM {self._duck_name(path)}").fetchall()
        if len(lengths) != 1:
            raise ContractError(f"a vector index needs one embedding length; the table has {sorted(lengths)}")
        # doc (CREATE VECTOR INDEX, index_type and distance_type): IVF or TREE_AH; EUCLIDEAN, COSINE or DOT_PRODUCT.
        if index_type not in ("IVF", "TREE_AH") or distance not in ("EUCLIDEAN", "COSINE", "DOT_PRODUCT"):
            raise ContractError(f"index_type {index_type} / distance_type {distance} unknown")
        stored = [c.strip().strip("`") for c in (storing or "").split(",") if c.strip()]
        if indexed in stored or not set(stored) <= {f["name"] for f in meta["fields"]}:
            raise ContractError(f"STORING names unknown or vector columns: {stored}")
        meta["index"] = {"name": name, "column": indexed, "stored": stored, "distance": distance, "populated": False}
        meta["etag"] = uuid.uuid4().hex  # not documented either way: a client must not patch with the older etag
        return self._job(resource, "QUERY", {"query": {"statementType": "CREATE_VECTOR_INDEX"}}, project=project)

    def _vector_search(self, path: str, call: re.Match, parameters: dict) -> tuple:
        """Run one ``VECTOR_SEARCH`` call and register its output (``base``, ``query``, ``distance``) as a
        table: the name to put in its place, the index usage mode, the reasons an index was not used, the
        index bytes scanned and the stored columns' usage (None without a used index)."""
        base = self._subquery(call["base"], parameters)
        query = self._subquery(call["query"], parameters)
        column, top_k = call["column"], int(call["top_k"])
        options = json.loads(call["options"] or "{}")
        # doc (VECTOR_SEARCH, options): "You can't specify fraction_lists_to_search when use_brute_force is
        # set to true."
        if options.get("use_brute_force") and "fraction_lists_to_search" in options:
            raise ContractError("use_brute_force and fraction_lists_to_search together")
        index = self.tables[path]["index"]
        reasons = []
        if index is None:
            reasons.append({"code": "INDEX_CONFIG_NOT_AVAILABLE", "message": "There is no vector index on the table."})
        elif options.get("use_brute_force"):
            reasons.append({"code": "INDEX_SUPPRESSED_BY_FUNCTION_OPTION", "message": "use_brute_force is set."})
        elif self.edition == "STANDARD":
            # doc (Introduction to vector search): "Using an index isn't supported in Standard editions."
            code = "NOT_SUPPORTED_IN_STANDARD_EDITION"
            reasons.append({"code": code, "message": "Vector indexes are not supported in the Standard edition."})
        elif self.tables[path]["bytes"] < _INDEX_MINIMUM_BYTES:
            # doc (Manage vector indexes): "If you create a vector index on a table that's smaller than 10 MB, then
            # the index isn't populated."; (INFORMATION_SCHEMA.VECTOR_INDEXES) BASE_TABLE_TOO_SMALL
            reasons.append({"code": "BASE_TABLE_TOO_SMALL", "message": "The base table is smaller than 10 MB."})
        elif not index["populated"]:
            reasons.append({"code": "PENDING_INDEX_CREATION", "message": "The vector index is still being built."})
        elif index["distance"] != call["distance"] or index["column"] != column:
            reasons.append({"code": "OTHER_REASON", "message": "The distance type differs from the index's."})
        vectors = np.asarray(base.column(column).to_pylist(), dtype=np.float64).reshape(base.num_rows, -1)
        queries = np.asarray(query.column(column).to_pylist(), dtype=np.float64).reshape(query.num_rows, -1)
        distances = _distances(vectors, queries, call["distance"])  # (queries, base rows)
        index_bytes, stored = 0, None
        if not reasons:  # an IVF search: the lists nearest each query, filtered rows only (pre-filter)
            # doc (Vector indexes, IVF): "The index creation itself always uses EUCLIDEAN distance for training but
            # the distance used in your search function can be different": lists are Euclidean k-means clusters.
            centroids = self._lists(path, index)
            member = np.argmin(_distances(centroids, vectors, "EUCLIDEAN"), axis=1)
            probes = max(1, math.ceil(float(options.get("fraction_lists_to_search", 0.1)) * len(centroids)))
            nearest_lists = np.argsort(_distances(centroids, queries, "EUCLIDEAN"), axis=1)[:, :probes]
            # doc (Manage vector indexes): until the index is fully populated, searches "use the index for the
            # indexed rows and brute force for the rest, and don't miss unindexed rows": the last rows are unindexed.
            indexed = np.arange(base.num_rows) < round(index.get("coverage", 1.0) * base.num_rows)
            for row, lists in enumerate(nearest_lists):
                distances[row, indexed & ~np.isin(member, lists)] = np.inf
            sizes = self.tables[path]["column_bytes"]
            whole = sum(sizes[c] for c in (index["column"], *index["stored"]))
            index_bytes = math.ceil(whole * probes / len(centroids))
            stored = {"isQueryAccelerated": self.stored_columns_unused is None, "baseTable": _reference(path)}
            if self.stored_columns_unused is not None:
                stored["storedColumnsUnusedReasons"] = [self.stored_columns_unused]
                self.stored_columns_unused = None
        picked_query, picked_base, picked_distance = [], [], []
        for row in range(query.num_rows):
            order = [i for i in np.argsort(distances[row], kind="stable")[:top_k] if np.isfinite(distances[row, i])]
            picked_query += [row] * len(order)
            picked_base += order
            picked_distance += [float(distances[row, i]) for i in order]
        taken_base = base.take(pa.array(picked_base, pa.int64())).combine_chunks()
        taken_query = query.take(pa.array(picked_query, pa.int64())).combine_chunks()
        found = pa.table(
            {
                "base": _struct(taken_base),
                "query": _struct(taken_query),
                "distance": pa.array(picked_distance, type=pa.float64()),
            }
        )
        self.searches += 1
        name = f"vector_search_{self.searches}"
        self.duck.register(name, found)
        return name, "UNUSED" if reasons else "FULLY_USED", reasons, index_bytes, stored

    def _subquery(self, text: str, parameters: dict) -> pa.Table:
        used = {name: value for name, value in parameters.items() if re.search(rf"@{name}\b", text)}
        return self.duck.sql(sqlglot.transpile(text, read="bigquery", write="duckdb")[0], params=used).to_arrow_table()

    def _lists(self, path: str, index: dict) -> np.ndarray:
        """The IVF index's list centroids: Euclidean k-means (a few Lloyd steps) over the table's vectors."""
        if "centroids" not in index:
            rows = self.duck.execute(f"SELECT {index['column']} FROM {self._duck_name(path)}").fetchall()
            vectors = np.asarray([r[0] for r in rows], dtype=np.float64)
            count = max(1, round(math.sqrt(len(vectors))))
            centroids = vectors[np.linspace(0, len(vectors) - 1, count).astype(int)]
            for _ in range(5):
                member = np.argmin(_distances(centroids, vectors, "EUCLIDEAN"), axis=1)
                centroids = np.stack(
                    [vectors[member == i].mean(axis=0) if (member == i).any() else c for i, c in enumerate(centroids)]
                )
            index["centroids"] = centroids
        return index["centroids"]

    def _results(self, job_id: str, query: dict) -> dict:
        job = self.jobs[job_id]
        answer = {
            "kind": "bigquery#getQueryResultsResponse",
            "jobReference": job["resource"]["jobReference"],
            "jobComplete": True,
        }
        if "result" not in job:
            return answer
        table: pa.Table = job["result"]
        fields = []
        for f in table.schema:
            field_type, mode = _bigquery_type(f.type)
            fields.append({"name": f.name, "type": field_type, "mode": mode})
        answer.update(
            {
                "schema": {"fields": fields},
                "totalRows": str(table.num_rows),
                "totalBytesProcessed": job["resource"]["statistics"]["query"]["totalBytesProcessed"],
            }
        )
        # doc (jobs.getQueryResults, pageToken): "Page token, returned by a previous call, to request the next page
        # of results." A token is opaque: only one this server gave is accepted.
        token = query.get("pageToken")
        if token is not None and token not in self.page_tokens:
            raise ContractError(f"pageToken {token!r} was not returned by a previous call")
        start = self.page_tokens[token] if token is not None else int(query.get("startIndex") or 0)
        size = min(int(query.get("maxResults", _SERVER_PAGE)), _SERVER_PAGE)
        if size == 0:  # the client asks for the schema and the row count first
            return answer
        rows = table.slice(start, size).to_pylist()
        answer["rows"] = [{"f": [_cell(r[f["name"]], f["type"], f["mode"]) for f in fields]} for r in rows]
        if start + size < table.num_rows:
            token = uuid.uuid4().hex
            self.page_tokens[token] = start + size
            answer["pageToken"] = token
        return answer


def _path(table: exp.Table) -> str:
    return ".".join(p for p in (table.catalog, table.db, table.name) if p)


def _reference(path: str) -> dict:
    project, dataset, table = path.split(".")
    return {"projectId": project, "datasetId": dataset, "tableId": table}


def _struct(table: pa.Table) -> pa.StructArray:
    return pa.StructArray.from_arrays([c.chunk(0) for c in table.columns], table.column_names)


def _distances(rows: np.ndarray, queries: np.ndarray, distance: str) -> np.ndarray:
    """(queries, rows) distances as BigQuery defines them: COSINE 1 - cos, EUCLIDEAN L2, DOT_PRODUCT -dot."""
    dot = queries @ rows.T
    if distance == "EUCLIDEAN":  # |q|^2 + |r|^2 - 2 q.r, without a (queries, rows, length) array
        squared = (queries**2).sum(axis=1)[:, None] + (rows**2).sum(axis=1)[None, :] - 2.0 * dot
        return np.sqrt(np.maximum(squared, 0.0))
    if distance == "DOT_PRODUCT":
        return -dot
    norms = np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(rows, axis=1)[None, :]
    return 1.0 - dot / norms


def _error(status: int, reason: str, message: str) -> dict:
    detail = {"message": message, "domain": "global", "reason": reason}
    return {"error": {"code": status, "message": message, "errors": [detail]}}
