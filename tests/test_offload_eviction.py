"""Eviction budgets under expert offload count only slow-tier reads (issue 15, part 3): experts already in
a layer's fast tier are free against its budget (engine/eviction.kept_prefix's `free`).

- the rule: with a free set it equals a plain reference loop, with none it is today's rule exactly, and
  replay's numpy version (traces/outcome.evicted_rows) equals it;
- live (single request and batch): greedy output stays plain greedy; each layer's decision sees the
  store's contents as the layer then reads (so reads <= budget); the rule keeps at least the nodes the
  plain rule keeps on the same routing, and sometimes more;
- replay == live: with prefetch="none" replay_offload's steps (nodes kept, accepted, misses) are the
  live run's, step by step.
"""
import copy
import random

import pytest
import torch
from test_lossless import hf_greedy
from tiny import tiny_moe

import moetune.engine.generate as live_generate
from moetune.engine import batch as batch_mod
from moetune.engine import batch_eviction, eviction
from moetune.engine.drafters import DraftModelDrafter
from moetune.engine.generate import generate
from moetune.engine.loader import moe_shape
from moetune.engine.offload import enable_offload
from moetune.policies.static import Static
from moetune.step import PLAIN, StepConfig
from moetune.traces.latency import LatencyModel
from moetune.traces.offload import LinkProfile, OffloadSpec, replay_offload
from moetune.traces.outcome import config_subtree, evicted_rows, outcome
from moetune.traces.reader import read_trace
from moetune.traces.record import record_request
from moetune.traces.schema import TraceMeta, TreeLimits
from moetune.traces.writer import TraceWriter

PROMPT = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]
NEW = 16
BUDGET = 3
EVICT = StepConfig(drafter="draft_model", depth=3, topk=2, budgets=(BUDGET, BUDGET))
EVAL = StepConfig(drafter="draft_model", depth=3, budgets=(2, 3), eval_agreement=True)  # two forwards a step


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A tiny trace of a draft model's trees; the draft model is a separate model (it never touches the
    store), its lm_head perturbed so that some drafts are rejected."""
    target, draft = tiny_moe("qwen3_moe", seed=0), tiny_moe("qwen3_moe", seed=0)
    torch.manual_seed(3)
    with torch.no_grad():
        draft.lm_head.weight.add_(0.02 * torch.randn_like(draft.lm_head.weight))
    limits = {"draft_model": TreeLimits(depth=3, topk=2)}
    shape = moe_shape(target)
    path = tmp_path_factory.mktemp("offload_eviction") / "tiny.trace"
    with TraceWriter(path, TraceMeta(shape=shape, drafters=limits, router_top=shape.num_experts)) as w:
        record_request(w, target, {"draft_model": DraftModelDrafter(draft)}, limits, Static(PLAIN), 0, PROMPT,
                       max_new_tokens=NEW)
    return target, draft, read_trace(path, strict=True)


# ---- the rule ----------------------------------------------------------------------------------------------
def reference(routing, rank, budget, previous, free):  # [T][K], [T] -> rows kept, by a plain loop
    count = 0
    while count < previous and len({e for r in rank[:count + 1] for e in routing[r]} - free) <= budget:
        count += 1
    return count


def test_rule_with_a_free_set_equals_a_loop_and_without_one_is_todays():
    rng = random.Random(0)
    for _ in range(500):
        T, E, K = rng.randrange(1, 20), rng.choice([4, 8, 16]), 2
        routing = [rng.sample(range(E), K) for _ in range(T)]
        rank = [0] + rng.sample(range(1, T), T - 1)
        budget, previous = rng.randrange(K, E + 1), rng.randrange(1, T + 1)
        free = frozenset(rng.sample(range(E), rng.randrange(0, E + 1)))
        kept = eviction.kept_prefix(routing, rank, budget, previous, free)
        assert kept == reference(routing, rank, budget, previous, free) >= 1  # the root always fits
        plain = eviction.kept_prefix(routing, rank, budget, previous)
        assert eviction.kept_prefix(routing, rank, budget, previous, frozenset()) == plain <= kept
        assert plain == reference(routing, rank, budget, previous, frozenset())
        index, order = torch.tensor(routing), torch.tensor(rank)
        _, count = eviction.evict(index, E, order, eviction.rank_positions(order), budget, torch.tensor(previous))
        assert int(count) == plain  # the accelerator path's rule, which never meets offload


def test_replays_rule_is_the_engines(recorded):
    """evicted_rows with random free sets equals kept_prefix chained over the layers of recorded trees."""
    trace, rng = recorded[2], random.Random(1)
    E, K = trace.shape.num_experts, trace.shape.top_k
    for pos in trace.requests[0].positions:
        tree = pos.trees["draft_model"]
        sub = config_subtree(tree, EVICT)
        for budgets in ((2, 2), (3, 4), (5, 2)):
            free = [frozenset(rng.sample(range(E), rng.randrange(0, E + 1))) for _ in budgets]
            rows, counts, sizes = evicted_rows(tree, sub, budgets, free)
            ranked = tree.experts[rows, :, :K].tolist()  # [n+1][L][K] in keep order
            previous, expected = len(rows), []
            for layer, (budget, f) in enumerate(zip(budgets, free)):
                previous = eviction.kept_prefix([r[layer] for r in ranked], list(range(len(rows))), budget,
                                                previous, f)
                expected.append(previous)
            assert counts.tolist() == expected
            plain = evicted_rows(tree, sub, budgets)
            assert evicted_rows(tree, sub, budgets, [frozenset()] * 2)[1].tolist() == plain[1].tolist()
            assert sizes.tolist() == plain[2].tolist()  # demand and computed experts still count every expert
    with pytest.raises(ValueError, match="give one per layer"):
        evicted_rows(tree, sub, (2, 2), [frozenset()])


# ---- live --------------------------------------------------------------------------------------------------
def _spy(handle, module, monkeypatch) -> list:
    """Every eviction decision (module.kept_prefix) and every store read, in order. A decision is
    (routing, rank, budget, previous, free, kept); a read is (layer, needed, resident as it starts)."""
    events, rule, stream = [], module.kept_prefix, handle.store.stream

    def decide(routing, rank, budget, previous, free=frozenset()):
        kept = rule(routing, rank, budget, previous, free)
        events.append(("decide", routing, rank, budget, previous, free, kept))
        return kept

    def read(layer, needed):
        events.append(("read", layer, frozenset(needed), frozenset(handle.store.layers[layer].slot_of)))
        return stream(layer, needed)

    monkeypatch.setattr(module, "kept_prefix", decide)
    handle.store.stream = read
    return events


def _layers(events) -> list[tuple[tuple, list[tuple]]]:
    """Each read with the decisions made for it (its layer's, since the read before)."""
    out, pending = [], []
    for e in events:
        if e[0] == "decide":
            pending.append(e)
        else:
            out.append((e, pending))
            pending = []
    return out


def _check_reads(events, budgets_per_read) -> int:
    """Every decision saw the store's contents as its layer then read, and each layer read at most its
    budget per deciding request. Returns how many decisions kept more rows than the plain rule would."""
    relaxed = 0
    for (_, layer, needed, resident), decisions in _layers(events):
        assert len(needed - resident) <= budgets_per_read, (layer, needed, resident)
        for _, routing, rank, budget, previous, free, kept in decisions:
            assert free == resident  # the resident set, taken before the layer's own reads
            assert len(set().union(*(routing[r] for r in rank[:kept])) - free) <= budget
            relaxed += kept > eviction.kept_prefix(routing, rank, budget, previous)
    return relaxed


@pytest.mark.parametrize("prefetch", ["none", "both"])
def test_live_single_request_reads_at_most_the_budget_and_stays_lossless(recorded, monkeypatch, prefetch):
    target, draft, _ = recorded
    model = copy.deepcopy(target)
    handle = enable_offload(model, capacity=4, prefetch=prefetch)
    events = _spy(handle, eviction, monkeypatch)
    prefill = live_generate.prefill
    monkeypatch.setattr(live_generate, "prefill", lambda *a: prefill(*a) or events.clear())
    try:
        out = generate(model, None, [PROMPT], drafter=DraftModelDrafter(draft), config=EVICT, max_new_tokens=NEW,
                       eos_token_id=-1)[0]
    finally:
        handle.remove()
    assert out.token_ids == hf_greedy(target, PROMPT, NEW)
    assert _check_reads(events, BUDGET) > 0  # the resident experts really let more rows through
    reads, L = _layers(events), moe_shape(target).num_layers
    assert len(reads) == L * len(out.steps)  # one verification forward per step
    more = 0
    for s, first in zip(out.steps, range(0, len(reads), L)):
        plain = aware = s.tree_size + 1  # rows entering layer 0
        for _, decisions in reads[first:first + L]:
            for _, routing, rank, budget, _, _, kept in decisions:
                plain, aware = eviction.kept_prefix(routing, rank, budget, plain), kept
                assert plain <= aware  # one relaxed constraint per layer: never fewer rows
        assert aware - 1 == s.nodes_kept
        more += aware > plain
    assert more > 0


def test_live_batch_reads_at_most_the_budget_per_request_and_stays_lossless(recorded, monkeypatch):
    target, draft, _ = recorded
    model = copy.deepcopy(target)
    handle = enable_offload(model, capacity=4, prefetch="none")
    events = _spy(handle, batch_eviction, monkeypatch)
    prefill = batch_mod.PackedBatch.prefill
    monkeypatch.setattr(batch_mod.PackedBatch, "prefill", lambda self, joiners: prefill(self, joiners) or
                        events.clear())
    prompts = [PROMPT, PROMPT[:7], PROMPT[3:]]
    try:
        res = batch_mod.generate_batch(model, None, prompts, drafter=DraftModelDrafter(draft), config=EVICT,
                                       batch_size=3, max_new_tokens=NEW, eos_token_id=-1)
    finally:
        handle.remove()
    assert [r.token_ids for r in res] == [hf_greedy(target, p, NEW) for p in prompts]
    assert _check_reads(events, len(prompts) * BUDGET) > 0


# ---- replay == live ----------------------------------------------------------------------------------------
class Recorder(Static):
    """A static policy that keeps its StepStats."""

    def __init__(self, config: StepConfig):
        super().__init__(config)
        self.stats = []

    def observe(self, stats) -> None:
        self.stats.append(stats)


@pytest.mark.parametrize("capacity", [2, 4])
@pytest.mark.parametrize("config", [EVICT, EVAL], ids=["evict", "eval"])
def test_replay_equals_live_step_by_step(recorded, monkeypatch, capacity, config):
    """Both start cold at the first decode step (a trace holds no prompt routing); prefetch is off, as
    replay models none."""
    target, draft, trace = recorded
    model = copy.deepcopy(target)
    handle = enable_offload(model, capacity=capacity, prefetch="none")
    prefill = live_generate.prefill
    monkeypatch.setattr(live_generate, "prefill", lambda *a: prefill(*a) or handle.clear())
    try:
        live = generate(model, None, [PROMPT], drafter=DraftModelDrafter(draft), config=config,
                        max_new_tokens=NEW)[0].steps
    finally:
        handle.remove()
    policy = Recorder(config)
    link = LinkProfile.for_shape(trace.shape, gbps=4.0, bytes_per_param=4)  # tiny_moe is float32
    replay_offload(trace, policy, LatencyModel.analytic(trace.shape), OffloadSpec(capacity, link))
    fields = lambda s: (s.context_len, s.tree_size, s.nodes_kept, s.accepted, s.unique_experts,
                        s.unique_experts_kept, s.offload_misses)
    assert [fields(s) for s in policy.stats] == [fields(s) for s in live]
    positions = trace.requests[0].positions
    plain = [outcome(positions[p].trees["draft_model"], config, NEW - p - 1).nodes_kept
             for p in (s.context_len - len(PROMPT) for s in live)]  # the plain rule on the same trees
    assert all(s.nodes_kept >= n for s, n in zip(live, plain))
    assert sum(s.nodes_kept > n for s, n in zip(live, plain)) > 0  # the resident experts let more rows through
