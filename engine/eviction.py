"""Lossless expert budgets by node eviction: at each MoE layer keep the tree nodes whose experts fit.

Why it is lossless: a node attends only to the cached context, its ancestors and itself. If the nodes
kept at every layer are closed under ancestors, every kept node's hidden states are exactly those of
the unbudgeted pass, so its logits are exact; an evicted node computes no expert at that layer or
after, and it and its subtree leave the acceptance. Greedy output therefore equals plain greedy
decoding at every budget >= top_k (the root alone needs top_k experts). The price is acceptance.

The rule (one ranking per step, a handful of tensor ops per layer, no host sync):
- Rank the rows once by the draft's path probability, root first and always kept, ties in
  breadth-first order. A child's path probability never exceeds its parent's (draft probabilities are at
  most 1), so every prefix of the ranking is closed under ancestors.
- At layer l the kept rows are the longest prefix of the ranking whose union of top-k experts holds at
  most B_l experts, never longer than the previous layer's prefix: a cumulative OR over the ranked
  [T, E] hit mask, a count per prefix, and one comparison.

Example: ranked rows r0 (experts {1,2}), r1 ({2,3}), r2 ({4,5}) with top_k 2 and B = 3: the prefix
unions hold 2, 3, 5 experts, so r0 and r1 are kept (3 experts computed) and r2 is evicted.

Under expert offload (engine/offload.py) a miss costs a slow-tier read, which dominates, so the budget
counts reads: experts already in the layer's fast tier are free (kept_prefix's `free`), and the kept
prefix is the longest whose union less the free experts holds at most B_l. In the example with experts
4 and 5 resident, all three rows are kept (3 experts read, 5 computed). Lossless all the same: the kept
set is still a prefix of the ranking. Only the host search takes `free`: offload keeps its fast tier in
CPU memory, so the tensor search (evict, for accelerators) never meets an offloaded model.

Sampling stays exact too: moetune's drafters propose their children deterministically (point
proposals), and which nodes survive depends only on the context and the tree, never on the random
draws of the acceptance walk, so the walk over the surviving children emits each token with exactly the
target's probability (tests/test_eviction.py measures it against the sampling test's null).

Shape legend: T verified rows (root + N nodes), E experts, K top-k.
"""
from __future__ import annotations

from collections.abc import Set as AbstractSet

import numpy as np
import torch

from .tree import DraftTree, depths


def node_rank(tree: DraftTree) -> tuple[int, ...]:  # T = N+1 rows, root first
    """Rows in the order they are kept: path probability descending, ties by depth then row.

    Path probabilities are products of the draft probabilities at the precision traces record them
    (float16), multiplied in float64 parents first, exactly as traces/derive.py does, so replay ranks
    every recorded tree as the engine did. N is small (tens of nodes): plain Python on the host, from the
    drafter's host copy of the probabilities when it gave one (no device read)."""
    if tree.host_probs is not None:
        probs = np.asarray(tree.host_probs, dtype=np.float32).astype(np.float16).astype(np.float64).tolist()
    else:
        probs = tree.probs.to(torch.float16).double().cpu().tolist()
    path: list[float] = []
    for node, parent in enumerate(tree.parents):
        path.append(probs[node] * (path[parent] if parent >= 0 else 1.0))
    depth = depths(tree.parents)
    order = sorted(range(len(path)), key=lambda i: (-path[i], depth[i], i))
    return (0, *(i + 1 for i in order))


def rank_positions(rank: torch.Tensor) -> torch.Tensor:  # [T] -> [T]
    """Each row's position in the ranking (the inverse permutation), computed once per step."""
    return torch.empty_like(rank).scatter_(0, rank, torch.arange(rank.numel(), device=rank.device))


def evict(top_k_index: torch.Tensor,  # [T, K] this layer's routing, rows in verification order
          num_experts: int,
          rank: torch.Tensor,  # [T] from node_rank
          position: torch.Tensor,  # [T] from rank_positions
          budget: int,
          previous: torch.Tensor | int,  # [] rows kept at the layer before (an int: all T rows)
          ) -> tuple[torch.Tensor, torch.Tensor]:  # [T] bool rows kept, [] their count
    """One layer's eviction: the longest prefix of the ranking whose expert union fits `budget`, never
    longer than the previous layer's. About ten small ops, no host sync."""
    T = top_k_index.shape[0]
    hits = torch.zeros(T, num_experts, dtype=torch.int32, device=top_k_index.device)
    hits.scatter_(1, top_k_index[rank], 1)  # [T, E] ranked
    union_sizes = (hits.cumsum(0) > 0).sum(1)  # [T] experts in the union of each prefix
    count = (union_sizes <= budget).sum()  # unions only grow, so the fitting prefixes are the first ones
    if not isinstance(previous, int):
        count = torch.minimum(count, previous)
    return position < count, count


def kept_prefix(routing: list[list[int]],  # [T][K] this layer's experts per row, verification order
                rank: list[int],  # [T] from node_rank
                budget: int,
                previous: int,  # rows kept at the layer before (T at the first layer)
                free: AbstractSet[int] = frozenset(),  # experts that do not count against the budget
                ) -> int:
    """evict's count, on the host: the longest prefix of `rank` (at most `previous` rows) whose expert
    union, less the experts in `free`, fits `budget`. Under offload `free` is the layer's resident set
    (engine/offload.resident_experts): a resident expert costs compute but no slow-tier read, and reads
    dominate there, so the budget counts reads. With `free` empty this is evict's rule exactly."""
    union: set[int] = set()
    for kept, row in enumerate(rank[:previous]):
        union.update(routing[row])
        union -= free
        if len(union) > budget:
            return kept
    return previous


def prefix_experts(routing: list[list[list[int]]],  # [L][T][K] each layer's experts per row
                   rank: list[int],  # rows in keep order
                   counts: list[int],  # [L] rows kept at each layer (a prefix of rank)
                   ) -> tuple[list[set[int]], list[set[int]]]:
    """Per layer, the experts of the rows that entered it (those the layer before kept; all at the first)
    and of the rows it kept: what an evicted pass was asked for, and what it computed."""
    demand, kept, entered = [], [], len(rank)
    for layer, count in zip(routing, counts):
        demand.append(set().union(*(layer[r] for r in rank[:entered])))
        kept.append(set().union(*(layer[r] for r in rank[:count])))
        entered = count
    return demand, kept
