"""Expert usage statistics for the controller and traces: plain numbers (numpy), no tensors kept.

Why: choosing per-layer budgets needs to know how concentrated each layer's routing is. Heavy-tailed
routing (a few experts take most tokens, experts that fire together) is what lets a budget drop the
long tail cheaply; i.i.d. routing is the worst case that MoESD's N(t) = E(1 - (1 - K/E)^t) models.

Per MoE layer l, updated by `observe` once per verification step with that step's top-k routing:
- frequency[l, e]: exponentially weighted fraction of verified tokens routed to expert e.
- coactivation[l, i, j]: exponentially weighted fraction of tokens with both i and j in their top-k
  (diagonal = frequency).
- unique-experts curve: mean unique experts among the first t tokens of a step (tree order), t = 1..,
  observed beside the i.i.d. prediction.

Shapes: L layers, E experts, K top-k, T tokens verified in a step.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def iid_unique_experts(t, num_experts: int, top_k: int):
    """MoESD's expected unique experts after t tokens with independent uniform routing."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** np.asarray(t, dtype=np.float64))


class CoactivationStats:
    """Exponentially weighted expert frequency and co-activation, plus the unique-experts curve."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, alpha: float = 0.05):
        if num_layers < 1 or num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(f"CoactivationStats needs num_layers >= 1, num_experts >= 1 and 1 <= top_k <= num_experts, "
                             f"got L={num_layers}, E={num_experts}, K={top_k}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"CoactivationStats.alpha is the weight of the newest step and must be in (0, 1], got {alpha}")
        self.num_layers, self.num_experts, self.top_k, self.alpha = num_layers, num_experts, top_k, alpha
        self.steps = 0
        self.frequency = np.zeros((num_layers, num_experts))  # [L, E]
        self.coactivation = np.zeros((num_layers, num_experts, num_experts))  # [L, E, E]
        self.curve_sum = np.zeros((num_layers, 0))  # [L, Tmax] summed unique experts among first t tokens
        self.curve_count = np.zeros(0)  # [Tmax] steps that verified at least t tokens

    def observe(self, routing: Sequence) -> None:
        """Fold one verification step in. routing: per layer, top-k expert ids [T, K] (-1 = none)."""
        if len(routing) != self.num_layers:
            raise ValueError(f"observe got routing for {len(routing)} layers, stats track {self.num_layers}")
        ids = [np.asarray(r, dtype=np.int64).reshape(-1, np.shape(r)[-1]) for r in routing]
        T = ids[0].shape[0]
        if T == 0:
            return
        self._grow(T)
        a = 1.0 if self.steps == 0 else self.alpha
        for layer, idx in enumerate(ids):
            hits = np.zeros((idx.shape[0], self.num_experts))  # [T, E]
            rows, cols = np.nonzero(idx >= 0)
            hits[rows, idx[rows, cols]] = 1.0
            self.frequency[layer] = (1 - a) * self.frequency[layer] + a * hits.mean(0)
            self.coactivation[layer] = (1 - a) * self.coactivation[layer] + a * (hits.T @ hits) / idx.shape[0]
            self.curve_sum[layer, :T] += (np.cumsum(hits, 0) > 0).sum(1)
        self.curve_count[:T] += 1
        self.steps += 1

    def _grow(self, T: int) -> None:
        extra = T - self.curve_count.shape[0]
        if extra > 0:
            self.curve_sum = np.pad(self.curve_sum, ((0, 0), (0, extra)))
            self.curve_count = np.pad(self.curve_count, (0, extra))

    def unique_curve(self, layer: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(t [n], observed mean unique experts [n], i.i.d. prediction [n]); layer None = mean over layers."""
        seen = self.curve_count > 0
        t = np.arange(1, self.curve_count.shape[0] + 1)[seen]
        sums = self.curve_sum.mean(0) if layer is None else self.curve_sum[layer]
        return t, sums[seen] / self.curve_count[seen], iid_unique_experts(t, self.num_experts, self.top_k)

    def expected_slot_coverage(self, layer: int, budget: int) -> float:
        """Fraction of top-k slots the `budget` most frequent experts would serve (a budget's expected reach)."""
        freq = np.sort(self.frequency[layer])[::-1]
        total = freq.sum()
        return float(freq[:budget].sum() / total) if total > 0 else 1.0

    def top_pairs(self, layer: int, n: int = 5) -> list[tuple[int, int, float]]:
        """The n expert pairs (i < j) that most often share a token's top-k."""
        c = np.triu(self.coactivation[layer], k=1)
        flat = np.argsort(c, axis=None)[::-1][:n]
        return [(int(i), int(j), float(c[i, j])) for i, j in zip(*np.unravel_index(flat, c.shape))]

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
                "alpha": self.alpha, "steps": self.steps, "frequency": self.frequency.tolist(),
                "coactivation": self.coactivation.tolist(), "curve_sum": self.curve_sum.tolist(),
                "curve_count": self.curve_count.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "CoactivationStats":
        stats = cls(d["num_layers"], d["num_experts"], d["top_k"], d["alpha"])
        stats.steps = int(d["steps"])
        stats.frequency = np.asarray(d["frequency"], dtype=np.float64).reshape(stats.num_layers, stats.num_experts)
        stats.coactivation = np.asarray(d["coactivation"], dtype=np.float64).reshape(
            stats.num_layers, stats.num_experts, stats.num_experts)
        stats.curve_count = np.asarray(d["curve_count"], dtype=np.float64)
        stats.curve_sum = np.asarray(d["curve_sum"], dtype=np.float64).reshape(stats.num_layers, -1)
        return stats
