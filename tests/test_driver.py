"""moetune.driver: the one step protocol (lookahead -> decide -> draft -> verify -> accept -> commit ->
observe) over a toy backend, request ids end to end, and the one StepStats builder."""
import subprocess
import sys

import pytest

from moetune.driver import decode, step_stats
from moetune.policies.base import Policy
from moetune.policies.cascade import Cascade
from moetune.policies.static import Static
from moetune.step import PLAIN, Lookahead, StepConfig

OUTPUT = [7, 8, 9, 7, 8, 9, 7, 8, 9, 1]  # what the toy target emits, token by token


class ListBackend:
    """A target whose greedy output is OUTPUT: a drafted chain is accepted while it follows OUTPUT."""

    keeps_steps = False

    def __init__(self, prompt_len=4, max_new_tokens=len(OUTPUT), guess=OUTPUT):
        self.prompt_len, self.max_new_tokens, self.guess = prompt_len, max_new_tokens, guess
        self.generated, self.done, self.calls, self.emitted = 0, False, [], []

    def prefill(self, passive):
        self.calls.append(("prefill", passive))

    def lookahead(self, passive):
        self.calls.append("lookahead")
        return Lookahead(passive.drafter, 2, passive.depth)

    def draft(self, config):
        self.calls.append("draft")
        p = self.generated
        depth = min(config.depth, self.max_new_tokens - p - 1) if config.speculate else 0
        return self.guess[p:p + depth]

    def verify(self, config, tree):
        self.calls.append("verify")
        return OUTPUT[self.generated:self.generated + len(tree) + 1]

    def accept(self, tree, truth):
        self.calls.append("accept")
        return next((i for i, (d, t) in enumerate(zip(tree, truth)) if d != t), len(tree))

    def commit(self, config, tree, truth, accepted):
        self.calls.append("commit")
        self.emitted = truth[:accepted + 1]
        self.generated += len(self.emitted)
        self.done = self.generated >= self.max_new_tokens

    def stats(self, request_id, step, config, passive, tree, truth, accepted, t_control):
        self.calls.append("stats")
        return step_stats(request_id, step, config, accepted=accepted, emitted=self.emitted, tree_size=len(tree),
                          tree_depth=len(tree), context_len=self.prompt_len + self.generated - len(self.emitted),
                          times=(1.0, 2.0, 0.0, 0.0), t_control=t_control, passive=passive,
                          chain=None if passive is None else [7, 8])


class Recorder(Static):
    """A static policy that learns: keeps every DecodeState and StepStats it sees."""

    def __init__(self, config):
        super().__init__(config)
        self.states, self.seen, self.begun, self.ended = [], [], [], []

    def begin(self, request_id, prompt_len):
        self.begun.append((request_id, prompt_len))

    def decide(self, state):
        self.states.append(state)
        return super().decide(state)

    def observe(self, stats):
        self.seen.append(stats)

    def end(self, request_id):
        self.ended.append(request_id)


def test_phases_in_order_and_states_and_stats_follow_the_request():
    backend, policy = ListBackend(), Recorder(StepConfig(depth=4))
    control = decode(policy, backend, request_id=42)
    assert backend.calls[0] == ("prefill", None)  # after the policy's begin
    assert backend.calls[1:6] == ["draft", "verify", "accept", "commit", "stats"]
    assert "lookahead" not in backend.calls  # no passive draft, no lookahead
    assert policy.begun == [(42, 4)] and policy.ended == [42] and control > 0
    # 4-chains along OUTPUT accept everything: 5 + 5 tokens
    assert [(s.request_id, s.step, s.accepted, s.emitted, s.context_len) for s in policy.seen] == \
        [(42, 0, 4, 5, 4), (42, 1, 4, 5, 9)]
    assert [(st.request_id, st.step, st.context_len, st.generated, st.remaining) for st in policy.states] == \
        [(42, 0, 4, 0, 10), (42, 1, 9, 5, 5)]
    assert all(s.t_control >= 0 and s.step_time >= 3.0 for s in policy.seen)


def test_wrong_drafts_and_the_last_step_is_cut_to_the_tokens_allowed():
    backend, policy = ListBackend(max_new_tokens=6, guess=[0] * 20), Recorder(StepConfig(depth=4))
    decode(policy, backend, request_id=0)
    assert [(s.accepted, s.emitted, s.tree_size) for s in policy.seen] == [(0, 1, 4)] * 2 + [(0, 1, 3)] + \
        [(0, 1, 2), (0, 1, 1), (0, 1, 0)]
    assert backend.generated == 6


def test_static_policy_gets_no_stats_unless_the_backend_keeps_them():
    backend = ListBackend()
    decode(Static(StepConfig(depth=2)), backend, request_id=0)
    assert "stats" not in backend.calls and backend.generated == len(OUTPUT)
    kept = ListBackend()
    kept.keeps_steps = True
    decode(Static(StepConfig(depth=2)), kept, request_id=0)
    assert kept.calls.count("stats") == kept.calls.count("commit")
    seen = []
    decode(Static(PLAIN), ListBackend(), request_id=3, on_step=seen.append)
    assert [s.request_id for s in seen] == [3] * len(OUTPUT)


def test_passive_draft_lookahead_is_shown_before_each_decision_and_checked_after():
    policy = Recorder(PLAIN)
    policy.passive_draft = StepConfig(drafter="ngram", depth=3)
    backend = ListBackend()
    decode(policy, backend, request_id=0)
    assert backend.calls[0] == ("prefill", policy.passive_draft)
    assert backend.calls[1:3] == ["lookahead", "draft"]
    assert all(st.lookahead == Lookahead("ngram", 2, 3) for st in policy.states)
    # plain steps emit one token: the chain [7, 8] against it
    assert [s.probe.accepted for s in policy.seen[:3]] == [1, 0, 0]
    assert policy.seen[0].probe.censored and not policy.seen[1].probe.censored


@pytest.mark.parametrize("passive", [StepConfig(drafter="draft_model", depth=3), StepConfig(drafter="ngram", topk=2)])
def test_a_passive_draft_that_is_not_a_model_free_chain_is_refused(passive):
    policy = Static(PLAIN)
    policy.passive_draft = passive
    with pytest.raises(ValueError, match="Policy.passive_draft must be a chain"):
        decode(policy, ListBackend(), request_id=0)


def test_any_object_with_the_methods_is_a_policy():
    class Duck:  # no Policy base, no passive_draft, no wants_routing
        def setup(self, shape): pass
        def begin(self, request_id, prompt_len): pass
        def decide(self, state): return StepConfig(depth=2)
        def observe(self, stats): self.last = stats
        def end(self, request_id): pass

    duck = Duck()
    decode(duck, ListBackend(), request_id=5)
    assert duck.last.request_id == 5 and duck.last.emitted == 1  # the last token alone
    assert isinstance(Static(PLAIN), Policy) and Static(PLAIN).decision_log() == []


def test_step_stats_defaults_without_a_budget():
    s = step_stats(1, 2, StepConfig(depth=3), accepted=2, emitted=[5, 6, 7], tree_size=3, tree_depth=3,
                   context_len=10, times=(1.0, 2.0, 3.0, 4.0), t_control=5.0, unique=(4, 6))
    assert (s.request_id, s.step, s.emitted, s.unique_experts_kept, s.router_mass_kept, s.tokens_substituted) == \
        (1, 2, 3, (4, 6), (1.0, 1.0), (0, 0))
    assert s.step_time == 15.0 and s.probe is None
    passive = StepConfig(drafter="ngram", depth=4)
    checked = step_stats(1, 2, PLAIN, accepted=0, emitted=[5], tree_size=0, tree_depth=0, context_len=10,
                         times=(0.0,) * 4, t_control=0.0, passive=passive, chain=[5, 9])
    assert (checked.probe.drafted, checked.probe.accepted, checked.probe.censored) == (2, 1, True)


def test_cascade_files_observations_by_request_id():
    from moetune.step import DecodeState

    c = Cascade()
    c.begin(0, 4)
    c.begin(1, 4)
    cfg0 = c.decide(DecodeState(0, 0, 4, 0, 10))  # request 0: its first test arm
    for i in range(3):
        c.decide(DecodeState(1, i, 4, 0, 10))  # request 1 moves on to its second arm
    s = step_stats(0, 0, cfg0, accepted=0, emitted=[1], tree_size=0, tree_depth=0, context_len=4,
                   times=(0.0, 1.0, 0.0, 0.0), t_control=0.0)
    c.observe(s)
    assert c.requests[0].time[c.requests[0].arm] == 1.0 and c.requests[1].time.sum() == 0.0


def test_driver_imports_no_torch():
    code = "import sys, moetune.driver, moetune.traces.replay; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_generate_carries_request_ids_to_policy_and_stats():
    from tiny import tiny_moe

    from moetune.engine.drafters import NgramDrafter
    from moetune.engine.generate import generate

    policy = Recorder(StepConfig(drafter="ngram", depth=3))
    res = generate(tiny_moe("qwen3_moe", seed=0), None, [[5, 6, 7, 5, 6], [5, 6]], drafter=NgramDrafter(),
                   policy=policy, max_new_tokens=6, eos_token_id=-1, request_ids=[11, 12])
    assert policy.begun == [(11, 5), (12, 2)] and policy.ended == [11, 12]
    assert {st.request_id for st in policy.states} == {11, 12}
    assert [s.request_id for r in res for s in r.steps] == [s.request_id for s in policy.seen]
    assert [s.request_id for s in res[1].steps] == [12] * len(res[1].steps)
    assert [s.context_len for s in res[0].steps][0] == 5
    with pytest.raises(ValueError, match="one id per prompt"):
        generate(tiny_moe("qwen3_moe", seed=0), None, [[5, 6]], policy=policy, max_new_tokens=2, request_ids=[1, 2])
