"""Exploration never starves (issue 12.4): a drafter useless at first is tried again on a schedule whose
cost stays bounded, and taken up once it has become good; calibration starts with the cheapest configs."""
import math

import numpy as np
import pytest

from moetune.adaptive.controller import Controller, ControllerConfig
from moetune.adaptive.explore import ExplorationSchedule
from moetune.policies.registry import make_policy
from moetune.step import PLAIN, BatchContext, DecodeState, ModelShape, StepStats
from moetune.traces.batch import replay_batch
from moetune.traces.latency import LatencyModel
from moetune.traces.replay import replay
from moetune.traces.synthetic import Phase, synthetic_trace

SHAPE = ModelShape(num_layers=4, num_experts=16, top_k=2, hidden_size=256, expert_intermediate_size=64)
# a try of the draft model's shortest chain costs about 1.3 plain steps
LATENCY = LatencyModel(verify=(4e-3, 1e-4, 4e-5, 0.0, 0.0), draft={"draft_model": (0.0, 1e-3, 0.0)})
USELESS, GOOD = 8, 8  # requests of 64 tokens: the draft model accepts nothing, then everything


@pytest.fixture(scope="module")
def phase_change():
    useless, good = [Phase(64, (0.0,), alt=0.0)], [Phase(64, (1.0,), alt=0.0)]
    return synthetic_trace(SHAPE, n_requests=USELESS + GOOD, n_tokens=64, phases=[useless] * USELESS + [good] * GOOD)


def speculated(result):
    """Per replayed step: (request id, whether it speculated)."""
    return result.log[:, 0], np.array([result.configs[int(i)].speculate for i in result.log[:, 3]])


@pytest.mark.parametrize("seed", range(3))
def test_a_useless_drafter_is_tried_again_and_taken_up_once_good(phase_change, seed):
    """As a new user runs it (no latency profile: calibration first). The old controller, here
    explore_every=0, ran the good half all plain: calibration and a few draws had condemned the drafter."""
    c = ControllerConfig()
    result = replay(phase_change, make_policy(f"adaptive:budgets=false,seed={seed}"), LATENCY)
    request, spec = speculated(result)
    switch = int(np.argmax(request >= USELESS))  # 512 steps: plain decoding emits one token per step
    # while useless: 4 calibration steps, a few Thompson draws while the posterior is wide, and forced tries
    # (at most log2(every_max / every) + 1 + steps / every_max = 8 of them)
    forced = math.log2(c.explore_every_max / c.explore_every) + 1 + switch / c.explore_every_max
    assert spec[:switch].sum() <= 4 + 6 + forced  # under 3.5% of the steps
    # once good: tried within every_max tries' worth of time (x 1.3 plain steps) plus the longest hold
    back = int(np.argmax(spec[switch:]))
    assert spec[switch:].any() and back <= c.explore_every_max * 1.3 + c.decide_every_max
    assert spec[request >= USELESS + GOOD - 2].mean() > 0.9  # and then kept
    good = result.requests[USELESS:]
    assert sum(r.plain_time_s for r in good) / sum(r.time_s for r in good) > 1.5
    starved = replay(phase_change, make_policy(f"adaptive:budgets=false,seed={seed},explore_every=0"), LATENCY)
    request, spec = speculated(starved)
    assert spec[request >= USELESS].mean() < 0.05


def test_forced_tries_cost_a_bounded_share_of_time_and_resume_once_a_try_pays():
    every, every_max, cost = 16, 128, 3.0  # a try takes three plain steps and never pays
    s = ExplorationSchedule(("draft_model",), every, every_max)
    tries, time = [], 0.0
    for step in range(1, 20_001):
        if s.due(step) and s.priced("draft_model", step, cost):
            s.tried("draft_model", bar=1.0, plain_s=1.0)
            s.observed("draft_model", step)
            s.judge("draft_model", emitted=1, seconds=cost)  # one token in three plain steps: does not pay
            tries.append(step)
            time += cost
        else:
            time += 1.0
    assert len(tries) <= math.log2(every_max / every) + 1 + 20_000 / (every_max * cost)
    assert cost * len(tries) / time < 1.5 / every_max  # about 1 / every_max of the time, whatever a try costs
    assert np.diff(tries)[-1] == every_max * cost  # waits double up to every_max tries' worth of time
    step = tries[-1] + int(every_max * cost)
    assert s.due(step) == "draft_model" and s.priced("draft_model", step, cost)
    s.tried("draft_model", bar=1.0, plain_s=1.0)
    s.judge("draft_model", emitted=6, seconds=cost)  # the drafter turned good: its try pays
    assert s.wait["draft_model"] == every


def test_calibration_starts_with_the_cheapest_configs():
    c = Controller(ControllerConfig(drafters=("draft_model", "ngram", "self")))
    c.setup(SHAPE)
    configs = [c._config(o) for o in c.calibration]
    tokens = [cfg.max_nodes + 1 if cfg.speculate else 1 for cfg in configs]
    assert not configs[0].speculate and all(cfg.depth == 1 for cfg in configs[1:4])
    assert tokens[:-2] == sorted(tokens[:-2])  # then the deepest chain and its budgeted level, once
    assert configs[-2].depth == configs[-1].depth == c.config.max_depth and configs[-1].budgets is not None


def test_thompson_draws_of_shapes_near_zero_are_never_nan():
    """Both gamma draws of a pair can underflow to 0; a NaN utility used to win np.argmax."""
    c = Controller(ControllerConfig(max_depth=1, widths=(1,)))
    c.setup(SHAPE)
    draws = [c.ranking.thompson([[1e-3]], [[2e-3]])[0][0] for _ in range(2000)]
    assert np.all(np.isfinite(draws)) and 0.0 <= min(draws) and max(draws) <= 1.0


@pytest.mark.parametrize("seed", range(3))
def test_a_batch_forces_tries_per_forward_not_per_request(seed, monkeypatch):
    """In a batch the schedule runs on forwards: 8 requests with a useless drafter force about as many tries
    per forward as one request does per step (before, every request's step advanced it: 10-25 useless
    speculative steps in 128 forwards, each holding the shared forward). With the tries Thompson draws make
    early on (the batched draft forward is priced as shared until lone tries raise its price), the useless
    drafter costs at most 4% of plain decoding's throughput."""
    c = ControllerConfig()
    tries, tried = [], ExplorationSchedule.tried
    monkeypatch.setattr(ExplorationSchedule, "tried", lambda self, *a: (tries.append(a), tried(self, *a))[1])
    useless = synthetic_trace(SHAPE, n_requests=16, n_tokens=64, phases=[[Phase(64, (0.0,), alt=0.0)]] * 16)
    result = replay_batch(useless, make_policy(f"adaptive:budgets=false,seed={seed}"), LATENCY, 8)
    plain = replay_batch(useless, make_policy("plain"), LATENCY, 8)
    forwards = len(result.steps)
    forced = math.log2(c.explore_every_max / c.explore_every) + 1 + forwards / c.explore_every_max
    assert forwards == 128 and len(tries) <= forced
    assert result.throughput >= 0.96 * plain.throughput


def test_a_batch_neither_calibrates_nor_force_tries_a_drafter_it_waits_for():
    """Self-speculation drafts request by request with a model forward while the whole batch waits: in a
    batch it is neither calibrated nor forced (at batch 16 auto ran 0.85x plain with it, 0.91x without);
    alone it is both."""
    c = Controller(ControllerConfig(drafters=("draft_model", "ngram", "self")))

    def drafters(batch) -> set:
        out = set()
        for rid in range(16):
            d = c.decide(DecodeState(rid, 0, 100, 0, 64, None, batch))
            out.add(d.config.drafter if d.config.speculate else None)
        return out

    def fresh(overdue: bool) -> None:
        c.setup(SHAPE)
        if overdue:  # past calibration, self overdue for a try at any price
            c.warmup, c.exploration.due, c.exploration.priced = 0, lambda forwards: "self", lambda *args: True

    for overdue in (False, True):
        fresh(overdue)
        assert "self" in drafters(None)
        fresh(overdue)
        assert "self" not in drafters(BatchContext.unseen(15))
    fresh(False)
    assert drafters(BatchContext.unseen(15)) == {None, "draft_model", "ngram"}


@pytest.mark.parametrize("offloaded", [False, True])
def test_with_experts_offloaded_calibration_skips_drafters_that_run_the_target(offloaded):
    """Self-speculation drafts with the target's own layers: with its experts offloaded each draft level
    reads the missing ones from the slow tier, so once a step reports offload, calibration goes on without it
    (it took 0.3-0.7 s a step against 60 ms for plain decoding at 8 of 32 experts resident)."""
    c = Controller(ControllerConfig(drafters=("draft_model", "ngram", "self")))
    c.setup(SHAPE)
    offload = dict(offload_misses=3, offload_bytes=3_000_000, offload_stall=9e-3) if offloaded else {}
    seen = set()
    for step in range(2 * c.warmup):
        d = c.decide(DecodeState(0, step, 100 + step, step, 1000))
        seen.add(d.config.drafter if d.config.speculate else None)
        c.observe(StepStats(step, PLAIN, 0, 1, 0, 0, 100 + step, t_verify=1e-3, request_id=0, **offload))
    assert ("self" in seen) != offloaded and {"draft_model", "ngram"} <= seen
