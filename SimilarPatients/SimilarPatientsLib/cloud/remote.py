"""A reference held in BigQuery, searched with the same call as a local :class:`Reference`.

``search`` builds one statement (:mod:`.sql`), runs it with its parameters, and returns the hit table of
``references.hits``: only the k hit rows come back from BigQuery, so the work here is proportional to k.
The table's description, written by :func:`.push.push`, says its models, recipes and fields; reading it
is a metadata call that bills nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import SimilarPatientsError
from ..progress import ProgressCallback, report
from ..references import schema
from ..references.hits import hit_table
from ..references.reference import ReferenceManifest, check_search, query_lesion_names
from ..search import filters
from ..search.correction import CORRECTED, RAW, resolved_space
from ..search.nearest import LesionMatch, check_queries
from . import client as bq
from . import corrected, sql
from .push import DESCRIPTION_KEY
from .tables import TableName, parse_table

log = logging.getLogger(__name__)


class BigQueryReference(ReferenceManifest):
    """A reference in a BigQuery table (pushed with ``references push NAME --bigquery TABLE``).

    ``maximum_bytes_billed`` stops any query that would bill more (None: no limit);
    ``fraction_lists_to_search`` is passed to ``VECTOR_SEARCH`` (None: BigQuery's default);
    ``check_recall``: when the index is used, run the same search comparing every row too (billed twice)
    and report the share of its patients the index found, in ``index_recall``.

    ``VECTOR_SEARCH`` runs only in the table's own project (BigQuery: "The project that runs the query
    containing VECTOR_SEARCH must match the project that contains the base table"): when the client bills
    another project, ``auto`` searches exactly and says why, and ``approximate`` and ``check_recall`` are
    refused before anything runs."""

    #: The most patients one search may ask for (a fused search asks each model for its depth).
    max_k = sql.MAX_K

    def __init__(
        self,
        table: TableName | str,
        client=None,
        *,
        project: str | None = None,
        maximum_bytes_billed: int | None = bq.DEFAULT_MAXIMUM_BYTES_BILLED,
        fraction_lists_to_search: float | None = None,
        check_recall: bool = False,
    ):
        self.check_recall = check_recall
        self.table = parse_table(table) if isinstance(table, str) else table
        self.maximum_bytes_billed = bq.check_maximum_bytes_billed(maximum_bytes_billed)
        self.client = client or bq.connect(self.table, project)
        sql.check_fraction_lists_to_search(fraction_lists_to_search)
        self.fraction_lists_to_search = fraction_lists_to_search
        #: the project the client's jobs run in (and are billed to)
        self.job_project = getattr(self.client, "project", None) or self.table.project
        if check_recall and not self.in_table_project:
            raise SimilarPatientsError(self._other_project("--check-recall measures the index's recall with two"))
        with bq.translated(self.table):
            found = self.client.get_table(self.table.path)
        self.column_types = {f.name: ("ARRAY" if f.mode == "REPEATED" else f.field_type) for f in found.schema}
        self.manifest = _manifest(found.description, self.table)
        self.name = self.table.url
        self._statistics: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._patients: dict[tuple, tuple[np.ndarray, list, float]] = {}

    def __repr__(self) -> str:
        return f"BigQueryReference({self.name!r}, models={self.models})"

    @property
    def in_table_project(self) -> bool:
        """Whether searches run in the table's project, the only one where ``VECTOR_SEARCH`` runs."""
        return self.job_project == self.table.project

    def _other_project(self, what: str) -> str:
        return (
            f"{what} VECTOR_SEARCH statements, and BigQuery runs VECTOR_SEARCH only in the project that holds the "
            f"table ({self.table.project}); these searches run in {self.job_project}. Run them in the table's "
            f"project (--billing-project {self.table.project}, with BigQuery Job User there), or search with "
            f"--method exact, which any project can run."
        )

    @property
    def index(self) -> dict | None:
        """The vector index the push created (name, type, distance, stored columns), or None."""
        return self.manifest.get("index")

    def space_of(self, model: str, space: str = CORRECTED, metric: str = "cosine") -> tuple[str, str | None]:
        """The space a search of ``model`` asking for ``space`` runs in here, and why it is not the one asked
        (None when it is): a table pushed before tables carried the corrected space, or another metric than
        the one whose corrected space a push stores, is searched in ``raw``."""
        if resolved_space(space, "cosine" if metric == "dot" else metric) == RAW:
            return RAW, None
        if corrected.space_of(self.manifest, model) is None:
            return RAW, (
                "searched in the raw space (plain distance on the stored vectors): this table was pushed before "
                "BigQuery tables carried the corrected space, so a few patients may be near every query (see "
                f"docs/search.md); push the reference again (`references push NAME --bigquery {self.table.path}`) "
                "to search it hub-free"
            )
        if metric != corrected.METRIC:
            return RAW, (
                f"searched in the raw space: a BigQuery table carries the corrected space for the "
                f"{corrected.METRIC} metric only, not {metric}; search with --metric {corrected.METRIC}, or a local "
                "copy of the reference, for the corrected space"
            )
        return CORRECTED, None

    def statement(
        self,
        model: str,
        embeddings: np.ndarray | None = None,
        patient: str | None = None,
        k: int = 5,
        metric: str = "cosine",
        where: filters.Filters = None,
        exclude: Sequence[str] = (),
        method: str = "auto",
        brute_force: bool = False,
        space: str = CORRECTED,
    ) -> sql.Statement:
        """The statement :meth:`search` runs (``--print-sql`` prints it, a dry run prices it): nearest to
        ``embeddings``, or to a reference ``patient``'s lesions, read by the statement itself.
        ``brute_force``: the same ``VECTOR_SEARCH`` comparing every row (what an approximate one is measured
        against). In the corrected space the query is stated in it (:mod:`.corrected`): embeddings z-scored
        with the table's statistics (read once from the statistics table), a patient's lesions and radius
        read first by a short query (the table is clustered by patient: a few blocks)."""
        check_search(embeddings, patient, method)
        model = self.model_name(model)
        info = self.model_info(model)
        searched, why = self.space_of(model, space, metric)
        queries = None if embeddings is None else check_queries(info.dim, embeddings, metric)
        spec = sql.SearchSpec(model, queries, k, metric, where, tuple(str(p) for p in exclude), patient)
        if searched == CORRECTED:
            radius = None
            if patient is not None:
                unit, _, radius = self._patient_vectors(model, str(patient))
            else:
                unit = corrected.unit_queries(*self._space_statistics(model), queries)
            spec = dataclasses.replace(
                spec, queries=corrected.query_vectors(unit), patient=None, corrected=True, query_radius=radius
            )
        statement = self._statement(model, spec, method, brute_force)
        return dataclasses.replace(statement, notes=(*statement.notes, why)) if why else statement

    def _statement(self, model: str, spec: sql.SearchSpec, method: str, brute_force: bool) -> sql.Statement:
        if method == "approximate" and not self.in_table_project:
            raise SimilarPatientsError(self._other_project("--method approximate searches with"))
        indexed = (self.index or {}).get("column", schema.EMBEDDING)
        serves = self.index is not None and indexed == (corrected.COLUMN if spec.corrected else schema.EMBEDDING)
        if method == "exact" or (method == "auto" and not serves):
            exact = sql.exact_search(self.table, spec, self.column_types)
            if method == "auto" and self.index is not None:
                other = RAW if spec.corrected else CORRECTED
                why = f"search: exact: the table's vector index is on the {other} space's vectors, not this search's"
                exact = dataclasses.replace(exact, notes=(*exact.notes, why))
            return exact
        if method == "auto" and not self.in_table_project:
            exact = sql.exact_search(self.table, spec, self.column_types)
            why = (
                f"search: exact, not with the table's vector index: this search runs in {self.job_project}, and "
                f"BigQuery runs VECTOR_SEARCH only in the table's project ({self.table.project}); run it there "
                f"(--billing-project {self.table.project}) to use the index"
            )
            return dataclasses.replace(exact, notes=(*exact.notes, why))
        # without an index VECTOR_SEARCH compares every row, so every filter applies before it
        stored = self.index["stored"] if serves else list(self.column_types)
        max_lesions = int(self.manifest["models"][model].get("max_lesions", 1))
        return sql.vector_search(
            self.table,
            spec,
            self.column_types,
            stored=stored,
            max_lesions=max_lesions,
            fraction_lists_to_search=self.fraction_lists_to_search,
            brute_force=brute_force,
        )

    def _space_statistics(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        """The centre and scale that z-score a query in ``model``'s corrected space, read once from the
        statistics table and checked against the digest the table's description records."""
        if model not in self._statistics:
            entry = self.manifest["corrected"]
            beside = self.table.beside(entry["table"])
            result = bq.run(self.client, self.table, sql.statistics(beside, model), self.maximum_bytes_billed)
            rows = result.rows
            found = None
            if len(rows) == 1:
                centre, scale = (np.asarray(rows[c].iloc[0], dtype=np.float64) for c in ("centre", "scale"))
                if corrected.digest(centre, scale) == entry["models"][model]["digest"]:
                    found = centre, scale
            if found is None:
                raise SimilarPatientsError(
                    f"The statistics of {self.table.path}'s corrected space ({beside.path}, model {model}) are not "
                    f"the ones its description records: the table is being pushed again, or its statistics table was "
                    f"changed. Search again once the push is done, or push the reference again; --space raw searches "
                    f"without them."
                )
            self._statistics[model] = found
        return self._statistics[model]

    def _patient_vectors(self, model: str, patient: str) -> tuple[np.ndarray, list, float]:
        """A reference patient's unit z-scored vectors, lesion ids and radius (refused when it has none here)."""
        key = (model, patient)
        if key not in self._patients:
            statement = sql.patient_vectors(self.table, model, patient)
            rows = bq.run(self.client, self.table, statement, self.maximum_bytes_billed).rows
            if not len(rows):
                self._refuse_patient(model, patient)
            augmented = np.asarray([np.asarray(v, dtype=np.float64) for v in rows[corrected.COLUMN]])
            radius = float(rows[corrected.RADIUS].iloc[0])
            self._patients = {
                key: (corrected.unit_from_augmented(augmented), list(rows[schema.LESION].astype(str)), radius)
            }
        return self._patients[key]

    def dry_run(self, statement: sql.Statement) -> int:
        """The bytes ``statement`` would scan; nothing is run or billed."""
        return bq.dry_run(self.client, self.table, statement)

    def search(
        self,
        model: str,
        embeddings: np.ndarray | None = None,
        patient: str | None = None,
        k: int = 5,
        metric: str = "cosine",
        where: filters.Filters = None,
        exclude: Sequence[str] = (),
        method: str = "auto",
        progress: ProgressCallback | None = None,
        query_lesions: Sequence[str] | None = None,
        space: str = CORRECTED,
    ) -> pd.DataFrame:
        """As :meth:`Reference.search`: in the ``corrected`` space (hub-free, :mod:`.corrected`) where the table
        carries it, else in ``raw`` with a note saying why (the ``space`` column says which answered). The
        hits' ``attrs["notes"]`` say what BigQuery billed, whether the index was used (the hits' ``search``
        column then says ``approximate``), and what post-filters or the index may have cut. In the raw space a
        ``patient``'s lesions are read by the search statement itself (one scan of the table, not two), after
        a check that bills two text columns: an unknown patient is refused before the embeddings are billed;
        in the corrected space they are read first, which is that check. With ``check_recall`` the index's
        recall is measured against the same search with ``use_brute_force``."""
        model = self.model_name(model)
        searched, _ = self.space_of(model, space, metric)
        if patient is not None and searched == RAW:
            self._check_patient(model, str(patient))
        statement = self.statement(model, embeddings, patient, k, metric, where, exclude, method, space=space)
        report(progress, 0, 1, f"searching {self.table.path} in BigQuery")
        result = bq.run(self.client, self.table, statement, self.maximum_bytes_billed)
        rows = result.rows
        matches = [
            LesionMatch(str(p), float(d), i, int(q))
            for i, (p, d, q) in enumerate(zip(rows[schema.PATIENT], rows["distance"], rows["query_row"]))
        ]
        counts = dict(zip(rows[schema.PATIENT].astype(str), rows["patient_lesions"].astype(int)))
        if patient is not None and searched == CORRECTED:  # read before the search, in query row order
            query_lesions = dict(enumerate(self._patient_vectors(model, str(patient))[1]))
        elif patient is not None:  # the patient's lesion ids came back with the hits, by query row
            query_lesions = dict(zip(rows["query_row"].astype(int), rows["query_lesion"].astype(str)))
        else:
            query_lesions = query_lesion_names(embeddings, query_lesions)
        approximate = bq.is_vector_search(statement) and result.index_usage not in (None, "UNUSED")
        recall = float("nan") if approximate else None  # BigQuery does not measure an index's recall
        exact_patients = None
        if approximate and self.check_recall:
            brute = self.statement(
                model, embeddings, patient, k, metric, where, exclude, method, brute_force=True, space=space
            )
            exact = bq.run(self.client, self.table, brute, self.maximum_bytes_billed)
            exact_patients = list(exact.rows[schema.PATIENT])
            found = set(rows[schema.PATIENT].astype(str))
            recall = len(found & {str(p) for p in exact_patients}) / max(1, len(exact_patients))
        hits = hit_table(matches, rows, counts, metric, query_lesions, self.label_fields, recall, searched)
        measured = recall if exact_patients is not None else None
        hits.attrs["notes"] = self._notes(statement, result, k, len(hits), patient, approximate, measured)
        report(progress, 1, 1, f"searching {self.table.path} in BigQuery")
        return hits

    def _check_patient(self, model: str, patient: str) -> None:
        """Refuse a patient without lesions of ``model`` here, as the local store does (a cheap query)."""
        counted = bq.run(self.client, self.table, sql.patient_lesions(self.table, model, patient), None)
        if int(counted.rows["lesions"].iloc[0]) == 0:
            self._refuse_patient(model, patient)

    def _refuse_patient(self, model: str, patient: str) -> None:
        info = self.manifest["models"][model]
        raise SimilarPatientsError(
            f"Patient {patient} is not in reference '{self.name}' for model '{model}' "
            f"({info.get('patients', 'its')} patients there)."
        )

    def _notes(
        self,
        statement: sql.Statement,
        result: bq.QueryResult,
        k: int,
        found: int,
        patient: str | None,
        approximate: bool = False,
        recall: float | None = None,
    ) -> list[str]:
        gib = (result.bytes_billed or 0) / 2**30
        notes = [f"BigQuery billed {gib:.3f} GiB ({result.bytes_processed or 0:,} bytes processed)"]
        if result.cache_hit:
            notes.append("BigQuery answered from its query cache (the same search, unchanged table): nothing billed")
        if approximate:
            measured = (
                "recall not measured (--check-recall measures it against the same search comparing every row)"
                if recall is None
                else f"recall {recall:.3f} of the {k} patients the same search finds comparing every row"
            )
            notes.append(
                f"search: approximate (BigQuery's vector index, {result.index_usage}); {measured}; --method exact "
                f"compares every lesion"
            )
            if found < k:
                notes.append(
                    f"{found} of the {k} patients asked for came back: an approximate search with filters can "
                    f"return fewer than it was asked for (the index's lists searched held too few lesions that "
                    f"pass them); --method exact, or a larger --fraction-lists-to-search, finds more"
                )
        if "VECTOR_SEARCH(" in statement.sql:
            if result.index_usage in (None, "UNUSED"):
                reasons = "; ".join(r for r in result.index_unused_reasons if r) or "no reason given"
                codes = set(result.index_unused_codes)
                if "NOT_SUPPORTED_IN_STANDARD_EDITION" in codes:
                    fix = (
                        "the project runs on BigQuery's Standard edition, which cannot use vector indexes: search from "
                        "a project on another edition or on-demand pricing, or --method exact"
                    )
                elif "BASE_TABLE_TOO_SMALL" in codes:
                    fix = "BigQuery never populates an index on a table under 10 MB; at that size exact search is cheap"
                else:
                    fix = (
                        f"create it (`references push NAME --bigquery {self.table.path} --create-index`, on a table "
                        f"of 10 MB or more), wait until it is populated, and search with the cosine metric it was "
                        f"built for"
                    )
                notes.append(
                    f"the vector index was not used ({reasons}): the search compared every lesion (exact, but it "
                    f"bills the whole table). Fix: {fix}"
                )
            elif result.index_usage == "PARTIALLY_USED":  # BigQuery: "Some search functions in the query used
                # vector indexes and some didn't" (the statement has one; said as it is if it ever occurs)
                reasons = "; ".join(r for r in result.index_unused_reasons if r) or "no reason given"
                notes.append(f"BigQuery used the vector index in some of the statement's searches, not all ({reasons})")
            if result.stored_columns_unused:
                notes.append(
                    f"BigQuery did not apply the filters on the index's stored columns before the search "
                    f"({'; '.join(result.stored_columns_unused)}): they became post-filters, so fewer than {k} "
                    f"patients may come back; --method exact applies every filter to every lesion"
                )
        notes += list(statement.notes)
        if found == 0 and patient is not None:
            notes.append(f"no hits: patient {patient} has no lesion of this model here, or none passed the filters")
        if found < k and statement.notes:
            notes.append(f"{found} of the {k} patients asked for passed the post-filters; --method exact finds all")
        for note in notes:
            log.info("%s: %s", self.table.path, note)
        return notes


def _manifest(text: str | None, table: TableName) -> dict:
    """The manifest a push wrote into the table's description, or a clear error for a table without it."""
    try:
        manifest = json.loads(text or "")[DESCRIPTION_KEY]
        if not {"models", "label_fields"} <= set(manifest):
            raise KeyError("models")
    except (ValueError, KeyError, TypeError):
        raise SimilarPatientsError(
            f"The BigQuery table {table.path} was not pushed by similar-patients: its description does not say "
            f"its models and recipes. Import the table locally (`references import NAME --source FILE` from an "
            f"export) and push it: `similar-patients references push NAME --bigquery {table.path}`."
        ) from None
    return manifest
