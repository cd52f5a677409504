"""The demo's analysis: one patient's nearest patients under every model, and how far the models agree."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd

from .errors import SimilarPatientsError
from .progress import ProgressCallback, report
from .references import schema
from .references.reference import Reference
from .references.store import ReferenceStore

REFERENCE = "nlst-sybil"


@dataclass
class Agreement:
    """How alike the models' answers for one query patient are."""

    mean_overlap: float  # mean |top-k(A) ∩ top-k(B)| over model pairs
    chance_overlap: float  # its expectation for k random patients
    shared: dict[str, int]  # patient -> number of models listing it, for patients in 2+ lists
    spearman: dict[tuple, float]  # model pair -> rank correlation of the query's distances to every other patient
    label_match: float | None = None  # share of all listed neighbours with the query's label
    label_base_rate: float | None = None  # share of all other patients with it


@dataclass
class DemoResult:
    patient: str
    query: pd.Series  # the query patient's labels
    hits: dict[str, pd.DataFrame]
    agreement: Agreement
    notes: list[str] = field(default_factory=list)
    display_fields: list[str] = field(default_factory=list)  # the reference's, in order
    label: str | None = None  # the field the neighbours' agreement with the query is measured on

    def reading(self) -> str:
        """One paragraph in plain words on how much the models agree."""
        a, models, label = self.agreement, list(self.hits), self.label
        k = max(len(h) for h in self.hits.values())
        pairs = sorted(a.spearman.items(), key=lambda item: item[1])
        rhos = np.array([r for _, r in pairs])
        text = (
            f"Across {len(models)} models, the top-{k} lists for patient {self.patient} share on average "
            f"{a.mean_overlap:.2f} of {k} patients per pair of models (chance: {a.chance_overlap:.2f}). "
        )
        if a.shared:
            top, count = max(a.shared.items(), key=lambda item: (item[1], item[0]))
            text += f"{len(a.shared)} patient(s) appear in two or more lists; {top} is listed by {count} models. "
        else:
            text += "No patient appears in more than one list. "
        text += (
            f"Ranking every other patient by distance to patient {self.patient}, the models agree at a mean "
            f"Spearman ρ of {rhos.mean():.2f} (from {rhos.min():.2f}, {pairs[0][0][0]} vs {pairs[0][0][1]}, to "
            f"{rhos.max():.2f}, {pairs[-1][0][0]} vs {pairs[-1][0][1]}): around this patient, "
            f"{_strength(rhos.mean())}. "
        )
        if a.label_match is not None:
            verdict = "above" if a.label_match > a.label_base_rate + 0.1 else "close to"
            text += (
                f"{a.label_match:.0%} of the listed neighbours share the query's {label} "
                f"({self.query.get(label)}), {verdict} the {a.label_base_rate:.0%} base rate among all patients, "
                f"so one patient's lists say little on their own about which model to trust; "
                f"`similar-patients evaluate` measures that over every patient."
            )
        return text


def _strength(rho: float) -> str:
    if rho >= 0.7:
        return "the models largely see the same similarity structure"
    if rho >= 0.4:
        return "the models agree on the broad structure but differ in the details that decide a top-5"
    return "the models see these tumors quite differently"


def default_patient(reference: Reference, model: str) -> str:
    """The lowest PatientID with one lesion and every label field filled: a deterministic, typical query."""
    lesions = reference.lesions(model)
    single = lesions.groupby(schema.PATIENT).filter(lambda g: len(g) == 1)
    complete = single.dropna(subset=[f for f in reference.label_fields if f in single.columns])
    pool = complete if len(complete) else single if len(single) else lesions
    return str(sorted(pool[schema.PATIENT].unique(), key=lambda p: (len(p), p))[0])


def run(
    store: ReferenceStore,
    patient: str | None = None,
    k: int = 5,
    metric: str = "cosine",
    label: str | None = None,
    progress: ProgressCallback | None = None,
) -> DemoResult:
    """Import NLST-Sybil if needed, then query every model with one patient. ``label``: the field whose
    agreement with the query is reported (default: the reference's first display field)."""
    notes = []
    if REFERENCE not in store:
        reference = store.import_reference(REFERENCE, REFERENCE, progress)
        notes += [f"imported '{REFERENCE}' from {reference.manifest['source']}"] + reference.manifest["notes"]
    reference = store.open(REFERENCE)
    models = reference.models
    patient = str(patient) if patient is not None else default_patient(reference, models[0])
    hits, rankings = {}, {}
    for i, model in enumerate(models):
        report(progress, i, len(models), f"searching {model}")
        everyone = reference.search(model, patient=patient, k=10**9, metric=metric, exclude=[patient])
        hits[model] = everyone.head(k)
        rankings[model] = everyone.set_index(schema.PATIENT)["distance"]
    report(progress, len(models), len(models), "searched")
    lesions = reference.lesions(models[0])
    query = lesions[lesions[schema.PATIENT] == patient].iloc[0]
    fields = reference.display_fields
    label = label or (fields[0] if fields else None)
    agreement = _agreement(hits, rankings, lesions, query, label, k)
    return DemoResult(patient, query, hits, agreement, notes, fields, label)


def _agreement(
    hits: dict[str, pd.DataFrame],
    rankings: dict[str, pd.Series],
    lesions: pd.DataFrame,
    query: pd.Series,
    label: str | None,
    k: int,
) -> Agreement:
    models = list(hits)
    if len(models) < 2:
        raise SimilarPatientsError("Model agreement needs a reference with at least two models.")
    sets = {m: set(hits[m][schema.PATIENT]) for m in models}
    overlaps = [len(sets[a] & sets[b]) for a, b in combinations(models, 2)]
    others = len(rankings[models[0]])
    counts = pd.Series([p for m in models for p in sets[m]]).value_counts()
    spearman = {}
    for a, b in combinations(models, 2):
        joined = pd.concat([rankings[a], rankings[b]], axis=1, join="inner").rank()
        spearman[(a, b)] = float(np.corrcoef(joined.iloc[:, 0], joined.iloc[:, 1])[0, 1])
    match = base = None
    if label is not None and label in lesions.columns and pd.notna(query.get(label)):
        listed = pd.concat([hits[m][label] for m in models])
        match = float((listed == query[label]).mean())
        per_patient = lesions.drop_duplicates(schema.PATIENT)
        base = float(
            (per_patient.loc[per_patient[schema.PATIENT] != query[schema.PATIENT], label] == query[label]).mean()
        )
    return Agreement(
        mean_overlap=float(np.mean(overlaps)),
        chance_overlap=k * k / others,
        shared={str(p): int(c) for p, c in counts[counts >= 2].items()},
        spearman=spearman,
        label_match=match,
        label_base_rate=base,
    )
