"""The controller prices expert transfers under offload (issue 15, part 3).

- live: with experts offloaded, every step's StepStats carry what its verify forward read from the slow tier
  (offload_misses, offload_bytes, offload_stall), and summed over a request's steps they are the store's own
  counters after prefill; with every expert resident they are None;
- replay: replay_offload's StepStats carry the same fields, each step's equal to an independent CacheModel's
  misses of that step and the link's time for them;
- controller: from synthetic steps (no model) it learns the seconds a miss costs and how often an expert
  misses, and with them prices every option: plain decoding when misses dominate, deep speculation when
  they are cheap and acceptance is high.
"""
import copy
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import moetune.engine.generate as live_generate
from moetune import DEFAULT_DRAFT, DEFAULT_TARGET
from moetune.adaptive.controller import Controller, ControllerConfig
from moetune.adaptive.plan import build_plan
from moetune.adaptive.transfers import TransferModel, split
from moetune.driver import step_stats
from moetune.engine.drafters import DraftModelDrafter
from moetune.engine.generate import generate
from moetune.engine.offload import enable_offload
from moetune.policies.adaptive import Adaptive
from moetune.policies.static import Static
from moetune.step import PLAIN, DecodeState, ModelShape, StepConfig, StepStats
from moetune.traces.latency import LatencyModel
from moetune.traces.offload import LinkProfile, OffloadSpec, offload_time, replay_offload, step_forwards
from moetune.traces.reader import read_trace

SAMPLE = Path(__file__).resolve().parents[1] / "traces" / "samples" / "code.trace"
CHAIN = StepConfig(drafter="draft_model", depth=3)
embedded = pytest.mark.skipif(not (DEFAULT_TARGET / "config.json").exists() or
                              not (DEFAULT_DRAFT / "config.json").exists(), reason="embedded models not trained yet")


# ---- live --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded_models():
    from moetune.engine.loader import load_draft, load_target
    target, tok = load_target(DEFAULT_TARGET, device="cpu")
    draft, _ = load_draft(DEFAULT_DRAFT, tok, device="cpu")  # its own weights: it never touches the store
    prompt = tok("The expert said that the model", add_special_tokens=False)["input_ids"]
    return target, draft, prompt


def _offloaded_run(models, monkeypatch, policy, prefetch: str):
    """Decode through an offloaded copy of the target (capacity 4 of 32), its counters reset after prefill."""
    target, draft, prompt = models
    model = copy.deepcopy(target)
    handle = enable_offload(model, capacity=4, prefetch=prefetch)
    prefill = live_generate.prefill

    def prefill_then_reset(*args):
        prefill(*args)
        handle.reset_stats()

    try:
        with monkeypatch.context() as m:
            m.setattr(live_generate, "prefill", prefill_then_reset)
            res = generate(model, None, [prompt], drafter=DraftModelDrafter(draft), policy=policy,
                           max_new_tokens=16, eos_token_id=-1)[0]
        return res, handle.report()
    finally:
        handle.remove()


@embedded
@pytest.mark.parametrize("prefetch", ["none", "both"])
@pytest.mark.parametrize("config", [PLAIN, CHAIN], ids=["plain", "chain"])
def test_live_step_counters_sum_to_the_store_report(embedded_models, monkeypatch, prefetch, config):
    res, report = _offloaded_run(embedded_models, monkeypatch, Static(config), prefetch)
    steps = res.steps
    assert all(s.offload_misses is not None for s in steps)
    assert sum(s.offload_misses for s in steps) == sum(l.misses for l in report.layers) > 0
    assert sum(s.offload_stall for s in steps) == pytest.approx(sum(l.stall_s for l in report.layers), rel=1e-9)
    assert sum(s.offload_bytes for s in steps) == sum(l.demand_bytes for l in report.layers)
    assert all(s.offload_bytes == s.offload_misses * report.expert_bytes for s in steps)  # no failed prefetch
    if prefetch == "none":  # every byte read was a miss's
        assert sum(l.prefetch_bytes for l in report.layers) == 0
    assert all(0 <= s.offload_stall <= s.t_verify for s in steps)  # the wait is part of the verify forward
    assert {s.offload_capacity for s in steps} == {4}  # _offloaded_run's fast tier


@embedded
def test_batched_steps_carry_their_shared_forwards_reads(embedded_models, monkeypatch):
    """In a batch every request's StepStats carry the shared forward's reads; each forward counted once,
    they sum to the store's counters after the (one, packed) prefill."""
    from moetune.engine import batch as batch_mod
    target, draft, prompt = embedded_models
    model = copy.deepcopy(target)
    handle = enable_offload(model, capacity=4, prefetch="none")
    prefill = batch_mod.PackedBatch.prefill

    def prefill_then_reset(self, joiners):
        prefill(self, joiners)
        handle.reset_stats()

    try:
        monkeypatch.setattr(batch_mod.PackedBatch, "prefill", prefill_then_reset)
        res = batch_mod.generate_batch(model, None, [prompt, prompt[:4], prompt[2:]], drafter=DraftModelDrafter(draft),
                                       config=CHAIN, batch_size=3, max_new_tokens=8, eos_token_id=-1)
        report = handle.report()
    finally:
        handle.remove()
    forwards = {}  # one entry per shared forward (the same step of every request in it)
    for r in res:
        for s in r.steps:
            forwards.setdefault((s.batch_t_verify, s.step), []).append(
                (s.offload_misses, s.offload_bytes, s.offload_stall))
    assert all(len(set(reads)) == 1 for reads in forwards.values())  # one forward's reads, in each request
    assert {s.offload_capacity for r in res for s in r.steps} == {4}
    assert sum(reads[0][0] for reads in forwards.values()) == sum(l.misses for l in report.layers) > 0
    assert sum(reads[0][1] for reads in forwards.values()) == sum(l.demand_bytes for l in report.layers)


@embedded
def test_live_fields_are_none_with_every_expert_resident(embedded_models):
    target, draft, prompt = embedded_models
    res = generate(target, None, [prompt], drafter=DraftModelDrafter(draft), config=CHAIN, max_new_tokens=6)[0]
    assert res.steps and all((s.offload_misses, s.offload_bytes, s.offload_stall) == (None,) * 3 for s in res.steps)


@embedded
def test_live_adaptive_learns_transfers_from_its_steps(embedded_models, monkeypatch):
    policy = Adaptive(ControllerConfig(drafters=("draft_model",), budgets=False))
    res, report = _offloaded_run(embedded_models, monkeypatch, policy, "none")
    transfers = policy.controller.learn().transfers
    assert transfers.steps == len(res.steps) > 0  # no budgets: no evaluation-mode step is left out
    measured = sum(l.stall_s for l in report.layers) / sum(l.misses for l in report.layers)
    assert transfers.seconds_per_miss == pytest.approx(measured, rel=0.1)  # a few steps forgotten a little
    assert 0 < transfers.miss_rate <= 1


# ---- replay ------------------------------------------------------------------------------------------------
class Recorder(Static):
    """A static policy that keeps its StepStats (a policy that observes is given them)."""

    def __init__(self, config: StepConfig):
        super().__init__(config)
        self.stats: list[StepStats] = []

    def observe(self, stats: StepStats) -> None:
        self.stats.append(stats)


@pytest.mark.parametrize("config", [PLAIN, StepConfig(drafter="draft_model", depth=4, topk=2),
                                    StepConfig(drafter="draft_model", depth=3, budgets=(8,) * 6,
                                               eval_agreement=True)], ids=["plain", "tree", "eval"])
def test_replay_step_counters_are_the_cache_models(config):
    trace = read_trace(SAMPLE)
    link = LinkProfile.for_shape(trace.shape, gbps=2.0, latency_s=2e-5)
    spec = OffloadSpec(6, link)
    policy = Recorder(config)
    latency = LatencyModel.analytic(trace.shape)
    res = replay_offload(trace, policy, latency, spec)
    requests, caches, total = {r.request_id: r for r in trace.requests}, {}, 0
    for s in policy.stats:
        req = requests[s.request_id]
        cache = caches.setdefault(s.request_id, spec.cache(trace.shape))
        p = s.context_len - req.prompt_len
        trees = req.positions[p].trees
        tree = trees[config.drafter] if config.speculate else next(iter(trees.values()))
        depth = (req.max_new_tokens or len(req.positions)) - p - 1  # as TraceBackend reads it
        *first, last = step_forwards(tree, config, depth)
        misses = [sum(cache.step(n)[1]) for n in first]  # evaluation mode's unbudgeted forward comes first
        if config.budgets is not None:  # then eviction does not count the experts the cache holds
            [last] = step_forwards(tree, replace(config, eval_agreement=False), depth, cache.contents())
        misses.append(sum(cache.step(last)[1]))
        assert s.offload_misses == sum(misses)
        assert s.offload_bytes == sum(misses) * link.expert_bytes
        assert s.offload_stall == pytest.approx(sum(offload_time([m], link) for m in misses))
        verify = latency.verify_time(s.tree_size + 1, sum(s.unique_experts_kept), s.context_len)
        assert s.t_verify - s.offload_stall == pytest.approx(verify)  # the stall is what offload added
        total += s.offload_misses
    assert total == res.misses.sum() > 0


def test_replay_teaches_the_controller_the_links_price():
    """Replay waits link.transfer_s per miss, so that is what the controller learns a miss costs."""
    trace = read_trace(SAMPLE)
    link = LinkProfile.for_shape(trace.shape, gbps=1.0, latency_s=1e-4)
    policy = Adaptive(ControllerConfig(drafters=tuple(trace.meta.drafters)))
    res = replay_offload(trace, policy, LatencyModel.analytic(trace.shape), OffloadSpec(8, link))
    transfers = policy.controller.learn().transfers
    assert transfers.steps > 0 and res.misses.sum() > 0
    assert transfers.seconds_per_miss == pytest.approx(link.transfer_s, rel=1e-9)


# ---- controller on synthetic steps -------------------------------------------------------------------------
SHAPE = ModelShape(num_layers=4, num_experts=32, top_k=4)
PROMPT_LEN = 32


def _unique(tokens: int) -> tuple[int, ...]:
    """Unique experts per layer of a forward of `tokens` tokens: related tokens share experts."""
    return (min(SHAPE.num_experts, SHAPE.top_k + 3 * (tokens - 1)),) * SHAPE.num_layers


def _synthetic_step(rng: random.Random, step: int, config: StepConfig, context_len: int, accept_p: float,
                    miss_rate: float, seconds_per_miss: float) -> StepStats:
    """One step of a machine whose compute is 2 ms + 0.1 ms per token + 20 us per expert, whose drafted
    tokens are each accepted with probability accept_p, and whose experts miss at miss_rate, each miss
    waiting seconds_per_miss (+-10%) on the slow tier."""
    nodes = config.max_nodes
    accepted = 0
    while accepted < nodes and rng.random() < accept_p:
        accepted += 1
    unique = _unique(nodes + 1)
    misses = sum(rng.random() < miss_rate for _ in range(sum(unique)))
    stall = misses * seconds_per_miss * rng.uniform(0.9, 1.1)
    t_verify = 2e-3 + 1e-4 * (nodes + 1) + 2e-5 * sum(unique) + stall
    t_draft = 3e-4 + 2e-4 * config.depth if config.speculate else 0.0
    return step_stats(0, step, config, accepted=accepted, emitted=[0] * (accepted + 1), tree_size=nodes,
                      tree_depth=config.depth if config.speculate else 0, context_len=context_len,
                      times=(t_draft, t_verify, 0.0, 0.0), t_control=0.0, unique=unique,
                      offload=dict(offload_misses=misses, offload_bytes=misses * 10**6, offload_stall=stall))


def _run(accept_p: float, miss_rate: float, seconds_per_miss: float, steps: int = 400) -> tuple[Controller, list]:
    """The controller deciding `steps` steps of one request on the synthetic machine; the steps it ran."""
    ctrl = Controller(ControllerConfig(drafters=("draft_model",), widths=(1,), budgets=False, eviction_levels=()))
    ctrl.setup(SHAPE)
    ctrl.begin(0, PROMPT_LEN)
    rng, generated, chosen = random.Random(0), 0, []
    for step in range(steps):
        config = ctrl.decide(DecodeState(0, step, PROMPT_LEN + generated, generated, 10**6)).config
        stats = _synthetic_step(rng, step, config, PROMPT_LEN + generated, accept_p, miss_rate, seconds_per_miss)
        ctrl.observe(stats)
        generated += stats.emitted
        chosen.append(stats)
    return ctrl, chosen


def test_expensive_misses_turn_speculation_off():
    """Each miss costs 2 ms (10x a plain step's compute per expert), and a chain computes more experts per
    emitted token than plain decoding at 50% acceptance: the controller settles on plain decoding."""
    ctrl, steps = _run(accept_p=0.5, miss_rate=0.5, seconds_per_miss=2e-3)
    late = [s.config for s in steps[-150:]]
    assert sum(not c.speculate for c in late) >= 0.9 * len(late)
    assert ctrl.learn().transfers.seconds_per_miss == pytest.approx(2e-3, rel=0.05)


def test_cheap_misses_and_high_acceptance_speculate_deep():
    _, steps = _run(accept_p=0.9, miss_rate=0.05, seconds_per_miss=2e-5)
    late = [s.config for s in steps[-150:]]
    assert sum(c.speculate for c in late) >= 0.9 * len(late)
    assert np.mean([c.depth for c in late if c.speculate]) >= 4


@pytest.mark.parametrize("seconds_per_miss,miss_rate", [(5e-4, 0.3), (4e-3, 0.6), (1e-5, 0.05)])
def test_learned_seconds_per_miss_and_miss_rate_converge(seconds_per_miss, miss_rate):
    ctrl, steps = _run(accept_p=0.7, miss_rate=miss_rate, seconds_per_miss=seconds_per_miss, steps=300)
    transfers = ctrl.learn().transfers
    assert transfers.seconds_per_miss == pytest.approx(seconds_per_miss, rel=0.03)
    assert transfers.miss_rate == pytest.approx(miss_rate, rel=0.1)
    assert transfers.seconds_per_expert == pytest.approx(transfers.miss_rate * transfers.seconds_per_miss)
    # the verify fit learns the compute alone: the step time less the stall
    last = steps[-1]
    compute = ctrl.latency.predict_verify(last.tree_size + 1, sum(last.unique_experts), last.context_len)
    assert compute == pytest.approx(last.t_verify - last.offload_stall, rel=0.05)


def test_an_option_pays_its_predicted_misses():
    """The plan's step time of every option grows by transfer_seconds x its predicted unique experts."""
    ctrl = Controller(ControllerConfig(drafters=("draft_model",), budgets=False))
    ctrl.setup(SHAPE)
    est = ctrl.learners.estimates(ctrl.menu)
    assert est.transfer_seconds == 0.0  # nothing observed: nothing priced
    base = build_plan(ctrl.menu, est).step_times([0.0] * len(ctrl.menu.grid.families), 100)
    priced = build_plan(ctrl.menu, replace(est, transfer_seconds=1e-3)).step_times(
        [0.0] * len(ctrl.menu.grid.families), 100)
    experts = [sum(u) for u in ctrl.unique]
    assert np.allclose(np.subtract(priced, base), 1e-3 * np.asarray(experts))


def test_forced_misses_are_priced_apart_from_the_learned_rate():
    """A fast tier of 8 experts a layer: steps of 4 experts a layer miss 1 in 4 of them; steps of 14 a layer
    also miss the 6 a layer that cannot fit. Learned apart, the rate of the fitting experts is 1/4 (one rate
    over all experts reads ~0.44), and the plan prices each option's forced misses at the full miss price."""
    model = TransferModel(0.99)
    rng = np.random.default_rng(0)
    for _ in range(400):
        layers = [4] * 6 if rng.random() < 0.7 else [14] * 6
        forced = sum(max(u - 8, 0) for u in layers)
        misses = forced + rng.binomial(sum(min(u, 8) for u in layers), 0.25)
        fitting, forced_n = split(layers, 8)
        model.observe(misses, misses * 5e-3, fitting, forced_n, 8)
    assert model.miss_rate == pytest.approx(0.25, abs=0.03) and model.capacity == 8
    assert model.seconds_per_miss == pytest.approx(5e-3)
    assert split([4, 14, 9], 8) == (20.0, 7.0) and split([4, 14], None) == (18.0, 0.0)
    ctrl = Controller(ControllerConfig(drafters=("draft_model",), budgets=False))
    ctrl.setup(SHAPE)
    est = replace(ctrl.learners.estimates(ctrl.menu), transfer_seconds=1e-3, miss_seconds=5e-3, capacity=6)
    base = build_plan(ctrl.menu, replace(est, transfer_seconds=0.0, miss_seconds=0.0)).step_times(
        [0.0] * len(ctrl.menu.grid.families), 100)
    priced = build_plan(ctrl.menu, est).step_times([0.0] * len(ctrl.menu.grid.families), 100)
    layers = np.asarray(ctrl.unique)  # (C, L) predicted per layer
    expected = 1e-3 * np.minimum(layers, 6).sum(1) + 5e-3 * np.maximum(layers - 6, 0).sum(1)
    assert np.maximum(layers - 6, 0).sum() > 0  # some options overflow the tier
    assert np.allclose(np.subtract(priced, base), expected)


def test_transfer_model_forgets_and_resets():
    model = TransferModel(0.9)
    for _ in range(200):
        model.observe(10, 10 * 1e-3, 40)
    for _ in range(200):  # the link slowed down: the old price is forgotten
        model.observe(10, 10 * 4e-3, 40)
    assert model.seconds_per_miss == pytest.approx(4e-3) and model.miss_rate == pytest.approx(0.25)
    model.observe(1, float("nan"), 4)
    with pytest.warns(RuntimeWarning, match="transfer-cost model"):
        assert not model.check()
    assert (model.seconds_per_miss, model.miss_rate, model.steps) == (0.0, 0.0, 0)
    model.observe(0, 2e-3, 40)  # a wait on prefetches in flight, nothing missing: still priced
    assert model.seconds_per_expert == pytest.approx(5e-5)
    with pytest.raises(ValueError, match=r"forgetting must be in \[0.9, 1\]"):
        TransferModel(0.5)


@pytest.mark.parametrize("fields", [dict(offload_misses=3), dict(offload_misses=3, offload_bytes=30),
                                    dict(offload_misses=-1, offload_bytes=0, offload_stall=0.0),
                                    dict(offload_misses=1, offload_bytes=10, offload_stall=float("nan"))])
def test_step_stats_refuse_partial_or_negative_offload_fields(fields):
    with pytest.raises(ValueError, match="offload_misses, offload_bytes and offload_stall are set together"):
        StepStats(step=0, config=PLAIN, accepted=0, emitted=1, tree_size=0, tree_depth=0, context_len=4, **fields)


@pytest.mark.parametrize("fields", [dict(offload_capacity=8), dict(offload_misses=1, offload_bytes=10, offload_stall=0.0,
                                                                  offload_capacity=0)])
def test_step_stats_refuse_a_capacity_without_reads_or_below_one(fields):
    with pytest.raises(ValueError, match="offload_capacity"):
        StepStats(step=0, config=PLAIN, accepted=0, emitted=1, tree_size=0, tree_depth=0, context_len=4, **fields)
