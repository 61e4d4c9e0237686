"""Latency-target mode: which option holds a request's target time per output token. Functions of the
config, plan and request state that change none of them: adaptive/controller.py records the outcome on the
request and commits the option.

Among options predicted to meet the target, take the best fidelity (lossless whenever possible), then the
best goodput, kept under the usual hysteresis. A request behind its target aims lower to catch up, but goes
lossy for it only when no lossless option meets the target with the usual margin. Feasibility comes from
the posterior mean (a target is a promise, not an experiment); the Thompson draw only ranks goodput among
the feasible options of the best fidelity. When nothing is feasible, the fastest option within the default
fidelity bound runs, and the request is flagged once its own evidence agrees.

Shape legend: O options (candidates x budget levels, flat).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .config import ControllerConfig
from .plan import Plan
from .slots import RequestState

MIN_EVIDENCE = 8  # steps of a request before its target is declared infeasible online


def lower_bound_ms(theta: np.ndarray, overhead_s: float, tokens: np.ndarray, depth: np.ndarray,
                   min_experts: int) -> float:
    """Fastest time per output token the latency model allows: every drafted token accepted, the fewest
    experts. theta: the verify fit's coefficients; tokens, depth (C,): each candidate's."""
    t = theta[0] + overhead_s + theta[1] * tokens + theta[2] * min_experts
    return float(max(np.min(t / (depth + 1)), 0.0) * 1e3)


def ahead(config: ControllerConfig, r: RequestState) -> bool:
    """The request runs ahead of its target by the usual margin, on MIN_EVIDENCE steps of its own at least."""
    target_s = config.latency_target_ms / 1e3 * (1 - config.target_margin)
    return r.emitted >= MIN_EVIDENCE and r.time / r.emitted <= target_s


def choose(config: ControllerConfig, plan: Plan, r: RequestState,
           E: np.ndarray, T: np.ndarray, mean_E: np.ndarray) -> tuple[int, bool] | None:  # each (O,)
    """(option, switched) that holds the target, or None when no option is predicted to. E: ranked emitted
    tokens, T: step seconds, mean_E: posterior-mean emitted tokens, per option."""
    target_s, util = config.latency_target_ms / 1e3, E / T
    nominal = target = target_s * (1 - config.target_margin)
    if r.emitted >= MIN_EVIDENCE and r.time / r.emitted > target_s:
        target *= max(0.5, target_s / (r.time / r.emitted))
    tpt = T / mean_E
    feasible = (tpt <= target) & np.isfinite(util)
    plan_loss = np.array(plan.loss)
    lossless = (tpt <= nominal) & (plan_loss <= 0.0) & np.isfinite(util)
    if lossless.any() and not (feasible & lossless).any():
        # a request behind its target tightens it to catch up, but never by giving up fidelity: a lossless
        # option that meets the target with the usual margin wins
        feasible = lossless
    if not feasible.any():
        return None
    loss = np.where(feasible, plan_loss, np.inf)
    best = int(np.argmax(np.where(loss <= loss.min() + 1e-12, util, -np.inf)))
    cur, dwell = r.slot.option, r.slot.dwell
    keep = cur >= 0 and feasible[cur] and plan.loss[cur] <= plan.loss[best] + 1e-12 and (
        dwell < config.min_dwell or util[cur] * (1 + config.hysteresis) >= util[best])
    return (cur, False) if keep else (best, best != cur)


def fastest(config: ControllerConfig, plan: Plan, r: RequestState, T: np.ndarray, util: np.ndarray,
            mean_E: np.ndarray, describe: Callable[[int], str]) -> tuple[int, bool, str]:  # each (O,)
    """Target unreachable as sampled: (the fastest option within the default fidelity bound, whether the
    request is flagged infeasible, the message to report: "" unless flagged and not reported before).
    Flagged once the request's own evidence (posterior mean, >= MIN_EVIDENCE steps) and its time so far
    agree; describe(option) names an option."""
    target_s = config.latency_target_ms / 1e3
    best = int(np.argmax(util + np.array(plan.over_loss)))
    infeasible = r.steps >= MIN_EVIDENCE and (T[best] / mean_E[best]) > target_s \
        and r.time > r.emitted * target_s  # ... and the request is not meeting it
    msg = ""
    if infeasible and not r.notes:
        msg = (f"latency target {config.latency_target_ms:g} ms/token is infeasible for this request: "
               f"best predicted {T[best] / mean_E[best] * 1e3:.3g} ms/token ({describe(best)}); running at the "
               "fastest configuration")
    return best, infeasible, msg
