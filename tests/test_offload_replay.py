"""Replay's counterfactual expert offload (traces/offload.py) against the live store (engine/offload.py, on
demand: prefetch="none"): on a recorded tiny trace, a static config replayed through the cache model hits
and misses what the live fast tier hits and misses, per layer, at every capacity and under both evictions.

Alignment: the trace holds no prompt routing, so both sides start cold at the first decode step (the live
fast tier is emptied and its counters reset right after prefill). A live "late" (a hit on an in-flight
prefetch) cannot occur without prefetch; live hits + late are compared with the model's hits anyway."""
import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny import tiny_moe

import moetune.engine.generate as live_generate
from moetune.engine import offload_store
from moetune.engine.drafters import DraftModelDrafter
from moetune.engine.generate import generate
from moetune.engine.loader import moe_shape
from moetune.engine.offload import enable_offload
from moetune.policies.static import Static
from moetune.step import PLAIN, ModelShape, StepConfig
from moetune.traces.latency import LatencyModel
from moetune.traces.offload import (DECAY, EVICTIONS, CacheModel, LinkProfile, OffloadSpec, offload_time,
                                    replay_offload, step_forwards)
from moetune.traces.outcome import outcome
from moetune.traces.reader import read_trace
from moetune.traces.record import record_request
from moetune.traces.replay import replay
from moetune.traces.schema import TraceMeta, TreeLimits
from moetune.traces.writer import TraceWriter

PROMPT = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]
NEW = 16
E = 8  # tiny_moe's experts per layer
CONFIGS = [PLAIN, StepConfig(drafter="draft_model", depth=3),
           StepConfig(drafter="draft_model", depth=2, topk=2),
           StepConfig(drafter="draft_model", depth=2, topk=2, budgets=(3, 4)),  # eviction: only kept rows compute
           StepConfig(drafter="draft_model", depth=3, budgets=(3, 3), eval_agreement=True)]  # two forwards a step


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A tiny trace of a draft model's trees; the draft model does not touch the store (the target's weights
    in a separate model, its lm_head perturbed so that some drafts are rejected)."""
    target, draft = tiny_moe("qwen3_moe", seed=0), tiny_moe("qwen3_moe", seed=0)
    torch.manual_seed(3)
    with torch.no_grad():
        draft.lm_head.weight.add_(0.02 * torch.randn_like(draft.lm_head.weight))
    drafters = {"draft_model": DraftModelDrafter(draft)}
    limits = {"draft_model": TreeLimits(depth=3, topk=2)}
    shape = moe_shape(target)
    meta = TraceMeta(shape=shape, drafters=limits, router_top=shape.num_experts)
    path = tmp_path_factory.mktemp("offload") / "tiny.trace"
    with TraceWriter(path, meta) as w:
        res = record_request(w, target, drafters, limits, Static(PLAIN), 0, PROMPT, max_new_tokens=NEW)
    assert res.mismatches == 0
    return target, drafters, read_trace(path, strict=True)


def _live(target, drafters, config, capacity, eviction, monkeypatch):
    """Decode PROMPT through an offloaded copy of the target, counting from a cold tier after prefill.
    Returns (tokens, report, the store's calls after prefill as (layer, needed))."""
    model = copy.deepcopy(target)
    handle = enable_offload(model, capacity=capacity, prefetch="none", eviction=eviction)
    calls = []
    stream = handle.store.stream
    handle.store.stream = lambda layer, needed: calls.append((layer, list(needed))) or stream(layer, needed)
    prefill = live_generate.prefill

    def prefill_then_cold(*args):
        prefill(*args)
        handle.clear()
        handle.reset_stats()
        calls.clear()

    try:
        with monkeypatch.context() as m:
            m.setattr(live_generate, "prefill", prefill_then_cold)
            out = generate(model, None, [PROMPT], drafter=dict(drafters), config=config, max_new_tokens=NEW)[0]
        return out.token_ids, handle.report(), calls
    finally:
        handle.remove()


def _per_layer(report):
    rows = report.per_layer()
    assert all(r["late"] == 0 for r in rows)  # nothing is in flight without prefetch
    return [r["hits"] + r["late"] for r in rows], [r["misses"] for r in rows]


@pytest.mark.parametrize("eviction", EVICTIONS)
@pytest.mark.parametrize("capacity", [1, 2, 4, 8])
def test_replay_hits_and_misses_equal_the_live_store(recorded, monkeypatch, capacity, eviction):
    """Per layer, per config: the store's calls replayed through CacheModel, and the trace replayed through
    replay_offload, both count the live store's hits and misses."""
    target, drafters, trace = recorded
    shape = trace.shape
    link = LinkProfile.for_shape(shape, gbps=4.0, latency_s=1e-5, bytes_per_param=4)  # tiny_moe is float32
    latency = LatencyModel.analytic(shape)
    for config in CONFIGS:
        tokens, report, calls = _live(target, drafters, config, capacity, eviction, monkeypatch)
        assert tokens == trace.requests[0].output.tolist()
        assert report.expert_bytes == link.expert_bytes
        live_hits, live_misses = _per_layer(report)
        cache = CacheModel(shape.num_layers, E, capacity, eviction)
        assert [layer for layer, _ in calls] == list(range(shape.num_layers)) * (len(calls) // shape.num_layers)
        counts = [cache.step([n for _, n in calls[i:i + shape.num_layers]])
                  for i in range(0, len(calls), shape.num_layers)]
        assert np.sum([h for h, _ in counts], axis=0).tolist() == live_hits, config
        assert np.sum([m for _, m in counts], axis=0).tolist() == live_misses, config
        res = replay_offload(trace, Static(config), latency, OffloadSpec(capacity, link, eviction))
        assert res.hits.tolist() == live_hits, config
        assert res.misses.tolist() == live_misses, config
        assert res.stall_s == pytest.approx(sum(live_misses) * link.transfer_s)
        forwards = 2 if config.eval_agreement else 1  # evaluation mode also verifies unbudgeted first
        assert res.replay.total().steps * forwards == len(calls) // shape.num_layers


def test_stall_enters_step_times_and_the_plain_baseline(recorded):
    """Each step's stall is added to its time (and so to the log and goodput); plain decoding pays its own
    misses, so plain replayed under offload has speedup 1."""
    trace = recorded[2]
    link = LinkProfile(gbps=1.0, latency_s=1e-4, expert_bytes=10**6)
    latency = LatencyModel.analytic(trace.shape)
    config = StepConfig(drafter="draft_model", depth=2, topk=2)
    base = replay(trace, Static(config), latency)
    res = replay_offload(trace, Static(config), latency, OffloadSpec(2, link))
    assert res.replay.log[:, :7].tolist() == base.log[:, :7].tolist()  # the same steps, only slower
    assert res.replay.total().time_s == pytest.approx(base.total().time_s + res.stall_s)
    assert res.replay.total().plain_time_s == pytest.approx(base.total().plain_time_s + res.plain_stall_s)
    assert res.stall_s == pytest.approx(res.misses.sum() * link.transfer_s) and res.misses.sum() > 0
    plain = replay_offload(trace, Static(PLAIN), latency, OffloadSpec(2, link))
    assert plain.misses.tolist() == plain.plain_misses.tolist()
    assert plain.summary()["speedup"] == pytest.approx(1.0)


def test_substitution_budget_computes_only_the_experts_it_keeps(recorded):
    trace = recorded[2]
    config = StepConfig(drafter="draft_model", depth=3, topk=2, budgets=(3, 2), budget_mode="substitute")
    binding = 0
    for p, pos in enumerate(trace.requests[0].positions):
        tree = pos.trees["draft_model"]
        o = outcome(tree, config)
        [kept] = step_forwards(tree, config)
        [full] = step_forwards(tree, replace(config, budgets=None))
        assert [len(k) for k in kept] == list(o.unique_kept) and all(k <= f for k, f in zip(kept, full))
        binding += kept != full
    assert binding > 0


def test_prefill_and_decode_forwards_mirror_the_store(recorded):
    """Forwards of many tokens (a prompt: more experts than slots) and of one, without any alignment."""
    target = copy.deepcopy(recorded[0])
    for capacity in (1, 3):
        handle = enable_offload(target, capacity=capacity, prefetch="none", eviction="lfu")
        calls = []
        stream = handle.store.stream
        handle.store.stream = lambda layer, needed: calls.append(list(needed)) or stream(layer, needed)
        with torch.no_grad():
            for ids in (PROMPT, PROMPT[:1], PROMPT[3:7], PROMPT[-1:]):
                target(torch.tensor([ids]))
        cache = CacheModel(2, E, capacity, "lfu")
        counts = [cache.step(calls[i:i + 2]) for i in range(0, len(calls), 2)]
        hits, misses = _per_layer(handle.report())
        assert np.sum([h for h, _ in counts], axis=0).tolist() == hits
        assert np.sum([m for _, m in counts], axis=0).tolist() == misses
        handle.remove()


def test_constants_are_the_live_stores():
    assert (EVICTIONS, DECAY) == (offload_store.EVICTIONS, offload_store.DECAY)


def test_hand_made_sequences():
    """LRU evicts the least recent call's expert, LFU the least (decayed) used; within one call a layer
    needing more than its capacity streams through it, and keeps what it computed last."""
    steps = [{0}, {0}, {1}, {2}, {1}]
    lru, lfu = CacheModel(1, 4, 2, "lru"), CacheModel(1, 4, 2, "lfu")
    # lru: {2} evicts 0 (last used at call 2, 1 at call 3), so {1} hits; lfu: {2} evicts 1 (0 was used twice)
    assert [lru.step([s]) for s in steps] == [((0,), (1,)), ((1,), (0,)), ((0,), (1,)), ((0,), (1,)), ((1,), (0,))]
    assert [lfu.step([s]) for s in steps][-1] == ((0,), (1,))
    one = CacheModel(1, 4, 1)
    assert one.step([{2, 0, 1}]) == ((0,), (3,))  # all three stream through the single slot, in id order
    assert one.step([{2}]) == ((1,), (0,)) and one.step([{0}]) == ((0,), (1,))
    two_layers = CacheModel(2, 4, 2)
    assert two_layers.step([{0, 1}, set()]) == ((0, 0), (2, 0))
    assert two_layers.step([[1, 1, 0], {3}]) == ((2, 0), (0, 1))  # duplicates count once


def test_capacity_of_every_expert_never_misses_after_warm_up():
    rng = np.random.default_rng(0)
    cache = CacheModel(3, 6, 6, "lfu")
    cache.step([set(range(6))] * 3)
    for _ in range(50):
        needed = [set(rng.choice(6, size=rng.integers(1, 7), replace=False).tolist()) for _ in range(3)]
        hits, misses = cache.step(needed)
        assert misses == (0, 0, 0) and list(hits) == [len(n) for n in needed]


def test_offload_time_is_every_miss_in_turn():
    link = LinkProfile(gbps=2.0, latency_s=1e-4, expert_bytes=1_000_000)
    assert link.transfer_s == pytest.approx(1e-4 + 5e-4)
    assert offload_time((3, 0, 2), link) == pytest.approx(5 * 6e-4)
    assert offload_time((), link) == 0


@pytest.mark.parametrize("make, fix", [
    (lambda: CacheModel(2, 8, 0), "capacity must be a whole number"),
    (lambda: CacheModel(2, 8, 9), r"pass capacity in \[1, 8\]"),
    (lambda: CacheModel(2, 8, 2, "fifo"), "eviction must be one of"),
    (lambda: CacheModel(0, 8, 2), "num_layers must be"),
    (lambda: CacheModel(2, 8, 2.0), "capacity must be a whole number"),
    (lambda: CacheModel(2, 8, 2).step([{1}]), r"one set of experts per MoE layer \(2\)"),
    (lambda: CacheModel(1, 8, 2).step([{8}]), r"expert ids must be in \[0, 8\)"),
    (lambda: LinkProfile(0.0, 0.0, 10), "gbps must be a positive"),
    (lambda: LinkProfile(1.0, -1.0, 10), "latency_s must be"),
    (lambda: LinkProfile(1.0, 0.0, 0), "LinkProfile.for_shape computes it"),
    (lambda: LinkProfile.for_shape(ModelShape(num_layers=2, num_experts=8, top_k=2), 4.0), "pass LinkProfile"),
    (lambda: OffloadSpec(2, "4GB/s"), "must be a LinkProfile"),
    (lambda: OffloadSpec(2, LinkProfile(1.0, 0.0, 10), "mru"), "eviction must be one of"),
])
def test_invalid_arguments_name_the_fix(make, fix):
    with pytest.raises(ValueError, match=fix):
        make()
