"""Drafting with a small model that shares the target's vocabulary: chains, static and dynamic trees.

Children are the top-k tokens of the draft distribution (point proposals, see accept.py), grown level
by level with one draft forward per level under a tree mask. Dynamic trees follow EAGLE-2: at every
level the `topk` nodes with the highest cumulative draft log-probability are expanded, and finally the
`num_draft_tokens` best nodes overall are kept (cumulative scores only fall along a path, so the kept
set is closed under ancestors). The draft keeps its own KV cache of the committed context and crops
what it drafted after each step.

The growth is written once, as a generator (`grow`): it yields each level's nodes (a `Level`) and is sent
back their log-probs. Whoever runs the draft model drives it: DraftModelDrafter feeds one request's
levels to its own forward (`drive`); engine/drafters/batched.py feeds the levels of every request of a
batch to one packed forward.

Shape legend: T tokens fed, n nodes of one level, m nodes fed so far at this step (this level's included),
V vocabulary, C committed context length.
"""
from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

from moetune.step import StepConfig

from .. import kv
from ..tree import DraftTree, attention_mask, chain, children, depths, path_to
from .base import Proposer


@dataclass(frozen=True)
class Level:
    """One level of a step's growth, as a driver feeds it: each node sits at its depth after the committed
    context and sees the whole context, itself and its ancestors among this step's fed nodes."""

    tokens: list[int]  # [n]
    depths: list[int]  # [n] 1 for a child of the root
    visible: torch.Tensor  # [n, m] bool, on the CPU: which of this step's fed nodes (in feeding order) each sees


Growth = Generator[Level, torch.Tensor, DraftTree]  # yields a Level, is sent its [n, V] log-probs


def grow(logp0: torch.Tensor,  # [V] draft log-probs after the last committed token
         config: StepConfig, device) -> Growth:
    """One step's tree growth: a static shape when config.tree is set, else a chain or dynamic tree."""
    tree = _Tree(device)
    return tree.static(logp0, config.tree) if config.tree is not None else tree.dynamic(logp0, config)


def drive(growth: Growth, feed: Callable[[Level], torch.Tensor]) -> DraftTree:
    """Run one growth to its tree; feed(level) returns the level's [n, V] log-probs."""
    logp = None
    while True:
        try:
            level = growth.send(logp)
        except StopIteration as done:
            return done.value
        logp = feed(level)


class DraftModelDrafter(Proposer):
    name = "draft_model"

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.seen = 0  # committed tokens held in self.cache
        self.root_logp: torch.Tensor | None = None  # [V] draft log-probs after the last committed token

    def _forward(self, ids: torch.Tensor,  # [1, T]
                 pos: torch.Tensor,  # [1, T]
                 mask: torch.Tensor | None,
                 last_only: bool = False) -> torch.Tensor:  # [T, V], or [1, V] when last_only
        """last_only: project only the last row on the vocabulary (a catch-up may read a whole prompt and
        needs only the next token's log-probs)."""
        return self.model(input_ids=ids, position_ids=pos, attention_mask=mask, cache=self.cache,
                          use_cache=True, logits_to_keep=1 if last_only else 0).logits[0]

    def prefill(self, prompt_ids: list[int]) -> None:
        self.cache, self.seen, self.root_logp = None, 0, None

    @torch.no_grad()
    def catch_up(self, context: list[int]) -> torch.Tensor:
        """Feed committed tokens the cache has not seen; [V] log-probs of the next token."""
        if self.cache is None:
            self.cache, self.seen = kv.new_cache(self.model), 0
        new = context[self.seen:]
        if new:
            device = self.model.device
            ids = torch.tensor([new], dtype=torch.long, device=device)
            pos = torch.arange(self.seen, len(context), device=device)[None]
            mask = kv_causal(len(new), self.seen, self.model.dtype, device)
            self.root_logp = torch.log_softmax(self._forward(ids, pos, mask, last_only=True)[-1].float(), dim=-1)
            self.seen = len(context)
        return self.root_logp

    @torch.no_grad()
    def draft(self, context_ids: list[int], config: StepConfig) -> DraftTree:
        logp0 = self.catch_up(context_ids)
        tree = drive(grow(logp0, config, self.model.device), lambda level: self._feed(level, len(context_ids)))
        kv.crop(self.cache, self.seen)
        return tree

    def _feed(self, level: Level, context_len: int) -> torch.Tensor:  # [n, V] log-probs
        """One level after the committed context and the nodes fed before it at this step."""
        device, dtype = self.model.device, self.model.dtype
        ids = torch.tensor([level.tokens], device=device)
        pos = torch.tensor([[context_len - 1 + d for d in level.depths]], device=device)
        n, m = level.visible.shape
        mask = None  # a single node that sees everything fed before it: HF's own mask
        if n > 1 or not bool(level.visible.all()):
            mask = torch.zeros(1, 1, n, context_len + m, dtype=dtype, device=device)
            mask[0, 0, :, context_len:].masked_fill_(~level.visible.to(device), torch.finfo(dtype).min)
        return torch.log_softmax(self._forward(ids, pos, mask).float(), dim=-1)


def kv_causal(t: int, past: int, dtype, device) -> torch.Tensor | None:
    """A causal mask for feeding t tokens after `past` cached ones; None (HF's own) suffices for t == 1."""
    return None if t == 1 else attention_mask(chain(t - 1), past, dtype, device)


class _Tree:
    """One step's tree as it grows: nodes in creation order, their levels handed out to be fed."""

    def __init__(self, device):
        self.device = device
        self.tok: list[int] = []
        self.par: list[int] = []
        self.lp: list[float] = []  # own draft log-prob
        self.score: list[float] = []  # cumulative draft log-prob of the path
        self.fed: list[int] = []  # nodes in feeding order (draft-cache order after the committed context)

    def add(self, token: int, parent: int, lp: float) -> int:
        self.tok.append(token)
        self.par.append(parent)
        self.lp.append(lp)
        self.score.append(lp + (self.score[parent] if parent >= 0 else 0.0))
        return len(self.tok) - 1

    def level(self, nodes: list[int]) -> Level:
        """`nodes` as the next level to feed; they join the fed nodes."""
        depth = depths(tuple(self.par))
        self.fed.extend(nodes)
        anc = [set(path_to(self.par, n)) for n in nodes]
        visible = torch.tensor([[m in a for m in self.fed] for a in anc], dtype=torch.bool)
        return Level([self.tok[n] for n in nodes], [depth[n] for n in nodes], visible.view(len(nodes), -1))

    def tree(self, keep: list[int]) -> DraftTree:
        keep = sorted(keep)
        index = {n: i for i, n in enumerate(keep)}
        parents = tuple(index[self.par[n]] if self.par[n] >= 0 else -1 for n in keep)
        tokens = torch.tensor([self.tok[n] for n in keep], dtype=torch.long, device=self.device)
        probs = torch.tensor([self.lp[n] for n in keep]).exp()  # on the host first: eviction ranks by them
        return DraftTree(parents, tokens, probs.to(self.device), tuple(probs.tolist()))

    def dynamic(self, logp0: torch.Tensor, config: StepConfig) -> Growth:  # logp0 [V]
        k = config.topk
        v, i = logp0.topk(k)
        frontier = [self.add(t, -1, lp) for t, lp in zip(i.tolist(), v.tolist())]
        for _ in range(config.depth - 1):
            logp = yield self.level(frontier)  # [len(frontier), V]
            v, i = logp.topk(k, dim=-1)  # [len(frontier), k]
            new = [self.add(t, n, lp) for n, ts, lps in zip(frontier, i.tolist(), v.tolist())
                   for t, lp in zip(ts, lps)]
            frontier = sorted(new, key=lambda n: -self.score[n])[:k]
        order = sorted(range(len(self.tok)), key=lambda n: (-self.score[n], n))
        return self.tree(order[:config.num_draft_tokens or len(order)])

    def static(self, logp0: torch.Tensor, shape: tuple[int, ...]) -> Growth:  # logp0 [V]
        kids = children(shape)
        self.tok, self.par = [0] * len(shape), list(shape)
        self.lp, self.score = [0.0] * len(shape), [0.0] * len(shape)
        self._assign(kids[0], logp0)
        depth = depths(shape)
        for d in range(1, max(depth, default=0)):
            level = [n for n in range(len(shape)) if depth[n] == d and kids[n + 1]]
            if level:
                logp = yield self.level(level)  # [len(level), V]
                for n, row in zip(level, logp):
                    self._assign(kids[n + 1], row)
        return self.tree(list(range(len(shape))))

    def _assign(self, nodes: tuple[int, ...], logp: torch.Tensor) -> None:  # logp [V]
        if nodes:
            v, i = logp.topk(len(nodes))
            for n, t, lp in zip(nodes, i.tolist(), v.tolist()):
                self.tok[n], self.lp[n] = t, lp
