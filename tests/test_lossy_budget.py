"""Lossy ("substitute") expert budgets: the root row's experts are always kept, and protection changes
nothing a budget did not already cut. Also the bench's Pareto plot and teacher-forced window layout."""
import itertools
import sys
from pathlib import Path

import pytest
import torch

from moetune.engine import moe_budget as mb
from moetune.engine import selection
from moetune.step import SELECTIONS, SUBSTITUTIONS, StepConfig
from tiny import tiny_dense, tiny_moe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_budget  # noqa: E402

E, K = 32, 4


def random_routing(T: int, seed: int):
    """A [T, E] router softmax, its top-K and (normalised) weights, and random node weights."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(T, E, generator=gen), dim=-1)  # [T, E]
    top_p, index = torch.topk(probs, K, dim=1)  # [T, K]
    weights = torch.rand(T, generator=gen)
    weights[0] = 1.0
    return probs, index, top_p / top_p.sum(1, keepdim=True), weights


def route(probs, index, w, node_weights, budget, sel, sub, roots=None):
    scores = selection.selection_scores(probs, index, sel, node_weights)
    return selection.substitute(probs, index, w, scores, budget, sub, normalized=True, roots=roots)


@pytest.mark.parametrize("sel,sub", list(itertools.product(SELECTIONS, SUBSTITUTIONS)))
def test_root_top_k_kept_at_every_budget(sel, sub):
    for seed in range(20):
        probs, index, w, nw = random_routing(17, seed)
        for budget in range(K, E + 1):
            r = route(probs, index, w, nw, budget, sel, sub)
            assert r.keep[index[0]].all() and not r.substituted[0] and r.mass_kept[0] == 1.0
            assert sorted(r.expert_ids[0].tolist()) == sorted(index[0].tolist())
            torch.testing.assert_close(r.weights[0, torch.argsort(r.expert_ids[0])], w[0, torch.argsort(index[0])])
            assert int(r.keep.sum()) <= budget


def test_protection_is_what_keeps_the_root():
    """Without it, a sum over rows drops one of the root's experts in most draws: the test above can fail."""
    no_root = torch.zeros(17, dtype=torch.bool)
    lost = 0
    for seed in range(20):
        probs, index, w, nw = random_routing(17, seed)
        lost += not route(probs, index, w, nw, 8, "prob_sum", "renormalize", no_root).keep[index[0]].all()
    assert lost >= 10


@pytest.mark.parametrize("sel,sub", list(itertools.product(SELECTIONS, SUBSTITUTIONS)))
def test_unchanged_when_budget_covers_every_hit_expert(sel, sub):
    """Protected and unprotected agree once nothing is cut; unprotected keeps the old top-B by score."""
    no_root = torch.zeros(17, dtype=torch.bool)
    for seed in range(10):
        probs, index, w, nw = random_routing(17, seed)
        hit = int(selection.hit_mask(index, E).any(0).sum())
        for budget in (hit, E):
            new = route(probs, index, w, nw, budget, sel, sub)
            old = route(probs, index, w, nw, budget, sel, sub, no_root)
            for field in ("expert_ids", "weights", "keep", "mass_kept", "substituted"):
                assert torch.equal(getattr(new, field), getattr(old, field)), field
            assert not new.substituted.any()
        scores = selection.selection_scores(probs, index, sel, nw)
        for budget in (K, 8, 12):
            old = route(probs, index, w, nw, budget, sel, sub, no_root)
            top = set(torch.topk(scores, budget).indices.tolist())  # HEAD's rule (distinct random scores)
            assert set(torch.nonzero(old.keep).flatten().tolist()) == top


def test_every_root_of_a_batch_is_protected_when_they_fit():
    probs, index, w, nw = random_routing(3 * 6, 4)
    roots = selection.root_rows(18, 6)
    assert roots.nonzero().flatten().tolist() == [0, 6, 12]
    need = int(selection.hit_mask(index[roots], E).any(0).sum())
    r = route(probs, index, w, None, need, "prob_sum", "reselect", roots)
    assert r.keep[index[roots]].all() and not r.substituted[roots].any()
    with pytest.raises(ValueError, match="whole number of trees"):
        selection.root_rows(18, 5)
    with pytest.raises(ValueError, match=r"\[T=18\] bool"):
        route(probs, index, w, None, 8, "prob_sum", "reselect", torch.ones(17, dtype=torch.bool))


def test_budgeted_root_logits_are_exact_in_the_model():
    """Causal attention: the root (row 0) sees only itself, so with its experts kept in every layer its
    logits are the unbudgeted ones even at budget = top_k, while later rows change."""
    m = tiny_moe("qwen3_moe", num_experts=16, top_k=2)
    ids = torch.tensor([[5, 17, 3, 99, 42, 8, 64, 23, 11, 120, 7, 55]])
    with torch.no_grad():
        ref = m(ids).logits[0]
        with mb.apply_budget(m, mb.BudgetPlan(2)) as report:
            out = m(ids).logits[0]
    assert sum(report.tokens_substituted) > 0
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    assert (out[1:] - ref[1:]).abs().max() > 1e-3
    mb.install(m).remove()


def test_chain_windows_tile_the_text():
    """Each window's rows predict the next tokens of the text, and the next window's root follows on."""
    windows = list(bench_budget.chain_windows(40, first=5, width=8))
    assert windows == [5, 13, 21, 29]  # a window at s covers rows s..s+7, predicting s+1..s+8 (< 40)
    assert list(bench_budget.chain_windows(12, first=5, width=8)) == []


def test_pareto_plot_takes_labelled_points(tmp_path):
    path = tmp_path / "pareto.png"
    bench_budget.pareto_plot([("off", 1.0, 0.0), ("B=12 prob_sum/renormalize", 1.1, 0.13),
                              ("B=12 accept_weighted/reselect", 1.05, 0.01)], path)
    assert path.stat().st_size > 1000
    assert bench_budget.pareto_front([("a", 1.0, 0.0), ("b", 1.2, 0.1), ("c", 1.1, 0.2)]) == ["a", "b"]


def test_bench_finds_nothing_lost_at_full_budget_and_a_loss_when_tight():
    """exact_steps and loss_increase keep the cache aligned: a budget of every expert changes nothing."""
    target, draft = tiny_moe("qwen3_moe", num_experts=8, top_k=2), tiny_dense()
    full = bench_budget.Policy(8, "prob_sum", "reselect", True)
    tight = bench_budget.Policy(2, "prob_sum", "renormalize", False)
    prompts = [[5, 17, 3, 99, 42, 8, 64, 23], [7, 55, 11, 120, 9, 31]]
    base = StepConfig(depth=3, topk=2, num_draft_tokens=6)
    steps = bench_budget.exact_steps(target, draft, prompts, base, 12, [full, tight])["policies"]
    assert steps[full]["exact_steps"] == 1.0 and steps[full]["kept"] == 1.0
    assert steps[tight]["exact_steps"] < 1.0 and steps[tight]["kept"] < 0.8
    text = torch.randint(2, 128, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    loss = bench_budget.loss_increase(target, draft, [text], first=4, width=7, pols=[full, tight])
    assert loss["rows"]["all"] == 5 * 7 and loss["rows"]["root"] == 5
    # a random tiny model's logits are nearly flat, so a tight budget moves its NLL little, but not by rounding
    assert abs(loss["policies"][full]["all_loss_increase"]) < 1e-6
    assert abs(loss["policies"][tight]["all_loss_increase"]) > 2e-5
    mb.install(target).remove()
