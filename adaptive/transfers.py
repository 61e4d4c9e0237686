"""What expert transfers cost when the experts are offloaded: seconds per miss and misses per expert, online.

Why apart from the latency fit: with experts behind a small fast tier (engine/offload.py, or replay's
traces/offload.py), every expert a verify forward computes that the fast tier lacks is read from the slow
tier on the critical path. That wait (StepStats.offload_stall) follows the cache, not the fit's features
(tokens, experts, context): fitted as compute it would smear over every coefficient. So the verify fit
learns from the step time less the stall (adaptive/learners.py), and this model prices transfers apart:

    an option's transfer seconds = miss_rate x (its predicted unique experts) x seconds_per_miss

- seconds_per_miss: the link's price of a miss, stall / misses (live it also holds waits on prefetches
  still in flight, and is less than a whole read where hits compute while misses load: the effective price);
- miss_rate: how often an expert a forward computes is missing from the fast tier, misses / experts.

Both are ratios of exponentially forgotten sums (the link, the cache's contents and the workload drift),
with the same forgetting, so their product is stall / experts: the price per unique expert that enters
the plan (plan.Estimates.transfer_seconds); it stays right where prefetched experts stall without missing.
Priced per unique expert, a deeper tree, whose unique experts grow more slowly than its tokens, amortises
a transfer over more tokens (MoE-SpeQ's roofline), and when misses dominate, plain decoding, which computes
the fewest experts per token, wins. One rate for every option: a wide tree's experts miss somewhat more
often than a plain step's (colder experts), which this averages.

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
        self.misses = self.stall_s = self.experts = 0.0
        self.steps = 0

    def observe(self, misses: int, stall_s: float, experts: float) -> None:
        """One verify forward: its misses, the seconds it waited on the slow tier, the experts it computed."""
        lam = self.forgetting
        self.misses = lam * self.misses + misses
        self.stall_s = lam * self.stall_s + stall_s
        self.experts = lam * self.experts + experts
        self.steps += 1

    @property
    def seconds_per_miss(self) -> float:
        return self.stall_s / self.misses if self.misses > 0 else 0.0

    @property
    def miss_rate(self) -> float:
        return self.misses / self.experts if self.experts > 0 else 0.0

    @property
    def seconds_per_expert(self) -> float:
        """miss_rate x seconds_per_miss (see the module docstring): what each unique expert adds to a step."""
        return self.stall_s / self.experts if self.experts > 0 else 0.0

    def check(self) -> bool:
        """True when healthy (finite, non-negative sums); otherwise reset (warning once)."""
        healthy = all(math.isfinite(x) and x >= 0 for x in (self.misses, self.stall_s, self.experts))
        if not healthy:
            report_reset(self, "transfer-cost model", f"sums misses={self.misses}, stall_s={self.stall_s}, "
                                                      f"experts={self.experts}")
            self.reset()
        return healthy
