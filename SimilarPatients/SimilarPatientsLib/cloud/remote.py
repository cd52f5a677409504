"""A reference held in BigQuery, searched with the same call as a local :class:`Reference`.

``search`` builds one statement (:mod:`.sql`), runs it with its parameters, and returns the hit table of
``references.hits``: only the k hit rows come back from BigQuery, so the work here is proportional to k.
The table's description, written by :func:`.push.push`, says its models, recipes and fields; reading it
is a metadata call that bills nothing.
"""

from __future__ import annotations

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
from ..search.correction import CORRECTED, RAW, check_space
from ..search.nearest import LesionMatch, check_queries
from . import client as bq
from . import sql
from .push import DESCRIPTION_KEY
from .tables import TableName, parse_table

log = logging.getLogger(__name__)


class BigQueryReference(ReferenceManifest):
    """A reference in a BigQuery table (pushed with ``references push NAME --bigquery TABLE``).

    ``maximum_bytes_billed`` stops any query that would bill more (None: no limit);
    ``fraction_lists_to_search`` is passed to ``VECTOR_SEARCH`` (None: BigQuery's default);
    ``check_recall``: when the index is used, run the same search comparing every row too (billed twice)
    and report the share of its patients the index found, in ``index_recall``."""

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
        self.fraction_lists_to_search = fraction_lists_to_search
        with bq.translated(self.table):
            found = self.client.get_table(self.table.path)
        self.column_types = {f.name: ("ARRAY" if f.mode == "REPEATED" else f.field_type) for f in found.schema}
        self.manifest = _manifest(found.description, self.table)
        self.name = self.table.url

    def __repr__(self) -> str:
        return f"BigQueryReference({self.name!r}, models={self.models})"

    @property
    def index(self) -> dict | None:
        """The vector index the push created (name, type, distance, stored columns), or None."""
        return self.manifest.get("index")

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
    ) -> sql.Statement:
        """The statement :meth:`search` runs (``--print-sql`` prints it, a dry run prices it): nearest to
        ``embeddings``, or to a reference ``patient``'s lesions, read by the statement itself.
        ``brute_force``: the same ``VECTOR_SEARCH`` comparing every row (what an approximate one is measured
        against)."""
        check_search(embeddings, patient, method)
        info = self.model_info(model)
        queries = None if embeddings is None else check_queries(info.dim, embeddings, metric)
        spec = sql.SearchSpec(model, queries, k, metric, where, tuple(str(p) for p in exclude), patient)
        if method == "exact" or (method == "auto" and not self.index):
            return sql.exact_search(self.table, spec, self.column_types)
        # without an index VECTOR_SEARCH compares every row, so every filter applies before it
        stored = self.index["stored"] if self.index else list(self.column_types)
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
        """As :meth:`Reference.search`, in the raw space (the ``space`` column and a note say so: a pushed
        table does not carry the corrected space's statistics yet). The hits' ``attrs["notes"]`` say what
        BigQuery billed, whether the index was used (the hits' ``search`` column then says ``approximate``),
        and what post-filters or the index may have cut. A ``patient``'s lesions are read by the search
        statement itself (one scan of the table, not two), after a check that bills two text columns: an
        unknown patient is refused before the embeddings are billed. With ``check_recall`` the index's recall
        is measured against the same search with ``use_brute_force``."""
        check_space(space, "cosine" if metric == "dot" else metric)
        statement = self.statement(model, embeddings, patient, k, metric, where, exclude, method)
        report(progress, 0, 1, f"searching {self.table.path} in BigQuery")
        if patient is not None:
            self._check_patient(model, str(patient))
        result = bq.run(self.client, self.table, statement, self.maximum_bytes_billed)
        rows = result.rows
        matches = [
            LesionMatch(str(p), float(d), i, int(q))
            for i, (p, d, q) in enumerate(zip(rows[schema.PATIENT], rows["distance"], rows["query_row"]))
        ]
        counts = dict(zip(rows[schema.PATIENT].astype(str), rows["patient_lesions"].astype(int)))
        if patient is not None:  # the patient's lesion ids came back with the hits, by query row
            query_lesions = dict(zip(rows["query_row"].astype(int), rows["query_lesion"].astype(str)))
        else:
            query_lesions = query_lesion_names(embeddings, query_lesions)
        approximate = "VECTOR_SEARCH(" in statement.sql and result.index_usage not in (None, "UNUSED")
        recall = float("nan") if approximate else None  # BigQuery does not measure an index's recall
        exact_patients = None
        if approximate and self.check_recall:
            brute = self.statement(model, embeddings, patient, k, metric, where, exclude, method, brute_force=True)
            exact = bq.run(self.client, self.table, brute, self.maximum_bytes_billed)
            exact_patients = list(exact.rows[schema.PATIENT])
            found = set(rows[schema.PATIENT].astype(str))
            recall = len(found & {str(p) for p in exact_patients}) / max(1, len(exact_patients))
        hits = hit_table(matches, rows, counts, metric, query_lesions, self.label_fields, recall, RAW)
        measured = recall if exact_patients is not None else None
        hits.attrs["notes"] = self._notes(statement, result, k, len(hits), patient, approximate, measured)
        if space != RAW:
            hits.attrs["notes"].append(
                "searched in the raw space (plain distance on the stored vectors): a BigQuery table does not carry "
                "the corrected space yet, so a few patients may be near every query (see docs/search.md)"
            )
        report(progress, 1, 1, f"searching {self.table.path} in BigQuery")
        return hits

    def _check_patient(self, model: str, patient: str) -> None:
        """Refuse a patient without lesions of ``model`` here, as the local store does (a cheap query)."""
        counted = bq.run(self.client, self.table, sql.patient_lesions(self.table, model, patient), None)
        if int(counted.rows["lesions"].iloc[0]) == 0:
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
                notes.append(
                    f"the vector index was not used ({reasons}): the search compared every lesion (exact, but it "
                    f"bills the whole table). Fix: create it (`references push NAME --bigquery {self.table.path} "
                    f"--create-index`, on a table of 10 MB or more), wait until it is populated, and search with the "
                    f"cosine metric it was built for"
                )
            elif result.index_usage == "PARTIALLY_USED":
                notes.append("the vector index was partly used: rows not yet indexed were compared exactly")
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
