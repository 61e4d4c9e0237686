"""Subtree selection (outcome.py's rules: EAGLE-2 growth, or a static parent array) for every tree of a
derive.Batch at once, memoised per config shape on the batch.

Why: a static policy asks the same config at every position, and choosing the subtree one tree at a time
in Python (~40 us a step, plus ~30 us for its unique-expert count) held a freshly read trace to
12,000-17,000 decisions/s for wide trees. Here each depth level is a few numpy calls over all trees of the
batch; the first step with a config pays for the whole batch (a few ms for ~2,000 trees) and every other
step only cuts its tree's Subtree from the arrays.

The selected sets equal the per-tree rule's: which nodes a level creates does not depend on the order of
the frontier, children are taken in (-draft probability, id) order (derive.Batch.order) and frontier and
final cuts keep the best by (-cumulative probability, id) within each tree (derive.Batch.by_rank), and
accepted lengths, depths and unique experts are exact integer counts over the same nodes.

Shape legend: T trees, S nodes and R rows (root + nodes per tree) of the batch, Q selected nodes,
L MoE layers, K top-k, W 64-bit words per expert bitset.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moetune.step import DRAFTER_TRAITS, StepConfig

from .derive import Batch, bit_table, children


@dataclass(frozen=True)
class Subtree:
    """The budget-independent part of an outcome (cached per record and config shape)."""

    nodes: np.ndarray  # [n] selected node ids, ascending (parents before children)
    accepted: int
    tree_depth: int
    unique_experts: tuple[int, ...]  # [L] over the root and the selected nodes
    exact: bool


@dataclass(frozen=True, eq=False)
class Selection:
    """One config's subtree in every tree of a batch."""

    nodes: np.ndarray  # [Q] each tree's own node ids, ascending within a tree, trees in batch order
    bounds: list  # [T+1] tree i's nodes are nodes[bounds[i]:bounds[i + 1]]
    accepted: list  # [T] selected nodes on the accepted path
    depth: list  # [T] deepest selected node (0: none)
    unique: list  # [T] lists [L]: unique routed experts over the root and the selected nodes (a tuple
    # only for the trees a step visits: a replay visits a fraction of the batch's trees)
    exact: list  # [T] the recording holds the whole subtree

    def for_tree(self, i: int) -> Subtree:
        """Tree i's part of the selection."""
        return Subtree(self.nodes[self.bounds[i]:self.bounds[i + 1]], self.accepted[i], self.depth[i],
                       tuple(self.unique[i]), self.exact[i])


def selection(batch: Batch, config: StepConfig) -> Selection:
    """`config`'s subtree in every tree of `batch` (computed on first use of the config's shape)."""
    key = (config.drafter, config.depth, config.topk, config.num_draft_tokens, config.tree)
    hit = batch.selections.get(key)
    if hit is None:
        chosen, exact = static_tree(batch, config.tree) if config.tree is not None else grow(batch, config)
        hit = batch.selections[key] = summarise(batch, chosen, exact)
    return hit


def grow(b: Batch, config: StepConfig) -> tuple[np.ndarray, np.ndarray]:
    """EAGLE-2 growth in every tree: chosen [S] bool and exact [T] bool (outcome.py's docstring)."""
    k, traits = config.topk, DRAFTER_TRAITS[config.drafter]
    lim_depth, lim_topk = b.limit_table[:, 0], b.limit_table[:, 1]
    known = lim_depth > 0  # trees whose recorded growth limits are known
    exact = ~known | ((config.depth <= lim_depth) & (k <= lim_topk))  # [T]
    if traits.chain_only and k > 1:  # its trie of several continuations is approximated (outcome.py)
        exact[:] = False
    chosen = np.zeros(len(b.order), dtype=bool)
    frontier = children(b.order, b.start, b.count, b.row_off[:-1], k)
    chosen[frontier] = True
    for level in range(1, config.depth):
        rows = b.node_row[frontier]
        if not traits.model_free:  # a model drafter always has k children where the recording expanded
            short = b.tree_of[frontier[b.count[rows] < k]]
            exact[short[known[short] & (level < lim_depth[short])]] = False
        cands = children(b.order, b.start, b.count, rows, k)
        if not cands.size:
            break
        chosen[cands] = True
        frontier = best(b, cands, k)
    if config.num_draft_tokens is not None:
        chosen = keep_best(b, chosen, config.num_draft_tokens)
    return chosen, exact


def best(b: Batch, nodes: np.ndarray, k: int) -> np.ndarray:
    """The up to k nodes of each tree among `nodes` with the highest cumulative probability (ties: lower id)."""
    if not nodes.size or np.bincount(b.tree_of[nodes]).max() <= k:
        return nodes
    ranks = np.sort(b.rank[nodes])  # grouped by tree, best first; position r of by_rank is in tree tree_of[r]
    first = np.searchsorted(ranks, b.node_off[:-1])  # [T] each tree's first entry in ranks
    return b.by_rank[ranks[np.arange(len(ranks)) - first[b.tree_of[ranks]] < k]]


def keep_best(b: Batch, chosen: np.ndarray, n: int) -> np.ndarray:
    """`best` for a mask of most nodes ([S] bool in, [S] bool out): a running count in by_rank order
    avoids sorting them."""
    in_rank = chosen[b.by_rank]
    count = np.cumsum(in_rank)
    before = np.concatenate(([0], count))[b.node_off[:-1]]  # [T] chosen nodes ranked in earlier trees
    kept = np.zeros_like(chosen)
    kept[b.by_rank[in_rank & (count - before[b.tree_of] <= n)]] = True
    return kept


def static_tree(b: Batch, tree: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A static parent array in every tree: node j maps to the recorded child of its mapped parent with
    draft-probability rank r (r-th child of that parent in `tree`); chosen [S], exact [T] (all mapped)."""
    trees = len(b.row_off) - 1
    chosen = np.zeros(len(b.order), dtype=bool)
    exact = np.ones(trees, dtype=bool)
    mapped: list[np.ndarray] = []  # [T] per config node: the batch node it maps to, -1 missing
    seen: dict[int, int] = {}
    for p in tree:
        rank = seen.get(p, 0)
        seen[p] = rank + 1
        if p < 0:
            ok, rows = np.ones(trees, dtype=bool), b.row_off[:-1]
        else:
            ok = mapped[p] >= 0
            rows = np.where(ok, b.node_row[mapped[p]], 0)
        a = b.start[rows] + rank
        ok &= rank < b.count[rows]
        node = np.where(ok, b.order[np.where(ok, a, 0)], -1)
        mapped.append(node)
        chosen[node[ok]] = True
        exact &= ok
    return chosen, exact


def summarise(b: Batch, chosen: np.ndarray, exact: np.ndarray) -> Selection:
    """Per-tree node lists, accepted lengths, depths and unique routed experts of a chosen set."""
    trees = len(b.row_off) - 1
    nodes = np.flatnonzero(chosen)  # ascending: grouped by tree
    tree = b.tree_of[nodes]
    bounds = np.concatenate(([0], np.cumsum(np.bincount(tree, minlength=trees))))
    accepted = np.bincount(tree[b.on_path[nodes]], minlength=trees)
    depth = np.zeros(trees, dtype=np.int64)
    some = bounds[1:] > bounds[:-1]  # reduceat needs non-empty segments (~2x faster than maximum.at)
    depth[some] = np.maximum.reduceat(b.depth[nodes], bounds[:-1][some])
    rows = np.zeros(int(b.row_off[-1]), dtype=bool)  # a mask, not a sort: each tree's root first
    rows[b.row_off[:-1]] = True
    rows[b.node_row[nodes]] = True
    rows = np.flatnonzero(rows)
    routed = np.take(b.routed, rows, axis=0)  # [Q+T, L, K] (take: ~4x faster than indexing here)
    table = bit_table(int(routed.max(initial=0)) // 64 + 1)
    bits = np.take(table, routed[:, :, 0], axis=0)  # [Q+T, L, W]; OR-ing K takes is ~3x faster than
    for j in range(1, routed.shape[2]):  # one reduce over an indexed [Q+T, L, K, W]
        bits |= np.take(table, routed[:, :, j], axis=0)
    per_tree = np.bitwise_or.reduceat(bits, np.searchsorted(rows, b.row_off[:-1]), axis=0)  # [T, L, W]
    unique = np.bitwise_count(per_tree).sum(axis=2, dtype=np.int64)  # [T, L]
    local = nodes - b.node_off[tree]
    local.flags.writeable = False  # shared by every tree's Subtree
    return Selection(local, bounds.tolist(), accepted.tolist(), depth.tolist(), unique.tolist(),
                     exact.tolist())
