"""Eviction budgets in a batch (engine/batch_eviction.py): each request's budget evicts only its own rows,
every request's greedy output stays its HF greedy output, and each request keeps what it would keep alone."""
import pytest
from test_batch import PerRequest, prompts
from test_lossless import hf_greedy
from tiny import FAMILIES, tiny_moe

from moetune.engine import batch_eviction
from moetune.engine.batch import generate_batch
from moetune.engine.drafters import DraftModelDrafter
from moetune.engine.generate import generate
from moetune.step import PLAIN, StepConfig

TREE = StepConfig(depth=3, topk=2, num_draft_tokens=6)
EVICT = (StepConfig(depth=3, topk=2, num_draft_tokens=6, budgets=(3,)), PLAIN,
         StepConfig(depth=4, budgets=(4, 3)), TREE, StepConfig(drafter="ngram", depth=3, budgets=(2,)))


@pytest.fixture(scope="module", params=FAMILIES)
def target(request):
    return tiny_moe(request.param)


def test_budgeted_requests_match_hf_and_their_own_run(target):
    """Budgeted and unbudgeted requests share forwards; each equals HF greedy on it alone, and each step
    keeps exactly the nodes and experts it keeps when the request runs alone under the same config."""
    ps = prompts()
    res = generate_batch(target, None, ps, drafter=DraftModelDrafter(target), policy=PerRequest(EVICT),
                         batch_size=3, max_new_tokens=15, eos_token_id=-1)
    evicted = 0
    for i, (p, r) in enumerate(zip(ps, res)):
        assert r.token_ids == hf_greedy(target, p, 15)
        config = EVICT[i % len(EVICT)]
        alone = generate(target, None, [p], drafter=DraftModelDrafter(target), config=config, max_new_tokens=15,
                         eos_token_id=-1)[0]
        assert [s.nodes_kept for s in r.steps] == [s.nodes_kept for s in alone.steps]
        if config.budgets is not None:
            assert [s.unique_experts for s in r.steps] == [s.unique_experts for s in alone.steps]
            assert [s.unique_experts_kept for s in r.steps] == [s.unique_experts_kept for s in alone.steps]
        for s in r.steps:
            assert s.config.budgets == config.budgets
            if config.budgets is None:
                assert s.nodes_kept is None
            else:
                budgets = config.budgets * (len(s.unique_experts_kept) // len(config.budgets))
                assert all(k <= b for k, b in zip(s.unique_experts_kept, budgets))
                evicted += s.nodes_kept < s.tree_size
    assert evicted > 0  # the budgets really evicted nodes


def test_forward_loads_only_what_the_requests_kept():
    """No layer computes an evicted row: the implementation underneath sees only the kept rows; and the
    batch's experts (StepStats.batch_experts) hold each request's kept experts."""
    target = tiny_moe("qwen3_moe")
    calls = []  # (rows the layer got, rows computed underneath) per evicting layer call
    lookup = batch_eviction.ALL_EXPERTS_FUNCTIONS.get_interface

    def spy(name, default):
        fn = lookup(name, default)
        if name == batch_eviction.IMPLEMENTATION:
            def outer(module, hidden, index, weights):
                calls.append([hidden.shape[0], None])
                return fn(module, hidden, index, weights)
            return outer

        def inner(module, hidden, index, weights):
            if calls and calls[-1][1] is None:
                calls[-1][1] = hidden.shape[0]
            return fn(module, hidden, index, weights)
        return inner

    budgeted = StepConfig(depth=3, topk=2, num_draft_tokens=6, budgets=(2,))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch_eviction.ALL_EXPERTS_FUNCTIONS, "get_interface", spy)
        res = generate_batch(target, None, prompts((6, 9)), drafter=DraftModelDrafter(target), config=budgeted,
                             batch_size=2, max_new_tokens=6, eos_token_id=-1)
    steps = [s for r in res for s in r.steps if s.batch_tokens is not None]
    assert calls and all(inner is not None and inner <= rows for rows, inner in calls)
    assert any(inner < rows for rows, inner in calls)  # evicted rows were not computed
    assert any(s.nodes_kept < s.tree_size for s in steps)
    for s in steps:  # a request's kept experts never exceed the forward's
        assert sum(s.unique_experts_kept) <= s.batch_experts


def test_substitution_budgets_are_dropped_or_refused():
    target = tiny_moe("qwen3_moe")
    lossy = StepConfig(depth=3, budgets=(3,), budget_mode="substitute")
    with pytest.raises(ValueError, match="budget_mode='evict'"):
        generate_batch(target, None, prompts((4, 5)), drafter=DraftModelDrafter(target), config=lossy,
                       batch_size=2, max_new_tokens=4)
    res = generate_batch(target, None, prompts((4, 5)), drafter=DraftModelDrafter(target),
                         policy=PerRequest((lossy,)), batch_size=2, max_new_tokens=4, eos_token_id=-1)
    assert all(s.config.budgets is None and s.nodes_kept is None for r in res for s in r.steps)


def test_budget_outside_the_model_is_named():
    target = tiny_moe("qwen3_moe")  # 8 experts, top-2
    with pytest.raises(ValueError, match=r"expert budget 1 is outside \[2, 8\]"):
        generate_batch(target, None, prompts((4, 5)), drafter=DraftModelDrafter(target),
                       policy=PerRequest((StepConfig(depth=2, budgets=(1,)),)), batch_size=2, max_new_tokens=3)
