"""Counterfactual outcomes of configs on recorded trees, and replay over synthetic traces."""
import numpy as np
import pytest

from moetune.adaptive.acceptance import expected_accepted
from moetune.policies.static import Plain, Static
from moetune.step import ModelShape, StepConfig
from moetune.traces.latency import LatencyModel
from moetune.traces.replay import make_policy, outcome, replay, replay_many
from moetune.traces.schema import TreeLimits, TreeRecord
from moetune.traces.synthetic import Phase, synthetic_trace
from moetune.traces.writer import write_trace

SHAPE = ModelShape(num_layers=2, num_experts=8, top_k=2, hidden_size=64, expert_intermediate_size=32)


def hand_tree(grid=(), budget_argmax=None):
    """root -> A (.6, matches) -> C (.5, matches); A -> D (.4); root -> B (.3) -> E (.9).

    Node ids A=0 B=1 C=2 D=3 E=4; rows of per-token arrays are root, A, B, C, D, E.
    Layer 0 routes root/A/C to experts {0,1}, B/D/E to {2,3},{4,5},{6,7}; layer 1 routes all to {0,1}.
    """
    parents = np.array([-1, -1, 0, 0, 1], np.int16)
    tokens = np.array([10, 11, 12, 13, 14], np.int32)
    argmax = np.array([10, 12, 99, 98, 97, 96], np.int32)
    l0 = [[0, 1], [0, 1], [2, 3], [0, 1], [4, 5], [6, 7]]
    experts = np.array([[e, [0, 1]] for e in l0], np.uint8)  # [6, 2, 2]
    probs = np.array([[[0.7, 0.3], [0.6, 0.4]]] * 6, np.float16)
    probs[2, 0] = 0.5  # B's layer-0 experts score below root+A's under prob_sum
    if budget_argmax is None:
        budget_argmax = np.zeros((len(grid), 6), np.int32)
    return TreeRecord(parents=parents, tokens=tokens, probs=np.array([.6, .3, .5, .4, .9], np.float16),
                      argmax=argmax, experts=experts, router_probs=probs, budget_argmax=budget_argmax,
                      top_k=2, grid=grid, limits=TreeLimits(depth=2, topk=2))


@pytest.mark.parametrize("config, size, accepted, unique0", [
    (StepConfig(depth=1), 1, 1, 2),
    (StepConfig(depth=2), 2, 2, 2),
    (StepConfig(depth=1, topk=2), 2, 1, 4),
    (StepConfig(depth=2, topk=2, num_draft_tokens=3), 3, 2, 4),  # A .6, B .3, C .3 (tie: lower id first)
    (StepConfig(depth=2, topk=2), 5, 2, 8),
    (StepConfig(tree=(-1, 0)), 2, 2, 2),  # root's best child, then its best child
    (StepConfig(tree=(-1, -1, 1)), 3, 1, 6),  # A, B, and B's best child E
])
def test_subtree_selection(config, size, accepted, unique0):
    o = outcome(hand_tree(), config)
    assert (o.tree_size, o.accepted, o.unique_experts) == (size, accepted, (unique0, 2))
    assert o.budget_tokens is None and o.mass_kept == (1.0, 1.0)
    # B (a frontier node of topk=2 growths at depth 2) holds one recorded child where a model drafter has two
    assert o.exact == (config.topk == 1 or config.depth == 1)


def test_beyond_the_recording_is_flagged():
    assert not outcome(hand_tree(), StepConfig(depth=3)).exact
    assert not outcome(hand_tree(), StepConfig(tree=(-1, 0, 0, 0))).exact
    assert outcome(hand_tree(), StepConfig(speculate=False)).unique_experts == (2, 2)


def test_budget_keeps_best_experts_and_uses_grid():
    # Verifying A, B under budget 2 in layer 0: {0,1} (root+A) outrank {2,3} (B); B loses its experts.
    grid_argmax = np.array([[10, 12, 55, 98, 97, 96]], np.int32)  # at B=2, B's argmax would change
    rec = hand_tree(grid=(2,), budget_argmax=grid_argmax)
    o = outcome(rec, StepConfig(depth=1, topk=2, budgets=(2, 2), budget_mode="substitute"))
    assert o.unique_experts == (4, 2) and o.unique_kept == (2, 2)
    assert o.substituted == (1, 0) and o.mass_kept[0] == pytest.approx(2 / 3)
    assert o.budget_accepted == 1 and o.budget_tokens == (10, 12)  # root and A were not affected
    # The whole tree at an on-grid uniform budget is exactly what was recorded.
    full = outcome(rec, StepConfig(depth=2, topk=2, budgets=(2, 2), budget_mode="substitute"))
    assert full.budget_exact and full.budget_tokens == (10, 12, 98)
    # Budgets that do not bind are lossless.
    assert outcome(rec, StepConfig(depth=1, topk=2, budgets=(8, 8), budget_mode="substitute")).budget_tokens is None
    with pytest.raises(ValueError, match="2 MoE layers"):
        outcome(rec, StepConfig(depth=1, topk=2, budgets=(2,), budget_mode="substitute"))


@pytest.mark.parametrize("budget, kept, nodes_kept, accepted", [(2, (2, 2), 1, 1), (4, (4, 2), 3, 2),
                                                                 (6, (6, 2), 4, 2), (8, (8, 2), 5, 2)])
def test_eviction_keeps_the_most_probable_prefix_that_fits(budget, kept, nodes_kept, accepted):
    """Ranked by path probability (float16 draft probabilities): A .6001, B .30005 (depth 1), C .30005
    (depth 2: the tie goes to the shallower node), E .27, D .24. Layer 0 routes root/A/C to {0,1}, B to
    {2,3}, E to {6,7}, D to {4,5}; A and C are the accepted path."""
    o = outcome(hand_tree(), StepConfig(depth=2, topk=2, budgets=(budget, budget)))
    assert (o.unique_kept, o.nodes_kept, o.budget_accepted, o.budget_tokens) == (kept, nodes_kept, accepted, None)
    assert o.unique_experts == (8, 2) and o.substituted == (0, 0) and o.budget_exact == o.exact
    with pytest.raises(ValueError, match="2 MoE layers"):
        outcome(hand_tree(), StepConfig(depth=2, topk=2, budgets=(2,)))


def test_synthetic_acceptance_matches_known_values():
    accept = (0.8, 0.6)
    trace = synthetic_trace(SHAPE, n_requests=3, n_tokens=160, phases=[Phase(160, accept, alt=0.0)], seed=1,
                            drafters={"draft_model": TreeLimits(depth=3, topk=1)})
    accepted = [outcome(pos.trees["draft_model"], StepConfig(depth=3)).accepted
                for r in trace.requests for pos in r.positions]
    assert np.mean(accepted) == pytest.approx(expected_accepted(np.array([*accept, accept[-1]]))[-1], abs=0.12)


def test_replay_plain_baseline_and_phases():
    latency = LatencyModel.analytic(SHAPE)
    phases = [Phase(40, (0.95,), kind="repetitive"), Phase(40, (0.1,), kind="prose")]
    trace = synthetic_trace(SHAPE, n_requests=2, n_tokens=80, phases=phases, seed=2)
    plain = replay(trace, Plain(), latency)
    t = plain.total()
    assert t.tokens == 160 and t.steps == 160 and t.speedup == pytest.approx(1.0)
    assert t.time_s == pytest.approx(t.plain_time_s)
    chain = replay(trace, Static(StepConfig(depth=4)), latency)
    log = chain.log
    first = log[log[:, 2] < 40, 4].mean()
    second = log[log[:, 2] >= 40, 4].mean()
    assert first > 2.5 and second < 0.5  # acceptance follows the phases
    assert chain.total().tokens == 160 and chain.summary()["fidelity"] == 1.0
    assert chain.requests[0].speedup == pytest.approx(chain.requests[0].plain_time_s / chain.requests[0].time_s)


def test_replay_budget_fidelity_and_latency_target():
    latency = LatencyModel.analytic(SHAPE)
    trace = synthetic_trace(SHAPE, n_requests=2, n_tokens=60, seed=4)
    free = replay(trace, Static(StepConfig(depth=3, topk=2)), latency, latency_target_ms=1e6).summary()
    tight = replay(trace, Static(StepConfig(depth=3, topk=2, budgets=(2, 2), budget_mode="substitute")), latency,
                   latency_target_ms=1e-3)
    s = tight.summary()
    assert free["fidelity"] == 1.0 and free["attainment"] == 1.0
    assert s["fidelity"] < 1.0 and s["attainment"] == 0.0
    assert max(s["unique_kept"]) <= 2 < min(free["unique_kept"])
    evicted = replay(trace, Static(StepConfig(depth=3, topk=2, budgets=(2, 2))), latency).summary()
    assert evicted["fidelity"] == 1.0 and max(evicted["unique_kept"]) <= 2  # eviction is lossless
    assert evicted["mean_accepted"] < free["mean_accepted"]


def test_make_policy_gives_fresh_policies():
    p = make_policy("static:depth=3,topk=2,num_draft_tokens=6,budgets=4/4,drafter=ngram")
    assert p.config == StepConfig(depth=3, topk=2, num_draft_tokens=6, budgets=(4, 4), drafter="ngram")
    assert p.config.budget_mode == "evict"  # lossless unless asked
    lossy = make_policy("static:depth=3,budgets=4/4,budget_mode=substitute,substitution=renormalize")
    assert (lossy.config.budget_mode, lossy.config.substitution) == ("substitute", "renormalize")
    with pytest.raises(ValueError, match="budget_mode must be one of"):
        make_policy("static:budgets=4/4,budget_mode=drop")
    assert isinstance(make_policy("plain"), Plain)
    static = Static(StepConfig(depth=2))
    assert make_policy(static) is not static and make_policy(static).config == static.config
    with pytest.raises(ValueError):
        make_policy("static:depht=3")


def test_replay_many_matches_serial(tmp_path):
    latency = LatencyModel.analytic(SHAPE)
    paths = []
    for seed in (5, 6):
        paths.append(tmp_path / f"{seed}.trace")
        write_trace(synthetic_trace(SHAPE, n_requests=1, n_tokens=30, seed=seed), paths[-1])
    specs = ["plain", "static:depth=2"]
    par = replay_many(paths, specs, latency, workers=2)
    ser = replay_many(paths, specs, latency, workers=1)
    for a, b in zip(par, ser):
        assert a.policy == b.policy and a.summary()["goodput_tok_s"] == pytest.approx(b.summary()["goodput_tok_s"])
        assert len(a.requests) == 2 and np.array_equal(a.log, b.log)


def test_batch_rank_matches_exact_order_with_near_ties():
    """derive.Batch.by_rank sorts by the top bits of cum_prob; near-ties, exact ties and -0.0 must still
    give the exact (tree, -cum_prob, id) order (through the checked fallback where needed)."""
    from moetune.traces.derive import Batch
    rng = np.random.default_rng(0)
    for cum in (rng.random(300), np.repeat([0.5, 0.5 + 2 ** -40, -0.0, 0.0, 0.25], 60)):
        tree_of = np.repeat(np.arange(3), 100)
        batch = Batch(np.array([0, 100, 200, 300]), np.array([0, 101, 202, 303]), tree_of, tree_of, cum,
                      cum > 0, cum > 0, tree_of, tree_of, tree_of, tree_of, [None] * 3, [], 1)
        assert batch.by_rank.tolist() == np.lexsort((-cum, tree_of)).tolist()


def test_replay_runs_the_driver_with_the_trace_request_ids():
    """StepStats (for a policy that observes) and the log agree step by step; a static policy, which gets
    no StepStats (the fast path), replays to the same log."""
    latency = LatencyModel.analytic(SHAPE)
    trace = synthetic_trace(SHAPE, n_requests=2, n_tokens=30, seed=7)
    seen = []

    class Watch(Static):
        def observe(self, stats):
            seen.append(stats)

    res = replay(trace, Watch(StepConfig(depth=3)), latency)
    assert [(s.request_id, s.step, s.accepted, s.emitted, s.tree_size) for s in seen] == \
        [tuple(int(x) for x in row[[0, 1, 4, 5, 6]]) for row in res.log]
    assert {s.request_id for s in seen} == {r.request_id for r in trace.requests}
    assert np.array_equal(replay(trace, Static(StepConfig(depth=3)), latency).log, res.log)
    with pytest.raises(ValueError, match="asked for drafter 'self'"):
        replay(trace, Static(StepConfig(drafter="self", depth=2)), latency)


def test_replay_lookahead_uses_the_ngram_orders_the_trace_recorded():
    """Replay's n-gram lookup matches with the recorded drafter's orders (meta.ngram_max_n/min_n)."""
    from dataclasses import replace
    from pathlib import Path

    from moetune.traces.reader import read_trace

    class Looking(Static):
        passive_draft = StepConfig(drafter="ngram", depth=3)

        def decide(self, state):
            orders.append(state.lookahead.order)
            return super().decide(state)

    trace = read_trace(Path(__file__).resolve().parents[1] / "traces" / "samples" / "repetitive.trace")
    latency = LatencyModel.analytic(trace.shape)
    orders: list[int] = []
    replay(trace, Looking(StepConfig(depth=3)), latency)
    assert (trace.meta.ngram_max_n, trace.meta.ngram_min_n) == (4, 1) and max(orders) == 4
    trace.meta = replace(trace.meta, ngram_max_n=2, ngram_min_n=2)
    orders.clear()
    replay(trace, Looking(StepConfig(depth=3)), latency)
    assert set(orders) <= {0, 2} and 2 in orders
