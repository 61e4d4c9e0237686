"""Sampling stays lossless: emitted tokens follow the target's distribution (fixed seeds, TV bounds).

Each check is paired with a biased sampler (always accepting drafted tokens) that the same bound rejects,
so the bounds are tight enough to mean something.
"""
import pytest
import torch
from tiny import tiny_moe

from moetune.engine.accept import accept_sample, sampling_probs
from moetune.engine.drafters import DraftModelDrafter
from moetune.engine.generate import generate
from moetune.engine.tree import DraftTree
from moetune.step import StepConfig

V = 8
TREE = (-1, -1, -1, 0, 3)  # three candidates below the root, a chain under the first


def tv(samples: list[int], p: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(samples), minlength=p.numel()).float()
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


def test_sampling_probs_top_p():
    probs = sampling_probs(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), 1.0, top_p=0.7)
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_tree_rejection_sampling_is_lossless():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(TREE) + 1, V, generator=g) * 1.5
    tokens = torch.tensor([logits[0].argmax(), logits[0].argsort()[-2], 5, logits[1].argmax(), 2])
    tree = DraftTree(TREE, tokens, torch.full((5,), 0.5))
    p = sampling_probs(logits, 0.8, 0.95)
    first, second = [], []
    n = 8000
    for _ in range(n):
        acc = accept_sample(tree, logits, 0.8, 0.95, g)
        first.append(acc.tokens[0])
        if acc.path[:1] == (0,):
            second.append(acc.tokens[1])
    assert tv(first, p[0]) < 0.03
    assert tv(second, p[1]) < 0.04  # conditional on the first child: the target's distribution at node 0
    biased = [int(tokens[0])] * n  # a sampler that always accepts the first draft
    assert tv(biased, p[0]) > 0.03


@pytest.mark.parametrize("budgets", [None, (3, 3)], ids=["unbudgeted", "eviction"])
def test_generate_samples_the_target_distribution(budgets):
    """Tree rejection sampling emits the target's distribution. Under an eviction budget too: which nodes
    survive depends on the tree, not on the walk's random draws (engine/eviction.py)."""
    target = tiny_moe("qwen3_moe", vocab_size=16, seed=3)
    prompt = [3, 7, 11]
    with torch.no_grad():
        p1 = sampling_probs(target(torch.tensor([prompt])).logits[0, -1], 1.0)
        p2 = sum(p1[t] * sampling_probs(target(torch.tensor([prompt + [t]])).logits[0, -1], 1.0)
                 for t in range(16))
    runs = generate(target, None, [prompt] * 300, drafter=DraftModelDrafter(target),
                    config=StepConfig(depth=2, topk=2, budgets=budgets), max_new_tokens=2, temperature=1.0, seed=0,
                    eos_token_id=-1)
    assert sum(r.mean_accepted for r in runs) > 0  # the draft tree is exercised
    if budgets is not None:  # eviction acted on some steps
        assert any(s.tree_size and min(s.unique_experts_kept) < 4 for r in runs for s in r.steps)
    assert tv([r.token_ids[0] for r in runs], p1) < 0.15
    assert tv([r.token_ids[1] for r in runs], p2) < 0.15
    greedy_draft = [int(p1.argmax())] * 300  # always accepting the draft's top token
    assert tv(greedy_draft, p1) > 0.15
