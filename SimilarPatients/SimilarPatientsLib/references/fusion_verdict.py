"""Whether fusing every model of a reference is the search to offer first: what an evaluation found,
kept where a program can read it for the reference in use.

``similar-patients evaluate`` writes its verdict as ``fusion.json`` twice: beside its report, and into the
evaluated reference's version folder (the same immutable version whose vectors it measured, beside the
closeness distributions). :func:`fusion_default` reads it back for an opened reference: from the version
folder first; else from the verdicts of the committed reports (:data:`PUBLISHED`, pinned here as the
NLST-Sybil upstream's blob ids are, and kept equal to ``docs/evaluation/*/fusion.json`` by a test), matched
by the reference's content (:func:`fingerprint`), never by its name. No verdict means no default.

The rule (applied by ``evaluation/report.py``): fusion is the default for a metric only if, at what the
search does (patients ranked by their nearest lesion pair in the evaluated space, the corrected one by
default, reciprocal rank fusion of every model, each model's first ``FUSION_DEPTH`` patients), its
class-balanced precision at the report's largest k is at least the best single model's on every task
evaluated (point estimates; the best model is picked after the fact, which favours it). Class-balanced,
because plain precision rewards returning the majority class, or one hub patient, to every query.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..util.atomic import replacing
from . import schema

VERDICT_FILE = "fusion.json"
#: The patient aggregation the verdict is read at: the search's nearest-lesion-pair roll-up.
SEARCH_AGGREGATION = "lesions"
#: Rows hashed at a time by :func:`fingerprint` (so a large reference is never copied whole).
_CHUNK = 65536
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusionAdvice:
    """Whether to preselect the fused search for a reference and metric, and why, in words for a user."""

    default: bool
    reason: str


def fingerprint(reference) -> str | None:
    """A digest of what an evaluation of ``reference`` measured: per model its name, recipe, length, the
    patient of each row and the vectors (float32, in row order). None for a reference whose vectors are
    not on this machine (BigQuery)."""
    if not hasattr(reference, "space"):
        return None
    digest = hashlib.sha256()
    for model in sorted(reference.models):
        info = reference.model_info(model)
        digest.update(json.dumps([model, info.recipe, info.dim, info.lesions]).encode())
        digest.update("\n".join(reference.lesions(model)[schema.PATIENT].astype(str)).encode())
        vectors = reference.space(model).vectors
        for start in range(0, len(vectors), _CHUNK):
            digest.update(np.ascontiguousarray(vectors[start : start + _CHUNK], dtype="<f4").tobytes())
    return digest.hexdigest()


def shape(reference) -> dict:
    """Per model, its lesion count: what a verdict is checked against before hashing a reference."""
    return {model: reference.model_info(model).lesions for model in reference.models}


def identity(reference) -> dict:
    """What a verdict records of the reference it was measured on: its :func:`fingerprint` and :func:`shape`."""
    return {"fingerprint": fingerprint(reference), "shape": shape(reference)}


def keep(reference, verdict: dict) -> Path | None:
    """Write ``verdict`` into the reference's version folder (None where it cannot be kept: a BigQuery
    table, or a read-only data home, when it is only logged)."""
    path = getattr(reference, "path", None)
    if path is None:
        return None
    target = Path(path) / VERDICT_FILE
    try:
        with replacing(target) as temporary:
            Path(temporary).write_text(json.dumps(verdict, indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        log.info("could not keep the fusion verdict in %s: %s", path, error)
        return None
    return target


def fusion_default(reference, metric: str = "cosine") -> FusionAdvice:
    """Whether the fused search of every model should be preselected for ``reference`` and ``metric``:
    only where an evaluation of this very reference showed it at least as good as the best single model."""
    verdict = _kept(reference) or _published(reference)
    if verdict is None:
        return FusionAdvice(
            False,
            f"No evaluation of '{reference.name}' compares fusing its models with the best single model, so "
            f"fusion is offered but not preselected (`similar-patients evaluate --reference {reference.name}` "
            f"makes that comparison).",
        )
    if sorted(verdict["models"]) != sorted(reference.models):
        return FusionAdvice(
            False,
            f"The evaluation of '{reference.name}' fused {', '.join(verdict['models'])}, not all of its models; "
            f"fusion is offered but not preselected.",
        )
    by_metric = verdict["metrics"].get(metric)
    if by_metric is None:
        return FusionAdvice(False, f"The evaluation of '{reference.name}' did not measure the {metric} distance.")
    return FusionAdvice(bool(by_metric["default"]), by_metric["reason"])


def _kept(reference) -> dict | None:
    path = getattr(reference, "path", None)
    if path is None or not (Path(path) / VERDICT_FILE).is_file():
        return None
    return json.loads((Path(path) / VERDICT_FILE).read_text(encoding="utf-8"))


def _published(reference) -> dict | None:
    candidates = [v for v in PUBLISHED if v["shape"] == shape(reference)]
    if not candidates:
        return None
    digest = fingerprint(reference)
    return next((v for v in candidates if v["fingerprint"] == digest), None)


#: The verdicts of the committed reports (docs/evaluation/<reference>/fusion.json), as they were written.
PUBLISHED: list = [
    # docs/evaluation/nlst-sybil/fusion.json: the NLST-Sybil upstream's six models (README's import), judged
    # on class-balanced precision in the corrected space
    {
        "reference": "nlst-sybil",
        "fingerprint": "17115a353798cb0247cef351e4af23866f5508b04d78ae1e7a318fc166a65a1d",
        "shape": {"CTClipVit": 732, "CTFM": 732, "Merlin": 732, "PASTA": 732, "SUPREME": 732, "VISTA3D": 732},
        "models": ["CTClipVit", "CTFM", "Merlin", "PASTA", "SUPREME", "VISTA3D"],
        "space": "corrected",
        "fusion": "rrf",
        "depth": 100,
        "rrf_constant": 60,
        "aggregation": "lesions",
        "measure": "balanced precision",
        "k": 10,
        "metrics": {
            "cosine": {
                "default": False,
                "reason": "On nlst-sybil, reciprocal rank fusion of its 6 models (each model's first "
                "100 patients, by their nearest lesion pair, cosine distance, corrected "
                "space) fell short of the best single model in class-balanced precision@10 "
                "on 1 of 3 tasks (adeno-nos-vs-squamous-nos: 0.507 against Merlin's 0.515 "
                "(-0.008, paired 95% CI -0.029 to +0.012)), so it is offered but not "
                "preselected.",
                "tasks": [
                    {
                        "task": "adeno-vs-squamous",
                        "fused": 0.518473,
                        "best_model": "CTFM",
                        "best": 0.515449,
                        "difference": 0.003025,
                        "low": -0.012389,
                        "high": 0.018403,
                    },
                    {
                        "task": "stage-iii-iv-vs-i-ii",
                        "fused": 0.536056,
                        "best_model": "VISTA3D",
                        "best": 0.531167,
                        "difference": 0.004889,
                        "low": -0.009756,
                        "high": 0.020235,
                    },
                    {
                        "task": "adeno-nos-vs-squamous-nos",
                        "fused": 0.507086,
                        "best_model": "Merlin",
                        "best": 0.51545,
                        "difference": -0.008364,
                        "low": -0.029147,
                        "high": 0.012278,
                    },
                ],
            },
            "euclidean": {
                "default": False,
                "reason": "On nlst-sybil, reciprocal rank fusion of its 6 models (each model's "
                "first 100 patients, by their nearest lesion pair, euclidean distance, "
                "corrected space) fell short of the best single model in class-balanced "
                "precision@10 on 2 of 3 tasks (adeno-vs-squamous: 0.513 against CTFM's "
                "0.515 (-0.002, paired 95% CI -0.018 to +0.013); "
                "adeno-nos-vs-squamous-nos: 0.500 against Merlin's 0.519 (-0.019, "
                "paired 95% CI -0.038 to +0.003)), so it is offered but not "
                "preselected.",
                "tasks": [
                    {
                        "task": "adeno-vs-squamous",
                        "fused": 0.51254,
                        "best_model": "CTFM",
                        "best": 0.514749,
                        "difference": -0.002209,
                        "low": -0.018129,
                        "high": 0.013289,
                    },
                    {
                        "task": "stage-iii-iv-vs-i-ii",
                        "fused": 0.529441,
                        "best_model": "VISTA3D",
                        "best": 0.52547,
                        "difference": 0.003971,
                        "low": -0.011056,
                        "high": 0.017534,
                    },
                    {
                        "task": "adeno-nos-vs-squamous-nos",
                        "fused": 0.500079,
                        "best_model": "Merlin",
                        "best": 0.518694,
                        "difference": -0.018614,
                        "low": -0.037654,
                        "high": 0.002612,
                    },
                ],
            },
        },
    },
]
