"""The adaptive controller's configuration: what it may choose among and how it learns.

Why its own file: argparse, the policy registry and tests build and validate it without the controller's
numerics; every field is checked on construction with a message that says what to fix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from moetune.step import DRAFTERS, StepConfig

from .acceptance import AcceptanceConfig
from .eviction import EvictionConfig
from .latency import LatencyConfig

EXPLORATIONS = ("thompson", "ucb", "greedy")
FLOATS = ("max_agreement_loss", "target_margin", "ucb_c", "explore_slack", "hysteresis", "prior_strength",
          "request_decay", "idle_decay", "global_decay", "latency_forgetting")


def check_latency_target(ms: float | None, what: str = "latency_target_ms") -> None:
    """One rule for a latency target wherever it is given (`moetune run` and `moetune replay`
    --latency-target-ms, the adaptive policy's latency_target_ms): None, or finite and > 0."""
    if ms is not None and not 0 < ms < math.inf:
        raise ValueError(f"{what} must be > 0 and finite (milliseconds per output token), got {ms}")


@dataclass(frozen=True)
class ControllerConfig:
    """Everything the controller may choose among, and how it learns. Validated on construction."""

    drafters: tuple[str, ...] = ("draft_model",)
    widths: tuple[int, ...] = (1, 2)  # 1 = chain; w > 1 = top-w tree of at most w * depth nodes
    max_depth: int = 8
    budgets: bool = True  # may use per-layer expert budgets (lossy); False = always lossless
    # lossless eviction budgets (adaptive/eviction.py) it may apply to a chosen option: fractions of the
    # option's predicted unique experts per layer; () = never evict
    eviction_levels: tuple[float, ...] = (0.5, 0.75)
    max_agreement_loss: float = 0.03  # without a latency target: most predicted fidelity loss allowed
    loss_levels: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2)
    latency_target_ms: float | None = None  # per output token
    target_margin: float = 0.1  # aim this fraction below the target
    exploration: str = "thompson"
    ucb_c: float = 1.0
    explore_slack: float = 0.1  # explore only options predicted within this fraction of the best goodput
    # a drafter not observed for explore_every steps (scaled by what its try costs, adaptive/explore.py)
    # is tried once although its posterior advises against it; the wait doubles after each try, up to
    # explore_every_max, and is back at explore_every after a try that pays (0: never forced)
    explore_every: int = 16
    explore_every_max: int = 128
    hysteresis: float = 0.05  # switch only for a predicted gain above this fraction
    min_dwell: int = 1  # steps a choice is kept before it may change (unless it became infeasible)
    decide_every: int = 4  # full decisions every this many steps of a request; the choice is held between
    decide_every_max: int = 12  # ... and up to this many while full decisions keep confirming the choice
    refresh_every: int = 128  # steps between plan recomputations (each costs ~1.5 ms live on a CPU)
    # calibration steps when no hardware profile seeds the latency model; None = one pass over the
    # calibration configs (a costly drafter, e.g. self-speculation on a CPU, is then tried only once)
    warmup_steps: int | None = None
    # run the n-gram drafter passively beside other drafters' steps (moetune.step.Probe): its acceptance
    # in this request is then known without spending steps on it (no effect unless "ngram" is a drafter)
    probe: bool = True
    prior_strength: float = 4.0
    request_decay: float = 0.94  # per speculative step: forgetting of a request's acceptance evidence
    idle_decay: float = 0.98  # per plain step: slower (such a step says nothing about acceptance)
    global_decay: float = 0.998
    latency_forgetting: float = 0.995
    seed: int = 0

    def __post_init__(self):
        for name in FLOATS:  # NaN passes every comparison below, so finiteness is checked first
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"ControllerConfig.{name} must be a finite number, got {getattr(self, name)}")
        if not self.drafters or any(d not in DRAFTERS for d in self.drafters):
            raise ValueError(f"ControllerConfig.drafters must be a non-empty subset of {DRAFTERS}, got {self.drafters}")
        if len(set(self.drafters)) != len(self.drafters):
            raise ValueError(f"ControllerConfig.drafters has duplicates: {self.drafters}")
        if not self.widths or any(not isinstance(w, int) or w < 1 for w in self.widths) \
                or len(set(self.widths)) != len(self.widths):
            raise ValueError(f"ControllerConfig.widths must be distinct integers >= 1 (1 = chain), got {self.widths}")
        if not 1 <= self.max_depth <= 32:
            raise ValueError(f"ControllerConfig.max_depth must be in [1, 32], got {self.max_depth}")
        w = max(self.widths)  # the widest candidate (candidates.py) must be a config a step can afford
        try:
            StepConfig(depth=self.max_depth, topk=w, num_draft_tokens=None if w == 1 else w * self.max_depth)
        except ValueError as e:
            raise ValueError(f"ControllerConfig.widths up to {w} at max_depth={self.max_depth} build steps "
                             f"beyond the engine's limits ({e}); lower widths or max_depth") from None
        if not 0.0 <= self.max_agreement_loss < 1.0:
            raise ValueError(f"ControllerConfig.max_agreement_loss must be in [0, 1), got {self.max_agreement_loss}")
        if not self.loss_levels or any(not 0.0 < x < 1.0 for x in self.loss_levels) \
                or list(self.loss_levels) != sorted(set(self.loss_levels)):
            raise ValueError(f"ControllerConfig.loss_levels must be strictly increasing values in (0, 1), "
                             f"got {self.loss_levels}")
        check_latency_target(self.latency_target_ms, "ControllerConfig.latency_target_ms")
        if self.eviction_levels:
            EvictionConfig(levels=self.eviction_levels)
        if not 0.0 <= self.target_margin < 0.5:
            raise ValueError(f"ControllerConfig.target_margin must be in [0, 0.5), got {self.target_margin}")
        if self.exploration not in EXPLORATIONS:
            raise ValueError(f"ControllerConfig.exploration must be one of {EXPLORATIONS}, got {self.exploration!r}")
        if not 0.0 <= self.explore_slack <= 1.0:
            raise ValueError(f"ControllerConfig.explore_slack must be in [0, 1] (1 = unrestricted exploration), "
                             f"got {self.explore_slack}")
        if self.ucb_c < 0:
            raise ValueError(f"ControllerConfig.ucb_c must be >= 0, got {self.ucb_c}")
        if self.hysteresis < 0:
            raise ValueError(f"ControllerConfig.hysteresis must be >= 0, got {self.hysteresis}")
        if not isinstance(self.probe, bool):
            raise ValueError(f"ControllerConfig.probe must be True or False, got {self.probe!r}")
        for name in ("min_dwell", "warmup_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"ControllerConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.explore_every < 0 or self.explore_every_max < self.explore_every:
            raise ValueError(f"ControllerConfig.explore_every must be >= 0 (0 = never force a try) and "
                             f"explore_every_max >= explore_every, got {self.explore_every}, {self.explore_every_max}")
        if self.refresh_every < 1:
            raise ValueError(f"ControllerConfig.refresh_every must be >= 1, got {self.refresh_every}")
        if self.decide_every < 1:
            raise ValueError(f"ControllerConfig.decide_every must be >= 1 (1 = every step), got {self.decide_every}")
        if self.decide_every_max < self.decide_every:
            raise ValueError(f"ControllerConfig.decide_every_max must be >= decide_every={self.decide_every}, "
                             f"got {self.decide_every_max}")
        # the estimators validate their own parameters; build them once here so errors surface early
        AcceptanceConfig(max_depth=self.max_depth, prior_strength=self.prior_strength,
                         request_decay=self.request_decay, global_decay=self.global_decay)
        if not 0.0 < self.idle_decay <= 1.0:
            raise ValueError(f"ControllerConfig.idle_decay must be in (0, 1], got {self.idle_decay}")
        LatencyConfig(forgetting=self.latency_forgetting)
