"""What expert transfers cost when the experts are offloaded: seconds per miss and misses per expert, online.

Why apart from the latency fit: with experts behind a small fast tier (engine/offload.py, or replay's
traces/offload.py), every expert a verify forward computes that the fast tier lacks is read from the slow
tier on the critical path. That wait (StepStats.offload_stall) follows the cache, not the fit's features
(tokens, experts, context): fitted as compute it would smear over every coefficient. So the verify fit
learns from the step time less the stall (adaptive/learners.py), and this model prices transfers apart:

    an option's transfer seconds = seconds_per_miss x (miss_rate x fitting + forced)

per layer, of its predicted unique experts u: forced = (u - capacity)+, the experts a fast tier of
`capacity` per layer cannot hold at once (a layer needing more streams through its slots, so each of
those misses), fitting = min(u, capacity), which miss at the learned rate (the tier's contents drift with
the workload).
- seconds_per_miss: the link's price of a miss, stall / misses (live it also holds waits on prefetches
  still in flight, and is less than a whole read where hits compute while misses load: the effective price);
- miss_rate: how often a fitting expert is missing, (misses - forced) / fitting.
Why the split: one rate per expert averaged a plain step's few experts a layer, which mostly stay
resident, with a deep tree's, which cannot all fit (widened stand-in, 8 of 32 experts resident: 0.23
misses an expert at 4 a layer, ~0.5 at ~14 a layer), so it priced plain decoding too slow and deep trees
too fast, and `auto` chose draft-model chains that ran slower than plain.

All are exponentially forgotten sums (the link, the cache's contents and the workload drift), with the
same forgetting. Priced per unique expert, a deeper tree, whose unique experts grow more slowly than its
tokens, amortises a transfer over more tokens (MoE-SpeQ's roofline), and when misses dominate, plain
decoding, which computes the fewest experts per token, wins. Without a reported capacity (a batched
forward, whose per-layer union is not in its StepStats) every expert counts as fitting.

Without offload (StepStats.offload_* None) nothing is observed and the price stays exactly 0.
"""
from __future__ import annotations

import math

from .health import report_reset


class TransferModel:
    """Forgotten sums of misses, stall seconds and unique experts computed over offloaded verify forwards."""

    def __init__(self, forgetting: float):
        if not 0.9 <= forgetting <= 1.0:
            raise ValueError(f"TransferModel forgetting must be in [0.9, 1] (1: never forget), got {forgetting}")
        self.forgetting = forgetting
        self.resets = 0
        self.reset()

    def reset(self) -> None:
        """Back to no data: transfers cost nothing until a step says otherwise."""
        self.misses = self.stall_s = self.experts = self.forced = 0.0
        self.steps = 0
        self.capacity: int | None = None  # the fast tier's experts per layer, as last reported

    def observe(self, misses: int, stall_s: float, experts: float, forced: float = 0.0,
                capacity: int | None = None) -> None:
        """One verify forward: its misses, the seconds it waited on the slow tier, the fitting experts it
        computed and the forced ones (`split`; all fitting when the capacity is unknown), the capacity."""
        lam = self.forgetting
        self.misses = lam * self.misses + misses
        self.stall_s = lam * self.stall_s + stall_s
        self.experts = lam * self.experts + experts
        self.forced = lam * self.forced + forced
        self.steps += 1
        if capacity is not None:
            self.capacity = capacity

    @property
    def seconds_per_miss(self) -> float:
        return self.stall_s / self.misses if self.misses > 0 else 0.0

    @property
    def miss_rate(self) -> float:
        """Misses per fitting expert (forced misses left out), at most 1."""
        return min(max(self.misses - self.forced, 0.0) / self.experts, 1.0) if self.experts > 0 else 0.0

    @property
    def seconds_per_expert(self) -> float:
        """miss_rate x seconds_per_miss (see the module docstring): what each fitting expert adds to a step;
        with stalls but no misses (waits on prefetches still in flight only), the stall per expert."""
        if self.misses <= 0:
            return self.stall_s / self.experts if self.experts > 0 else 0.0
        return self.miss_rate * self.seconds_per_miss

    def check(self) -> bool:
        """True when healthy (finite, non-negative sums); otherwise reset (warning once)."""
        sums = (self.misses, self.stall_s, self.experts, self.forced)
        healthy = all(math.isfinite(x) and x >= 0 for x in sums)
        if not healthy:
            report_reset(self, "transfer-cost model", f"sums misses={self.misses}, stall_s={self.stall_s}, "
                                                      f"experts={self.experts}, forced={self.forced}")
            self.reset()
        return healthy


def split(layers, capacity: int | None) -> tuple[float, float]:
    """(fitting, forced) experts of a forward computing `layers` experts per layer in a fast tier of `capacity`
    per layer (None: unknown, all fitting)."""
    if capacity is None:
        return float(sum(layers)), 0.0
    return float(sum(min(u, capacity) for u in layers)), float(sum(max(u - capacity, 0) for u in layers))
