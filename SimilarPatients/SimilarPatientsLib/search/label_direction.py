"""A label direction in the corrected space, and the blend of visual similarity with label-score closeness.

"Similar with respect to stage": a ridge regression, fitted on the reference's own labelled patients in the
z-scored space, gives every patient a label score (one number for an ordinal or numeric label, one per class
for a categorical one); two patients are close on the label when their scores are. A search then ranks by a
blended distance of the candidates (the first ``DEPTH`` patients by either distance)::

    (1 - weight) * corrected visual distance + weight * label-score distance / label_scale

Both parts are dimensionless (the corrected distance is about 1 at a patient's 10th neighbour; the label
distance is over the scores' spread). A blend of distances, not of ranks: reciprocal rank fusion throws away
how much nearer the first visual match is, and lost the same tumor on another CT series (same-tumor R@1
0.68 -> 0.16 for CT-FM on NLST-Sybil, docs/search.md).

The ridge penalty and the weight are chosen by cross-validation on the labelled patients (:func:`choose`),
by the balanced agreement of the first ``K`` neighbours with the query's label (:func:`agreement`), never
by taste. Ridge rather than logistic regression: one singular value decomposition per training set fits
every penalty at once, so the selection and a permutation test that refits stay cheap.

Pure numpy on arrays; :mod:`..references.label_aware` holds the reference's side (which labels, storage).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

#: Penalties tried, as multiples of the number of training patients (the features are z-scored, so the
#: penalty per patient is on the scale of one feature's variance).
PENALTIES = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
#: Blend weights of the label ranking tried (0 is the visual ranking alone, 1 the label ranking alone).
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
#: Patients each ranking contributes to the blend.
DEPTH = 100
#: Neighbours the selection counts.
K = 10
#: Folds of the selection's cross-validation.
FOLDS = 5
#: How much same-tumor R@1 a blend may lose against the visual ranking (the product's promise: the same
#: tumor on another CT series still comes first).
SAME_TUMOR_TOLERANCE = 0.03

ORDINAL, NUMERIC, CATEGORICAL = "ordinal", "numeric", "categorical"


@dataclass(frozen=True)
class Codes:
    """Labelled patients' targets: ``values`` (n, c) the regression targets (a code or one-hot classes),
    ``groups`` (n,) the class (or level, or quantile bin) each patient is balanced and folded by, and
    ``gains`` how two patients' labels agree: same class (categorical) or 1 − |difference| / span."""

    kind: str
    values: np.ndarray  # (n, c) float64
    groups: np.ndarray  # (n,) int

    def agreement(self, queries: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
        """(q, k) how far each neighbour (index into the labelled patients) agrees with its query's label."""
        if self.kind == CATEGORICAL:
            return (self.groups[neighbours] == self.groups[queries][:, None]).astype(np.float64)
        code = self.values[:, 0]
        span = max(float(np.ptp(code)), 1e-12)
        return 1.0 - np.abs(code[neighbours] - code[queries][:, None]) / span


class RidgeFit:
    """Ridge regressions of ``targets`` on ``features`` for every penalty at once: one symmetric
    eigendecomposition of the smaller Gram matrix (patients × patients or dimensions × dimensions) gives the
    singular vectors every penalty shares."""

    def __init__(self, features: np.ndarray, targets: np.ndarray):
        self.mean = features.mean(axis=0)
        self.target_mean = targets.mean(axis=0)
        centred = features - self.mean
        wide = len(centred) <= centred.shape[1]
        values, vectors = np.linalg.eigh(centred @ centred.T if wide else centred.T @ centred)
        keep = values > 1e-10 * max(float(values.max(initial=0.0)), 1e-300)
        self.singular = np.sqrt(values[keep])
        vectors = vectors[:, keep]
        if wide:  # vectors are the left singular vectors U; V = Xᵀ U / s
            self.v = centred.T @ vectors / self.singular
            self.projected = vectors.T @ (targets - self.target_mean)
        else:  # vectors are V; Uᵀ y = Vᵀ Xᵀ y / s
            self.v = vectors
            self.projected = (vectors.T @ (centred.T @ (targets - self.target_mean))) / self.singular[:, None]
        self.patients = len(features)

    def coefficients(self, penalty: float) -> tuple[np.ndarray, np.ndarray]:
        """(D, c) weights and (c,) intercept for the penalty ``penalty`` × patients."""
        shrink = self.singular / (self.singular**2 + penalty * self.patients)
        weights = self.v @ (shrink[:, None] * self.projected.reshape(len(shrink), -1))
        weights = weights.reshape((len(self.v), *self.projected.shape[1:]))
        return weights, self.target_mean - self.mean @ weights

    def scores(self, features: np.ndarray, penalty: float) -> np.ndarray:
        weights, intercept = self.coefficients(penalty)
        return features @ weights + intercept


def label_distances(query_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(q, n) Euclidean distance between each query's label scores (q, c) and each patient's (n, c)."""
    difference = query_scores[:, None, :] - scores[None, :, :]
    return np.sqrt((difference * difference).sum(-1))


def label_scale(scores: np.ndarray) -> float:
    """The typical spread of the label scores (n, c): the root mean squared distance to their mean, so a label
    distance over it is dimensionless, as a corrected visual distance is."""
    spread = float(np.sqrt(((scores - scores.mean(axis=0)) ** 2).sum(axis=1).mean()))
    return spread if spread > 0 else 1.0


def listed(distances: np.ndarray, depth: int = DEPTH) -> np.ndarray:
    """(q, n) whether each patient is among the query's first ``depth`` by ``distances`` (inf: ineligible)."""
    depth = min(depth, distances.shape[1])
    kth = np.partition(distances, depth - 1, axis=1)[:, depth - 1 : depth]
    return (distances <= kth) & np.isfinite(distances)


def candidates(visual: np.ndarray, label: np.ndarray, depth: int = DEPTH, visual_listed=None) -> np.ndarray:
    """(q, n) the blend's candidates: the first ``depth`` by either distance among the eligible patients
    (``visual`` finite; +inf marks the query itself and excluded or filtered patients). ``visual_listed``:
    :func:`listed` of ``visual``, where the caller has it already."""
    eligible = np.isfinite(visual)
    by_visual = listed(visual, depth) if visual_listed is None else visual_listed
    return (by_visual | listed(np.where(eligible, label, np.inf), depth)) & eligible


def blend(visual: np.ndarray, label: np.ndarray, weight: float, candidates_: np.ndarray | None = None) -> np.ndarray:
    """(q, n) the blended distance ``visual · (1 + weight · label)`` of the candidates (:func:`candidates`,
    computed here unless given), +inf for every other patient (never a hit). ``visual`` is the corrected
    distance, ``label`` the label distance over :func:`label_scale`: the label scales the visual distance,
    so a match much nearer than the rest (the same tumor on another series) stays ahead unless its label
    score is far, and among patients about as near, the one nearer on the label comes first."""
    chosen = candidates(visual, label) if candidates_ is None else candidates_
    with np.errstate(invalid="ignore"):
        return np.where(chosen, blended_distance(visual, label, weight), np.inf)


def blended_distance(visual, label, weight: float):
    """The label-aware distance: the visual one scaled by ``1 + weight · label distance``."""
    return visual * (1.0 + weight * label)


def first(blended: np.ndarray, k: int, counted: np.ndarray | None = None) -> np.ndarray:
    """(q, k) the ``k`` smallest blended distances' patients per query, ties to the lower index (sorted
    PatientID); only ``counted`` (n,) patients where given; −1 where fewer are candidates."""
    if counted is not None:
        blended = np.where(counted[None, :], blended, np.inf)
    k = min(k, blended.shape[1])
    near = np.argpartition(blended, k - 1, axis=1)[:, :k] if k < blended.shape[1] else np.argsort(blended, axis=1)
    values = np.take_along_axis(blended, near, 1)
    order = np.lexsort((near, values), axis=1)
    near, values = np.take_along_axis(near, order, 1), np.take_along_axis(values, order, 1)
    return np.where(np.isfinite(values), near, -1)


def balanced(per_query: np.ndarray, groups: np.ndarray) -> float:
    """The mean over groups of the group's mean per-query value (so no class or level carries it alone)."""
    return float(np.mean([per_query[groups == g].mean() for g in np.unique(groups)]))


def agreement(codes: Codes, queries: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """(q,) each query's mean agreement over its listed neighbours (−1 = none listed counts as 0)."""
    gains = codes.agreement(queries, np.maximum(neighbours, 0))
    return np.where(neighbours >= 0, gains, 0.0).mean(axis=1)


def fold_of(groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(n,) a stratified fold number per patient: each group's patients shuffled and dealt round-robin."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(groups), dtype=np.int64)
    offset = 0
    for g in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == g))
        fold[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)
    return fold


@dataclass
class SameTumor:
    """Label-free lesion pairs the selection keeps the promise on: ``features`` (m, D) the z-scored lesions;
    the query lesions (rows ``queries``: those with the same tumor on another CT series), their corrected
    ``visual`` distances (q, m) to every lesion (+inf to themselves) and their ``relevant`` (q, m) matches."""

    features: np.ndarray
    queries: np.ndarray  # (q,) the query lesions' rows
    visual: np.ndarray
    relevant: np.ndarray

    @cached_property
    def listed(self) -> np.ndarray:
        return listed(self.visual)

    def recalls(self, scores: np.ndarray, scale: float, weights) -> dict:
        """Same-tumor R@1 of the blend with each weight, ``scores`` (m, c) being the lesions' label scores."""
        label = label_distances(scores[self.queries], scores) / scale
        chosen = candidates(self.visual, label, DEPTH, self.listed)
        rows = np.arange(len(self.queries))
        out = {}
        for weight in weights:
            best = first(blend(self.visual, label, weight, chosen), 1)[:, 0]
            out[weight] = float(self.relevant[rows, best].mean())
        return out


@dataclass(frozen=True)
class Choice:
    """The selection's answer: the penalty and blend weight, the balanced agreement each pair reached, and
    the same-tumor R@1 each kept (empty without lesion pairs)."""

    penalty: float
    weight: float
    table: dict  # (penalty, weight) -> balanced agreement
    same_tumor: dict  # (penalty, weight) -> same-tumor R@1


def choose(
    features: np.ndarray,
    labelled: np.ndarray,
    codes: Codes,
    visual: np.ndarray,
    queries: np.ndarray | None = None,
    folds: int = FOLDS,
    seed: int = 0,
    penalties=PENALTIES,
    weights=WEIGHTS,
    tumor: SameTumor | None = None,
) -> Choice:
    """The penalty and blend weight with the best balanced agreement of the first ``K`` labelled neighbours
    over ``folds`` folds of the labelled patients: in each fold the ridge is fitted without the fold's
    labels and the fold's patients are queries.

    ``features`` (n, D) every patient's mean z-scored vector; ``labelled`` (L,) which patients carry a label
    (indices, in the order of ``codes``); ``visual`` (Q, n) the corrected visual distances of the patients in
    ``queries`` (places among the labelled, default all of them; a large reference uses a sample) to every
    patient, +inf to themselves. With ``tumor``, only blends that keep same-tumor R@1 within
    ``SAME_TUMOR_TOLERANCE`` of the visual ranking's (weight 0) are eligible, measured with the ridge fitted
    on all the labelled patients given."""
    queries = np.arange(len(labelled)) if queries is None else np.asarray(queries)
    fold = fold_of(codes.groups, folds, seed)
    counted = np.zeros(len(features), dtype=bool)
    counted[labelled] = True
    place = np.full(len(features), -1, dtype=np.int64)
    place[labelled] = np.arange(len(labelled))
    table = {(p, w): [] for p in penalties for w in weights}
    groups = []
    for f in range(folds):
        held = queries[fold[queries] == f]
        if not len(held):
            continue
        fit = RidgeFit(features[labelled[fold != f]], codes.values[fold != f])
        seen = visual[np.searchsorted(queries, held)]
        seen_listed = listed(seen)
        for penalty in penalties:
            scores = fit.scores(features, penalty)
            label = label_distances(scores[labelled[held]], scores) / label_scale(scores)
            chosen = candidates(seen, label, DEPTH, seen_listed)
            for weight in weights:
                top = first(blend(seen, label, weight, chosen), K, counted)
                neighbours = np.where(top >= 0, place[np.maximum(top, 0)], -1)
                table[(penalty, weight)].append(agreement(codes, held, neighbours))
        groups.append(codes.groups[held])
    groups = np.concatenate(groups)
    summary = {key: balanced(np.concatenate(values), groups) for key, values in table.items()}
    kept, eligible = {}, list(summary)
    if tumor is not None:
        whole = RidgeFit(features[labelled], codes.values)
        visual = tumor.recalls(np.zeros((len(tumor.features), 1)), 1.0, (0.0,))[0.0]
        for penalty in penalties:
            scale = label_scale(whole.scores(features, penalty))
            found = tumor.recalls(whole.scores(tumor.features, penalty), scale, [w for w in weights if w])
            kept.update({(penalty, w): found.get(w, visual) for w in weights})
        eligible = [key for key in summary if kept[key] >= visual - SAME_TUMOR_TOLERANCE]
    best = max(eligible, key=lambda key: (round(summary[key], 12), -key[1], key[0]))  # ties: less label, more penalty
    return Choice(best[0], best[1], summary, kept)
