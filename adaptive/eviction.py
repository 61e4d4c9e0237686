"""Lossless eviction budgets (engine/eviction.py) as a per-step choice, learned from what they deliver.

Why learned from outcomes and not predicted: an eviction budget keeps the most probable nodes of a tree
whose experts fit, so in expectation it is a smaller tree, and the plan's mean models would never prefer
it to drafting that smaller tree. What it buys is per-step adaptivity (more nodes kept when this step's
tokens share experts, fewer when they do not), and what that is worth depends on how acceptance and
co-activation go together on this model and text. So each (family, level) keeps a decayed estimate of
the log ratio of the goodput its steps delivered to the goodput the plan predicted for the same option
unbudgeted; level 0 (no eviction) learns how well the plan is calibrated, so comparing levels cancels
what the plan already knows. A Thompson draw picks the level for each full decision, among options whose
experts the latency model predicts to be a sizeable share of their verify time (eviction saves at most
that share; on a model bound by per-op overhead it would only cost exploration).

Budgets: level rho gives layer l the budget B_l = round(rho * U_l), at least what the root and one node
are predicted to touch and at most num_experts, U_l the expert model's predicted unique experts of the
option's verified tokens in that layer (per layer, learned online). Plain Python on a few numbers: it
runs inside decide and observe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EvictionConfig:
    levels: tuple[float, ...] = (0.5, 0.75)  # fractions of the predicted unique experts per layer
    decay: float = 0.97  # per observation of a (family, level): forgetting, so phases are followed
    prior_count: float = 4.0  # pseudo-observations of the prior
    prior_penalty: float = 0.1  # eviction starts this much (log goodput) below no eviction: tried, not trusted
    noise: float = 0.3  # spread of one step's log goodput ratio (Thompson draws scale it by 1/sqrt(n))
    # eviction saves at most the experts' share of a verify: below this predicted share it is not tried
    min_expert_share: float = 0.5

    def __post_init__(self):
        if any(not 0.0 < x < 1.0 for x in self.levels) or list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"eviction levels must be strictly increasing fractions in (0, 1) of the predicted "
                             f"unique experts per layer, got {self.levels}")
        if not 0.0 < self.decay <= 1.0 or self.prior_count <= 0 or self.noise <= 0:
            raise ValueError(f"EvictionConfig needs 0 < decay <= 1, prior_count > 0 and noise > 0, got {self}")


class EvictionChooser:
    """Per acceptance family: decayed sums of log goodput ratios at each level (0 = no eviction)."""

    def __init__(self, config: EvictionConfig, families: int, rng: np.random.Generator):
        self.config = config
        self.rng = rng
        levels = 1 + len(config.levels)
        self.sums = [[0.0] * levels for _ in range(families)]
        self.counts = [[0.0] * levels for _ in range(families)]

    def choose(self, family: int) -> int:
        """The level (0: none) with the best Thompson draw of its mean log goodput ratio."""
        c, sums, counts = self.config, self.sums[family], self.counts[family]
        best, best_draw = 0, -math.inf
        for level, (s, n) in enumerate(zip(sums, counts)):
            prior = 0.0 if level == 0 else -c.prior_penalty
            mean = (s + prior * c.prior_count) / (n + c.prior_count)
            draw = mean + c.noise / math.sqrt(n + c.prior_count) * float(self.rng.standard_normal())
            if draw > best_draw:
                best, best_draw = level, draw
        return best

    def observe(self, family: int, level: int, ratio: float) -> None:
        """One step at `level` delivered `ratio` times the goodput predicted for its option unbudgeted."""
        if not math.isfinite(ratio) or ratio <= 0.0:
            return
        d = self.config.decay
        self.sums[family][level] = d * self.sums[family][level] + math.log(ratio)
        self.counts[family][level] = d * self.counts[family][level] + 1.0

    def budgets(self, level: int, unique: list[float], floor: list[int], num_experts: int) -> tuple[int, ...] | None:
        """Per-layer budgets of `level` for an option predicted to touch `unique` experts per layer, at
        least `floor` (what the root and one node are predicted to touch: a budget that keeps only the
        root wastes the draft); None when the level evicts nothing anywhere."""
        rho = self.config.levels[level - 1]
        budgets = tuple(min(max(round(rho * u), f), num_experts) for u, f in zip(unique, floor))
        return budgets if any(b < u for b, u in zip(budgets, unique)) else None
