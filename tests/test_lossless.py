"""Greedy speculative output equals HF greedy `generate`, whatever the drafter or tree shape."""
import time

import pytest
import torch
from tiny import FAMILIES, tiny_dense, tiny_moe

from moetune import DEFAULT_DRAFT, DEFAULT_TARGET
from moetune.engine.drafters import DraftModelDrafter, NgramDrafter, SelfDrafter
from moetune.engine.generate import generate
from moetune.step import PLAIN, StepConfig

PROMPT = [5, 17, 33, 17, 33, 90, 4, 17, 33]


class Late:
    """Duck-typed (no Policy base): plain decoding for 3 steps, then `config`; declares `drafters`."""

    def __init__(self, config: StepConfig, drafters):
        self.config, self.drafters = config, drafters

    def setup(self, shape): pass
    def begin(self, r, n): pass
    def decide(self, state): return PLAIN if state.step < 3 else self.config
    def observe(self, stats): pass
    def end(self, r): pass


def hf_greedy(model, prompt, n, eos=None):
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, eos_token_id=eos,
                         pad_token_id=1)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=FAMILIES)
def target(request):
    return tiny_moe(request.param)


CASES = {
    "plain": (None, None),
    "self_draft_chain": ("same", StepConfig(depth=5)),
    "self_draft_dynamic_tree": ("same", StepConfig(depth=4, topk=3, num_draft_tokens=12)),
    "static_tree": ("same", StepConfig(tree=(-1, -1, 0, 0, 1, 2, 2, 4))),
    "random_draft_tree": ("random", StepConfig(depth=3, topk=2)),
    "ngram": ("ngram", StepConfig(drafter="ngram", depth=4, topk=3)),
    "self_spec_top1": ("self", StepConfig(drafter="self", depth=3, topk=2, num_draft_tokens=5)),
}


@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_hf(target, case):
    kind, config = CASES[case]
    drafter = {None: None, "same": DraftModelDrafter(target), "random": DraftModelDrafter(tiny_dense()),
               "ngram": NgramDrafter(), "self": SelfDrafter(target, layers=1)}[kind]
    res = generate(target, None, [PROMPT], drafter=drafter, config=config, max_new_tokens=23, eos_token_id=-1,
                   routing=True)[0]
    assert res.token_ids == hf_greedy(target, PROMPT, 23)
    assert sum(s.emitted for s in res.steps) == 23
    if kind == "same":
        assert res.mean_accepted >= 1.5
    if kind == "random":
        assert res.mean_accepted < 0.5
    step = res.steps[-1]
    assert len(step.unique_experts) == 2 and all(1 <= u <= 8 for u in step.unique_experts)


def test_static_steps_skip_routing(target):
    """A static policy learns nothing from routing, so its steps capture none (and stay lossless)."""
    res = generate(target, None, [PROMPT], drafter=NgramDrafter(), config=StepConfig(drafter="ngram", depth=4),
                   max_new_tokens=23, eos_token_id=-1)[0]
    assert res.token_ids == hf_greedy(target, PROMPT, 23)
    assert all(s.unique_experts == () for s in res.steps)


def test_the_adaptive_policy_samples_routing(target, monkeypatch):
    """The adaptive controller learns unique experts from a sample of steps (Controller.routing_now): every
    step of its first ROUTING_WARMUP, then one in ROUTING_EVERY capture routing, the others skip the hooks;
    output stays HF's, and routing=True still captures every step."""
    from moetune.adaptive import controller
    from moetune.adaptive.config import ControllerConfig
    from moetune.policies.adaptive import Adaptive
    monkeypatch.setattr(controller, "ROUTING_WARMUP", 4)
    config = ControllerConfig(drafters=("ngram",), budgets=False)
    res = generate(target, None, [PROMPT], drafter=NgramDrafter(), policy=Adaptive(config), max_new_tokens=40,
                   eos_token_id=-1)[0]
    assert res.token_ids == hf_greedy(target, PROMPT, 40)
    captured = [len(s.unique_experts) == 2 for s in res.steps]
    assert captured == [i < 4 or i % controller.ROUTING_EVERY == 0 for i in range(len(res.steps))]
    assert len(res.steps) > 12 and not all(captured)
    res = generate(target, None, [PROMPT], drafter=NgramDrafter(), policy=Adaptive(config), max_new_tokens=40,
                   eos_token_id=-1, routing=True)[0]
    assert all(len(s.unique_experts) == 2 for s in res.steps)


def test_plain_decoding_runs_as_many_forwards_as_hf(target):
    """Plain decoding's prefill also runs the first root (as HF's prefill emits the first token): n new
    tokens cost one prefill and n - 1 decode forwards, HF's count, and the output is HF's."""
    calls = []
    hook = target.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        ref = hf_greedy(target, PROMPT, 12)
        hf_calls = len(calls)
        calls.clear()
        res = generate(target, None, [PROMPT], max_new_tokens=12, eos_token_id=-1)[0]
    finally:
        hook.remove()
    assert res.token_ids == ref and len(res.steps) == 12
    assert len(calls) == hf_calls == 12


@pytest.mark.parametrize("declared", [None, ("draft_model",), ("ngram",)])
def test_a_draft_model_reads_the_prompt_only_for_policies_that_may_draft_with_it(target, declared):
    """A draft model at hand costs plain decoding nothing (HF's plain generate runs none). A policy that may
    draft with it (Policy.drafters lists it, or says None: any) has it read the prompt in the prefill; one
    that says it will not, yet drafts with it at step 3, has it read the whole context then, in that step's
    draft time. Greedy output is the target's either way."""
    fed = []

    class Slow(DraftModelDrafter):
        def catch_up(self, context):
            if self.cache is None:
                time.sleep(0.2)
            return super().catch_up(context)

    drafter = Slow(tiny_dense())
    hook = drafter.model.register_forward_pre_hook(lambda m, a, k: fed.append(k["input_ids"].shape[1]),
                                                   with_kwargs=True)

    try:
        plain = generate(target, None, [PROMPT], drafter=drafter, config=PLAIN, max_new_tokens=6, eos_token_id=-1)[0]
        assert fed == [] and plain.prefill_time < 0.2
        late = generate(target, None, [PROMPT], drafter=drafter, policy=Late(StepConfig(depth=2), declared),
                        max_new_tokens=12, eos_token_id=-1)[0]
    finally:
        hook.remove()
    assert late.token_ids == hf_greedy(target, PROMPT, 12)
    if declared == ("ngram",):  # the prompt and the three plain steps' tokens, in one forward at step 3
        assert fed[0] == len(PROMPT) + 3 and late.prefill_time < 0.2 and late.steps[3].t_draft >= 0.2
    else:
        assert fed[0] == len(PROMPT) and late.prefill_time >= 0.2 and late.steps[3].t_draft < 0.2


def test_the_self_drafter_reads_only_when_asked():
    """The self drafter reads a context through the target's own layers (a second prefill): even for a policy
    that may draft with it, it reads at its first draft, not in every request's prefill (in a call of many
    prompts it stays in the pool once built)."""
    target = tiny_moe("qwen3_moe")
    reads = []

    class Counted(SelfDrafter):
        def catch_up(self, context):
            if self.cache is None:
                reads.append(len(context))
            return super().catch_up(context)

    res = generate(target, None, [PROMPT, PROMPT[:5]], drafter={"self": Counted(target)},
                   policy=Late(StepConfig(drafter="self", depth=2), ("self",)), max_new_tokens=8, eos_token_id=-1)
    assert reads == [len(PROMPT) + 3, 5 + 3]  # each request's first self draft, at step 3
    assert [r.token_ids for r in res] == [hf_greedy(target, PROMPT, 8), hf_greedy(target, PROMPT[:5], 8)]


def test_a_catch_up_reads_many_tokens_as_one_at_a_time_would(target):
    """A catch-up feeds many committed tokens in one forward and projects only the last row on the
    vocabulary; its log-probs equal those of feeding the tokens one by one (draft model, and the self
    drafter both whole and cut to its first layer)."""
    context = PROMPT + [3, 8, 21]
    dense = tiny_dense()
    for make in (lambda: DraftModelDrafter(dense), lambda: SelfDrafter(target, layers=1),
                 lambda: SelfDrafter(target)):
        at_once, one_by_one = make(), make()
        at_once.prefill(context)
        one_by_one.prefill(context)
        got = at_once.catch_up(context)
        for n in range(1, len(context) + 1):
            ref = one_by_one.catch_up(context[:n])
        assert got.shape == ref.shape == (at_once.model.config.vocab_size,)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_eos_and_max_tokens_mid_tree(target):
    ref = hf_greedy(target, PROMPT, 20)
    drafter = DraftModelDrafter(target)
    cfg = StepConfig(depth=6)
    eos = ref[9]  # lands inside an accepted path of 6 + bonus
    out = generate(target, None, [PROMPT], drafter=drafter, config=cfg, max_new_tokens=20, eos_token_id=eos)[0]
    assert out.token_ids == hf_greedy(target, PROMPT, 20, eos=eos)
    assert out.token_ids[-1] == eos
    for n in (1, 4, 11):
        got = generate(target, None, [PROMPT], drafter=drafter, config=cfg, max_new_tokens=n, eos_token_id=-1)[0]
        assert got.token_ids == ref[:n]


def test_policy_switches_drafters_and_budget_full_is_lossless():
    target = tiny_moe("qwen3_moe")
    configs = [StepConfig(depth=3), StepConfig(drafter="ngram", depth=2), StepConfig(speculate=False),
               StepConfig(drafter="self", depth=2, topk=2), StepConfig(depth=2, topk=2, budgets=(8, 8))]

    class Cycle:  # duck-typed (no Policy base, passive_draft or wants_routing): the driver takes any such object
        def setup(self, shape): pass
        def begin(self, r, n): pass
        def decide(self, state): return configs[state.step % len(configs)]
        def observe(self, stats): pass
        def end(self, r): pass

    res = generate(target, None, [PROMPT, PROMPT[:4]], drafter={"draft_model": DraftModelDrafter(target)},
                   policy=Cycle(), max_new_tokens=25, eos_token_id=-1)
    assert res[0].token_ids == hf_greedy(target, PROMPT, 25)
    assert res[1].token_ids == hf_greedy(target, PROMPT[:4], 25)
    assert {s.config.drafter for s in res[0].steps if s.config.speculate} == {"draft_model", "ngram", "self"}


@pytest.mark.skipif(not (DEFAULT_TARGET / "config.json").exists() or not (DEFAULT_DRAFT / "config.json").exists(),
                    reason="embedded default models not trained yet")
def test_embedded_default_models():
    from moetune.engine.loader import load_draft, load_target
    target, tok = load_target(DEFAULT_TARGET, device="cpu")
    draft, _ = load_draft(DEFAULT_DRAFT, tok, device="cpu")
    prompt = tok("The expert said that", add_special_tokens=False)["input_ids"]
    res = generate(target, tok, [prompt], drafter=DraftModelDrafter(draft),
                   config=StepConfig(depth=4, topk=2, num_draft_tokens=8), max_new_tokens=24, eos_token_id=-1)[0]
    assert res.token_ids == hf_greedy(target, prompt, 24)
