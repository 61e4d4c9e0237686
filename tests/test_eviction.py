"""Lossless expert budgets by node eviction: the rule equals a plain reference, kept sets are ancestor-closed
and within budget at every layer, survivors' logits are exact, and greedy output equals HF `generate` at
every budget down to top_k, for the four families, every drafter and static and dynamic trees."""
import random

import pytest
import torch
from test_lossless import PROMPT, hf_greedy
from tiny import FAMILIES, tiny_moe

from moetune.engine import eviction
from moetune.engine import moe_budget as mb
from moetune.engine.drafters import DraftModelDrafter, NgramDrafter, SelfDrafter
from moetune.engine.generate import generate
from moetune.engine.kv import crop, new_cache
from moetune.engine.loader import moe_blocks
from moetune.engine.routing import capture_routing
from moetune.engine.selection import hit_mask
from moetune.engine.tree import DraftTree, ancestors, path_weights
from moetune.engine.verify import forward_args, verify
from moetune.step import StepConfig


def random_tree(rng: random.Random, n: int, ties: bool = False) -> DraftTree:
    parents = tuple(rng.randrange(-1, i) for i in range(n))
    probs = [1.0 if ties and rng.random() < 0.5 else rng.choice([0.5, 0.25, rng.random()]) for _ in range(n)]
    return DraftTree(parents, torch.randint(0, 50, (n,)), torch.tensor(probs))


def test_every_prefix_of_the_rank_is_ancestor_closed():
    rng = random.Random(0)
    for trial in range(300):
        tree = random_tree(rng, rng.randrange(0, 20), ties=trial % 2 == 0)
        rank = list(eviction.node_rank(tree))
        assert rank[0] == 0 and sorted(rank) == list(range(len(tree) + 1))
        anc = ancestors(tree.parents)
        for i in range(1, len(rank)):
            assert set(anc[rank[i]].nonzero().flatten().tolist()) <= set(rank[:i + 1])
        weight = path_weights(tree)[rank]
        assert torch.all(weight[1:] <= weight[:-1] * 1.002)  # most probable paths first (float16 probabilities)


def reference_counts(top_k_index, rank, budgets):  # [L, T, K] -> per-layer kept prefix lengths, by loops
    counts, previous = [], len(rank)
    for layer, budget in zip(top_k_index.tolist(), budgets):
        union, count = set(), 0
        for row in rank:
            union |= set(layer[row])
            if len(union) > budget:
                break
            count += 1
        previous = min(previous, count)
        counts.append(previous)
    return counts


def test_evict_equals_a_loop_reference_on_random_routing():
    rng = random.Random(1)
    for _ in range(200):
        T, E, K, L = rng.randrange(1, 24), rng.choice([4, 8, 16]), 2, 3
        index = torch.stack([torch.stack([torch.randperm(E)[:K] for _ in range(T)]) for _ in range(L)])  # [L, T, K]
        tree = random_tree(rng, T - 1)
        rank = torch.tensor(eviction.node_rank(tree))
        budgets = [rng.randrange(K, E + 1) for _ in range(L)]
        position = eviction.rank_positions(rank)
        assert torch.equal(rank[position], torch.arange(T))
        previous, counts = T, []
        host = T
        for layer in range(L):
            alive, previous = eviction.evict(index[layer], E, rank, position, budgets[layer], previous)
            counts.append(int(previous))
            host = eviction.kept_prefix(index[layer].tolist(), rank.tolist(), budgets[layer], host)
            assert host == counts[-1]  # the CPU path's host search equals the tensor search
            assert torch.equal(alive, position < previous)
            assert hit_mask(index[layer][alive], E).any(0).sum() <= budgets[layer]
        assert counts == reference_counts(index, rank.tolist(), budgets)


@pytest.mark.parametrize("gather", [True, False], ids=["gather-kept-rows", "static-shapes"])
@pytest.mark.parametrize("family", FAMILIES)
def test_survivors_are_exact_and_within_budget_at_every_layer(family, gather, monkeypatch):
    """Both ways of computing only the kept experts: gathering the kept rows (CPU) and static shapes with
    evicted rows on the root's first expert at weight 0 (accelerators)."""
    monkeypatch.setattr(mb, "_gathers_kept_rows", lambda device: gather)
    model = tiny_moe(family)
    tree = DraftTree((-1, -1, 0, 0, 1, 2, 2, 4, 5, 8), torch.tensor([5, 9, 17, 3, 99, 42, 8, 64, 23, 11]),
                     torch.tensor([0.6, 0.3, 0.5, 0.4, 0.9, 0.2, 0.7, 0.5, 0.8, 0.3]))
    cache = new_cache(model)
    model(torch.tensor([PROMPT]), cache=cache, use_cache=True)
    full = verify(model, cache, 7, tree, StepConfig(tree=tree.parents), routing=True)
    crop(cache, len(PROMPT))
    computed = []  # per experts call: the experts HF's experts implementation was asked to run
    hooks = [block.experts.register_forward_hook(lambda m, args, out: computed.append(set(args[1].flatten().tolist())))
             for block in moe_blocks(model)]
    for budget in range(2, 9):
        config = StepConfig(tree=tree.parents, budgets=(budget, budget))
        computed.clear()
        with capture_routing(model) as routing:
            ver = verify(model, cache, 7, tree, config)
        crop(cache, len(PROMPT))
        assert [len(c) for c in computed] == list(ver.budget_report.unique_experts_kept)  # only kept experts run
        alive = ver.alive if ver.alive is not None else torch.ones(len(tree) + 1, dtype=torch.bool)
        rows = alive.nonzero().flatten()
        assert alive[0] and set(ancestors(tree.parents)[rows].nonzero()[:, 1].tolist()) <= set(rows.tolist())
        torch.testing.assert_close(ver.logits[rows], full.logits[rows], atol=1e-5, rtol=1e-5)
        assert torch.equal(ver.logits[rows].argmax(-1), full.logits[rows].argmax(-1))
        counts = [int(c) for c in ver.budget_report.kept_rows]
        assert counts == sorted(counts, reverse=True) and counts[-1] == len(rows)
        rank = torch.tensor(eviction.node_rank(tree))
        for layer, (count, lr) in enumerate(zip(counts, routing.layers)):
            kept = rank[:count]
            assert hit_mask(lr.top_k_index[kept], 8).any(0).sum() <= budget
            assert ver.budget_report.unique_experts_kept[layer] == hit_mask(lr.top_k_index[kept], 8).any(0).sum()
        if budget == 8:
            assert bool(alive.all())
    for hook in hooks:
        hook.remove()
    mb.install(model).remove()


CASES = {
    "draft_chain": ("same", dict(depth=5)),
    "draft_dynamic_tree": ("same", dict(depth=4, topk=3, num_draft_tokens=12)),
    "static_tree": ("same", dict(tree=(-1, -1, 0, 0, 1, 2, 2, 4))),
    "ngram": ("ngram", dict(drafter="ngram", depth=4, topk=3)),
    "self": ("self", dict(drafter="self", depth=3, topk=2, num_draft_tokens=5)),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES)
def test_greedy_equals_hf_at_every_budget(family, case):
    target = tiny_moe(family)
    kind, kw = CASES[case]
    drafter = {"same": DraftModelDrafter(target), "ngram": NgramDrafter(),
               "self": SelfDrafter(target, layers=1)}[kind]
    reference = hf_greedy(target, PROMPT, 19)
    accepted = []
    for budget in (2, 3, 5, 8):
        config = StepConfig(**kw, budgets=(budget, budget))
        res = generate(target, None, [PROMPT], drafter=drafter, config=config, max_new_tokens=19,
                       eos_token_id=-1)[0]
        assert res.token_ids == reference, budget
        assert all(kept <= budget for s in res.steps for kept in s.unique_experts_kept)
        accepted.append(res.mean_accepted)
    if kind == "same":  # a perfect draft: the tight budget must cost acceptance, the full one none
        assert accepted[0] < accepted[-1]
    mb.install(target).remove()


def test_invalid_mode_and_plan_are_named():
    with pytest.raises(ValueError, match="budget_mode must be one of"):
        StepConfig(budgets=(4, 4), budget_mode="drop")
    with pytest.raises(ValueError, match="needs rank"):
        mb.BudgetPlan(4, mode="evict")
    model = tiny_moe("qwen3_moe")
    cache = new_cache(model)
    args = forward_args(model, cache, 5, DraftTree.empty())
    with pytest.raises(ValueError, match="one tree per forward"):
        with mb.apply_budget(model, mb.BudgetPlan(4, mode="evict", rank=(0, 1))):
            model(**args)
    mb.install(model).remove()
