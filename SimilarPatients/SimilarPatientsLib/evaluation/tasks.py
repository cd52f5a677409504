"""Evaluation tasks: a label field split into a positive and a negative class, per patient.

A task is what ``similar-patients evaluate`` asks of every model: "does the embedding tell these two groups
apart, and do a patient's nearest neighbours share its group?". Tasks are built from a label field and
value lists (``--label stage --positive IIIA,IIIB,IV``), or taken from the presets below, which name the
tasks the NLST-Sybil reference is evaluated on (with the published figures they are compared with).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import SimilarPatientsError
from ..references import schema
from ..search.filters import value_mask

#: ICD-O-3 morphology codes of the adenocarcinoma family found in NLST (NOS, lepidic/BAC, mucinous,
#: mixed subtypes, acinar, signet ring) and of the squamous family; adenosquamous (8560) is in neither.
ADENOCARCINOMA_CODES = ("8140", "8250", "8252", "8253", "8254", "8255", "8323", "8480", "8481", "8490", "8550")
SQUAMOUS_CODES = ("8070", "8071", "8072")


@dataclass(frozen=True)
class Task:
    """A binary patient label: ``positive`` and ``negative`` value terms of ``field``.

    Terms are values or ``~TEXT`` / ``>=N`` / ``<N`` / ``!=V`` expressions; ``negative=None`` means every
    other known value. Patients matching neither side (or both) are left out of the task.
    """

    name: str
    field: str
    positive: tuple
    negative: tuple | None = None
    description: str = ""
    #: Published AUCs to compare with: model -> AUC, or a note for the whole task.
    published: dict = field(default_factory=dict)
    published_note: str = ""
    #: The field's values in their clinical order where the label is ordinal (AJCC stage): retrieval then
    #: also reports nDCG with graded gains (a IIIA neighbour of a IIIB query counts more than a IA one).
    ordinal: tuple | None = None

    def patient_grades(self, lesions: pd.DataFrame, patients) -> np.ndarray | None:
        """Each of ``patients``' place (0 .. levels - 1) on :attr:`ordinal`; None when the task has no order."""
        if self.ordinal is None:
            return None
        place = {value: i for i, value in enumerate(self.ordinal)}
        first = lesions.groupby(schema.PATIENT, sort=False)[self.field].first()
        grades = first.reindex(pd.Index(patients)).map(place).to_numpy(dtype=np.float64)
        if np.isnan(grades).any():
            raise SimilarPatientsError(
                f"Task '{self.name}': some patients' {self.field} is none of {', '.join(self.ordinal)}."
            )
        return grades

    def patient_labels(self, lesions: pd.DataFrame) -> pd.Series:
        """1 (positive) / 0 (negative) per PatientID, sorted, for the patients the task covers."""
        if self.field not in lesions.columns:
            raise SimilarPatientsError(
                f"Task '{self.name}' needs the label field '{self.field}', which this reference does not have; "
                f"it has: {', '.join(c for c in lesions.columns if c not in schema.STRUCTURAL)}."
            )
        column = lesions[self.field]
        positive = value_mask(column, self.positive)
        negative = value_mask(column, self.negative) if self.negative else column.notna().to_numpy() & ~positive
        label = np.where(positive & ~negative, 1.0, np.where(negative & ~positive, 0.0, np.nan))
        per_patient = pd.Series(label, index=lesions[schema.PATIENT].to_numpy()).groupby(level=0)
        if (per_patient.nunique() > 1).any():
            split = per_patient.nunique()
            mixed = split[split > 1].index
            raise SimilarPatientsError(
                f"Task '{self.name}': the lesions of {len(mixed)} patient(s) (e.g. {mixed[0]}) "
                f"fall on different sides; a patient-level task needs one label per patient."
            )
        labels = per_patient.first().dropna().astype(int).sort_index()
        counts = labels.value_counts()
        if counts.get(1, 0) < 2 or counts.get(0, 0) < 2:
            raise SimilarPatientsError(
                f"Task '{self.name}' has {counts.get(1, 0)} positive and {counts.get(0, 0)} negative patients; "
                f"each side needs at least 2 (check the values given for '{self.field}')."
            )
        return labels


def _published_stage() -> dict:
    return {
        "CTClipVit": 0.593,
        "CTFM": 0.724,
        "FMCIB": 0.724,
        "Merlin": 0.612,
        "ModelsGen": 0.651,
        "PASTA": 0.680,
        "SUPREME": 0.618,
        "VISTA3D": 0.679,
        "Voco": 0.619,
    }


_PUBLISHED_SOURCE = "single-split logistic regression, patient-level 60/20/20 split, test AUC"

PRESETS = {
    task.name: task
    for task in (
        Task(
            name="adeno-vs-squamous",
            field="histology_code",
            positive=ADENOCARCINOMA_CODES,
            negative=SQUAMOUS_CODES,
            description="adenocarcinoma family (NOS, lepidic/BAC, mucinous, mixed, acinar) vs squamous family",
        ),
        Task(
            name="adeno-nos-vs-squamous-nos",
            field="histology_code",
            positive=("8140",),
            negative=("8070",),
            description="adenocarcinoma NOS vs squamous cell carcinoma NOS",
            published_note=f"0.45–0.61 for all models ({_PUBLISHED_SOURCE})",
        ),
        Task(
            name="stage-iii-iv-vs-i-ii",
            field="stage",
            positive=("IIIA", "IIIB", "IV"),
            negative=("IA", "IB", "IIA", "IIB"),
            description="stage III–IV vs stage I–II (AJCC, NLST)",
            published=_published_stage(),
            published_note=_PUBLISHED_SOURCE,
            ordinal=("IA", "IB", "IIA", "IIB", "IIIA", "IIIB", "IV"),
        ),
    )
}

#: The tasks ``evaluate`` runs on a reference when none are named and the reference has their fields.
DEFAULT_TASKS = ("adeno-vs-squamous", "stage-iii-iv-vs-i-ii", "adeno-nos-vs-squamous-nos")


def task_from_arguments(field: str, positive: Sequence[str], negative: Sequence[str] | None = None) -> Task:
    """A task from the command line: ``--label FIELD --positive V,.. [--negative V,..]``."""
    if not positive:
        raise SimilarPatientsError(f"Say which values of '{field}' are the positive class (--positive V1,V2 ...).")
    negative_name = ",".join(negative) if negative else "rest"
    return Task(
        name=f"{field}:{','.join(positive)}-vs-{negative_name}",
        field=field,
        positive=tuple(positive),
        negative=tuple(negative) if negative else None,
        description=f"{field} in {{{', '.join(positive)}}} vs "
        + (f"{{{', '.join(negative)}}}" if negative else "the rest"),
    )


def resolve(names: Sequence[str]) -> list:
    """Preset tasks by name, or a clear error listing them."""
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise SimilarPatientsError(f"Unknown task(s) {', '.join(unknown)}; presets are: {', '.join(PRESETS)}.")
    return [PRESETS[n] for n in names]
