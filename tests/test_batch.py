"""Batched greedy decoding (engine/batch.py) equals each request's HF greedy `generate`, whatever else is in
the batch, and requests never see each other's cache."""
import pytest
import torch
from test_lossless import hf_greedy
from tiny import FAMILIES, tiny_moe

from moetune.engine import batch as batch_mod
from moetune.engine.batch import generate_batch, throughput
from moetune.engine.drafters import DraftModelDrafter
from moetune.policies.registry import make_policy
from moetune.step import PLAIN, StepConfig

LENGTHS = (1, 5, 9, 3, 12, 7, 2)
CONFIGS = (PLAIN, StepConfig(depth=4), StepConfig(tree=(-1, -1, 0, 0, 1, 2, 2, 4)),
           StepConfig(depth=3, topk=2, num_draft_tokens=5), StepConfig(drafter="ngram", depth=4, topk=2),
           StepConfig(drafter="ngram", depth=3), StepConfig(depth=2))


def prompts(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)  # repeats inside a prompt give the n-gram drafter matches
    return [(torch.randint(2, 40, (n,), generator=g).tolist() * 2)[:n + n // 2] for n in lengths]


class PerRequest:
    """Each request its own config (by request id), so plain, chains and trees share one forward."""

    def __init__(self, configs):
        self.configs = configs

    def setup(self, shape): pass
    def begin(self, request_id, prompt_len): pass
    def decide(self, state): return self.configs[state.request_id % len(self.configs)]
    def observe(self, stats): pass
    def end(self, request_id): pass


@pytest.fixture(scope="module", params=FAMILIES)
def target(request):
    return tiny_moe(request.param)


def test_mixed_batch_matches_hf(target):
    """Plain, chain, static tree, dynamic tree and n-gram requests of different lengths, 7 requests through
    3 slots (requests join and leave mid-run), each equal to HF greedy on it alone."""
    ps = prompts()
    res = generate_batch(target, None, ps, drafter=DraftModelDrafter(target), policy=PerRequest(CONFIGS),
                         batch_size=3, max_new_tokens=19, eos_token_id=-1)
    for p, r in zip(ps, res):
        assert r.token_ids == hf_greedy(target, p, 19)
        assert sum(s.emitted for s in r.steps) == 19
        assert {s.request_id for s in r.steps} == {r.request_id}
    assert max(r.mean_accepted for r in res) >= 1.5  # the same-model drafter really speculated
    for r in res:  # never more than 3 requests at once
        assert sum(o.joined <= r.joined < o.finish for o in res) <= 3
    assert throughput(res) > 0


def test_sampled_batch_equals_each_request_sampled_alone(target):
    """Sampling: request i of a batch draws from its own generator (seed + i), so with the trees it drafts
    alone (a static config per request) it emits exactly what engine.generate samples for it alone with
    that seed; the draws are not greedy's."""
    from moetune.engine.generate import generate
    ps = prompts()
    kw = dict(drafter=DraftModelDrafter(target), max_new_tokens=12, eos_token_id=-1, temperature=0.9, top_p=0.95)
    res = generate_batch(target, None, ps, policy=PerRequest(CONFIGS), batch_size=3, seed=5, **kw)
    for i, (p, r) in enumerate(zip(ps, res)):
        alone = generate(target, None, [p], config=CONFIGS[i % len(CONFIGS)], seed=5 + i, **kw)[0]
        assert r.token_ids == alone.token_ids
        assert [(s.tree_size, s.accepted) for s in r.steps] == [(s.tree_size, s.accepted) for s in alone.steps]
    assert any(r.token_ids != hf_greedy(target, p, 12) for p, r in zip(ps, res))
    # a passive draft (auto's n-gram probe) is checked against the emitted tokens under greedy decoding only
    kw.pop("temperature")
    probes = {t: [s.probe for r in generate_batch(target, None, ps[:3], policy=make_policy("auto"), batch_size=3,
                                                  temperature=t, **kw) for s in r.steps] for t in (0.0, 0.9)}
    assert any(p is not None for p in probes[0.0]) and all(p is None for p in probes[0.9])


def test_eos_and_max_new_tokens_mid_tree():
    target = tiny_moe("qwen3_moe")
    ps = prompts()[:4]
    cfg = StepConfig(depth=6)
    ref = hf_greedy(target, ps[2], 20)
    at = next(i for i in range(8, 20) if ref[i] not in ref[:i] and i % 7 != 6)  # inside a step's 6 accepted + bonus
    res = generate_batch(target, None, ps, drafter=DraftModelDrafter(target), config=cfg, batch_size=2,
                         max_new_tokens=20, eos_token_id=ref[at])
    assert len(res[2].token_ids) == at + 1 and res[2].steps[-1].emitted < res[2].steps[-1].accepted + 1
    for p, r in zip(ps, res):
        assert r.token_ids == hf_greedy(target, p, 20, eos=ref[at])
    for n in (1, 4, 11):
        res = generate_batch(target, None, ps, drafter=DraftModelDrafter(target), config=cfg, batch_size=3,
                             max_new_tokens=n, eos_token_id=-1)
        assert [r.token_ids for r in res] == [hf_greedy(target, p, 20)[:n] for p in ps]


def test_other_requests_cache_is_invisible(monkeypatch):
    """Request B's cached keys and values are overwritten with noise mid-run: A's logits stay those of A
    decoded alone (within 1e-5) and its output HF's, while B's output changes."""
    target = tiny_moe("olmoe")
    a, b = [7, 3, 9, 3, 9], prompts((30,), seed=5)[0]
    verify, accept = batch_mod.PackedBatch.verify, batch_mod.PackedBatch.accept
    logits_a: list[torch.Tensor] = []
    corrupted = []

    def corrupting_verify(self):
        if len(self.active) == 2 and self.active[0].step >= 2:
            corrupted.append(self.active[0].step)
            where = (self.owner == 1).nonzero().flatten()
            for layer in self.cache.layers:
                layer.keys[..., where, :] = torch.randn_like(layer.keys[..., where, :]) * 100
                layer.values[..., where, :] = torch.randn_like(layer.values[..., where, :]) * 100
        return verify(self)

    def recording_accept(self, logits, row_tokens, kept):
        logits_a.append(logits[self.active[0].rows].clone())
        return accept(self, logits, row_tokens, kept)

    monkeypatch.setattr(batch_mod.PackedBatch, "accept", recording_accept)
    alone = generate_batch(target, None, [a], max_new_tokens=12, eos_token_id=-1)[0]
    solo_logits, logits_a[:] = list(logits_a), []
    monkeypatch.setattr(batch_mod.PackedBatch, "verify", corrupting_verify)
    both = generate_batch(target, None, [a, b], max_new_tokens=12, eos_token_id=-1)
    assert corrupted
    assert both[0].token_ids == alone.token_ids == hf_greedy(target, a, 12)
    assert both[1].token_ids != hf_greedy(target, b, 12)
    assert len(logits_a) == len(solo_logits) == 12
    for x, y in zip(solo_logits, logits_a):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", CONFIGS[:4], ids=["plain", "chain", "static tree", "dynamic tree"])
def test_a_lone_request_takes_the_single_request_forward_with_the_packed_logits(monkeypatch, config):
    """A request alone in the batch runs the single-request engine's forward (causal chain, tree mask), not
    the packed layout: its logits equal the packed path's (within 1e-5) and its output HF's."""
    target = tiny_moe("qwen3_moe")
    ps = prompts((9, 4, 6), seed=3)
    accept, alone = batch_mod.PackedBatch.accept, batch_mod.PackedBatch._alone
    seen: dict[bool, list] = {True: [], False: []}
    fast = [0]

    def recording_accept(self, logits, row_tokens, kept):
        if len(self.active) == 1:
            seen[mode].append(logits.clone())
        return accept(self, logits, row_tokens, kept)

    def counted_alone(self):
        fast[0] += alone(self)
        return alone(self)
    monkeypatch.setattr(batch_mod.PackedBatch, "accept", recording_accept)
    runs = {}
    for mode in (True, False):
        monkeypatch.setattr(batch_mod.PackedBatch, "_alone", counted_alone if mode else lambda self: False)
        runs[mode] = generate_batch(target, None, ps, drafter=DraftModelDrafter(target), policy=PerRequest(
            [PLAIN, config, config]), batch_size=2, max_new_tokens=14, eos_token_id=-1)
    assert fast[0] > 0 and len(seen[True]) == len(seen[False]) > 0  # the last request, once alone
    for x, y in zip(seen[True], seen[False]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    for p, r, q in zip(ps, runs[True], runs[False]):
        assert r.token_ids == q.token_ids == hf_greedy(target, p, 14)


def test_arrivals_and_adaptive_policy():
    """Requests join no earlier than they arrive; the adaptive policy (per-request state by request id)
    decodes the batch losslessly."""
    target = tiny_moe("qwen2_moe")
    ps = prompts()[:5]
    arrivals = [0.0, 0.0, 0.02, 0.05, 0.05]
    res = generate_batch(target, None, ps, drafter=DraftModelDrafter(target), policy=make_policy("auto"),
                         batch_size=2, max_new_tokens=16, eos_token_id=-1, arrivals=arrivals,
                         request_ids=[10, 11, 12, 13, 14])
    for p, r, t in zip(ps, res, arrivals):
        assert r.token_ids == hf_greedy(target, p, 16)
        assert r.joined >= t and r.first_token > r.joined and r.time_to_first_token > 0
        assert r.tokens_per_second > 0 and r.time_per_output_token >= 0
    assert [r.request_id for r in res] == [10, 11, 12, 13, 14]


@pytest.mark.parametrize("kwargs, word", [
    (dict(batch_size=0), "batch_size"), (dict(temperature=-0.7), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(request_ids=[1]), "request_ids"), (dict(arrivals=[0.0, 1.0, 2.0]), "arrivals"),
    (dict(arrivals=[0.0, -1.0]), "arrivals"), (dict(config=StepConfig(budgets=(8, 8), budget_mode="substitute")), "budget_mode"),
])
def test_invalid_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word) as err:
        generate_batch(None, None, [[5, 6], [7]], **kwargs)
    assert "\n" not in str(err.value)


def test_group_hits_equal_per_request_unique_experts():
    """Routing.group_hits (one scatter for the whole batch) gives each request's unique experts and the
    union of the others' exactly as unique_experts over their rows does."""
    from moetune.engine.routing import LayerRouting, Routing
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        T, B, E = int(torch.randint(2, 30, (1,), generator=g)), 4, 16
        index = [torch.randint(0, E, (T, 2), generator=g) for _ in range(3)]
        routing = Routing(E, [LayerRouting(i, torch.ones(T, 2), torch.zeros(T, E)) for i in index])
        group = torch.randint(0, B, (T,), generator=g)
        hits = routing.group_hits(group, B)  # [B, L, E]
        loads = hits.sum(0)
        for b in range(B):
            rows = (group == b).nonzero().flatten()
            own = routing.unique_experts(rows) if len(rows) else torch.zeros(3, dtype=torch.long)
            assert hits[b].sum(1).tolist() == own.tolist()
            rest = (group != b).nonzero().flatten()
            others = routing.unique_experts(rest) if len(rest) else torch.zeros(3, dtype=torch.long)
            assert ((loads - hits[b].int()) > 0).sum(1).tolist() == others.tolist()
