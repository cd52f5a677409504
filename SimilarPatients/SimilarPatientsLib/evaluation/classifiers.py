"""Classifiers on frozen embeddings, as practitioners compare them: nearest neighbours, class means, a
regularised linear probe, and a small MLP adapter.

Each one answers one cross-validation fold: given the training patients' labels, a :class:`Prediction`
(a score per test patient, higher = more likely positive, and a 0/1 decision). They see a
:class:`FoldInput`, so the same code serves mean/max-pooled patients (one row per patient) and
lesion-level data (several rows per patient).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..search.distances import unit_rows
from ..util.optional import optional_import

CLASSIFIERS = ("knn", "centroid", "linear", "mlp")


@dataclass
class Prediction:
    """A classifier's answer for a fold's test patients (ascending): a score (higher = more likely
    positive) and a 0/1 decision each."""

    scores: np.ndarray
    decisions: np.ndarray


@dataclass
class FoldInput:
    """One fold of one cohort: patient distances, instance rows and the split."""

    distances: np.ndarray  # (n, n) patient distances
    rows: np.ndarray  # (r, D) instances
    row_patient: np.ndarray  # (r,) patient index of each row, non-decreasing
    train: np.ndarray  # training patient indices
    test: np.ndarray  # test patient indices, ascending

    def rows_of(self, patients: np.ndarray) -> np.ndarray:
        return np.flatnonzero(np.isin(self.row_patient, patients))


def _per_patient_mean(row_scores: np.ndarray, row_patient: np.ndarray) -> np.ndarray:
    """Mean score per patient, patients in ascending index order."""
    _, group = np.unique(row_patient, return_inverse=True)
    return np.bincount(group, weights=row_scores) / np.bincount(group)


class NearestNeighbours:
    """Fraction of positives among the ``k`` nearest training patients; decides positive above the
    training prevalence (so an uninformative embedding gives a balanced accuracy near 0.5)."""

    name = "knn"

    def __init__(self, k: int = 15):
        self.k = k

    def __call__(self, fold: FoldInput, labels: np.ndarray, seed: int) -> Prediction:
        distances = fold.distances[np.ix_(fold.test, fold.train)]
        k = min(self.k, len(fold.train))
        nearest = np.argpartition(distances, k - 1, axis=1)[:, :k]
        train_labels = labels[fold.train]
        scores = train_labels[nearest].mean(axis=1)
        return Prediction(scores, scores > train_labels.mean())


class ClassMean:
    """Cosine similarity to the positive training mean minus that to the negative mean (a prototype
    classifier: no fitting beyond two averages)."""

    name = "centroid"

    def __call__(self, fold: FoldInput, labels: np.ndarray, seed: int) -> Prediction:
        train_rows = fold.rows_of(fold.train)
        units = unit_rows(fold.rows[train_rows])
        row_labels = labels[fold.row_patient[train_rows]].astype(bool)
        prototypes = unit_rows(np.stack([units[row_labels].mean(0), units[~row_labels].mean(0)]))
        test_rows = fold.rows_of(fold.test)
        similarity = unit_rows(fold.rows[test_rows]) @ prototypes.T
        scores = _per_patient_mean(similarity[:, 0] - similarity[:, 1], fold.row_patient[test_rows])
        return Prediction(scores, scores > 0)


class LinearProbe:
    """L2-regularised logistic regression on standardised features, classes weighted to balance.

    ``C`` is fixed rather than tuned so that the permutation test can re-run the same procedure hundreds
    of times; 0.01 is strong regularisation, as suits a few hundred patients in 512–4096 dimensions.
    """

    name = "linear"

    def __init__(self, C: float = 0.01):
        self.C = C

    def __call__(self, fold: FoldInput, labels: np.ndarray, seed: int) -> Prediction:
        LogisticRegression = optional_import("sklearn.linear_model", "analysis").LogisticRegression
        StandardScaler = optional_import("sklearn.preprocessing", "analysis").StandardScaler

        train_rows, test_rows = fold.rows_of(fold.train), fold.rows_of(fold.test)
        scaler = StandardScaler().fit(fold.rows[train_rows])
        model = LogisticRegression(C=self.C, class_weight="balanced", max_iter=5000)
        model.fit(scaler.transform(fold.rows[train_rows]), labels[fold.row_patient[train_rows]])
        row_scores = model.decision_function(scaler.transform(fold.rows[test_rows]))
        scores = _per_patient_mean(row_scores, fold.row_patient[test_rows])
        return Prediction(scores, scores > 0)


class MLPAdapter:
    """A one-hidden-layer MLP (torch, CPU) on standardised features: dropout, weight decay, class-weighted
    binary cross-entropy, full-batch AdamW for a fixed number of epochs (no early stopping, so no
    validation data is taken from the training fold)."""

    name = "mlp"

    def __init__(
        self, hidden: int = 64, dropout: float = 0.5, epochs: int = 100, lr: float = 3e-3, decay: float = 0.05
    ):
        self.hidden, self.dropout, self.epochs, self.lr, self.decay = hidden, dropout, epochs, lr, decay

    def __call__(self, fold: FoldInput, labels: np.ndarray, seed: int) -> Prediction:
        torch = optional_import("torch", "analysis")

        train_rows, test_rows = fold.rows_of(fold.train), fold.rows_of(fold.test)
        x = fold.rows[train_rows]
        mean, std = x.mean(0), x.std(0) + 1e-8
        inputs = torch.as_tensor((x - mean) / std, dtype=torch.float32)
        targets = torch.as_tensor(labels[fold.row_patient[train_rows]], dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        network = torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], self.hidden),
            torch.nn.GELU(),
            torch.nn.Dropout(self.dropout),
            torch.nn.Linear(self.hidden, 1),
        )
        with torch.no_grad():
            for parameter in network.parameters():  # seeded init, independent of the global RNG
                bound = 1.0 / np.sqrt(parameter.shape[-1])
                parameter.uniform_(-bound, bound, generator=generator)
        positives = float(targets.sum())
        loss_function = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(targets) - positives) / positives))
        optimiser = torch.optim.AdamW(network.parameters(), lr=self.lr, weight_decay=self.decay)
        network.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # dropout masks
            for _ in range(self.epochs):
                optimiser.zero_grad()
                loss_function(network(inputs).squeeze(1), targets).backward()
                optimiser.step()
        network.eval()
        with torch.no_grad():
            test = torch.as_tensor((fold.rows[test_rows] - mean) / std, dtype=torch.float32)
            row_scores = network(test).squeeze(1).double().numpy()
        scores = _per_patient_mean(row_scores, fold.row_patient[test_rows])
        return Prediction(scores, scores > 0)


def build(names, knn_k: int = 15, probe_c: float = 0.01) -> list:
    """Classifier objects by name, in the order given."""
    factories = {
        "knn": lambda: NearestNeighbours(knn_k),
        "centroid": ClassMean,
        "linear": lambda: LinearProbe(probe_c),
        "mlp": MLPAdapter,
    }
    return [factories[name]() for name in names]
