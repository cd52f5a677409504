"""BigQuery statements of a reference: the nearest-patient search (``VECTOR_SEARCH`` on the vector index,
or an exact scan with ``COSINE_DISTANCE`` / ``EUCLIDEAN_DISTANCE``) and the vector index itself.

Statements are plain text plus typed parameters, built here without any client so that they can be
printed (``--print-sql``), parsed and run elsewhere (the tests run the exact scan on DuckDB). Every value a
user gives travels as a query parameter: the query vectors, the model, each filter value, excluded
patients. What BigQuery does not accept as a parameter is written as a checked literal: table and column
names (:mod:`.tables`), ``top_k``, ``k``, the distance type and the ``options`` JSON.

A search answers as :meth:`Reference.search` does: each patient's distance is that of its nearest pair of
(query lesion, reference lesion), in float64 (the exact scan's distance function, or ``VECTOR_SEARCH``'s
own ``distance`` column, which needs no embedding read back from the table); lesion ties go to the
smaller ``lesion_id``, then the first query lesion; patients are ordered by distance, then PatientID.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SimilarPatientsError
from ..references import schema
from ..search import filters
from ..search.correction import NEIGHBOURS
from ..search.distances import check_metric
from . import corrected
from .tables import TableName, column

#: local metric -> (VECTOR_SEARCH distance_type, exact distance function). BigQuery's default is EUCLIDEAN,
#: so the distance type is always written out.
DISTANCES = {"cosine": ("COSINE", "COSINE_DISTANCE"), "euclidean": ("EUCLIDEAN", "EUCLIDEAN_DISTANCE")}
INDEX_TYPES = ("IVF", "TREE_AH")
INDEX_NAME = "similar_patients_embedding"
#: Columns a statement adds to the reference's own (a pushed table must not have them).
ADDED_COLUMNS = (
    "query_row",
    "query_lesion",
    "distance",
    "patient_lesions",
    "nearest_rank",
    "unscaled",
    "passes",
    "patient_radius",
    "query_radius",
)
#: How many more lesions VECTOR_SEARCH returns when a filter can only be applied after it (post-filter).
POST_FILTER_OVERFETCH = 10
MAX_K = 10_000
_NUMERIC_TYPES = frozenset({"INT64", "INTEGER", "FLOAT64", "FLOAT", "NUMERIC", "BIGNUMERIC"})


@dataclass(frozen=True)
class Parameter:
    """One named query parameter: ``type`` is a BigQuery type (``STRING``, ``FLOAT64``, ``ARRAY<FLOAT64>``...)."""

    name: str
    type: str
    value: Any


@dataclass(frozen=True)
class Statement:
    """SQL text, its parameters, and what a reader of its results must know (e.g. post-filters)."""

    sql: str
    parameters: tuple[Parameter, ...] = ()
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """The statement and its parameters as ``--print-sql`` shows them (long vectors shortened)."""
        lines = [self.sql.rstrip() + ";", "-- parameters:"]
        for p in self.parameters:
            value = p.value
            if isinstance(value, list) and len(value) > 6:
                value = f"[{', '.join(f'{v!r}' for v in value[:3])}, … {len(value)} values]"
            lines.append(f"--   @{p.name} {p.type} = {value}")
        lines += [f"-- note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class SearchSpec:
    """What one search asks, independent of how the table is searched."""

    model: str
    queries: np.ndarray | None  #: (q, D) float64; None with ``patient``
    k: int
    metric: str = "cosine"
    where: filters.Filters = None
    exclude: tuple = ()
    patient: str | None = None  #: search with this reference patient's lesions, read in the same statement
    #: the corrected space (:mod:`.corrected`): ``queries`` are then ``[t̂, 1]`` rows, ``patient`` None
    corrected: bool = False
    #: the query's radius in the corrected space (a reference patient's); None: measured by the statement
    query_radius: float | None = None


def distance_of(metric: str) -> tuple[str, str]:
    """(VECTOR_SEARCH distance_type, exact function) for a library metric; ``dot`` has no exact function."""
    check_metric(metric)
    if metric not in DISTANCES:
        raise SimilarPatientsError(
            f"BigQuery search supports the cosine and euclidean metrics, not '{metric}'; search with --metric cosine "
            f"(or euclidean), or search a local copy of the reference for '{metric}'."
        )
    return DISTANCES[metric]


def exact_search(table: TableName, spec: SearchSpec, column_types: Mapping[str, str]) -> Statement:
    """Every lesion of the model compared (no index): the answer the local exact scan gives."""
    builder = _Builder(spec, column_types, table)
    if spec.corrected:
        return _exact_corrected(table, builder)
    conditions = builder.conditions(builder.terms)
    _, function = distance_of(spec.metric)
    candidates = f"{builder.rows()} WHERE {' AND '.join([builder.model_condition, *conditions])}"
    pairs = (
        f"SELECT c.* EXCEPT ({column(schema.EMBEDDING)}), q.* EXCEPT ({column(schema.EMBEDDING)}), "
        f"{function}(c.{column(schema.EMBEDDING)}, q.{column(schema.EMBEDDING)}) AS distance\n"
        f"  FROM ({candidates}) AS c\n  CROSS JOIN ({builder.query_table()}) AS q"
    )
    return builder.statement(table, pairs)


def _unscaled(base: str, query: str) -> str:
    """The z-scored cosine distance ``d`` of an augmented row and a ``[t̂, 1]`` query (:mod:`.corrected`)."""
    return f"2 * COSINE_DISTANCE({base}, {query}) - 2"


def _exact_corrected(table: TableName, builder: _Builder) -> Statement:
    """The exact scan in the corrected space: every lesion of the model paired with the query lesions once;
    the filters mark the pairs (the query's radius is measured over all of them, as locally) and the
    corrected distance divides ``d`` by ``sqrt(r_p · r_q)``."""
    vector, radius = column(corrected.COLUMN), column(corrected.RADIUS)
    passes = " AND ".join(builder.conditions(builder.terms, qualifier="c.")) or "TRUE"
    pairs = (
        f"SELECT c.* EXCEPT ({vector}, {radius}), q.* EXCEPT ({vector}), "
        f"c.{radius} AS patient_radius,\n    {_unscaled(f'c.{vector}', f'q.{vector}')} AS unscaled, "
        f"{passes} AS passes\n"
        f"  FROM ({builder.rows()} WHERE {builder.model_condition}) AS c\n"
        f"  CROSS JOIN ({builder.query_table()}) AS q"
    )
    prefix = [("pairs", pairs), ("radius", builder.radius("pairs"))]
    found = (
        "SELECT * EXCEPT (unscaled, passes, patient_radius),\n"
        "    unscaled / SQRT(patient_radius * (SELECT query_radius FROM radius)) AS distance\n"
        "  FROM pairs WHERE passes"
    )
    return builder.statement(table, found, prefix=prefix)


def vector_search(
    table: TableName,
    spec: SearchSpec,
    column_types: Mapping[str, str],
    *,
    stored: Collection[str],
    max_lesions: int,
    fraction_lists_to_search: float | None = None,
    brute_force: bool = False,
) -> Statement:
    """``VECTOR_SEARCH`` in its batch form, the query vectors as parameters in the query table; its own
    ``distance`` is the one reported, and only the columns the index stores are selected from ``base``
    (every column but the embedding), so an indexed search need not read the embeddings back.
    ``brute_force``: ``use_brute_force`` (every row compared, the index ignored: the exact answer an
    approximate one is measured against).

    Filters on ``stored`` columns (those the index stores) go into the base table query and are applied
    before the search; others can only be applied to what the search returned (post-filters), so the
    search over-fetches and the statement says that fewer than k patients may come back. ``max_lesions``
    (the most lesions one patient has) sizes ``top_k`` so that k patients are reached.

    In the corrected space it searches the augmented column with ``DOT_PRODUCT``, whose distance is the
    corrected one but for the query's radius, by which it is divided; a new query's radius is measured by
    the same statement over every lesion of the model (one scan of that column)."""
    builder = _Builder(spec, column_types, table)
    if spec.corrected:
        distance_type, searched = "DOT_PRODUCT", corrected.COLUMN
    else:
        (distance_type, _), searched = distance_of(spec.metric), schema.EMBEDDING
    stored = set(stored)
    before = [t for t in builder.terms if t.field in stored]
    after = [t for t in builder.terms if t.field not in stored]
    base_conditions = [builder.model_condition, *builder.conditions(before)]
    post_conditions = builder.conditions(after, qualifier="base.")  # VECTOR_SEARCH returns base, query, distance
    # excluded patients are dropped after the search: top_k leaves room for all their lesions
    top_k = (spec.k + len(spec.exclude)) * max(1, int(max_lesions))
    notes = []
    if after:
        top_k *= POST_FILTER_OVERFETCH
        fields = sorted({t.field for t in after})
        notes.append(
            f"the vector index does not store {', '.join(fields)}: those filters apply after the search "
            f"(post-filter), which fetches {top_k} lesions per query lesion and can still return fewer than "
            f"{spec.k} patients; store the columns in the index (push with --create-index) or search --method exact"
        )
    options = _options(fraction_lists_to_search, brute_force)
    vectors = ", ".join(column(c) for c in ((searched, corrected.RADIUS) if spec.corrected else (searched,)))
    prefix = []
    distance = "distance"
    if spec.corrected:
        prefix.append(("radius", builder.radius()))
        distance = "distance / SQRT((SELECT query_radius FROM radius)) AS distance"
    found = (
        f"SELECT base.* EXCEPT ({vectors}), query.* EXCEPT ({column(searched)}), {distance}\n"
        f"  FROM VECTOR_SEARCH(\n"
        f"    ({builder.rows()} WHERE {' AND '.join(base_conditions)}),\n"
        f"    '{searched}',\n"
        f"    ({builder.query_table()}),\n"
        f"    '{searched}',\n"
        f"    top_k => {_literal_int(top_k, 'top_k')},\n"
        f"    distance_type => '{distance_type}'{options})"
    )
    if post_conditions:
        found += f"\n  WHERE {' AND '.join(post_conditions)}"
    return builder.statement(table, found, tuple(notes), prefix)


def patient_lesions(table: TableName, model: str, patient: str) -> Statement:
    """How many lesions ``patient`` has in ``model``: two short text columns read (and, the table being
    clustered by them, only that patient's blocks), so an unknown patient is refused before a search bills
    the embeddings."""
    sql = (
        f"SELECT COUNT(*) AS lesions FROM {table.sql}\n"
        f"WHERE {column(schema.MODEL)} = @model AND {column(schema.PATIENT)} = @patient"
    )
    return Statement(sql, (Parameter("model", "STRING", str(model)), Parameter("patient", "STRING", str(patient))))


def patient_vectors(table: TableName, model: str, patient: str) -> Statement:
    """A reference patient's lesions in the corrected space (lesion id, augmented vector, radius), in lesion
    order: the table being clustered by (model, PatientID), BigQuery reads that patient's blocks only."""
    sql = (
        f"SELECT {column(schema.LESION)}, {column(corrected.COLUMN)}, {column(corrected.RADIUS)} FROM {table.sql}\n"
        f"WHERE {column(schema.MODEL)} = @model AND {column(schema.PATIENT)} = @patient\n"
        f"ORDER BY {column(schema.LESION)}"
    )
    return Statement(sql, (Parameter("model", "STRING", str(model)), Parameter("patient", "STRING", str(patient))))


def statistics(table: TableName, model: str) -> Statement:
    """One model's centre and scale from the statistics table beside a pushed one (:mod:`.corrected`)."""
    centre, scale = (column(c) for c in corrected.STATISTICS_COLUMNS[1:])
    sql = f"SELECT {centre}, {scale} FROM {table.sql} WHERE {column('model')} = @model"
    return Statement(sql, (Parameter("model", "STRING", str(model)),))


def index_statement(
    table: TableName,
    stored: Sequence[str],
    index_type: str = "IVF",
    indexed: str = schema.EMBEDDING,
    distance: str = "COSINE",
) -> Statement:
    """``CREATE OR REPLACE VECTOR INDEX`` on ``indexed`` (the embedding, cosine; or the corrected space's
    column, ``DOT_PRODUCT``), ``STORING`` the columns filters use."""
    if index_type not in INDEX_TYPES:
        raise SimilarPatientsError(f"Unknown vector index type '{index_type}'; choose {' or '.join(INDEX_TYPES)}.")
    storing = f" STORING({', '.join(column(c) for c in stored)})" if stored else ""
    sql = (
        f"CREATE OR REPLACE VECTOR INDEX {column(INDEX_NAME)} ON {table.sql}({column(indexed)}){storing}\n"
        f"OPTIONS(index_type = '{index_type}', distance_type = '{distance}')"
    )
    return Statement(sql)


def drop_index_statement(table: TableName) -> Statement:
    """``DROP VECTOR INDEX IF EXISTS``: whether ``CREATE OR REPLACE TABLE`` keeps a table's index is not
    documented, so a push without an index drops any it may have kept (billed as storage, never used)."""
    return Statement(f"DROP VECTOR INDEX IF EXISTS {column(INDEX_NAME)} ON {table.sql}")


def _options(fraction_lists_to_search: float | None, brute_force: bool = False) -> str:
    """The ``options`` argument: a JSON literal of checked numbers only. ``use_brute_force`` takes no
    ``fraction_lists_to_search`` beside it (nothing is left to fraction)."""
    if brute_force:
        return f",\n    options => '{json.dumps({'use_brute_force': True})}'"
    fraction = check_fraction_lists_to_search(fraction_lists_to_search)
    if fraction is None:
        return ""
    return f",\n    options => '{json.dumps({'fraction_lists_to_search': fraction})}'"


def check_fraction_lists_to_search(value) -> float | None:
    """The share of an IVF index's lists a search reads, as BigQuery checks it: "The
    fraction_lists_to_search value must be in the range 0.0 to 1.0, exclusive" (1 would be every list:
    ``--method exact``)."""
    if value is None:
        return None
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = math.nan
    if isinstance(value, bool) or not (math.isfinite(fraction) and 0.0 < fraction < 1.0):
        raise SimilarPatientsError(
            f"fraction_lists_to_search must be a number between 0 and 1, both excluded (the share of the index's "
            f"lists searched; BigQuery refuses 0 and 1); got {value!r}. To compare every lesion, search --method exact."
        )
    return fraction


def _literal_int(value, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= int(value) <= 10**7:
        raise SimilarPatientsError(f"{what} must be a whole number from 1 to 10,000,000; got {value!r}.")
    return str(int(value))


class _Builder:
    """The parts every search statement shares: parameters, filter conditions, the query table, roll-up."""

    def __init__(self, spec: SearchSpec, column_types: Mapping[str, str], table: TableName):
        if isinstance(spec.k, bool) or not isinstance(spec.k, (int, np.integer)) or not 1 <= spec.k <= MAX_K:
            raise SimilarPatientsError(f"k must be a whole number from 1 to {MAX_K:,}; got {spec.k!r}.")
        self.spec = spec
        self.table = table
        self.types = {name: str(t).upper() for name, t in column_types.items()}
        self.parameters: list[Parameter] = [Parameter("model", "STRING", str(spec.model))]
        self.model_condition = f"{column(schema.MODEL)} = @model"
        self.terms = filters.terms(spec.where)
        for term in self.terms:
            if term.field not in self.types or term.field == schema.EMBEDDING:
                fields = ", ".join(c for c in self.types if c != schema.EMBEDDING)
                raise SimilarPatientsError(f"No field '{term.field}' to filter on; this reference has: {fields}.")
        self.vector = corrected.COLUMN if spec.corrected else schema.EMBEDDING
        self._query_table: str | None = None
        self.exclude_condition = None
        if spec.exclude:
            self.parameters.append(Parameter("exclude", "ARRAY<STRING>", [str(p) for p in spec.exclude]))
            self.exclude_condition = f"{column(schema.PATIENT)} NOT IN UNNEST(@exclude)"

    def rows(self) -> str:
        """``SELECT * FROM`` the table, but the vector columns of the other space: BigQuery bills the columns
        a query reads, and a search reads one space's vectors."""
        other = (schema.EMBEDDING,) if self.spec.corrected else (corrected.COLUMN, corrected.RADIUS)
        unread = [column(c) for c in other if c in self.types]
        return (
            f"SELECT * EXCEPT ({', '.join(unread)}) FROM {self.table.sql}"
            if unread
            else f"SELECT * FROM {self.table.sql}"
        )

    def add(self, type_: str, value, name: str | None = None) -> str:
        name = name or f"filter_{sum(p.name.startswith('filter_') for p in self.parameters)}"
        self.parameters.append(Parameter(name, type_, value))
        return f"@{name}"

    def conditions(self, terms: Sequence[filters.FilterTerm], qualifier: str = "") -> list[str]:
        """SQL conditions equal to :func:`filters.row_mask` on the same terms (a missing value matches only
        ``!=``), each value a parameter; ``qualifier`` prefixes the column names."""
        return [self._condition(term, qualifier) for term in terms]

    def _condition(self, term: filters.FilterTerm, qualifier: str) -> str:
        name = qualifier + column(term.field)
        numeric = self.types[term.field] in _NUMERIC_TYPES
        if term.operator in ("=", "!="):
            if numeric:
                values = []
                for value in term.value:
                    try:
                        values.append(float(value))
                    except (TypeError, ValueError):
                        raise SimilarPatientsError(
                            f"'{term.field}' holds numbers; '{value}' is not one. Write {term.field}=NUMBER, or "
                            f"{term.field}>=NUMBER."
                        ) from None
                found = f"COALESCE(CAST({name} AS FLOAT64) IN UNNEST({self.add('ARRAY<FLOAT64>', values)}), FALSE)"
            else:
                values = [str(v).strip() for v in term.value]
                found = f"COALESCE(TRIM(CAST({name} AS STRING)) IN UNNEST({self.add('ARRAY<STRING>', values)}), FALSE)"
            return found if term.operator == "=" else f"NOT {found}"
        if term.operator == "~":
            value = self.add("STRING", str(term.value).lower())
            return f"COALESCE(STRPOS(LOWER(CAST({name} AS STRING)), {value}) > 0, FALSE)"
        try:
            bound = float(term.value)
        except ValueError:
            raise SimilarPatientsError(f"'{term.value}' is not a number; {term.operator} compares numbers.") from None
        number = f"CAST({name} AS FLOAT64)" if numeric else f"SAFE_CAST(TRIM(CAST({name} AS STRING)) AS FLOAT64)"
        return f"COALESCE({number} {term.operator} {self.add('FLOAT64', bound)}, FALSE)"

    def query_table(self) -> str:
        """The query lesions as a one-row-per-vector table: ``(SELECT 0 AS query_row, @query AS embedding)``,
        or a reference patient's lesions read from the table (with their ``query_lesion`` ids), which spares
        a second scan of the table to fetch them. Written once (its parameters too), however often used."""
        if self._query_table is None:
            self._query_table = self._write_query_table()
        return self._query_table

    def radius(self, pairs: str | None = None) -> str:
        """The ``radius`` CTE: the query's radius in the corrected space, a reference patient's (a parameter),
        or its distance to its ``NEIGHBOURS``-th nearest patient in the z-scored space over every lesion of
        the model (``pairs``: a CTE holding them with ``unscaled``; else the table and the query table),
        one where the model has fewer patients, kept above zero, 1 where there are none (as locally)."""
        if self.spec.query_radius is not None:
            return f"SELECT {self.add('FLOAT64', float(self.spec.query_radius), 'query_radius')} AS query_radius"
        patient = column(schema.PATIENT)
        if pairs is None:
            vector = column(corrected.COLUMN)
            pairs = (
                f"(SELECT c.{patient}, {_unscaled(f'c.{vector}', f'q.{vector}')} AS unscaled\n"
                f"      FROM (SELECT {patient}, {vector} FROM {self.table.sql} WHERE {self.model_condition}) AS c\n"
                f"      CROSS JOIN ({self.query_table()}) AS q)"
            )
        return (
            f"SELECT GREATEST(COALESCE(MAX(unscaled), 1.0), 1e-12) AS query_radius FROM (\n"
            f"    SELECT MIN(unscaled) AS unscaled FROM {pairs}\n"
            f"    GROUP BY {patient} ORDER BY unscaled LIMIT {NEIGHBOURS}\n  )"
        )

    def _write_query_table(self) -> str:
        if self.spec.patient is not None:
            self.parameters.append(Parameter("patient", "STRING", str(self.spec.patient)))
            lesion, patient = column(schema.LESION), column(schema.PATIENT)
            return (
                f"SELECT ROW_NUMBER() OVER (ORDER BY {lesion}) - 1 AS query_row, {lesion} AS query_lesion, "
                f"{column(schema.EMBEDDING)} FROM {self.table.sql}\n"
                f"    WHERE {self.model_condition} AND {patient} = @patient"
            )
        queries = np.asarray(self.spec.queries, dtype=np.float64)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or not len(queries) or not np.isfinite(queries).all():
            raise SimilarPatientsError("The query must be one finite embedding or a (lesions × length) array of them.")
        rows = []
        for i, vector in enumerate(queries):
            name = "query" if len(queries) == 1 else f"query_{i}"
            self.parameters.append(Parameter(name, "ARRAY<FLOAT64>", [float(v) for v in vector]))
            rows.append(f"SELECT {i} AS query_row, @{name} AS {column(self.vector)}")
        return " UNION ALL ".join(rows)

    def statement(self, table: TableName, found: str, notes: tuple = (), prefix: Sequence = ()) -> Statement:
        """Lesion matches (``found``: lesion columns, ``query_row``, ``distance``) rolled up to patients:
        each patient's nearest pair, the k nearest patients, and each one's lesion count in the model. Each
        CTE is read once (BigQuery may evaluate a CTE once per reference), but ``prefix``'s (name, query)
        CTEs, which come first; the counts read two small columns."""
        patient, lesion = column(schema.PATIENT), column(schema.LESION)
        exclude = f"\n  WHERE {self.exclude_condition}" if self.exclude_condition else ""
        first = "".join(f"{name} AS (\n  {query}\n),\n" for name, query in prefix)
        sql = (
            f"WITH {first}found AS (\n  {found}\n),\n"
            f"nearest AS (\n"
            f"  SELECT * EXCEPT (nearest_rank) FROM (\n"
            f"    SELECT *, ROW_NUMBER() OVER (PARTITION BY {patient} ORDER BY distance, {lesion}, query_row) "
            f"AS nearest_rank\n    FROM found{exclude.replace(chr(10), chr(10) + '  ')}\n  )\n"
            f"  WHERE nearest_rank = 1\n"
            f"  ORDER BY distance, {patient}\n"
            f"  LIMIT {self.spec.k}\n),\n"
            f"counts AS (\n"
            f"  SELECT {patient}, COUNT(*) AS patient_lesions FROM {table.sql}\n"
            f"  WHERE {self.model_condition}\n"
            f"  GROUP BY {patient}\n)\n"
            f"SELECT nearest.*, counts.patient_lesions\n"
            f"FROM nearest JOIN counts USING ({patient})\n"
            f"ORDER BY distance, {patient}"
        )
        return Statement(sql, tuple(self.parameters), notes)
