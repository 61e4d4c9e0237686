"""Unique experts per layer for a candidate tree, and router mass kept under an expert budget.

Why not only the i.i.d. formula N(t) = E(1 - (1 - K/E)^t) (MoESD): drafted tokens of one step are
related, so their routing co-activates and real trees touch fewer unique experts than i.i.d. tokens
would; how much fewer differs per layer. We keep, per layer and per verified-token count, a running mean
of the unique experts observed, shrunk toward N(t) scaled by the layer's observed co-activation ratio.

Why a mass curve: routing is heavy-tailed, so dropping the least-used fraction x of a step's unique
experts drops much less than x of the router mass. Per layer, mass dropped ~= x ** gamma_l, gamma_l
fitted online (log-log regression through the origin) from budgeted steps.

Why an overlap exponent (batches): of a request's u experts, those the rest of the batch loads anyway
cost nothing more. Were experts drawn uniformly, a share x of them loaded would leave u (1 - x) new; but
routing is skewed, the loaded ones are the popular ones, and far fewer are new (on the Qwen3-30B-A3B-shape
replay 0.8x that at batch 2, 0.3x at batch 32). New ~= u (1 - x) ** overlap, overlap fitted online on
the last OVERLAP_WINDOW batched request-steps (what each added to the forward's union against the others'
union) so that predicted and observed new experts sum alike (steps that add none are common on small
models, so not a log-log fit), shrunk toward 1 (uniform draws) while observations are few.

Why buffered: observe runs every decode step and must cost next to nothing; steps are queued and folded
in with a few vectorised operations when a prediction needs them (the same result as one at a time).
"""
from __future__ import annotations

import numpy as np

from moetune.step import ModelShape

from .health import report_reset

OVERLAP_WINDOW = 1024  # batched request-steps the overlap exponent is fitted on
OVERLAP_PRIOR = 8.0  # the exponent 1 (uniform draws) counts as this many request-steps
OVERLAP_RANGE = (0.25, 8.0)


def iid_unique(num_experts: int, top_k: int, tokens) -> np.ndarray:
    """MoESD's expected unique experts for `tokens` tokens routed i.i.d. to top_k of num_experts."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** np.asarray(tokens, dtype=float))


class ExpertModel:
    """Predicts unique experts per layer vs tokens verified, and the router mass a budget keeps."""

    def __init__(self, shape: ModelShape, max_tokens: int, prior_weight: float = 4.0, ratio_rate: float = 0.05,
                 gamma_prior: float = 2.0, gamma_weight: float = 5.0):
        self.shape = shape
        self.max_tokens = max_tokens
        self.iid = iid_unique(shape.num_experts, shape.top_k, np.arange(max_tokens + 1))
        self.prior_weight = prior_weight
        self.ratio_rate = ratio_rate
        self._gamma_prior = (gamma_prior, gamma_weight)
        self._pending: list[tuple] = []
        self._pending_batch: list[tuple] = []
        self.resets = 0
        self.reset()

    def reset(self) -> None:
        """Back to the prior: no observed passes."""
        L = self.shape.num_layers
        self.sum = np.zeros((L, self.max_tokens + 1))  # unique experts summed per layer and token count
        self.count = np.zeros(self.max_tokens + 1)  # passes per token count
        self.ratio = np.ones(L)  # observed / i.i.d., per layer (co-activation)
        # log-log regression sums per layer, started at the prior gamma with weight gamma_weight
        gamma, weight = self._gamma_prior
        self._xy = np.full(L, gamma * weight)
        self._xx = np.full(L, weight)
        self._batch = np.zeros((0, 3))  # recent batched request-steps: own experts, others' share, new experts
        self._overlap = 1.0

    def observe(self, tokens: int, unique: tuple[int, ...], kept: tuple[int, ...] = (),
                mass_kept: tuple[float, ...] = ()) -> None:
        """Queue one verification pass: tokens verified, unique experts per layer, and under a budget the
        experts kept and router mass kept per layer."""
        L = self.shape.num_layers
        if len(unique) != L or tokens < 1:
            return
        budgeted = len(kept) == L and len(mass_kept) == L
        self._pending.append((tokens, unique, kept if budgeted else unique, mass_kept if budgeted else (1.0,) * L))

    def observe_batch(self, own: int, others: int, union: int) -> None:
        """Queue one request's step in a batch: its unique experts, the others' union and the forward's union
        (each summed over layers)."""
        if own > 0 and 0 < others < self.shape.num_layers * self.shape.num_experts and union >= others:
            self._pending_batch.append((own, others, union))

    @property
    def overlap(self) -> float:
        """Of a request's experts, the share the rest of a batch does not load ~= (1 - x) ** overlap, x the
        share of all experts the rest loads."""
        self.flush()
        return self._overlap

    def _fit_overlap(self) -> None:
        """The exponent whose predicted new experts sum to the observed ones (bisection: the predicted sum
        falls as the exponent grows), shrunk toward 1 by OVERLAP_PRIOR request-steps."""
        own, x, new = self._batch.T
        lo, hi = OVERLAP_RANGE
        target = new.sum()
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if (own * (1.0 - x) ** mid).sum() > target else (lo, mid)
        n = len(own)
        self._overlap = (n * 0.5 * (lo + hi) + OVERLAP_PRIOR) / (n + OVERLAP_PRIOR)

    def flush(self) -> None:
        """Fold the queued passes into the per-count means, the co-activation ratio and the tail fit, and
        the queued batched steps into the overlap exponent."""
        if self._pending_batch:
            own, others, union = (np.array(c, dtype=float) for c in zip(*self._pending_batch))
            self._pending_batch.clear()
            rows = np.stack([own, others / (self.shape.num_layers * self.shape.num_experts), union - others], 1)
            self._batch = np.concatenate([self._batch, rows])[-OVERLAP_WINDOW:]
            self._fit_overlap()
        if not self._pending:
            return
        tokens, unique, kept, mass = (np.array(c, dtype=float) for c in zip(*self._pending))
        self._pending.clear()
        n = np.minimum(tokens, self.max_tokens).astype(int)
        np.add.at(self.sum.T, n, unique)
        np.add.at(self.count, n, 1.0)
        multi = tokens > 1
        if multi.any():  # exponential moving average, oldest first, in closed form
            x = unique[multi] / self.iid[n[multi]][:, None]
            r, m = self.ratio_rate, len(x)
            self.ratio = (1.0 - r) ** m * self.ratio + (r * (1.0 - r) ** (m - 1.0 - np.arange(m))) @ x
        x = 1.0 - kept / np.maximum(unique, 1.0)
        drop = 1.0 - mass
        ok = (x > 0.0) & (x < 1.0) & (drop > 1e-6) & (drop < 1.0)
        if ok.any():
            lx, ld = np.log(np.where(ok, x, 1.0)), np.log(np.where(ok, drop, 1.0))
            self._xy += (lx * ld).sum(axis=0)
            self._xx += (lx * lx).sum(axis=0)

    def check(self) -> bool:
        """True when healthy (finite statistics, positive ratios and weights); otherwise reset to the
        prior (warning once). Called when the controller replans."""
        self.flush()
        stats = (self.sum, self.count, self.ratio, self._xy, self._xx, self._batch, self._overlap)
        healthy = all(np.all(np.isfinite(x)) for x in stats) and self.count.min() >= 0.0 and \
            self.ratio.min() > 0.0 and self._xx.min() > 0.0
        if not healthy:
            report_reset(self, "unique-expert model", "non-finite or out-of-range statistics")
            self.reset()
        return healthy

    @property
    def gamma(self) -> np.ndarray:
        """Per-layer tail exponent: mass dropped ~= (fraction of unique experts dropped) ** gamma."""
        self.flush()
        return np.maximum(self._xy / self._xx, 1.0)

    def predict(self, tokens) -> np.ndarray:
        """Expected unique experts per layer, shape (L, len(tokens)), for verified-token counts."""
        self.flush()
        n = np.minimum(np.asarray(tokens, dtype=int), self.max_tokens)
        prior = self.ratio[:, None] * self.iid[None, n]
        pred = (self.sum[:, n] + self.prior_weight * prior) / (self.count[n] + self.prior_weight)
        cap = np.minimum(n * self.shape.top_k, self.shape.num_experts)
        return np.clip(pred, self.shape.top_k * (n > 0), cap)
