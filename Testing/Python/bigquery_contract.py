"""A loopback HTTP server that holds the BigQuery REST contract against what google-cloud-bigquery sends.

It answers the calls the library makes (tables.get and tables.patch, jobs.insert for queries, dry runs and
DDL, jobs.get, jobs.getQueryResults with paging, load jobs by multipart and resumable upload) and checks
each request against the REST reference: typed named parameters whose values parse as their types and
match the statement's ``@names``, GoogleSQL (not legacy), a Parquet load with list inference that
truncates its table, ``maximumBytesBilled`` as an int64 string. A request that breaks the contract is
answered 400 and recorded in ``violations``.

Queries really run: the statement is transpiled by sqlglot from BigQuery to DuckDB and run on the tables
the load jobs uploaded. ``VECTOR_SEARCH`` has no DuckDB equivalent; with no populated index BigQuery
compares every row, and this server does the same: the call becomes a table of its output columns
(``base`` and ``query`` structs, ``distance``), the ``top_k`` nearest base rows of each query row, and
``vectorSearchStatistics`` says the index was not used, as BigQuery does (``UNUSED``, with a reason).
Bytes are BigQuery's logical bytes (8 per FLOAT64/INT64 value, 2 + length per STRING) of the columns a
statement reads. Errors are injected with :meth:`fail` as BigQuery's error bodies.
"""

from __future__ import annotations

import http.server
import io
import json
import re
import threading
import uuid
from urllib.parse import parse_qs, urlparse

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import sqlglot
from sqlglot import exp

_TYPES = {"STRING", "FLOAT64", "INT64", "BOOL", "ARRAY"}
_SERVER_PAGE = 4  #: rows per getQueryResults page at most, to make the client page
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

    def _answer(self, method, route, groups, query, body, headers):
        if route == "tables" and method in ("GET", "PATCH"):
            path = ".".join(groups)
            if path not in self.tables:
                return 404, _error(404, "notFound", f"Not found: Table {groups[0]}:{groups[1]}.{groups[2]}"), None
            if method == "PATCH":
                change = json.loads(body)
                if set(change) - {"description", "tableReference", "etag"}:
                    raise ContractError(f"tables.patch sent fields it did not mean to change: {sorted(change)}")
                self.tables[path]["description"] = change["description"]
            return 200, self._table_resource(path), None
        if route == "jobs" and method == "POST":
            return 200, self._insert(json.loads(body)), None
        if route == "job" and method == "GET":
            return 200, self.jobs[groups[1]]["resource"], None
        if route == "queries" and method == "GET":
            return 200, self._results(groups[1], query), None
        if route == "upload":
            return self._upload(method, query, body, headers)
        raise ContractError(f"no such BigQuery v2 method: {method} {route}")

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
        if load.get("writeDisposition") != "WRITE_TRUNCATE":
            raise ContractError("a re-push must replace the table: writeDisposition WRITE_TRUNCATE")
        if not load.get("parquetOptions", {}).get("enableListInference"):
            raise ContractError("without parquetOptions.enableListInference the embedding loads as a STRUCT")
        destination = load["destinationTable"]
        path = f"{destination['projectId']}.{destination['datasetId']}.{destination['tableId']}"
        table = pq.read_table(io.BytesIO(data))
        fields = []
        for f in table.schema:
            field_type, mode = _bigquery_type(f.type)
            fields.append({"name": f.name, "type": field_type, "mode": mode})
        self.duck.execute(f'CREATE SCHEMA IF NOT EXISTS "{destination["projectId"]}"."{destination["datasetId"]}"')
        self.duck.register("upload", table)
        self.duck.execute(f"CREATE OR REPLACE TABLE {self._duck_name(path)} AS SELECT * FROM upload")
        self.duck.unregister("upload")
        column_bytes = self._column_bytes(path, fields)
        self.tables[path] = {
            "fields": fields,
            "rows": table.num_rows,
            "bytes": sum(column_bytes.values()),
            "column_bytes": column_bytes,
            "description": load.get("destinationTableProperties", {}).get("description"),
            "etag": uuid.uuid4().hex,
            "index": None,
        }
        return self._job(resource, "LOAD", statistics={"load": {"outputRows": str(table.num_rows)}})

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
    def _job(self, resource: dict, kind: str, statistics: dict | None = None, error: dict | None = None) -> dict:
        reference = resource.get("jobReference") or {}
        job_id = reference.get("jobId") or uuid.uuid4().hex
        if reference.get("projectId", self.project) != self.project:
            raise ContractError(f"jobReference.projectId {reference.get('projectId')} is not the billed project")
        job = {
            "kind": "bigquery#job",
            "id": f"{self.project}:US.{job_id}",
            "jobReference": {"projectId": self.project, "jobId": job_id, "location": "US"},
            "configuration": {**resource.get("configuration", {}), "jobType": kind},
            "status": {"state": "DONE"},
            "statistics": {"creationTime": "1", "startTime": "2", "endTime": "3", **(statistics or {})},
        }
        if error:
            job["status"]["errorResult"] = error
            job["status"]["errors"] = [error]
        self.jobs[job_id] = {"resource": job}
        return job

    def _insert(self, resource: dict) -> dict:
        configuration = resource.get("configuration", {})
        query = configuration.get("query")
        if query is None:
            raise ContractError("jobs.insert without a body upload must be a query job (configuration.query)")
        if query.get("useLegacySql") is not False:
            raise ContractError("queries must set useLegacySql: false (GoogleSQL)")
        if "maximumBytesBilled" in query and not re.fullmatch(r"\d+", str(query["maximumBytesBilled"])):
            raise ContractError(f"maximumBytesBilled is an int64 string, got {query['maximumBytesBilled']!r}")
        sql = query["query"]
        parameters = self._parameters(query)
        if sql.startswith("CREATE OR REPLACE VECTOR INDEX"):
            return self._create_index(resource, sql)
        tree = sqlglot.parse_one(sql, read="bigquery", error_level=sqlglot.ErrorLevel.RAISE)
        if not isinstance(tree, exp.Select):
            raise ContractError("a search statement must parse as a GoogleSQL SELECT")
        used = {p.name for p in tree.find_all(exp.Parameter)} | {p.name for p in tree.find_all(exp.Placeholder)}
        if used != set(parameters):
            raise ContractError(f"@names {sorted(used)} and parameters {sorted(parameters)} differ")
        path, read_bytes = self._bytes_read(tree)
        statistics = {"query": {"totalBytesProcessed": str(read_bytes), "statementType": "SELECT"}}
        statistics["totalBytesProcessed"] = str(read_bytes)
        if configuration.get("dryRun"):
            return self._job(resource, "QUERY", statistics)
        limit = query.get("maximumBytesBilled")
        if limit is not None and read_bytes > int(limit):
            error = {
                "reason": "bytesBilledLimitExceeded",
                "message": f"Query exceeded limit for bytes billed: {limit}. {read_bytes} or higher required.",
            }
            return self._job(resource, "QUERY", statistics, error)
        vector = _VECTOR_SEARCH.search(sql)
        if vector:
            statistics["query"]["vectorSearchStatistics"] = {
                "indexUsageMode": "UNUSED",
                "indexUnusedReasons": [
                    {"code": "INDEX_SUPPRESSED_BY_FUNCTION_OPTION"}
                    if self.tables[path]["index"] is None
                    else {"code": "PENDING_INDEX_CREATION", "message": "The vector index is still being built."}
                ],
            }
            sql = _VECTOR_SEARCH.sub(_brute_force, sql)
        statistics["query"]["totalBytesBilled"] = str(max(read_bytes, 10 * 2**20))
        duck = sqlglot.transpile(sql, read="bigquery", write="duckdb")[0]
        result = self.duck.sql(duck, params=parameters).to_arrow_table()
        job = self._job(resource, "QUERY", statistics)
        self.jobs[job["jobReference"]["jobId"]]["result"] = result
        return job

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
        tables = {".".join(p for p in (t.catalog, t.db, t.name) if p) for t in tree.find_all(exp.Table)}
        known = [t for t in tables if t in self.tables]
        if len(known) != 1:
            raise ContractError(f"a statement reads one reference table; found {sorted(tables)}")
        path = known[0]
        columns = self.tables[path]["column_bytes"]
        if any(isinstance(s, exp.Star) for s in tree.find_all(exp.Star)):
            return path, sum(columns.values())
        named = {c.name for c in tree.find_all(exp.Column)}
        return path, sum(size for name, size in columns.items() if name in named)

    def _create_index(self, resource: dict, sql: str) -> dict:
        shape = r"CREATE OR REPLACE VECTOR INDEX `(\w+)` ON `([\w.-]+)`\(`embedding`\)(?: STORING\(([^)]*)\))?"
        match = re.match(shape, sql)
        if match is None or match.group(2) not in self.tables:
            raise ContractError(f"CREATE VECTOR INDEX on an unknown table: {sql[:120]}")
        meta = self.tables[match.group(2)]
        if meta["bytes"] < 10 * 1000 * 1000:
            raise ContractError("an index on a table under 10 MB is never populated: it should not be created")
        lengths = self.duck.execute(f"SELECT DISTINCT len(embedding) FROM {self._duck_name(match.group(2))}").fetchall()
        if len(lengths) != 1:
            raise ContractError(f"a vector index needs one embedding length; the table has {sorted(lengths)}")
        stored = [c.strip().strip("`") for c in (match.group(3) or "").split(",") if c.strip()]
        if "embedding" in stored or not set(stored) <= {f["name"] for f in meta["fields"]}:
            raise ContractError(f"STORING names unknown or vector columns: {stored}")
        meta["index"] = {"name": match.group(1), "stored": stored}
        return self._job(resource, "QUERY", {"query": {"statementType": "CREATE_VECTOR_INDEX"}})

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
        start = int(query.get("pageToken") or query.get("startIndex") or 0)
        size = min(int(query.get("maxResults", _SERVER_PAGE)), _SERVER_PAGE)
        if size == 0:  # the client asks for the schema and the row count first
            return answer
        rows = table.slice(start, size).to_pylist()
        answer["rows"] = [{"f": [_cell(r[f["name"]], f["type"], f["mode"]) for f in fields]} for r in rows]
        if start + size < table.num_rows:
            answer["pageToken"] = str(start + size)
        return answer


def _brute_force(call: re.Match) -> str:
    """A VECTOR_SEARCH call as what it returns when it compares every row: per query row, the ``top_k``
    nearest base rows, as columns ``base``, ``query`` (structs of their rows) and ``distance``."""
    function = {"COSINE": "COSINE_DISTANCE", "EUCLIDEAN": "EUCLIDEAN_DISTANCE"}[call["distance"]]
    distance = f"{function}(b.`{call['column']}`, q.`{call['column']}`)"
    return (
        f"(SELECT b AS base, q AS query, {distance} AS distance FROM ({call['base']}) AS b "
        f"CROSS JOIN ({call['query']}) AS q "
        f"QUALIFY ROW_NUMBER() OVER (PARTITION BY q.query_row ORDER BY {distance}) <= {call['top_k']})"
    )


def _error(status: int, reason: str, message: str) -> dict:
    detail = {"message": message, "domain": "global", "reason": reason}
    return {"error": {"code": status, "message": message, "errors": [detail]}}
