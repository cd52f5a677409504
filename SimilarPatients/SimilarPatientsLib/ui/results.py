"""The results table as a clinician reads it: which of a hit table's columns, under which titles, each cell
as text (similarity as a sentence, distances with their digits, blanks for what is missing)."""

from __future__ import annotations

from dataclasses import dataclass

#: Column titles a clinician reads in the results table.
HEADERS = {
    "rank": "#",
    "PatientID": "Patient",
    "closer_than": "Similarity",
    "distance": "Distance",
    "collection_id": "Collection",
    "series_size_MB": "Series MB",
    "mark": "Mark",
}


@dataclass(frozen=True)
class ResultsTable:
    """What the table shows: column titles and one row of cell texts per hit."""

    titles: list
    rows: list


def results_table(hits, display_fields, marks=None) -> ResultsTable:
    """The hit table's rank, patient, the user's like / unlike mark (``marks``: PatientID -> mark; the
    column only where something is marked), similarity, each model's rank for a fused search (so a clinician
    sees which models agree), distance, the reference's display fields, collection and series size, as text."""
    from ..references.fused import rank_labels

    ranks = rank_labels(hits)
    shown = hits.assign(**{f"{model} rank": ranks[model] for model in ranks.columns})
    if marks:
        shown = shown.assign(mark=[marks.get(str(p)) for p in shown["PatientID"]])
    wanted = ["rank", "PatientID", "mark", "closer_than", *(f"{m} rank" for m in ranks.columns), "distance"]
    wanted += [*display_fields, "collection_id", "series_size_MB"]
    columns = [c for c in dict.fromkeys(wanted) if c in shown.columns]
    rows = [[cell_text(name, record[name]) for name in columns] for record in shown.to_dict("records")]
    return ResultsTable([HEADERS.get(c, c) for c in columns], rows)


def cell_text(name: str, value) -> str:
    """A results-table cell: similarity as a sentence, distances with their digits, blanks for missing."""
    if value is None or value != value:
        return ""
    if name == "closer_than":
        return f"closer than {value:.0f}% of nearest matches"
    if name == "distance":
        return f"{value:.4g}"
    return str(value)


def filter_terms(text) -> list:
    """The filter box's expressions (separated by ';') as the library takes them."""
    return [term.strip() for term in str(text or "").split(";") if term.strip()]
