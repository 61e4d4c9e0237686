"""Batched draft-model drafting (engine/drafters/batched.py): every request of a step drafts in one draft
forward per level, proposes exactly the trees its own DraftModelDrafter would, and never sees another
request's draft cache."""
import pytest
import torch
from test_batch import PerRequest, prompts
from test_lossless import hf_greedy
from tiny import FAMILIES, tiny_dense, tiny_moe

from moetune.engine import batch as batch_mod
from moetune.engine import kv
from moetune.engine.batch import generate_batch
from moetune.engine.drafters import DraftModelDrafter
from moetune.engine.drafters.batched import BatchedDraftModel
from moetune.engine.generate import generate
from moetune.step import PLAIN, StepConfig

CHAIN = StepConfig(depth=3)
STATIC = StepConfig(tree=(-1, -1, 0, 0, 1, 2, 2, 4))
DYNAMIC = StepConfig(depth=4, topk=3, num_draft_tokens=10)
SHAPES = {"chain": CHAIN, "static_tree": STATIC, "dynamic_tree": DYNAMIC}
LEVELS = {CHAIN: 2, STATIC: 2, DYNAMIC: 3}  # draft forwards of one request's growth


@pytest.fixture(scope="module", params=FAMILIES)
def target(request):
    return tiny_moe(request.param)


@pytest.fixture(scope="module", params=["dense", "olmoe"])
def draft(request):
    return tiny_dense() if request.param == "dense" else tiny_moe("olmoe", seed=3)


def tokens(n: int, g: torch.Generator) -> list[int]:
    return torch.randint(2, 120, (n,), generator=g).tolist()


def assert_same_tree(got, want):
    assert got.parents == want.parents
    assert got.tokens.tolist() == want.tokens.tolist()
    torch.testing.assert_close(got.probs, want.probs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [*SHAPES, "mixed"])
def test_same_trees_as_one_drafter_per_request(draft, shape):
    """Six steps, commits of 1-4 tokens per request: requests 0-2 join first (their prompts caught up
    together, as at a batch's prefill), request 3 joins at step 2 (its prompt caught up inside the draft),
    request 1 leaves after step 2, request 2 sits out step 1 (not fed; it catches up two commits later).
    "mixed": each request its own shape at each step, so growths of different depths share forwards."""
    g = torch.Generator().manual_seed(1)
    start = {i: tokens(n, g) for i, n in enumerate((1, 6, 13, 4))}
    shared, alone, context = BatchedDraftModel(draft), {}, {}

    def join(i):
        context[i], alone[i] = list(start[i]), DraftModelDrafter(draft)
        alone[i].prefill(context[i])

    def config(i, step):
        return list(SHAPES.values())[(i + step) % 3] if shape == "mixed" else SHAPES[shape]

    for i in (0, 1, 2):
        join(i)
    shared.catch_up([(i, context[i]) for i in (0, 1, 2)])
    for step in range(6):
        if step == 2:
            join(3)
        if step == 3:
            shared.leave([1])
            del context[1]
        drafting = [i for i in context if (i, step) != (2, 1)]
        trees = shared.draft([(i, context[i], config(i, step)) for i in drafting])
        for i, tree in zip(drafting, trees):
            assert_same_tree(tree, alone[i].draft(context[i], config(i, step)))
        for i in context:
            context[i] += tokens(1 + (i + step) % 4, g)
    assert 1 not in shared.owner.tolist() and 1 not in shared.seen
    for i in context:  # the cache holds each request's committed tokens seen so far, nothing drafted
        assert shared.owner.tolist().count(i) == shared.seen[i]
    assert kv.cache_len(shared.cache) == len(shared.owner) == sum(shared.seen.values())


class Cycle(PerRequest):
    """Each request's config changes every step, so requests skip the draft model for some steps."""

    def decide(self, state):
        return self.configs[(state.request_id + state.step) % len(self.configs)]


@pytest.mark.parametrize("policy", [
    lambda: PerRequest([CHAIN]), lambda: PerRequest([STATIC]), lambda: PerRequest([DYNAMIC]),
    lambda: Cycle([CHAIN, StepConfig(drafter="ngram", depth=3), PLAIN, STATIC, DYNAMIC]),
], ids=["chain", "static_tree", "dynamic_tree", "switching"])
def test_generate_batch_equals_each_request_alone(target, policy):
    """Seven requests through 3 slots (joining and leaving mid-run), the target as its own draft model:
    each request's output is HF greedy's and engine.generate's on it alone, with the same tree sizes and
    acceptances at every step (its drafts were the single drafter's)."""
    ps = prompts()
    res = generate_batch(target, None, ps, drafter=DraftModelDrafter(target), policy=policy(), batch_size=3,
                         max_new_tokens=14, eos_token_id=-1)
    solo = generate(target, None, ps, drafter=DraftModelDrafter(target), policy=policy(), max_new_tokens=14,
                    eos_token_id=-1)
    for p, r, s in zip(ps, res, solo):
        assert r.token_ids == s.token_ids == hf_greedy(target, p, 14)
        assert [(x.tree_size, x.accepted) for x in r.steps] == [(x.tree_size, x.accepted) for x in s.steps]
        assert all(x.t_draft > 0 for x in r.steps if x.config.speculate)
    # a step's draft-model requests share one draft forward: each carries it whole, with its group's size
    # (its nodes as drafted: a tree cut at max_new_tokens verifies fewer)
    forwards = {}
    for r in res:
        for x in r.steps:
            if x.batch_t_draft is not None:
                assert x.config.drafter == "draft_model"
                forwards.setdefault(x.batch_t_draft, []).append(x)
    assert forwards and all(len(g) == g[0].batch_draft_requests and sum(x.tree_size for x in g) <= g[0].batch_draft_nodes
                            for g in forwards.values())
    drafted = [x.accepted for r in res for x in r.steps if x.config.speculate and x.config.drafter == "draft_model"]
    assert sum(drafted) / len(drafted) >= 1.5  # the same-model draft really speculated


def test_one_draft_forward_per_level(target, monkeypatch):
    """Per step the draft model runs once for the catch-up on committed tokens (a joiner's prompt at its
    first draft) and once per level of the deepest growth, whatever the number of requests; never at prefill,
    and never at all for requests that do not draft with it."""
    draft = tiny_dense()
    forwards, counts = [0], []

    def counted(method):
        def run(self, *args):
            before = forwards[0]
            method(self, *args)
            counts.append((method.__name__, len(self.active), forwards[0] - before))
        return run

    handle = draft.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    monkeypatch.setattr(batch_mod.PackedBatch, "draft", counted(batch_mod.PackedBatch.draft))
    monkeypatch.setattr(batch_mod.PackedBatch, "prefill", counted(batch_mod.PackedBatch.prefill))
    try:
        for configs in ([CHAIN], [CHAIN, DYNAMIC, STATIC]):
            counts.clear()
            generate_batch(target, None, prompts(), drafter=DraftModelDrafter(draft), policy=PerRequest(configs),
                           batch_size=4, max_new_tokens=10, eos_token_id=-1)
            steps = [n for name, _, n in counts if name == "draft"]
            levels = max(LEVELS[c] for c in configs)
            assert set(steps) == {levels + 1}
            assert max(b for name, b, _ in counts if name == "draft") == 4  # four requests shared those
            assert {n for name, _, n in counts if name == "prefill"} == {0}
        forwards[0] = 0
        generate_batch(target, None, prompts(), drafter=DraftModelDrafter(draft), policy=PerRequest([PLAIN]),
                       batch_size=4, max_new_tokens=10, eos_token_id=-1)
        assert forwards[0] == 0  # a draft model no request drafts with never runs
    finally:
        handle.remove()


def test_draft_rows_never_see_other_requests_keys(draft):
    """Request 1's cached draft keys and values are overwritten with noise: request 0's root log-probs
    and trees, drafted beside it in the same forwards (catch-up and levels), stay those of a clean run,
    while request 1's change."""
    g = torch.Generator().manual_seed(2)
    context = {0: tokens(5, g), 1: tokens(9, g)}
    clean, noisy = BatchedDraftModel(draft), BatchedDraftModel(draft)
    for d in (clean, noisy):
        d.catch_up(list(context.items()))
    where = (noisy.owner == 1).nonzero().flatten()
    for layer in noisy.cache.layers:
        layer.keys[..., where, :] = torch.randn_like(layer.keys[..., where, :]) * 100
        layer.values[..., where, :] = torch.randn_like(layer.values[..., where, :]) * 100
    for step, config in enumerate((CHAIN, STATIC, DYNAMIC)):
        for i in context:
            context[i] += tokens(2, g)
        want, got = (d.draft([(i, context[i], config) for i in context]) for d in (clean, noisy))
        torch.testing.assert_close(noisy.root_logp[0], clean.root_logp[0], atol=1e-5, rtol=0)
        assert_same_tree(got[0], want[0])
        assert (noisy.root_logp[1] - clean.root_logp[1]).abs().max() > 1e-2
