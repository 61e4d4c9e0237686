"""The one canonical draft tree, and everything verification derives from it.

A tree is a parent array over N drafted nodes (node i's parent is < i; -1 means a child of the root,
the last committed token, which is not yet in the KV cache), the drafted token of every node and the
draft's probability of that token given its path. Verification feeds [root, node 0, ..., node N-1]
(N+1 rows, "row" = node index + 1, root = row 0) after a KV cache of C tokens.

Shape legend: N drafted nodes, C cached tokens, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True, eq=False)
class DraftTree:
    """A drafter's proposal. `parents` is a plain tuple so shapes can be cached and compared cheaply.
    Drafters build trees on the host, so they may hand over `host_probs` too: eviction ranks nodes by
    them without reading `probs` back from the device (engine/host.py)."""

    parents: tuple[int, ...]
    tokens: torch.Tensor  # [N] long
    probs: torch.Tensor  # [N] float: draft probability of each token given its parent's path
    host_probs: tuple[float, ...] | None = None  # `probs` as host floats, exactly (None: read them)

    def __post_init__(self):
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"DraftTree parents must satisfy -1 <= parent[i] < i; node {i} has parent {p}")
        if self.tokens.shape != (len(self.parents),) or self.probs.shape != (len(self.parents),):
            raise ValueError(f"DraftTree needs tokens and probs of shape [{len(self.parents)}], got "
                             f"{tuple(self.tokens.shape)} and {tuple(self.probs.shape)}")

    def __len__(self) -> int:
        return len(self.parents)

    @property
    def depth(self) -> int:
        return max(depths(self.parents), default=0)

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> "DraftTree":
        """No speculation: verification then decodes exactly one token."""
        return DraftTree((), torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, device=device))


def chain(n: int) -> tuple[int, ...]:
    """Parent array of a chain of n nodes."""
    return tuple(range(-1, n - 1))


def is_chain(parents: tuple[int, ...]) -> bool:
    """Whether the tree is a chain (each node the child of the one before): causal attention verifies it."""
    return all(p == i - 1 for i, p in enumerate(parents))


@lru_cache(maxsize=512)
def depths(parents: tuple[int, ...]) -> tuple[int, ...]:
    """Depth of every node (children of the root have depth 1)."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return tuple(out)


@lru_cache(maxsize=512)
def ancestors(parents: tuple[int, ...]) -> torch.Tensor:
    """[N+1, N+1] bool over rows: entry (r, s) is True when row s is row r or one of its ancestors."""
    n = len(parents)
    anc = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    anc[:, 0] = True
    for i, p in enumerate(parents):
        anc[i + 1] = anc[p + 1]
        anc[i + 1, i + 1] = True
    return anc


@lru_cache(maxsize=512)
def children(parents: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Children of every row (root first), as node indices in drafting order."""
    out: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, p in enumerate(parents):
        out[p + 1].append(i)
    return tuple(tuple(c) for c in out)


def path_to(parents: tuple[int, ...], node: int) -> list[int]:
    """Nodes from the root's child down to `node` (empty for node -1, the root)."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def leaf_paths(parents: tuple[int, ...]) -> list[list[int]]:
    """Root-to-leaf paths (retrieve indices, as node indices)."""
    kids = children(parents)
    return [path_to(parents, i) for i in range(len(parents)) if not kids[i + 1]]


def attention_mask(parents: tuple[int, ...], past_len: int, dtype: torch.dtype,
                   device: torch.device | str) -> torch.Tensor:
    """[1, 1, N+1, C+N+1] additive mask: every row sees the whole cache, itself and its ancestors."""
    n = len(parents)
    mask = torch.zeros(1, 1, n + 1, past_len + n + 1, dtype=dtype, device=device)
    if n:
        blocked = ~ancestors(parents).to(device)
        mask[0, 0, :, past_len:].masked_fill_(blocked, torch.finfo(dtype).min)
    return mask


def position_ids(parents: tuple[int, ...], past_len: int, device: torch.device | str) -> torch.Tensor:
    """[1, N+1] positions: the root sits at C, a node at C + its depth."""
    return torch.tensor([[past_len, *(past_len + d for d in depths(parents))]], dtype=torch.long, device=device)


def path_weights(tree: DraftTree) -> torch.Tensor:
    """[N+1] the draft's estimate that each row lies on the accepted path: product of draft probs, root 1."""
    anc = ancestors(tree.parents)[1:, 1:].to(tree.probs.device)
    logp = torch.log(tree.probs.float().clamp_min(1e-30))
    w = torch.exp(anc.to(logp.dtype) @ logp) if len(tree) else logp
    return torch.cat([torch.ones(1, device=w.device), w])


def subtree(tree: DraftTree, keep) -> DraftTree:
    """The tree restricted to `keep` (node indices closed under ancestors), renumbered in order."""
    keep = sorted(set(int(k) for k in keep))
    index = {old: new for new, old in enumerate(keep)}
    parents = []
    for k in keep:
        p = tree.parents[k]
        if p >= 0 and p not in index:
            raise ValueError(f"subtree keeps node {k} but not its parent {p}; `keep` must be closed under ancestors")
        parents.append(index[p] if p >= 0 else -1)
    sel = torch.tensor(keep, dtype=torch.long, device=tree.tokens.device)
    host = None if tree.host_probs is None else tuple(tree.host_probs[k] for k in keep)
    return DraftTree(tuple(parents), tree.tokens[sel], tree.probs[sel], host)
