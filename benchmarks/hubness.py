"""Which space: each candidate transform's hubness, class-balanced P@10 and same-tumor R@1, per model, on
NLST-Sybil, on the product's ranking (a patient's distance is its nearest lesion pair; all 464 patients).

Candidates (all from the reference's own, label-free statistics):
- ``raw``: cosine on the stored vectors (today's published lists);
- ``centred``: minus the reference mean;  ``z-scored``: also divided by each dimension's SD;
- ``centred+LS`` / ``z+LS``: local scaling (Schnitzer et al. 2012): a distance over the square root of the
  two patients' distances to their 10th nearest other patient;
- ``centred+CSLS``: cross-domain similarity local scaling (Conneau et al. 2018), in distance form
  ``2·d − m_x − m_y`` with ``m`` a patient's mean distance to its 10 nearest.

Printed per model and candidate: the largest share of all top-10 lists one patient is in, the share of
patients in none, the Spearman correlation of list count with lesion count (the roll-up's bias),
class-balanced P@10 for stage III–IV vs I–II and adeno vs squamous (each task's patients are the gallery)
with the paired 95% bootstrap interval of the difference against raw, and same-tumor R@1 (a lesion's
nearest other lesion is the same patient's in another CT series; 376 queries). The library's corrected
space is checked to give the ``z+LS`` lists exactly.

    PYTHONPATH=SimilarPatients python benchmarks/hubness.py      # about 3 minutes on 2 cores
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from SimilarPatientsLib.evaluation import lookalike, neighbourhoods
from SimilarPatientsLib.evaluation.tasks import PRESETS
from SimilarPatientsLib.references.store import ReferenceStore
from SimilarPatientsLib.search.distances import pairwise_distances

NLST = Path(__file__).resolve().parents[2] / "shared" / "data" / "nlst-sybil-embeddings"
TASKS = {"stage": PRESETS["stage-iii-iv-vs-i-ii"], "histology": PRESETS["adeno-vs-squamous"]}
K = 10


def lesion_matrix(vectors: np.ndarray) -> np.ndarray:
    distances = pairwise_distances(vectors, vectors, "cosine")
    np.fill_diagonal(distances, np.inf)
    return distances


def patient_matrix(lesion: np.ndarray, codes: np.ndarray, patients: int) -> np.ndarray:
    """Nearest lesion pair per pair of patients; a patient's own lesions never count."""
    starts = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=patients))])
    order = np.argsort(codes, kind="stable")
    grouped = lesion[np.ix_(order, order)]
    reduced = np.minimum.reduceat(np.minimum.reduceat(grouped, starts[:-1], axis=0), starts[:-1], axis=1)
    np.fill_diagonal(reduced, np.inf)
    return reduced


def candidates(vectors: np.ndarray, codes: np.ndarray, patients: int) -> dict:
    """Per candidate: the (patients × patients) and (lesions × lesions) distance matrices it ranks by."""
    mean, sd = vectors.mean(axis=0), vectors.std(axis=0) + 1e-12
    out = {}
    for name, transformed in (("raw", vectors), ("centred", vectors - mean), ("z-scored", (vectors - mean) / sd)):
        lesion = lesion_matrix(transformed)
        out[name] = (patient_matrix(lesion, codes, patients), lesion)
    for base in ("centred", "z-scored"):
        by_patient, lesion = out[base]
        radii = np.sort(by_patient, axis=1)[:, K - 1]
        label = "centred+LS" if base == "centred" else "z+LS"
        out[label] = (
            by_patient / np.sqrt(np.outer(radii, radii)),
            lesion / np.sqrt(np.outer(radii, radii)[codes][:, codes]),
        )
    by_patient, lesion = out["centred"]
    means = np.sort(by_patient, axis=1)[:, :K].mean(axis=1)
    out["centred+CSLS"] = (
        2 * by_patient - means[:, None] - means[None, :],
        2 * lesion - means[codes][:, None] - means[codes][None, :],
    )
    return out


def main() -> None:
    home = tempfile.mkdtemp()
    ReferenceStore(home).import_reference("nlst-sybil", str(NLST))
    reference = ReferenceStore(home).open("nlst-sybil")
    print(f"NLST-Sybil, {len(reference.models)} models; P@10 difference: paired, 95% bootstrap over queries\n")
    header = f"{'model':10s} {'space':13s} {'top hub':>8s} {'never':>6s} {'lesion ρ':>8s} "
    header += " ".join(f"{t + ' BP@10 [Δ vs raw]':>34s}" for t in TASKS) + f" {'same-tumor R@1':>15s}"
    print(header)
    for model in reference.models:
        space = reference.space(model)
        lesions = reference.lesions(model)
        patients = space.patient_ids
        vectors = np.asarray(space.vectors, dtype=np.float64)
        matrices = candidates(vectors, space.patient_codes, len(patients))
        pairs = lookalike.Pairs.build(lesions)
        labels = {t: task.patient_labels(lesions) for t, task in TASKS.items()}
        precision = {}
        for name, (by_patient, lesion) in matrices.items():
            order = np.argsort(by_patient, axis=1, kind="stable")[:, :-1]
            ranked = neighbourhoods.Rankings(patients, order, space.lesion_counts)
            hub = neighbourhoods.hubness(ranked)
            cells = []
            for task, label in labels.items():
                precision[name, task] = neighbourhoods.precision_per_query(ranked, label)
                value = neighbourhoods.balanced(precision[name, task], label)
                if name == "raw":
                    cells.append(f"{value:34.3f}")
                else:
                    point, low, high = neighbourhoods.paired_difference(
                        precision[name, task], precision["raw", task], label
                    )
                    cells.append(f"{value:.3f} [{point:+.3f}, {low:+.3f} … {high:+.3f}]".rjust(34))
            recall = lookalike.figures(np.argsort(lesion, axis=1, kind="stable")[:, :-1], pairs.relevant)["R@1"].mean()
            print(
                f"{model:10s} {name:13s} {hub.largest:8.3f} {hub.never:6.3f} {hub.lesion_bias:8.2f} "
                + " ".join(cells)
                + f" {recall:15.3f}"
            )
            if name == "z+LS":
                library = neighbourhoods.rankings(reference, model, "corrected")
                if not np.array_equal(library.order[:, :K], order[:, :K]):
                    sys.exit(f"{model}: the library's corrected lists differ from z+LS")
        print()


if __name__ == "__main__":
    main()
