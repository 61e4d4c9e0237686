"""Tree structure helpers, and tree attention == chain attention over each node's ancestors."""
import pytest
import torch
from tiny import FAMILIES, tiny_moe

from moetune.engine import kv
from moetune.engine.tree import (DraftTree, ancestors, attention_mask, chain, depths, leaf_paths, path_to,
                                 path_weights, position_ids, subtree)

TREE = (-1, -1, 0, 0, 1, 2, 4)  # two root children, a branch under each, depth 4 at most


def test_structure():
    assert depths(TREE) == (1, 1, 2, 2, 2, 3, 3)
    assert path_to(TREE, 6) == [1, 4, 6]
    assert sorted(map(tuple, leaf_paths(TREE))) == [(0, 2, 5), (0, 3), (1, 4, 6)]
    anc = ancestors(TREE)
    assert anc[7].nonzero().flatten().tolist() == [0, 2, 5, 7]  # row 7 = node 6: root, nodes 1, 4, 6
    assert position_ids(TREE, 10, "cpu").tolist() == [[10, 11, 11, 12, 12, 12, 13, 13]]
    mask = attention_mask(TREE, 3, torch.float32, "cpu")
    assert mask.shape == (1, 1, 8, 11)
    assert (mask[0, 0, :, :3] == 0).all() and mask[0, 0, 1, 5] < -1e30 and mask[0, 0, 3, 4] == 0


def test_subtree_and_weights():
    tree = DraftTree(TREE, torch.arange(7) + 10, torch.full((7,), 0.5))
    sub = subtree(tree, [1, 4, 6, 0])
    assert sub.parents == (-1, -1, 1, 2) and sub.tokens.tolist() == [10, 11, 14, 16]
    assert torch.allclose(path_weights(tree), torch.tensor([1, .5, .5, .25, .25, .25, .125, .125]))
    with pytest.raises(ValueError, match="closed under ancestors"):
        subtree(tree, [6])
    with pytest.raises(ValueError, match="parent"):
        DraftTree((0,), torch.zeros(1, dtype=torch.long), torch.ones(1))
    assert chain(3) == (-1, 0, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_tree_attention_equals_chain_attention(family):
    model = tiny_moe(family)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(2, 128, (1, 5), generator=g)
    tokens = torch.randint(2, 128, (len(TREE),), generator=g)
    root = 7
    cache = kv.new_cache(model)
    with torch.no_grad():
        model(input_ids=prefix, cache=cache, use_cache=True)
        ids = torch.cat([torch.tensor([root]), tokens])[None]
        tree_logits = model(input_ids=ids, attention_mask=attention_mask(TREE, 5, torch.float32, "cpu"),
                            position_ids=position_ids(TREE, 5, "cpu"), cache=cache,
                            use_cache=True).logits[0]
        for node in range(len(TREE)):
            seq = torch.cat([prefix[0], torch.tensor([root]), tokens[path_to(TREE, node)]])[None]
            chain_logits = model(input_ids=seq).logits[0, -1]
            torch.testing.assert_close(tree_logits[node + 1], chain_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(tree_logits[0], model(input_ids=torch.cat(
            [prefix[0], torch.tensor([root])])[None]).logits[0, -1], atol=1e-4, rtol=1e-4)
