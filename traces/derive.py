"""Derived per-tree arrays that replay needs (depths, path probabilities, the accepted path, children in
draft-probability order), computed for all trees of a trace at once with numpy.

Why batched and lazy: a replay step touches one recorded tree, and a static policy touches only the
positions it lands on, so per-tree Python setup (a loop over ~100 nodes and a sort per parent, ~100 us
per tree) used to cost more than the step itself and capped a freshly read trace at ~9,000 decisions/s.
Here `prepare` derives every node of every tree level by level in a few numpy calls per depth level for
the whole trace (~2 us per tree), and each tree's views and small Python lists are cut from that batch
only when a step first touches the tree.

The results equal the per-node definitions exactly: a node's cumulative probability is computed as
probs[i] * cum[parent[i]] in float64, parents before children (so each product is the same float
operation); siblings are ordered by (-draft probability, node id), and frontier cuts by
(-cumulative probability, node id), both as stable sorts.

Shape legend: T trees, S = sum of N over the trees (nodes), R = S + T (rows: each tree's root, then its
nodes), L MoE layers, K top-k, M router entries, W 64-bit words per expert bitset.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

import numpy as np


@dataclass(frozen=True, eq=False)
class Derived:
    """One tree's derived arrays (views into its batch), and its batch's lists for selection's loops."""

    depth: np.ndarray  # [N] int64, 1 = child of the root
    cum_prob: np.ndarray  # [N] float64, product of draft probabilities along the path from the root
    match: np.ndarray  # [N] bool, the target's verdict: token == target argmax at its parent
    on_path: np.ndarray  # [N] bool, the node and all its ancestors match (the accepted path)
    bit_table: np.ndarray  # [64 W, W] uint64, row e: expert e's bit (W words cover the tree's experts)
    child_order: list  # [S] the batch's: node ids (the tree's own) grouped by parent row, then (-draft prob, id)
    child_start: list  # [R+1] the batch's: children of row r are child_order[child_start[row0 + r]:...[row0 + r + 1]]
    row0: int  # this tree's root row in the batch (row r of the tree: 0 = root, i + 1 = node i)

    @functools.cached_property
    def cum_rank(self) -> list:  # [N] rank of each node by (-cum_prob, id): EAGLE-2's frontier and final cut
        rank = np.empty(len(self.cum_prob), dtype=np.int64)
        rank[np.argsort(-self.cum_prob, kind="stable")] = np.arange(len(self.cum_prob))  # stable: ties by id
        return rank.tolist()


@dataclass(frozen=True, eq=False)
class Batch:
    """Derived arrays of many trees, concatenated: tree i's nodes are [node_off[i], node_off[i + 1]),
    its rows (root first) [row_off[i], row_off[i + 1])."""

    node_off: np.ndarray  # [T+1]
    row_off: np.ndarray  # [T+1]
    depth: np.ndarray  # [S] int64
    cum: np.ndarray  # [S] float64
    match: np.ndarray  # [S] bool
    on_path: np.ndarray  # [S] bool
    order: list  # [S] node ids (each tree's own) grouped by batch parent row, then (-prob, id)
    start: list  # [R+1] children of batch row r: order[start[r]:start[r + 1]]

    def tree(self, i: int, experts: np.ndarray) -> Derived:
        """Tree i's views (cut on first use, so trees no step touches cost nothing)."""
        a, b = self.node_off[i], self.node_off[i + 1]
        return Derived(depth=self.depth[a:b], cum_prob=self.cum[a:b], match=self.match[a:b],
                       on_path=self.on_path[a:b], bit_table=bit_table(int(experts.max(initial=0)) // 64 + 1),
                       child_order=self.order, child_start=self.start, row0=int(self.row_off[i]))


def prepare(trees: Iterable) -> None:
    """Attach one Batch to every TreeRecord in `trees` that has none (TreeRecord.derived cuts its part).

    Draft probabilities are float16 (as stored), so siblings sort by one int64 key per node: the parent
    row, then the complement of the float16 bit pattern (which orders non-negative floats)."""
    todo = [t for t in trees if t.batch is None]
    if not todo:
        return
    n = np.array([t.num_nodes for t in todo], dtype=np.int64)  # [T]
    node_off = np.concatenate(([0], np.cumsum(n)))  # [T+1]
    row_off = node_off + np.arange(len(todo) + 1)  # [T+1]
    tree_of = np.repeat(np.arange(len(todo)), n)  # [S]
    parents = np.concatenate([t.parents for t in todo]).astype(np.int64)  # [S] local, -1 = root
    prow = parents + 1 + row_off[tree_of]  # [S] batch row of each node's parent
    pnode = np.where(parents >= 0, parents + node_off[tree_of], -1)  # [S] batch node of the parent, -1 root
    tokens = np.concatenate([t.tokens for t in todo]).astype(np.int64)  # [S]
    argmax = np.concatenate([t.argmax for t in todo]).astype(np.int64)  # [R]
    probs16 = np.concatenate([t.probs for t in todo]).astype(np.float16)  # [S]
    match = tokens == argmax[prow]
    depth, cum, ok = levels(pnode, probs16.astype(np.float64), match)
    key = (prow << 16) | (0xFFFF - probs16.view(np.uint16).astype(np.int64))  # [S]
    order = np.argsort(key, kind="stable")  # [S] stable: equal probabilities keep node id order
    start = np.concatenate(([0], np.cumsum(np.bincount(prow, minlength=int(row_off[-1])))))  # [R+1]
    local = order - node_off[tree_of[order]]  # [S] each tree's own node ids
    batch = Batch(node_off, row_off, depth, cum, match, ok, local.tolist(), start.tolist())
    for i, t in enumerate(todo):
        t.batch = (batch, i)


def levels(pnode: np.ndarray, probs: np.ndarray, match: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """depth, cumulative probability and accepted-path flag [S], one depth level per iteration
    (parents are settled before their children, so each product is taken in the per-node order)."""
    depth = np.where(pnode < 0, 1, 0)  # [S]
    cum = np.where(pnode < 0, probs, 0.0)
    ok = match & (pnode < 0)
    rest = np.flatnonzero(pnode >= 0)  # nodes whose depth is not settled yet
    d = 1
    while rest.size:
        at = depth[pnode[rest]] == d  # the parent was settled last round: the node has depth d + 1
        idx, rest = rest[at], rest[~at]
        par = pnode[idx]
        depth[idx] = d + 1
        cum[idx] = probs[idx] * cum[par]
        ok[idx] = match[idx] & ok[par]
        d += 1
    return depth.astype(np.int64), cum, ok


@functools.cache
def bit_table(words: int) -> np.ndarray:
    """[64 W, W] uint64: row e holds expert e's bit in word e // 64 (shared, read-only)."""
    e = np.arange(64 * words)
    table = np.zeros((64 * words, words), dtype=np.uint64)
    table[e, e // 64] = np.left_shift(np.uint64(1), (e % 64).astype(np.uint64))
    table.flags.writeable = False
    return table


def routed_bits(experts: np.ndarray, top_k: int, table: np.ndarray) -> np.ndarray:
    """experts [n, L, M] -> [L, W] uint64: the union over the n tokens of their first `top_k` entries
    (the routed experts) as a bitset; np.bitwise_count(...).sum(axis=1) counts unique experts per layer."""
    return np.bitwise_or.reduce(table[experts[:, :, :top_k]], axis=(0, 2))  # [n, L, K, W] -> [L, W]
