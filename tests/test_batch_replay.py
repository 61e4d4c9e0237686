"""Batched replay (traces/batch.py): batch 1 is single-request replay, the batch loads the union of its
requests' experts, plain throughput grows with the batch, each request keeps its own id, bad arguments."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moetune.adaptive.experts import iid_unique
from moetune.policies.base import Policy
from moetune.step import PLAIN, DecodeState, ModelShape, StepConfig, StepStats
from moetune.traces.batch import replay_batch, routed_experts, tile_requests
from moetune.traces.moesd import StepMeans, moesd_speedup
from moetune.traces.latency import LatencyModel, fit_trace
from moetune.traces.outcome import outcome
from moetune.traces.reader import read_trace
from moetune.traces.replay import make_policy, replay
from moetune.traces.schema import Position, RequestTrace, Trace, TraceMeta, TreeLimits, TreeRecord
from moetune.traces.synthetic import synthetic_trace

SAMPLE = Path(__file__).resolve().parent.parent / "traces" / "samples" / "repetitive.trace"
SMALL = ModelShape(num_layers=4, num_experts=32, top_k=2, hidden_size=64, expert_intermediate_size=32)
FIELDS = ("tokens", "steps", "time_s", "plain_time_s", "accepted", "drafted", "agreed", "inexact")


@pytest.fixture(scope="module")
def sample():
    trace = read_trace(SAMPLE)
    return trace, fit_trace(trace)


@pytest.mark.parametrize("spec", ["plain", "static:depth=4", "static:depth=4,topk=2,num_draft_tokens=8",
                                  "static:drafter=ngram,depth=4", "auto",
                                  "static:depth=5,topk=2,budgets=6/6/6/6/6/6,budget_mode=evict"])
def test_batch_one_is_single_request_replay(sample, spec):
    trace, latency = sample
    single = replay(trace, make_policy(spec), latency)
    batch = replay_batch(trace, make_policy(spec), latency, batch_size=1)
    assert batch.replay.configs == single.configs
    assert np.array_equal(batch.replay.log, single.log)  # step for step: configs, accepted, tree sizes, times
    for a, b in zip(single.requests, batch.replay.requests):
        assert [getattr(a, f) for f in FIELDS] == [getattr(b, f) for f in FIELDS]
        assert np.array_equal(a.unique_kept, b.unique_kept)
    assert batch.throughput == pytest.approx(single.total().goodput, rel=1e-12)
    assert np.all(batch.column("active") == 1)


def hand_tree(l0: list, l1: list) -> TreeRecord:
    """root -> node 0 (p .6, the target's token) and node 1 (p .3); rows root, 0, 1 route l0 / l1."""
    experts = np.array([[a, b] for a, b in zip(l0, l1)], np.uint8)  # [3, L=2, K=2]
    return TreeRecord(parents=np.array([-1, -1], np.int16), tokens=np.array([5, 6], np.int32),
                      probs=np.array([.6, .3], np.float16), argmax=np.array([5, 9, 9], np.int32), experts=experts,
                      router_probs=np.full((3, 2, 2), .5, np.float16), budget_argmax=np.zeros((0, 3), np.int32),
                      top_k=2, limits=TreeLimits(depth=1, topk=2))


def hand_trace() -> Trace:
    """Request 0: root {0,1}/{0,1}, node 0 {2,3}/{4,5}; request 1: root {1,2}/{6,7}, node 0 {3,4}/{6,7};
    node 1 (never selected by a chain) {6,7}/{6,7} and {5,6}/{0,1}."""
    trees = [hand_tree([[0, 1], [2, 3], [6, 7]], [[0, 1], [4, 5], [6, 7]]),
             hand_tree([[1, 2], [3, 4], [5, 6]], [[6, 7], [6, 7], [0, 1]])]
    shape = ModelShape(num_layers=2, num_experts=8, top_k=2)
    meta = TraceMeta(shape=shape, drafters={"draft_model": TreeLimits(depth=1, topk=2)}, router_top=2)
    requests = [RequestTrace(request_id=i, prompt_len=10, positions=[Position(5, {"draft_model": t})],
                             max_new_tokens=4, complete=True) for i, t in enumerate(trees)]
    return Trace(meta, requests, path="<hand>")


@pytest.mark.parametrize("config, union, own", [
    (PLAIN, 3 + 4, 4 + 4),  # layer 0 {0,1,2}, layer 1 {0,1,6,7}
    (StepConfig(depth=1), 5 + 6, 8 + 6),  # layer 0 {0,1,2,3,4}, layer 1 {0,1,4,5,6,7}
])
def test_batch_loads_the_union_of_its_requests_experts(config, union, own):
    latency = LatencyModel(verify=(0.0, 0.0, 1e-3, 0.0, 0.0))  # a second per thousand experts loaded
    trace = hand_trace()
    own_experts = [int(routed_experts(r.positions[0].trees["draft_model"], config, 3, 8).sum()) for r in trace.requests]
    assert sum(own_experts) == own
    result = replay_batch(trace, make_policy(lambda: StaticFor(config)), latency, batch_size=2)
    assert result.column("active").tolist() == [2]
    assert result.column("experts").tolist() == [union]
    assert result.column("verify_s")[0] == pytest.approx(union * 1e-3)
    alone = replay_batch(hand_trace(), make_policy(lambda: StaticFor(config)), latency, batch_size=1)
    assert alone.column("experts").tolist() == own_experts


class StaticFor(Policy):
    name = "static_for"

    def __init__(self, config: StepConfig):
        self.config = config

    def decide(self, state: DecodeState) -> StepConfig:
        return self.config


@pytest.mark.parametrize("budget", [4, 6, 9])
def test_eviction_rows_match_outcome(budget):
    """The rows routed_experts keeps per layer reach exactly outcome.py's kept expert counts."""
    trace = synthetic_trace(SMALL, n_requests=1, n_tokens=12, seed=3, budget_grid=())
    config = StepConfig(depth=4, topk=2, num_draft_tokens=8, budgets=(budget,) * 4, budget_mode="evict")
    for pos in trace.requests[0].positions:
        tree = pos.trees["draft_model"]
        assert routed_experts(tree, config, None, 32).sum(axis=1).tolist() == list(outcome(tree, config).unique_kept)


def test_plain_throughput_rises_with_batch_size():
    """A step costs a fixed overhead plus time per expert loaded: batching shares both."""
    trace = synthetic_trace(SMALL, n_requests=16, n_tokens=12, seed=1, budget_grid=())
    latency = LatencyModel(verify=(5e-3, 0.0, 1e-4, 0.0, 0.0))
    results = [replay_batch(trace, make_policy("plain"), latency, b) for b in (1, 2, 4, 8, 16)]
    rates = [r.throughput for r in results]
    assert all(a < b for a, b in zip(rates, rates[1:])), rates
    for r in results:
        assert r.replay.total().tokens == 16 * 12
        step_time = r.column("verify_s") + r.column("draft_s") + r.column("overhead_s")
        assert r.replay.total().time_s == pytest.approx(step_time.sum())  # request shares add up to the steps
        assert r.span == pytest.approx(step_time.sum())
        assert r.column("active").max() == r.batch_size


class Recorder(Policy):
    """Speculates a chain of depth 1 + request id % 3 and records what it sees, per request id."""

    name = "recorder"

    def __init__(self):
        self.events, self.active, self.most = [], set(), 0

    def begin(self, request_id, prompt_len):
        self.events.append(("begin", request_id, prompt_len))
        self.active.add(request_id)
        self.most = max(self.most, len(self.active))

    def decide(self, state: DecodeState) -> StepConfig:
        self.events.append(("decide", state.request_id, state.step, state.generated))
        return StepConfig(depth=1 + state.request_id % 3)

    def observe(self, stats: StepStats) -> None:
        self.events.append(("observe", stats.request_id, stats.step, stats.emitted, stats.config.depth))

    def end(self, request_id):
        self.events.append(("end", request_id))
        self.active.remove(request_id)


def test_policy_sees_each_requests_own_id():
    trace = synthetic_trace(SMALL, n_requests=5, n_tokens=10, seed=2, budget_grid=())
    policy = Recorder()
    result = replay_batch(trace, policy, LatencyModel.analytic(SMALL), batch_size=3)
    assert policy.most == 3
    for req in trace.requests:
        rid = req.request_id
        mine = [e for e in policy.events if e[1] == rid]
        assert mine[0] == ("begin", rid, req.prompt_len) and mine[-1] == ("end", rid)
        decides = [e for e in mine if e[0] == "decide"]
        observed = [e for e in mine if e[0] == "observe"]
        assert [e[2] for e in decides] == [e[2] for e in observed] == list(range(len(decides)))
        assert [e[3] for e in decides] == np.cumsum([0] + [e[3] for e in observed[:-1]]).tolist()
        assert all(e[4] == 1 + rid % 3 for e in observed)  # each request's stats carry its own decision
        assert sum(e[3] for e in observed) == len(req.positions)
    first_end = next(i for i, e in enumerate(policy.events) if e[0] == "end")
    assert len({e[1] for e in policy.events[:first_end] if e[0] == "decide"}) == 3  # interleaved
    assert [s.result.request_id for s in result.served] == [0, 1, 2, 3, 4]


def test_arrivals_idle_and_join_in_order():
    trace = synthetic_trace(SMALL, n_requests=3, n_tokens=6, seed=4, budget_grid=())
    result = replay_batch(trace, make_policy("plain"), LatencyModel.analytic(SMALL), 2, arrivals=[0.0, 5.0, 0.0])
    joined = {s.result.request_id: s for s in result.served}
    assert joined[0].joined == joined[2].joined == 0.0
    assert joined[1].joined == 5.0 and joined[1].finish > 5.0
    assert result.span == pytest.approx(joined[1].finish)


@pytest.mark.parametrize("batch_size", [0, -2, 1.5, True, "4"])
def test_invalid_batch_size_names_the_argument_and_fix(batch_size):
    trace = synthetic_trace(SMALL, n_requests=1, n_tokens=2, budget_grid=())
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1.*pass batch_size=1 or more"):
        replay_batch(trace, make_policy("plain"), LatencyModel.analytic(SMALL), batch_size)


def test_invalid_arrivals_and_draft_mode():
    trace = synthetic_trace(SMALL, n_requests=2, n_tokens=2, budget_grid=())
    lat = LatencyModel.analytic(SMALL)
    with pytest.raises(ValueError, match="arrivals needs one time per request"):
        replay_batch(trace, make_policy("plain"), lat, 2, arrivals=[0.0])
    with pytest.raises(ValueError, match="draft must be one of"):
        replay_batch(trace, make_policy("plain"), lat, 2, draft="parallel")


def test_tile_requests_reuses_tails_with_distinct_ids():
    trace = synthetic_trace(SMALL, n_requests=2, n_tokens=10, budget_grid=())
    pool = tile_requests(trace, 7)
    assert [r.request_id for r in pool.requests] == list(range(7))
    assert [len(r.positions) for r in pool.requests] == [10, 10, 8, 8, 6, 6, 9]  # skips 0, 7 % 5, 14 % 5, 21 % 5
    assert pool.requests[2].prompt_len == trace.requests[0].prompt_len + 2
    assert pool.requests[2].positions[0] is trace.requests[0].positions[2]


def test_moesd_speedup_is_the_expert_ratio_when_only_experts_cost():
    """With a latency of per-expert time only and free drafts, MoESD's speedup is (1 + a) N(b) / N(b(n+1))."""
    latency = LatencyModel(verify=(0.0, 0.0, 1e-4, 0.0, 0.0))
    means = StepMeans("draft_model", tree_size=3.0, tree_depth=3.0, accepted=1.5, context=100.0)
    bs = np.array([1, 4, 16, 64])
    got = moesd_speedup(latency, SMALL, means, bs.tolist())
    want = 2.5 * iid_unique(32, 2, bs) / iid_unique(32, 2, 4 * bs)
    assert got == pytest.approx(want)
    assert got[-1] > got[0]  # extra tokens cost ever less as the batch loads every expert


class Alone(Policy):
    """Wraps a policy so it decides and learns as if each request were alone (no batch context)."""

    def __init__(self, inner: Policy):
        self.inner, self.name = inner, inner.name

    def setup(self, shape):
        self.inner.setup(shape)

    def begin(self, request_id, prompt_len):
        self.inner.begin(request_id, prompt_len)

    def decide(self, state: DecodeState) -> StepConfig:
        return self.inner.decide(replace(state, batch=None))

    def observe(self, stats: StepStats) -> None:
        self.inner.observe(replace(stats, batch_tokens=None, batch_experts=None, batch_context=None,
                                   batch_t_verify=None, batch_experts_others=None))

    def end(self, request_id):
        self.inner.end(request_id)


def test_auto_prices_options_in_the_batch():
    """Where experts dominate a step, a drafted token priced alone loads experts; in a batch of 8 the others
    load most of them already: auto with the batch context speculates where it ran mostly plain, and goes
    faster (over three traces: one run's Thompson draws decide a lot). Alone (batch 1) the batch context is
    absent and decisions are the same step for step."""
    shape = ModelShape(num_layers=4, num_experts=32, top_k=2, hidden_size=64, expert_intermediate_size=32)
    latency = LatencyModel(verify=(1e-3, 1e-6, 1e-4, 0.0, 0.0), draft={"draft_model": (1e-5, 1e-5, 0.0)})
    spec = "auto:drafters=draft_model"
    drafted, speedup = [], []
    for seed in (1, 2, 3):
        trace = synthetic_trace(shape, n_requests=16, n_tokens=48, seed=seed, budget_grid=())
        if seed == 1:
            single = [replay_batch(trace, p, latency, 1) for p in (make_policy(spec), Alone(make_policy(spec)))]
            assert np.array_equal(single[0].replay.log, single[1].replay.log)
        runs = [replay_batch(trace, p, latency, 8) for p in (make_policy(spec), Alone(make_policy(spec)))]
        drafted.append([r.replay.total().drafted / r.replay.total().steps for r in runs])
        speedup.append(runs[0].throughput / runs[1].throughput)
    batched, alone = np.mean(drafted, axis=0)
    assert all(b > a for b, a in drafted) and batched > 1.0 and alone < 0.6 * batched, drafted
    assert np.mean(speedup) > 1.05, speedup
