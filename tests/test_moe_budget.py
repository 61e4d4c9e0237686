"""Budgeted MoE verification on the four tiny families: lossless when off, really skips experts when on.

Tolerance: with no plan the patched block calls HF's forward, so outputs are bit-identical. Budget = E
goes through the grouped reference path (different summation order), so logits match HF within 1e-5
(fp32) and argmax is identical.
"""
import pytest
import torch

from moetune.engine import moe_budget as mb
from moetune.engine import selection
from moetune.engine.kernels import reference
from moetune.step import StepConfig
from tiny import FAMILIES, tiny_dense, tiny_moe

IDS = torch.tensor([[5, 17, 3, 99, 42, 8, 64, 23, 11, 120, 7, 55]])  # [1, T=12]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    m = tiny_moe(request.param)
    yield m
    mb.install(m).remove()


def logits(m):
    with torch.no_grad():
        return m(IDS).logits


def test_no_plan_is_hf_block(model):
    ref = logits(model)
    mb.install(model)
    assert torch.equal(logits(model), ref)
    other = tiny_moe("qwen3_moe", seed=3)
    with mb.apply_budget(other, mb.BudgetPlan(2)):  # a plan on another model does not leak
        assert torch.equal(logits(model), ref)


def test_full_budget_equals_unbudgeted(model):
    ref = logits(model)
    with mb.apply_budget(model, mb.BudgetPlan(8)) as report:
        out = logits(model)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert report.unique_experts == report.unique_experts_kept
    assert report.tokens_substituted == (0, 0) and report.router_mass_kept == (1.0, 1.0)


@pytest.mark.parametrize("substitution", ["renormalize", "reselect"])
def test_budget_really_skips_experts(model, substitution, monkeypatch):
    calls = []
    real = reference.budgeted_moe_reference

    def spy(hidden, expert_ids, weights, gate_up, down, selected):
        calls.append(set(expert_ids[expert_ids >= 0].tolist()) & set(selected.tolist()))
        return real(hidden, expert_ids, weights, gate_up, down, selected)

    monkeypatch.setattr(reference, "budgeted_moe_reference", spy)
    plan = mb.BudgetPlan(3, substitution=substitution)
    with mb.apply_budget(model, plan) as report:
        out = logits(model)
    assert len(calls) == 2 and all(len(c) <= 3 for c in calls)
    assert all(k <= 3 for k in report.unique_experts_kept)
    assert max(report.unique_experts) > 3 and sum(report.tokens_substituted) > 0
    assert [tuple(sorted(c)) for c in calls] == list(report.computed_experts)

    # Poison every expert the report says was skipped: the budgeted output must not change.
    blocks = mb.moe_blocks(model)
    saved = [(b.experts.gate_up_proj.detach().clone(), b.experts.down_proj.detach().clone()) for b in blocks]
    with torch.no_grad():
        for b, kept in zip(blocks, report.computed_experts):
            skipped = [e for e in range(8) if e not in kept]
            b.experts.gate_up_proj[skipped] = float("nan")
            b.experts.down_proj[skipped] = float("nan")
    try:
        with mb.apply_budget(model, plan):
            poisoned = logits(model)
    finally:
        with torch.no_grad():
            for b, (gu, dn) in zip(blocks, saved):
                b.experts.gate_up_proj.copy_(gu)
                b.experts.down_proj.copy_(dn)
    assert torch.equal(poisoned, out)


def test_budgeted_block_matches_hf_experts_on_same_routing(monkeypatch):
    """The grouped path computes what HF's experts module computes for the substituted routing."""
    m = tiny_moe("qwen3_moe")
    seen = []
    real = reference.budgeted_moe_reference

    def spy(hidden, expert_ids, weights, gate_up, down, selected):
        out = real(hidden, expert_ids, weights, gate_up, down, selected)
        seen.append((hidden, expert_ids, weights, out))
        return out

    monkeypatch.setattr(reference, "budgeted_moe_reference", spy)
    with mb.apply_budget(m, mb.BudgetPlan(3, substitution="reselect")):
        logits(m)
    block = mb.moe_blocks(m)[0]
    hidden, ids, w, out = seen[0]
    with torch.no_grad():
        hf = block.experts(hidden, ids.clamp(min=0), w * (ids >= 0))
    torch.testing.assert_close(out, hf, atol=1e-5, rtol=1e-5)
    mb.install(m).remove()


def test_substitution_semantics_hand_built():
    probs = torch.tensor([[0.50, 0.30, 0.15, 0.05], [0.10, 0.05, 0.25, 0.60]])  # [T=2, E=4]
    index = torch.tensor([[0, 1], [3, 2]])
    norm_w = torch.tensor([[0.625, 0.375], [0.6 / 0.85, 0.25 / 0.85]])
    scores = selection.selection_scores(probs, index, "prob_sum")  # [0.60, 0.35, 0.40, 0.65] -> drop expert 1
    no_root = torch.zeros(2, dtype=torch.bool)  # the substitution mechanics alone (root protection: test_lossy_budget)
    renorm = selection.substitute(probs, index, norm_w, scores, 3, "renormalize", normalized=True, roots=no_root)
    assert renorm.expert_ids.tolist() == [[0, -1], [3, 2]]
    torch.testing.assert_close(renorm.weights, torch.tensor([[1.0, 0.0], norm_w[1].tolist()]))
    resel = selection.substitute(probs, index, norm_w, scores, 3, "reselect", normalized=True, roots=no_root)
    assert resel.expert_ids.tolist() == [[0, 2], [3, 2]]
    torch.testing.assert_close(resel.weights, torch.tensor([[0.5 / 0.65, 0.15 / 0.65], norm_w[1].tolist()]))
    torch.testing.assert_close(resel.mass_kept, torch.tensor([0.625, 1.0]))
    assert resel.substituted.tolist() == [True, False]
    raw_w = probs.gather(1, index)  # router without norm_topk_prob
    raw = selection.substitute(probs, index, raw_w, scores, 3, "reselect", normalized=False, roots=no_root)
    torch.testing.assert_close(raw.weights[0], torch.tensor([0.5, 0.15]))
    kept = selection.substitute(probs, index, raw_w, scores, 3, "renormalize", normalized=False, roots=no_root)
    torch.testing.assert_close(kept.weights[0], torch.tensor([0.8, 0.0]))  # keeps the token's total top-k mass


def test_token_that_lost_all_experts_is_reselected_under_renormalize():
    probs = torch.tensor([[0.7, 0.2, 0.05, 0.05], [0.05, 0.05, 0.5, 0.4], [0.05, 0.05, 0.45, 0.45]])
    index = torch.tensor([[0, 1], [2, 3], [2, 3]])
    w = probs.gather(1, index)
    scores = selection.selection_scores(probs, index, "prob_sum")  # keeps 2 and 3 at budget 2
    r = selection.substitute(probs, index, w, scores, 2, "renormalize", normalized=False,
                             roots=torch.zeros(3, dtype=torch.bool))  # no root: row 0 may lose its experts
    assert sorted(r.expert_ids[0].tolist()) == [2, 3] and r.mass_kept[0].item() == 0.0


def test_selection_scores_differ_by_method():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.3, 0.4, 0.3], [0.3, 0.4, 0.3]])  # [T=3, E=3]
    index = torch.tensor([[0], [1], [1]])  # K=1; expert 2 is in no top-k
    prob_sum = selection.selection_scores(probs, index, "prob_sum")
    assert prob_sum.argmax().item() == 0 and prob_sum[2] == float("-inf")
    assert selection.selection_scores(probs, index, "hit_count").argmax().item() == 1
    root_only = selection.selection_scores(probs, index, "accept_weighted", torch.tensor([1.0, 0.0, 0.0]))
    leaves = selection.selection_scores(probs, index, "accept_weighted", torch.tensor([0.0, 1.0, 1.0]))
    assert root_only.argmax().item() == 0 and leaves.argmax().item() == 1
    assert torch.equal(selection.selection_scores(probs, index, "accept_weighted"), prob_sum)


def test_accept_weighted_uses_node_weights():
    m = tiny_moe("olmoe")
    uniform = mb.BudgetPlan(3, selection="accept_weighted")  # above top_k=2: the root's 2 are always kept
    skewed = mb.BudgetPlan(3, selection="accept_weighted", node_weights=[1.0] + [0.0] * 11)
    with mb.apply_budget(m, uniform) as a:
        logits(m)
    with mb.apply_budget(m, skewed) as b:
        logits(m)
    assert a.computed_experts != b.computed_experts
    with pytest.raises(ValueError, match="per verified token"):
        with mb.apply_budget(m, mb.BudgetPlan(2, selection="accept_weighted", node_weights=[1.0] * 5)):
            logits(m)
    mb.install(m).remove()


def test_shared_expert_always_computed():
    m = tiny_moe("qwen2_moe")
    calls = []
    hooks = [b.shared_expert.register_forward_hook(lambda *a: calls.append(1)) for b in mb.moe_blocks(m)]
    with mb.apply_budget(m, mb.BudgetPlan(2)):
        logits(m)
    assert len(calls) == 2
    for h in hooks:
        h.remove()
    mb.install(m).remove()


def test_remove_restores_and_install_is_idempotent():
    m = tiny_moe("mixtral")
    ref = logits(m)
    blocks = mb.moe_blocks(m)
    gate_calls = []
    hook = blocks[0].gate.register_forward_hook(lambda *a: gate_calls.append(1))
    h = mb.install(m)
    assert mb.install(m) is h
    with mb.apply_budget(m, mb.BudgetPlan(4)):
        logits(m)
    assert gate_calls == [1]  # routing hooks on .gate still fire under a budget
    hook.remove()
    h.remove()
    h.remove()
    assert all("forward" not in b.__dict__ for b in blocks)
    assert torch.equal(logits(m), ref)
    with mb.apply_budget(m, mb.BudgetPlan(8)):  # reinstalls on demand
        assert torch.equal(logits(m).argmax(-1), ref.argmax(-1))
    mb.install(m).remove()


def test_bad_budgets_name_the_limit():
    m = tiny_moe("qwen3_moe")
    for plan, msg in [(mb.BudgetPlan(1), "below top_k=2"), (mb.BudgetPlan(9), "above num_experts=8"),
                      (mb.BudgetPlan((4, 4, 4)), "3 entries but the model has 2 MoE layers")]:
        with pytest.raises(ValueError, match=msg):
            with mb.apply_budget(m, plan):
                pass
    with pytest.raises(ValueError, match="no MoE layers"):
        with mb.apply_budget(tiny_dense(), mb.BudgetPlan(4)):
            pass
    for kw in [dict(budgets=0), dict(budgets=()), dict(budgets=4, selection="best"),
               dict(budgets=4, substitution="drop")]:
        with pytest.raises(ValueError, match="BudgetPlan"):
            mb.BudgetPlan(**kw)
    with pytest.raises(ValueError, match="budgets is None"):
        mb.BudgetPlan.from_step_config(StepConfig())
    mb.install(m).remove()


def test_plan_from_step_config_and_per_layer_budgets():
    m = tiny_moe("qwen3_moe")
    plan = mb.BudgetPlan.from_step_config(StepConfig(budgets=(8, 2), substitution="reselect",
                                                                    budget_mode="substitute"))
    assert plan.budgets == (8, 2) and plan.substitution == "reselect"
    with mb.apply_budget(m, plan) as report:
        logits(m)
    assert report.unique_experts_kept[0] == report.unique_experts[0] and report.unique_experts_kept[1] <= 2
    mb.install(m).remove()


def test_argmax_agreement():
    a = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert float(mb.argmax_agreement(a, torch.tensor([[0.0, 2.0], [0.0, 1.0]]))) == 0.5
    assert float(mb.argmax_agreement(a, a)) == 1.0


def test_eval_mode_reports_agreement_without_disturbing_decoding():
    """StepConfig.eval_agreement: budget = E agrees everywhere, a tight budget does not, and the extra
    unbudgeted pass (cache cropped back) leaves tokens and per-step numbers exactly as with eval off."""
    from moetune.engine.drafters import DraftModelDrafter
    from moetune.engine.generate import generate
    torch.set_num_threads(1)
    m = tiny_moe("qwen3_moe")
    draft = DraftModelDrafter(tiny_dense())
    prompt = [5, 17, 33, 17, 33, 90, 4, 17, 33]

    def run(budget, eval_agreement):
        cfg = StepConfig(depth=3, topk=2, budgets=budget, eval_agreement=eval_agreement, budget_mode="substitute")
        return generate(m, None, [prompt], drafter=draft, config=cfg, max_new_tokens=12, eos_token_id=-1)[0]

    full = run((8,), True)
    assert [s.agreement for s in full.steps] == [1.0] * len(full.steps)
    tight, tight_off = run((2,), True), run((2,), False)
    assert min(s.agreement for s in tight.steps) < 1.0
    assert all(0.0 <= s.agreement <= 1.0 for s in tight.steps)
    assert all(s.agreement is None for s in tight_off.steps)
    assert tight.token_ids == tight_off.token_ids
    assert [(s.accepted, s.unique_experts, s.unique_experts_kept, s.tokens_substituted) for s in tight.steps] == \
        [(s.accepted, s.unique_experts, s.unique_experts_kept, s.tokens_substituted) for s in tight_off.steps]
    assert all(s.agreement is None for s in run(None, True).steps)  # no budget: nothing to compare
    mb.install(m).remove()
