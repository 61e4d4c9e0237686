"""Recording with the engine on tiny models: counterfactual replay of smaller configs (with and without
expert budgets) reproduces what the engine does live with them, and the policy that ran while recording
replays to its measured goodput."""
from pathlib import Path

import pytest

from moetune import DEFAULT_DRAFT, DEFAULT_TARGET
from moetune.engine import moe_budget as mb
from moetune.engine.drafters import DraftModelDrafter, NgramDrafter, SelfDrafter
from moetune.engine.generate import generate
from moetune.policies.static import Static
from moetune.step import StepConfig
from moetune.traces.latency import fit_trace
from moetune.traces.outcome import outcome
from moetune.traces.reader import read_trace
from moetune.traces.record import record_request
from moetune.traces.replay import replay
from moetune.traces.schema import TraceMeta, TreeLimits
from moetune.engine.loader import load_draft, load_target, moe_shape
from moetune.ngram import NgramIndex
from moetune.traces.writer import TraceWriter
from tiny import tiny_moe

PROMPT = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]
NEW = 24


class Collect(Static):
    """A static policy that keeps what it observes, routing included."""

    wants_routing = True

    def __init__(self, config):
        super().__init__(config)
        self.seen = []

    def observe(self, stats):
        self.seen.append(stats)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    target = tiny_moe("qwen3_moe", seed=0)
    drafters = {"self": SelfDrafter(target), "ngram": NgramDrafter()}
    limits = {"self": TreeLimits(depth=3, topk=2), "ngram": TreeLimits(depth=3, topk=1)}
    shape = moe_shape(target)
    # The whole router distribution (M = E), so budget rankings can be checked against the engine's.
    meta = TraceMeta(shape=shape, drafters=limits, router_top=shape.num_experts, budget_grid=(2, 4))
    path = tmp_path_factory.mktemp("rec") / "tiny.trace"
    live_policy = Static(StepConfig(drafter="self", depth=2), name="live")
    with TraceWriter(path, meta) as w:
        res = record_request(w, target, drafters, limits, live_policy, 0, PROMPT, "test", max_new_tokens=NEW,
                             budget_grid=(2, 4))
    assert res.mismatches == 0
    return target, drafters, read_trace(path, strict=True)


def same_step(s):
    """What a live step and its replay must agree on (both are built by moetune.driver.step_stats)."""
    return (s.request_id, s.step, s.config, s.context_len, s.accepted, s.emitted, s.tree_size, s.tree_depth,
            s.unique_experts, s.unique_experts_kept, s.tokens_substituted, s.nodes_kept, s.probe)


@pytest.mark.parametrize("config", [
    StepConfig(drafter="self", depth=1),
    StepConfig(drafter="self", depth=3),
    StepConfig(drafter="self", depth=2, topk=2),
    StepConfig(drafter="self", depth=3, topk=2, num_draft_tokens=4),
    StepConfig(drafter="self", tree=(-1, -1, 0)),
    StepConfig(drafter="ngram", depth=2),
    StepConfig(drafter="self", depth=3, topk=2, budgets=(3, 3)),  # eviction: replay derives it exactly
    StepConfig(drafter="self", depth=3, topk=2, num_draft_tokens=4, budgets=(4, 2)),
    StepConfig(drafter="ngram", depth=3, budgets=(2, 3)),
])
def test_counterfactual_matches_live_engine(recorded, config):
    """Live and replay run the same driver: every step agrees field by field, request id included."""
    target, drafters, trace = recorded
    req = trace.requests[0]
    live = Collect(config)
    out = generate(target, None, [PROMPT], drafter=dict(drafters), policy=live, max_new_tokens=NEW,
                   request_ids=[req.request_id])[0]
    assert out.token_ids == req.output.tolist()
    replayed = Collect(config)
    replay(trace, replayed, fit_trace(trace))
    assert [same_step(s) for s in replayed.seen] == [same_step(s) for s in live.seen]
    assert out.steps == live.seen  # the live result keeps the very StepStats the policy observed


def test_budget_grid_recorded_and_lossless_at_full_budget(recorded):
    _, _, trace = recorded
    for pos in trace.requests[0].positions:
        tree = pos.trees["self"]
        assert tree.budget_argmax.shape == (2, tree.num_nodes + 1)
        assert tree.argmax[0] == pos.token
    full = replay(trace, Static(StepConfig(drafter="self", depth=2, budgets=(8, 8))), fit_trace(trace))
    assert full.summary()["fidelity"] == 1.0


def test_self_check_live_policy_replays_to_measured_goodput(recorded):
    _, _, trace = recorded
    req = trace.requests[0]
    assert req.live is not None and req.live.configs == [StepConfig(drafter="self", depth=2)]
    result = replay(trace, Static(req.live.configs[0]), fit_trace(trace, include_trees=False))
    assert result.log[:, 4].astype(int).tolist() == req.live.accepted.tolist()
    assert result.total().goodput == pytest.approx(req.live.goodput, rel=0.10)


@pytest.mark.parametrize("config, grid_exact", [
    (StepConfig(drafter="ngram", depth=3, budgets=(4, 4), budget_mode="substitute"), True),  # the whole recorded tree, a grid budget
    (StepConfig(drafter="ngram", depth=3, budgets=(2, 2), budget_mode="substitute"), True),
    (StepConfig(drafter="self", depth=2, topk=2, budgets=(3, 5), budget_mode="substitute"), False),
    (StepConfig(drafter="self", depth=3, budgets=(3, 3), selection="hit_count", budget_mode="substitute"), False),
    (StepConfig(drafter="self", depth=2, topk=2, budgets=(4, 3), selection="accept_weighted",
                budget_mode="substitute"), False),
])
def test_budget_outcomes_match_live_engine(recorded, config, grid_exact):
    """Each live budgeted step, while the live output still equals the recorded one (same context), has
    the unique experts kept, routing mass kept and substituted tokens replay derives for the layers it
    calls exact, and the accepted length wherever replay calls that exact."""
    target, drafters, trace = recorded
    req = trace.requests[0]
    live = Collect(config)
    out = generate(target, None, [PROMPT], drafter=dict(drafters), policy=live, max_new_tokens=NEW)[0]
    p = compared = dropped = exact = 0
    for stats in live.seen:
        if out.token_ids[:p] != req.output[:p].tolist():
            break  # the budget changed an emitted token: from here the contexts differ
        o = outcome(req.positions[p].trees[config.drafter], config, NEW - p - 1)
        n = o.budget_layers_exact
        assert n >= 1  # the full router distribution makes at least the first layer's ranking exact
        assert o.unique_kept[:n] == stats.unique_experts_kept[:n]
        assert o.substituted[:n] == stats.tokens_substituted[:n]
        assert o.mass_kept[:n] == pytest.approx(stats.router_mass_kept[:n], abs=2e-3)  # float16 router probs
        if o.budget_exact:
            assert o.budget_accepted == stats.accepted
            exact += 1
        compared += 1
        dropped += any(stats.tokens_substituted[:n])
        p += stats.emitted
    assert compared >= 3 and dropped >= 1
    assert (exact > 0) == grid_exact


class Probing(Collect):
    """Collect, asking for a passive n-gram draft (Policy.passive_draft); keeps the lookaheads it was shown."""

    passive_draft = StepConfig(drafter="ngram", depth=3)

    def decide(self, state):
        self.looks = getattr(self, "looks", []) + [state.lookahead]
        return super().decide(state)


@pytest.mark.parametrize("config", [StepConfig(speculate=False), StepConfig(drafter="self", depth=2),
                                    StepConfig(drafter="ngram", depth=2)])
def test_probe_reports_what_an_ngram_step_would_accept_live_and_in_replay(recorded, config):
    target, drafters, trace = recorded
    live = Probing(config)
    out = generate(target, None, [PROMPT], drafter=dict(drafters), policy=live, max_new_tokens=NEW)[0]
    replayed = Probing(config)
    replay(trace, replayed, fit_trace(trace))
    assert [s.probe for s in replayed.seen] == [s.probe for s in live.seen]
    # ground truth from the whole greedy output: the n-gram chain at each step's position, checked only
    # against the tokens the step emitted
    ids, pos = PROMPT + out.token_ids, len(PROMPT)
    for s in live.seen:
        draft = (NgramDrafter().continuations(ids[:pos], 3, 1) or [[]])[0]
        full = next((i for i, (d, t) in enumerate(zip(draft, ids[pos:])) if d != t), min(len(draft), len(ids) - pos))
        assert (s.probe.drafted, s.probe.accepted) == (len(draft), min(full, s.emitted))
        assert s.probe.censored == (full >= s.emitted and len(draft) > s.emitted)
        pos += s.emitted
    assert any(s.probe.accepted > 0 for s in live.seen)  # the prompt repeats itself: the probe matches
    if config.speculate and config.drafter == "ngram":
        # on the n-gram drafter's own (shallower) steps the probe also checks the level past the chain
        assert any(s.probe.accepted > s.accepted == s.tree_size for s in live.seen)


@pytest.mark.parametrize("config", [StepConfig(speculate=False), StepConfig(drafter="self", depth=2),
                                    StepConfig(drafter="ngram", depth=2)])
def test_lookahead_is_shown_before_each_decision_live_and_in_replay(recorded, config):
    target, drafters, trace = recorded
    req = trace.requests[0]
    assert req.prompt_ids.tolist() == PROMPT  # recorded, so replay can run the lookup over the context
    live = Probing(config)
    out = generate(target, None, [PROMPT], drafter=dict(drafters), policy=live, max_new_tokens=NEW)[0]
    replayed = Probing(config)
    replay(trace, replayed, fit_trace(trace))
    assert replayed.looks == live.looks
    # ground truth: a fresh brute-force-checked index over each step's context
    ids, pos = PROMPT + out.token_ids, len(PROMPT)
    for look, s in zip(live.looks, live.seen):
        order, chain = NgramIndex().lookahead(ids[:pos], 3)
        assert (look.drafter, look.order, look.drafted) == ("ngram", order, len(chain))
        pos += s.emitted
    assert {look.order for look in live.looks} >= {0, 1} or len({look.order for look in live.looks}) > 1
    # a trace without prompt ids (recorded before they were kept) replays with no lookahead
    req.prompt_ids, saved = None, req.prompt_ids
    try:
        blind = Probing(config)
        replay(trace, blind, fit_trace(trace))
    finally:
        req.prompt_ids = saved
    assert all(look is None for look in blind.looks) and len(blind.looks) == len(live.looks)


SAMPLES = Path(__file__).resolve().parents[1] / "traces" / "samples"


@pytest.fixture(scope="module")
def embedded():
    if not (DEFAULT_TARGET / "config.json").exists():
        pytest.skip("embedded default models not trained yet")
    target, tok = load_target(DEFAULT_TARGET, device="cpu", dtype="float32")
    draft, _ = load_draft(DEFAULT_DRAFT, tok, device="cpu", dtype="float32")
    return target, DraftModelDrafter(draft)


@pytest.mark.parametrize("name", ["code", "docstring", "repetitive"])
def test_eviction_replays_exactly_on_every_sample_trace(embedded, name):
    """Replay derives eviction from the recorded routing and draft probabilities alone: on each sample trace
    (the embedded models) every live step of a budgeted tree agrees with its replay field by field, and
    the live output stays the recorded plain-greedy one (eviction is lossless)."""
    target, drafter = embedded
    trace = read_trace(SAMPLES / f"{name}.trace")
    req = trace.requests[0]
    config = StepConfig(depth=4, topk=2, num_draft_tokens=8, budgets=(10, 12, 12, 12, 12, 10))
    live = Collect(config)
    out = generate(target, None, [req.prompt_ids.tolist()], drafter={"draft_model": drafter}, policy=live,
                   max_new_tokens=len(req.output), request_ids=[req.request_id], eos_token_id=-1)[0]
    assert out.token_ids == req.output.tolist()
    replayed = Collect(config)
    replay(trace, replayed, fit_trace(trace))
    mine = [same_step(s) for s in replayed.seen if s.request_id == req.request_id]
    assert mine == [same_step(s) for s in live.seen]
    assert any(s.nodes_kept < s.tree_size for s in live.seen)  # eviction acted
    mb.install(target).remove()
