"""Batch-level routing prediction metrics (pure numpy).

Shape legend: B tokens of one batch (one per sequence, same decoding step), L layers, E experts, K top_k.

For one batch, the true set R[l] is the OR over the batch of each token's selected experts at layer l.
Two predicted sets are scored against it:
  * top-k (the paper's B_acc): every token's K highest-scored experts, OR-ed over the batch.
    B_acc = mean over layers of |pred & R| / |R| (recall); precision = |pred & R| / |pred|.
  * fixed budget: the `budget` experts with the highest summed score over the batch, per layer. The same
    budget for every method and batch, so a method cannot buy recall by predicting more experts.
Per-batch values are averaged over batches (and over layers for the overall figure); F1 is the harmonic
mean of the averaged precision and recall.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def routing_mask(routing: np.ndarray, num_experts: int) -> np.ndarray:
    """(N, L, K) expert ids -> (N, L, E) bool. A NO_EXPERT (-1) entry sets no expert (as an index it
    would wrap around to expert E-1)."""
    mask = np.zeros((*routing.shape[:2], num_experts + 1), dtype=bool)  # last column catches NO_EXPERT
    np.put_along_axis(mask, np.where(routing < 0, num_experts, routing).astype(np.int64), True, axis=-1)
    return mask[..., :num_experts]


def topk_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """(..., E) scores -> (..., E) bool of the k highest; ties go to the lower expert id (stable sort)."""
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask


def set_scores(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L, E) bool predicted and true sets -> per-layer (precision, recall); empty sets score 1."""
    hit = (pred & true).sum(-1)
    n_pred, n_true = pred.sum(-1), true.sum(-1)
    precision = np.where(n_pred > 0, hit / np.maximum(n_pred, 1), 1.0)
    recall = np.where(n_true > 0, hit / np.maximum(n_true, 1), 1.0)
    return precision, recall


def f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


@dataclass
class MetricAccumulator:
    """Feed batches with `add`; read figures with `result`."""

    num_layers: int
    top_k: int
    budget: int | None  # None: the top-k metric only (a live run has no budget fixed across methods)
    _sums: dict[str, np.ndarray] = field(default_factory=dict)
    batches: int = 0

    def __post_init__(self) -> None:
        if self.top_k < 1 or (self.budget is not None and self.budget < 1):
            raise ValueError(f"top_k and budget must be >= 1, got {self.top_k}, {self.budget}")
        for key in ("precision", "recall") + (("budget_precision", "budget_recall") if self.budget else ()):
            self._sums[key] = np.zeros(self.num_layers)

    def add(self, true_mask: np.ndarray, scores: np.ndarray) -> None:
        """true_mask (B, L, E) bool, scores (B, L, E): one batch."""
        true = true_mask.any(0)                                                 # (L, E)
        sets = [("", topk_mask(scores, self.top_k).any(0))]                    # (L, E)
        if self.budget:
            sets.append(("budget_", topk_mask(scores.sum(0), self.budget)))    # (L, E)
        for prefix, predicted in sets:
            precision, recall = set_scores(predicted, true)
            self._sums[prefix + "precision"] += precision
            self._sums[prefix + "recall"] += recall
        self.batches += 1

    def result(self) -> dict:
        n = max(self.batches, 1)
        p, r = self._sums["precision"] / n, self._sums["recall"] / n
        out = {
            "b_acc": float(r.mean()), "precision": float(p.mean()), "recall": float(r.mean()),
            "f1": f1(float(p.mean()), float(r.mean())),
            "per_layer": [float(x) for x in r],
            "per_layer_precision": [float(x) for x in p],
        }
        if self.budget:
            bp, br = self._sums["budget_precision"] / n, self._sums["budget_recall"] / n
            out["budget"] = {"experts_per_layer": self.budget, "precision": float(bp.mean()),
                             "recall": float(br.mean()), "f1": f1(float(bp.mean()), float(br.mean()))}
        return {**out, "batches": self.batches}
