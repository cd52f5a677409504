""" "More like these": relevance feedback. The user marks hit patients as like / unlike, and the query moves
towards the liked and away from the unliked (Rocchio, 1971) before the search runs again.

The move is made in the corrected space (z-scored by the reference's statistics, :mod:`.correction`), the one
the search ranks in: each vector z-scored and scaled to unit length (cosine sees directions only, so each
patient counts by its direction, whatever its norm), then, for each query lesion ``q``::

    q' = α·q + β·mean(liked) − γ·mean(unliked)

A judged patient with several lesions contributes one: its lesion nearest that query lesion (the pair that
put it in the hits, the one the user looked at; its other lesions may be other tumors). The moved query is
handed back as stored-space vectors (``μ + σ·q'``), whose z-scoring is exactly ``q'``, so the search treats it
as any new query: its local-scaling radius is measured in its own search.

The judged patients in the new answer: an unliked patient is left out (the user said no, and is not shown it
again); a liked patient stays where the moved query ranks it, marked ``like`` in the ``feedback`` column (the
user sees whether the move kept what they liked).

α, β, γ are :data:`WEIGHTS`, chosen by the residual-collection evaluation on NLST-Sybil
(:mod:`..evaluation.feedback`, docs/search.md "More like these"), not by taste. Only cosine in the corrected
space is offered: ``raw`` (plain distance on the stored vectors) exists to reproduce published lists, which a
moved query no longer is, and the weights were measured for cosine only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import SimilarPatientsError
from .correction import CORRECTED, Correction
from .distances import unit_rows

#: (α, β, γ): the weights of the query, the liked patients' mean and the unliked patients' mean; α is fixed at 1
#: (only the ratios move a cosine query), β and γ chosen by cross-validation over query folds on NLST-Sybil
#: (``benchmarks/feedback.py``: 4 of 5 folds chose these, the fifth (1, 2, 1); all queries choose these): the
#: liked patients count four times the query, the unliked half as much as the liked.
WEIGHTS = (1.0, 4.0, 2.0)
#: The most patients one feedback judges (like and unlike together): feedback is on the hits a person looked at.
MAX_JUDGED = 100
#: The column of the hit table that marks a liked patient.
COLUMN = "feedback"
LIKE = "like"


@dataclass(frozen=True)
class Judged:
    """The patients a user marked: liked and unliked, each once, in the order given."""

    like: tuple = ()
    unlike: tuple = ()

    def __bool__(self) -> bool:
        return bool(self.like or self.unlike)

    @property
    def patients(self) -> tuple:
        return self.like + self.unlike


def judged(like: Sequence[str] | None, unlike: Sequence[str] | None, query_patient: str | None = None) -> Judged:
    """The marks as given, checked: each a PatientID (repeats kept once), none both liked and unliked, none the
    query patient itself, at most :data:`MAX_JUDGED` in all."""
    sides = []
    for name, given in (("like", like), ("unlike", unlike)):
        if isinstance(given, str):
            given = [given]
        ids = [str(p).strip() for p in (given or ())]
        if any(not p for p in ids):
            raise SimilarPatientsError(f"An empty PatientID among the patients to {name}; give each patient's ID.")
        sides.append(tuple(dict.fromkeys(ids)))
    marks = Judged(*sides)
    both = sorted(set(marks.like) & set(marks.unlike))
    if both:
        raise SimilarPatientsError(f"Patient(s) {', '.join(both)} both liked and unliked: mark each patient once.")
    if query_patient is not None and str(query_patient) in marks.patients:
        raise SimilarPatientsError(
            f"Patient {query_patient} is the query: mark the hits (other patients) as like / unlike, not the query."
        )
    if len(marks.patients) > MAX_JUDGED:
        raise SimilarPatientsError(
            f"{len(marks.patients)} patients marked; feedback takes at most {MAX_JUDGED} (the hits looked at). To "
            f"search by a label of many patients, filter by it (--where) instead."
        )
    return marks


def check_space(space: str, metric: str) -> None:
    """Refuse feedback outside the space it is defined and measured in: cosine, corrected."""
    if space != CORRECTED or metric != "cosine":
        raise SimilarPatientsError(
            f"More like these (like / unlike) moves the query in the corrected space with the cosine distance; "
            f"this search is {metric} in the {space} space. Search with the defaults (space 'corrected', metric "
            f"'cosine') to give feedback: 'raw' reproduces published lists, which a moved query no longer would."
        )


def unit(rows: np.ndarray) -> np.ndarray:
    """Float64 rows scaled to unit length (a zero row refused: it has no direction)."""
    rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    if not np.all(rows.any(axis=1)):
        raise SimilarPatientsError("A vector of the feedback is the reference mean itself: it has no direction.")
    return unit_rows(rows)


def nearest_lesions(queries: np.ndarray, lesions: np.ndarray) -> np.ndarray:
    """For each unit query row, the unit row of ``lesions`` (one patient's) nearest it by cosine."""
    return lesions[np.argmax(queries @ lesions.T, axis=1)]


def directions(
    queries: np.ndarray, liked: Sequence[np.ndarray], unliked: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What Rocchio adds up, per query lesion: the unit query, the mean of the liked patients' nearest unit
    lesions and that of the unliked (zero where none is marked), from z-scored ``queries`` (n, D) and each
    judged patient's z-scored lesions ((m_i, D) each)."""
    q = unit(queries)
    means = [
        np.mean([nearest_lesions(q, unit(p)) for p in patients], axis=0) if len(patients) else np.zeros_like(q)
        for patients in (liked, unliked)
    ]
    return q, means[0], means[1]


def combine(query: np.ndarray, liked: np.ndarray, unliked: np.ndarray, weights: tuple = WEIGHTS) -> np.ndarray:
    """``α·query + β·liked − γ·unliked`` (the :func:`directions`), each row scaled to unit length."""
    alpha, beta, gamma = weights
    moved = alpha * query + beta * liked - gamma * unliked
    norms = np.linalg.norm(moved, axis=-1, keepdims=True)
    if not np.all(norms > 1e-9):
        raise SimilarPatientsError(
            "The feedback cancels the query out (the unliked patients point where the query does): unmark some."
        )
    return moved / norms


def rocchio(
    queries: np.ndarray, liked: Sequence[np.ndarray], unliked: Sequence[np.ndarray], weights: tuple = WEIGHTS
) -> np.ndarray:
    """The moved query (one unit row per query lesion) from z-scored ``queries`` and judged lesions."""
    return combine(*directions(queries, liked, unliked), weights)


def moved_query(
    correction: Correction,
    queries: np.ndarray,
    liked: Sequence[np.ndarray],
    unliked: Sequence[np.ndarray],
    weights: tuple = WEIGHTS,
) -> np.ndarray:
    """:func:`rocchio` on stored-space vectors: the query and the judged patients' lesions as stored, the moved
    query back in the stored space (``μ + σ·q'``, whose z-scoring is ``q'``), so any search can run it."""
    z = correction.transformed
    moved = rocchio(z(queries), [z(p) for p in liked], [z(p) for p in unliked], weights)
    return correction.centre + correction.scale * moved


def marked(hits, marks: Judged):
    """``hits`` (a hit table) with the :data:`COLUMN` column after ``index_recall``: ``like`` on a liked patient,
    empty elsewhere (an unliked patient is never in the answer)."""
    liked = set(marks.like)
    values = np.array([LIKE if str(p) in liked else None for p in hits["PatientID"]], dtype=object)
    at = list(hits.columns).index("index_recall") + 1 if "index_recall" in hits.columns else len(hits.columns)
    hits = hits.copy()
    hits.insert(at, COLUMN, values)
    return hits
