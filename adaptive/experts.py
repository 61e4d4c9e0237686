"""Unique experts per layer for a candidate tree, and router mass kept under an expert budget.

Why not only the i.i.d. formula N(t) = E(1 - (1 - K/E)^t) (MoESD): drafted tokens of one step are
related, so their routing co-activates and real trees touch fewer unique experts than i.i.d. tokens
would; how much fewer differs per layer. We keep, per layer and per verified-token count, a running mean
of the unique experts observed, shrunk toward N(t) scaled by the layer's observed co-activation ratio.

Why a mass curve: routing is heavy-tailed, so dropping the least-used fraction x of a step's unique
experts drops much less than x of the router mass. Per layer, mass dropped ~= x ** gamma_l, gamma_l
fitted online (log-log regression through the origin) from budgeted steps.
"""
from __future__ import annotations

import numpy as np

from moetune.step import ModelShape


def iid_unique(num_experts: int, top_k: int, tokens) -> np.ndarray:
    """MoESD's expected unique experts for `tokens` tokens routed i.i.d. to top_k of num_experts."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** np.asarray(tokens, dtype=float))


class ExpertModel:
    """Predicts unique experts per layer vs tokens verified, and the router mass a budget keeps."""

    def __init__(self, shape: ModelShape, max_tokens: int, prior_weight: float = 4.0, ratio_rate: float = 0.05,
                 gamma_prior: float = 2.0, gamma_weight: float = 5.0):
        L, E = shape.num_layers, shape.num_experts
        self.shape = shape
        self.max_tokens = max_tokens
        self.iid = iid_unique(E, shape.top_k, np.arange(max_tokens + 1))
        self.sum = np.zeros((L, max_tokens + 1))
        self.count = np.zeros(max_tokens + 1)
        self.ratio = np.ones(L)  # observed / i.i.d., per layer (co-activation)
        self.prior_weight = prior_weight
        self.ratio_rate = ratio_rate
        # log-log regression sums per layer, started at the prior gamma with weight gamma_weight
        self._xy = np.full(L, gamma_prior * gamma_weight)
        self._xx = np.full(L, gamma_weight)
        self.version = 0  # bumps on every update, so callers can tell when to recompute plans

    def observe(self, tokens: int, unique: tuple[int, ...], kept: tuple[int, ...] = (),
                mass_kept: tuple[float, ...] = ()) -> None:
        L = self.shape.num_layers
        if len(unique) != L or tokens < 1:
            return
        u = np.asarray(unique, dtype=float)
        n = min(tokens, self.max_tokens)
        self.sum[:, n] += u
        self.count[n] += 1.0
        if tokens > 1:
            self.ratio += self.ratio_rate * (u / self.iid[n] - self.ratio)
        if len(kept) == L and len(mass_kept) == L:
            x = 1.0 - np.asarray(kept, dtype=float) / np.maximum(u, 1.0)
            drop = 1.0 - np.asarray(mass_kept, dtype=float)
            ok = (x > 0.0) & (x < 1.0) & (drop > 1e-6) & (drop < 1.0)
            if ok.any():
                lx, ld = np.log(x[ok]), np.log(drop[ok])
                self._xy[ok] += lx * ld
                self._xx[ok] += lx * lx
        self.version += 1

    @property
    def gamma(self) -> np.ndarray:
        """Per-layer tail exponent: mass dropped ~= (fraction of unique experts dropped) ** gamma."""
        return np.maximum(self._xy / self._xx, 1.0)

    def predict(self, tokens) -> np.ndarray:
        """Expected unique experts per layer, shape (L, len(tokens)), for verified-token counts."""
        n = np.minimum(np.asarray(tokens, dtype=int), self.max_tokens)
        prior = self.ratio[:, None] * self.iid[None, n]
        pred = (self.sum[:, n] + self.prior_weight * prior) / (self.count[n] + self.prior_weight)
        cap = np.minimum(n * self.shape.top_k, self.shape.num_experts)
        return np.clip(pred, self.shape.top_k * (n > 0), cap)

    def mass_dropped(self, dropped_fraction) -> np.ndarray:
        """Router mass lost per layer when the given fraction (L, ...) of its unique experts is dropped."""
        x = np.clip(np.asarray(dropped_fraction, dtype=float), 0.0, 1.0)
        g = self.gamma.reshape((-1,) + (1,) * (x.ndim - 1))
        return x ** g
