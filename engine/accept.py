"""Decide which drafted tokens the target accepts, losslessly.

Terms, defined once:
- accepted tokens: drafted nodes on one root-to-node path that the target agrees with; a of them.
- recovered token: when every child of the last accepted node (or of the root) is rejected, the token
  sampled from what is left of the target distribution (the residual) after those rejections.
- bonus token: the target's own next token after the last accepted node when it has no children left to
  try (greedy: the argmax there). Either way each step emits a + 1 tokens.

Greedy: the longest path whose every token equals the target's argmax at its parent, plus the bonus.
Sampling: multi-candidate rejection sampling on the tree (SpecInfer / Sequoia). Drafters here propose
children deterministically (top-k of a draft distribution, n-gram continuations), i.e. each child is a
point proposal q = one-hot(child): the child is accepted with probability min(1, p(c)/q(c)) = p(c), and
on rejection the residual becomes norm(max(0, p - q)), i.e. p with c removed. Because the candidates do
not depend on the random draws, the emitted token is distributed exactly as the target's p.

Shape legend: N drafted nodes, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .tree import DraftTree, children, depths, is_chain, path_to


@dataclass(frozen=True)
class Acceptance:
    path: tuple[int, ...]  # accepted node indices, from the root's child down
    tokens: tuple[int, ...]  # accepted tokens followed by the bonus or recovered token

    @property
    def accepted(self) -> int:
        return len(self.path)

    @property
    def rows(self) -> list[int]:
        """Verified rows whose KV entries stay: the root and the accepted nodes."""
        return [0, *(i + 1 for i in self.path)]


def sampling_probs(logits: torch.Tensor,  # [R, V]
                   temperature: float, top_p: float = 1.0) -> torch.Tensor:  # [R, V] float32
    """The distribution the target samples from: softmax(logits / T), restricted to the top-p nucleus."""
    if temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    scaled = logits.float() / temperature
    if top_p < 1:
        sorted_logits, order = torch.sort(scaled, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False
        scaled = scaled.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.softmax(scaled, dim=-1)


def accept_greedy(tree: DraftTree, logits: torch.Tensor,  # [N+1, V]
                  alive: torch.Tensor | None = None,  # [N+1] bool, rows an eviction budget kept (None: all)
                  ) -> Acceptance:
    """Longest path of kept nodes agreeing with the target's argmax, plus the bonus token: the step's one
    host transfer (engine/host.py), then plain Python.

    Evicted rows (alive False) have no valid logits and are never accepted; the kept rows are closed under
    ancestors, so the bonus token always comes from a kept row."""
    target = logits.argmax(dim=-1)  # [N+1]
    n = len(tree)
    if n == 0:
        return Acceptance((), (int(target[0]),))
    tokens = tree.tokens.to(target.device)
    if is_chain(tree.parents):  # node i's parent row is i: the accepted path is the agreeing prefix
        host = torch.cat([target, tokens] + ([] if alive is None else [alive[1:].long()])).tolist()
        kept = n if alive is None else sum(host[2 * n + 1:])  # a chain's kept nodes are a prefix
        a = next((i for i in range(kept) if host[n + 1 + i] != host[i]), kept)
        return Acceptance(tuple(range(a)), tuple(host[n + 1:n + 1 + a]) + (host[a],))
    match = tokens == target[parent_rows(tree.parents).to(target.device)]  # [N]
    if alive is not None:
        match &= alive[1:]
    host = torch.cat([target, match.long()]).tolist()
    return longest_agreeing_path(tree.parents, host[:n + 1], host[n + 1:])


@lru_cache(maxsize=512)
def parent_rows(parents: tuple[int, ...]) -> torch.Tensor:
    """[N] each node's parent row (the root is row 0)."""
    return torch.tensor(parents, dtype=torch.long) + 1


def longest_agreeing_path(parents: tuple[int, ...], target: list[int], match: list[int]) -> Acceptance:
    """The deepest node whose whole path matches (the first such in drafting order), its path and the
    target's tokens along it plus the bonus. target: argmax per row [N+1]; match: per node [N]."""
    depth = depths(parents)
    ok: list[bool] = []  # node i and all its ancestors match
    best, best_depth = -1, 0
    for i, p in enumerate(parents):
        ok.append(bool(match[i]) and (p < 0 or ok[p]))
        if ok[i] and depth[i] > best_depth:
            best, best_depth = i, depth[i]
    if best < 0:
        return Acceptance((), (target[0],))
    path = path_to(parents, best)
    return Acceptance(tuple(path), tuple(target[parents[i] + 1] for i in path) + (target[best + 1],))


def accept_greedy_packed(requests: list[tuple[tuple[int, ...], int, set[int] | None]],
                         row_tokens: list[int],  # [T] each row's input token: a request's root, then its nodes
                         logits: torch.Tensor,  # [T, V]
                         ) -> list[Acceptance]:
    """accept_greedy for every request of a packed forward (engine/batch.py) from one argmax and one host
    transfer, not one per request. Per request: its tree's parents, its first row, and the rows (counted
    from its first, the root 0) an eviction budget kept, None for all.

    Example: two requests, a plain one at row 0 and a chain of 2 at rows 1-3, row_tokens [7, 4, 5, 6]
    (chain tokens 5, 6 after root 4), argmax [8, 5, 9, 2]: the first emits (8,); the second accepts node 0
    (5 is the argmax at its root) and not node 1 (6 is not 9), emitting (5, 9)."""
    target = logits.argmax(dim=-1).tolist()  # [T]: the one transfer
    out = []
    for parents, start, alive in requests:
        rows = target[start:start + len(parents) + 1]
        match = [row_tokens[start + 1 + i] == rows[p + 1] and (alive is None or i + 1 in alive)
                 for i, p in enumerate(parents)]
        out.append(longest_agreeing_path(parents, rows, match))
    return out


def accept_sample(tree: DraftTree, logits: torch.Tensor,  # [N+1, V]
                  temperature: float, top_p: float, generator: torch.Generator,
                  alive: torch.Tensor | None = None,  # [N+1] bool, rows an eviction budget kept (None: all)
                  ) -> Acceptance:
    """Walk down the tree trying each kept node's children in order; lossless for point proposals (which
    children were kept depends on the tree and context only, not on the walk's random draws)."""
    probs = sampling_probs(logits, temperature, top_p)  # [N+1, V]
    rows, vocab = probs.shape
    n = len(tree)
    # one host transfer (token ids travel as float32: exact below 2**24)
    host = torch.cat([probs.flatten(), tree.tokens.to(probs.device, torch.float32)]
                     + ([] if alive is None else [alive.float()])).cpu()
    probs = host[:rows * vocab].view(rows, vocab)
    tokens = [int(t) for t in host[rows * vocab:rows * vocab + n].tolist()]
    kids = children(tree.parents)
    if alive is not None:
        kept = host[rows * vocab + n:].tolist()
        kids = tuple(tuple(c for c in row if kept[c + 1]) for row in kids)
    path: list[int] = []
    row = 0
    while True:
        p = probs[row]
        for c in kids[row]:
            t = tokens[c]
            if torch.rand((), generator=generator) < p[t]:
                path.append(c)
                row = c + 1
                break
            p = p.clone()
            p[t] = 0.0
            p = p / p.sum()
        else:
            nxt = int(torch.multinomial(p, 1, generator=generator))
            return Acceptance(tuple(path), tuple(tokens[i] for i in path) + (nxt,))


def accept_tree(tree: DraftTree, logits: torch.Tensor,  # [N+1, V]
                temperature: float, top_p: float, generator: torch.Generator | None,
                alive: torch.Tensor | None = None,  # [N+1] bool, rows an eviction budget kept (None: all)
                ) -> Acceptance:
    """The step's acceptance, as live decoding and batches run it: greedy at temperature 0, else sampled."""
    if temperature == 0:
        return accept_greedy(tree, logits, alive)
    return accept_sample(tree, logits, temperature, top_p, generator, alive)

