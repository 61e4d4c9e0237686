"""The indexed n-gram lookup returns exactly what the brute-force scan it replaced returns."""
import random

import pytest

from moetune.engine.drafters import NgramDrafter
from moetune.ngram import NgramIndex
from moetune.step import StepConfig


def reference_continuations(context, length, count, max_n, min_n):
    """The original brute-force scan: longest n first, most recent match first, no smaller n once found."""
    found = []
    end = len(context)
    for n in range(min(max_n, end - 1), min_n - 1, -1):
        pattern = context[end - n:]
        for start in range(end - n - 1, -1, -1):
            if context[start:start + n] == pattern:
                cont = context[start + n:start + n + length]
                if cont and cont not in found:
                    found.append(cont)
                    if len(found) == count:
                        return found
        if found:
            return found
    return found


def reference_tree(conts, budget):
    parents, tokens, index = [], [], {}
    for cont in conts:
        for d in range(len(cont)):
            key = tuple(cont[:d + 1])
            if key in index:
                continue
            if len(tokens) == budget:
                break
            index[key] = len(tokens)
            parents.append(index[key[:-1]] if d else -1)
            tokens.append(cont[d])
    return tuple(parents), tokens


class CountingDrafter(NgramDrafter):
    """Counts index resets (each prefill, and each context that does not extend the indexed one;
    not the constructor's), so the tests know which sync path ran."""

    def _reset(self):
        self.resets = getattr(self, "resets", -1) + 1
        super()._reset()


def random_setup(rng):
    max_n = rng.randint(1, 6)
    return max_n, rng.randint(1, max_n), rng.randint(1, 6), rng.randint(1, 5), rng.randint(2, 6)


def check(d, context, length, count):
    assert d.continuations(context, length, count) == \
        reference_continuations(context, length, count, d.max_n, d.min_n), (context, length, count)


@pytest.mark.parametrize("seed", range(40))
def test_matches_reference_on_fresh_contexts(seed):
    rng = random.Random(seed)
    for _ in range(10):
        max_n, min_n, length, count, vocab = random_setup(rng)
        context = [rng.randrange(vocab) for _ in range(rng.randint(1, 300))]
        check(NgramDrafter(max_n=max_n, min_n=min_n), context, length, count)


@pytest.mark.parametrize("seed", range(20))
def test_matches_reference_while_context_grows(seed):
    rng = random.Random(100 + seed)
    max_n, min_n, _, _, vocab = random_setup(rng)
    full = [rng.randrange(vocab) for _ in range(300)]
    d = CountingDrafter(max_n=max_n, min_n=min_n)
    k = rng.randint(1, 20)
    d.prefill(full[:k])
    while k <= len(full):
        check(d, full[:k], rng.randint(1, 6), rng.randint(1, 5))
        k += rng.randint(0, 8)  # 0: the same context again
    assert d.resets == 1  # only prefill's: every later call took the incremental path
    fresh = NgramDrafter(max_n=max_n, min_n=min_n)
    fresh.prefill(full[:d._len])
    assert d._index == fresh._index


@pytest.mark.parametrize("seed", range(20))
def test_rebuilds_on_unrelated_or_shorter_context(seed):
    rng = random.Random(200 + seed)
    max_n, min_n, length, count, vocab = random_setup(rng)
    d = CountingDrafter(max_n=max_n, min_n=min_n)
    a = [rng.randrange(vocab) for _ in range(rng.randint(2, 300))]
    check(d, a, length, count)
    assert d.resets == 0
    # an unrelated context (different first token), longer or shorter
    b = [vocab] + [rng.randrange(vocab) for _ in range(rng.randint(1, 300))]
    check(d, b, length, count)
    assert d.resets == 1
    # a shorter context (a prefix of the indexed one)
    check(d, b[:rng.randint(1, len(b) - 1)], length, count)
    assert d.resets == 2
    check(d, b, length, count)  # grows again from the prefix
    assert d.resets == 2


def test_prefill_forgets_previous_request():
    # the new request agrees with the old one on the first token and on the old last token, longer:
    # only prefill tells the two requests apart
    old = [0, 5, 6, 7, 1, 2]
    new = [0, 1, 2, 3, 4, 2, 1, 2, 9]
    assert new[len(old) - 1] == old[-1] and len(new) > len(old)
    stale = NgramDrafter(max_n=3)  # without prefill the index would wrongly be extended (the assumption)
    stale.continuations(old, 3, 2)
    assert stale.continuations(new + [1, 2], 3, 2) == [[9, 1, 2]]
    d = CountingDrafter(max_n=3)
    check(d, old, 3, 2)
    d.prefill(new[:4])
    check(d, new, 3, 2)
    assert d.continuations(new + [1, 2], 3, 2) == [[9, 1, 2], [3, 4, 2]]
    assert d.resets == 1
    fresh = NgramDrafter(max_n=3)
    fresh.prefill(new + [1, 2])
    assert d._index == fresh._index


@pytest.mark.parametrize("seed", range(10))
def test_prefill_then_decode_matches_reference(seed):
    rng = random.Random(300 + seed)
    d = NgramDrafter()
    for _ in range(3):  # three requests in a row
        vocab = rng.randint(2, 8)
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 100))]
        d.prefill(ids)
        for _ in range(30):
            check(d, ids, 4, rng.randint(1, 3))
            ids = ids + [rng.randrange(vocab) for _ in range(rng.randint(1, 5))]


def test_hand_cases():
    d = NgramDrafter()
    ctx = [1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3]
    assert d.continuations(ctx, 2, 1) == [[7, 1]]  # most recent match first
    assert d.continuations(ctx, 2, 2) == [[7, 1], [9, 1]]
    assert d.continuations(ctx, 2, 5) == [[7, 1], [9, 1]]
    # [4, 5] matches (n=2), so the n=1 matches of [5] are never used
    assert d.continuations([4, 5, 1, 5, 2, 4, 5], 2, 3) == [[1, 5]]
    assert d.continuations([1, 2, 3], 4, 2) == []
    assert d.continuations([1], 4, 2) == []
    assert d.continuations([], 4, 2) == []
    assert d.continuations([3, 3, 3, 3], 2, 3) == [[3]]  # n=3 matches once
    assert NgramDrafter(max_n=1).continuations([3, 3, 3, 3], 2, 3) == [[3], [3, 3]]  # distinct only
    assert NgramDrafter(max_n=2, min_n=2).continuations([5, 1, 6, 1], 2, 1) == []


def tree_of(d, context, cfg):
    t = d.draft(context, cfg)
    return t.parents, t.tokens.tolist()


def test_draft_hand_cases():
    d = NgramDrafter()
    assert tree_of(d, [1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], StepConfig(drafter="ngram", depth=2, topk=2)) == \
        ((-1, 0, -1, 2), [7, 1, 9, 1])
    # continuations [9, 6] and [9, 5] share their first token
    assert tree_of(d, [1, 9, 5, 1, 9, 6, 1], StepConfig(drafter="ngram", depth=2, topk=2)) == ((-1, 0, 0), [9, 6, 5])
    assert tree_of(d, [1, 9, 5, 1, 9, 6, 1], StepConfig(drafter="ngram", depth=2, topk=2, num_draft_tokens=2)) == \
        ((-1, 0), [9, 6])
    assert tree_of(d, [1, 9, 5, 1, 9, 6, 1], StepConfig(drafter="ngram", depth=3)) == ((-1, 0, 1), [9, 6, 1])
    assert tree_of(d, [1, 2, 3], StepConfig(drafter="ngram", depth=3, topk=2)) == ((), [])


@pytest.mark.parametrize("seed", range(10))
def test_draft_matches_reference_tree(seed):
    rng = random.Random(400 + seed)
    d = NgramDrafter()
    ids = [rng.randrange(4) for _ in range(rng.randint(1, 50))]
    d.prefill(ids)
    for _ in range(20):
        cfg = StepConfig(drafter="ngram", depth=rng.randint(1, 5), topk=rng.randint(1, 4),
                         num_draft_tokens=rng.choice([None, 1, 3, 8]))
        conts = reference_continuations(ids, cfg.depth, cfg.topk, d.max_n, d.min_n)
        assert tree_of(d, ids, cfg) == reference_tree(conts, cfg.num_draft_tokens or cfg.max_nodes)
        ids = ids + [rng.randrange(4) for _ in range(rng.randint(1, 4))]


def test_constructor_validation():
    for max_n, min_n in ((0, 1), (2, 3), (3, 0)):
        with pytest.raises(ValueError, match="min_n"):
            NgramDrafter(max_n=max_n, min_n=min_n)


def reference_order(context, max_n, min_n):
    """The longest n whose n-gram ending the context occurs earlier with a token after it (0: none)."""
    end = len(context)
    for n in range(min(max_n, end - 1), min_n - 1, -1):
        if any(context[s:s + n] == context[end - n:] for s in range(end - n)):
            return n
    return 0


@pytest.mark.parametrize("seed", range(20))
def test_lookahead_is_the_count_one_draft_and_its_order(seed):
    rng = random.Random(500 + seed)
    max_n, min_n, vocab = rng.randint(2, 6), rng.randint(1, 2), rng.randint(3, 10)
    full = [rng.randrange(vocab) for _ in range(200)]
    index = NgramIndex(max_n=max_n, min_n=min_n)  # torch-free: what replay uses
    index.prefill(full[:3])
    orders = set()
    for k in range(3, len(full) + 1, 7):
        length = rng.randint(1, 8)
        order, chain = index.lookahead(full[:k], length)
        expected = reference_continuations(full[:k], length, 1, max_n, min_n)
        assert chain == (expected[0] if expected else [])
        assert order == reference_order(full[:k], max_n, min_n)
        orders.add(order)
    assert len(orders) > 1  # several orders (or none) were seen, not one case over and over


def test_drafters_are_built_by_name_in_one_place_and_match_their_traits():
    from moetune.engine.drafters import DraftModelDrafter, SelfDrafter, make_drafter
    from moetune.ngram import MAX_N
    from moetune.step import DRAFTER_TRAITS, DRAFTERS
    from tiny import tiny_dense, tiny_moe

    target = tiny_moe("qwen3_moe", seed=0)
    built = {name: make_drafter(name, target, tiny_dense()) for name in DRAFTERS}
    assert [type(d) for d in built.values()] == [DraftModelDrafter, NgramDrafter, SelfDrafter]
    assert all(d.name == name for name, d in built.items())
    assert (built["ngram"].max_n, built["ngram"].min_n) == (MAX_N, 1) == (DRAFTER_TRAITS["ngram"].max_order, 1)
    ngram = make_drafter("ngram", target, max_n=2, min_n=2)
    assert (ngram.max_n, ngram.min_n) == (2, 2)
    for name, traits in DRAFTER_TRAITS.items():  # a passive draft runs every step: a cheap chain
        assert not traits.passive or (traits.model_free and traits.chain_only)
        assert (traits.max_order > 0) == isinstance(built[name], NgramIndex)
    with pytest.raises(ValueError, match="drafter 'draft_model' but none was given"):
        make_drafter("draft_model", target)
    with pytest.raises(ValueError, match="unknown drafter 'eagle'"):
        make_drafter("eagle", target)
