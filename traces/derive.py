"""Derived per-tree arrays that replay needs (depths, path probabilities, the accepted path, children in
draft-probability order), computed for all trees of a trace at once with numpy.

Why batched and lazy: a replay step touches one recorded tree, and a static policy touches only the
positions it lands on, so per-tree Python setup (a loop over ~100 nodes and a sort per parent, ~100 us
per tree) used to cost more than the step itself and capped a freshly read trace at ~9,000 decisions/s.
Here `prepare` derives every node of every tree level by level in a few numpy calls per depth level for
the whole trace (~5 us per tree), each tree's views are cut from that batch only when a step first
touches the tree, and subtree selection also runs over the whole batch (traces/select.py).

The results equal the per-node definitions exactly: a node's cumulative probability is computed as
probs[i] * cum[parent[i]] in float64, parents before children (so each product is the same float
operation); siblings are ordered by (-draft probability, node id), and frontier cuts by
(-cumulative probability, node id), both as stable sorts.

Shape legend: T trees, S = sum of N over the trees (nodes), R = S + T (rows: each tree's root, then its
nodes), L MoE layers, K top-k, M router entries, W 64-bit words per expert bitset.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np


@dataclass(frozen=True, eq=False)
class Derived:
    """One tree's derived arrays (views into its batch)."""

    depth: np.ndarray  # [N] int64, 1 = child of the root
    cum_prob: np.ndarray  # [N] float64, product of draft probabilities along the path from the root
    match: np.ndarray  # [N] bool, the target's verdict: token == target argmax at its parent
    on_path: np.ndarray  # [N] bool, the node and all its ancestors match (the accepted path)
    bit_table: np.ndarray  # [64 W, W] uint64, row e: expert e's bit (W words cover the tree's experts)


@dataclass(frozen=True, eq=False)
class Batch:
    """Derived arrays of many trees, concatenated: tree i's nodes are [node_off[i], node_off[i + 1]),
    its rows (root first) [row_off[i], row_off[i + 1]).
    Node ids below are the batch's (tree i's node j is node_off[i] + j)."""

    node_off: np.ndarray  # [T+1]
    row_off: np.ndarray  # [T+1]
    tree_of: np.ndarray  # [S] the tree each node belongs to
    depth: np.ndarray  # [S] int64
    cum: np.ndarray  # [S] float64
    match: np.ndarray  # [S] bool
    on_path: np.ndarray  # [S] bool
    order: np.ndarray  # [S] nodes grouped by parent row, then (-draft prob, id)
    start: np.ndarray  # [R+1] children of batch row r: order[start[r]:start[r + 1]]
    count: np.ndarray  # [R] children of each row
    node_row: np.ndarray  # [S] each node's batch row (node + its tree + 1)
    limits: list  # [T] each tree's TreeLimits (None: unknown)
    experts: list  # [T] each tree's [N+1, L, M] router entries (concatenated only when a selection needs them)
    top_k: int  # K: the first K router entries are the routed experts
    selections: dict = field(default_factory=dict)  # traces.select's cache: config shape -> Selection

    def tree(self, i: int, experts: np.ndarray) -> Derived:
        """Tree i's views (cut on first use, so trees no step touches cost nothing)."""
        a, b = self.node_off[i], self.node_off[i + 1]
        return Derived(depth=self.depth[a:b], cum_prob=self.cum[a:b], match=self.match[a:b],
                       on_path=self.on_path[a:b], bit_table=bit_table(int(experts.max(initial=0)) // 64 + 1))

    @functools.cached_property
    def by_rank(self) -> np.ndarray:  # [S] nodes sorted by (tree, -cum_prob, id): EAGLE-2's cuts per tree
        """Sorted as one int64 key per node (tree, the top bits of -cum_prob's float bits, id): sorting
        values is ~10x faster than a stable lexsort. Cumulative probabilities in [0, 1] order like their
        bits, so only nodes of one tree whose values agree in the kept bits can be out of order; every
        adjacent pair is checked against the exact values, and any miss takes the exact (slower) order."""
        s, t = len(self.cum), len(self.row_off) - 1
        id_bits, tree_bits = max(s.bit_length(), 1), max(t.bit_length(), 1)
        value_bits = 63 - id_bits - tree_bits  # cum in [0, 1] has 62 significant bits (sign and top exponent bit 0)
        if value_bits >= 16 and self.cum.min(initial=0.0) >= 0 and self.cum.max(initial=1.0) <= 1:  # NaN fails
            top = (self.cum + 0.0).view(np.int64) >> (62 - value_bits)  # + 0.0: -0.0 has the sign bit
            key = (self.tree_of << (63 - tree_bits)) | (((1 << value_bits) - 1 - top) << id_bits) | np.arange(s)
            key.sort()
            order = key & ((1 << id_bits) - 1)
            tree, cum = key >> (63 - tree_bits), self.cum[order]  # the key's tree bits: no tree_of gather
            if not np.any((tree[1:] == tree[:-1]) & (cum[1:] > cum[:-1])):  # ties keep id order (key)
                return order
        return np.lexsort((-self.cum, self.tree_of))  # stable: ties by id

    @functools.cached_property
    def rank(self) -> np.ndarray:  # [S] each node's position in by_rank
        rank = np.empty_like(self.by_rank)
        rank[self.by_rank] = np.arange(len(rank))
        return rank

    @functools.cached_property
    def routed(self) -> np.ndarray:  # [R, L, K] every row's routed experts
        if self.experts[0].shape[2] == self.top_k:  # M = K: no per-tree slicing (a view each)
            return np.concatenate(self.experts)
        return np.concatenate([e[:, :, :self.top_k] for e in self.experts])

    @functools.cached_property
    def limit_table(self) -> np.ndarray:  # [T, 2] each tree's recorded (depth, topk); (0, 0): unknown
        """Trees of one drafter share one TreeLimits object, so the table is built per distinct object
        (one object, the usual case, needs no np.unique over the ids)."""
        first = self.limits[0]
        if all(lim is first for lim in self.limits):
            return np.tile(np.array((first.depth, first.topk) if first else (0, 0), dtype=np.int64),
                           (len(self.limits), 1))
        _, first, inverse = np.unique([id(lim) for lim in self.limits], return_index=True, return_inverse=True)
        distinct = [self.limits[i] for i in first]
        table = np.array([(lim.depth, lim.topk) if lim else (0, 0) for lim in distinct], dtype=np.int64)
        return table.reshape(-1, 2)[inverse]


def prepare(trees: Iterable) -> None:
    """Attach one Batch to every TreeRecord in `trees` that has none (TreeRecord.derived cuts its part).

    Draft probabilities are float16 (as stored), so siblings sort by one int64 key per node: the parent
    row, then the complement of the float16 bit pattern (which orders non-negative floats)."""
    todo = [t for t in trees if t.batch is None]
    if not todo:
        return
    parts = [t.parents for t in todo]
    n = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))  # [T]
    node_off = np.concatenate(([0], np.cumsum(n)))  # [T+1]
    row_off = node_off + np.arange(len(todo) + 1)  # [T+1]
    tree_of = np.repeat(np.arange(len(todo)), n)  # [S]
    first = np.repeat(node_off[:-1], n)  # [S] first node of each node's tree (repeats are cheaper than gathers)
    parents = np.concatenate(parts).astype(np.int64)  # [S] local, -1 = root
    prow = parents + first + tree_of + 1  # [S] batch row of each node's parent (row_off[tree] = first + tree)
    pnode = np.where(parents >= 0, parents + first, -1)  # [S] batch node of the parent, -1 root
    tokens = np.concatenate([t.tokens for t in todo])  # [S]
    argmax = np.concatenate([t.argmax for t in todo])  # [R]
    probs16 = np.concatenate([t.probs for t in todo]).astype(np.float16, copy=False)  # [S]
    match = tokens == argmax[prow]
    key = (prow << 16) | (0xFFFF - probs16.view(np.uint16).astype(np.int64))  # [S]
    order = np.argsort(key, kind="stable")  # [S] stable: equal probabilities keep node id order
    count = np.bincount(prow, minlength=int(row_off[-1]))  # [R]
    start = np.concatenate(([0], np.cumsum(count)))  # [R+1]
    node_row = np.arange(len(prow)) + tree_of + 1  # [S]
    depth, cum, ok = levels(pnode, probs16.astype(np.float64), match)
    batch = Batch(node_off, row_off, tree_of, depth, cum, match, ok, order, start, count, node_row,
                  [t.limits for t in todo], [t.experts for t in todo], todo[0].top_k)
    for i, t in enumerate(todo):
        t.batch = (batch, i)


def levels(pnode: np.ndarray, probs: np.ndarray, match: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """depth, cumulative probability and accepted-path flag [S], one depth level at a time (each node
    after its parent, so each product is taken in the per-node order). `probs` becomes the cumulative
    probabilities (prepare passes a fresh float64 copy, so copying it again would only cost time).

    Depths come from pointer jumping (each pass doubles the ancestor distance covered: ~log2(depth)
    passes over S int16 values), then one stable sort groups the nodes by depth, so every level is a
    contiguous slice; this is ~1.7x faster than walking the children level by level (per-level gathers
    of start/count plus a repeat)."""
    s = len(pnode)
    jump = np.append(np.where(pnode >= 0, pnode, s), s)  # [S+1] ancestor pointer; s: past the root
    dist = np.ones(s + 1, dtype=np.int16)  # parents -1 <= p < i < N <= 32767 bound every depth
    dist[s] = 0
    while not np.all(jump[:s] == s):
        dist += dist[jump]
        jump = jump[jump]
    depth = dist[:s].astype(np.int64)
    by_depth = np.argsort(dist[:s], kind="stable")
    ends = np.cumsum(np.bincount(depth))
    cum = probs  # depth 1 keeps its own probability
    ok = match.copy()
    for d in range(2, len(ends)):
        level = by_depth[ends[d - 1]:ends[d]]
        par = pnode[level]
        cum[level] *= cum[par]
        ok[level] &= ok[par]
    return depth, cum, ok


def children(order: np.ndarray, start: np.ndarray, count: np.ndarray, rows: np.ndarray,
             k: int | None = None) -> np.ndarray:
    """The first (most probable) up to k (None: all) children of each batch row in `rows`, concatenated."""
    a = start[rows]
    cnt = count[rows] if k is None else np.minimum(count[rows], k)
    ends = np.cumsum(cnt)
    return order[np.repeat(a - ends + cnt, cnt) + np.arange(ends[-1] if len(ends) else 0)]


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
