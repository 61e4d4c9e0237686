"""Drafting with a small model that shares the target's vocabulary: chains, static and dynamic trees.

Children are the top-k tokens of the draft distribution (point proposals, see accept.py), grown level
by level with one draft forward per level under a tree mask. Dynamic trees follow EAGLE-2: at every
level the `topk` nodes with the highest cumulative draft log-probability are expanded, and finally the
`num_draft_tokens` best nodes overall are kept (cumulative scores only fall along a path, so the kept
set is closed under ancestors). The draft keeps its own KV cache of the committed context and crops
what it drafted after each step.

Shape legend: T tokens fed, V vocabulary, C committed context length.
"""
from __future__ import annotations

import torch

from moetune.step import StepConfig

from .. import kv
from ..tree import DraftTree, attention_mask, chain, children, depths, path_to
from .base import Proposer


class DraftModelDrafter(Proposer):
    name = "draft_model"

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.seen = 0  # committed tokens held in self.cache
        self.root_logp: torch.Tensor | None = None  # [V] draft log-probs after the last committed token

    def _forward(self, ids: torch.Tensor,  # [1, T]
                 pos: torch.Tensor,  # [1, T]
                 mask: torch.Tensor | None) -> torch.Tensor:  # [T, V]
        return self.model(input_ids=ids, position_ids=pos, attention_mask=mask, cache=self.cache,
                          use_cache=True).logits[0]

    def prefill(self, prompt_ids: list[int]) -> None:
        self.cache, self.seen, self.root_logp = kv.new_cache(self.model), 0, None
        self._catch_up(prompt_ids)

    @torch.no_grad()
    def _catch_up(self, context: list[int]) -> torch.Tensor:
        """Feed committed tokens the cache has not seen; [V] log-probs of the next token."""
        if self.cache is None:
            self.cache, self.seen = kv.new_cache(self.model), 0
        new = context[self.seen:]
        if new:
            device = self.model.device
            ids = torch.tensor([new], dtype=torch.long, device=device)
            pos = torch.arange(self.seen, len(context), device=device)[None]
            mask = kv_causal(len(new), self.seen, self.model.dtype, device)
            self.root_logp = torch.log_softmax(self._forward(ids, pos, mask)[-1].float(), dim=-1)
            self.seen = len(context)
        return self.root_logp

    @torch.no_grad()
    def draft(self, context_ids: list[int], config: StepConfig) -> DraftTree:
        logp0 = self._catch_up(context_ids)
        grow = _Growth(self, len(context_ids))
        tree = grow.static(logp0, config.tree) if config.tree is not None else grow.dynamic(logp0, config)
        kv.crop(self.cache, self.seen)
        return tree


def kv_causal(t: int, past: int, dtype, device) -> torch.Tensor | None:
    """A causal mask for feeding t tokens after `past` cached ones; None (HF's own) suffices for t == 1."""
    return None if t == 1 else attention_mask(chain(t - 1), past, dtype, device)


class _Growth:
    """One step's tree growth: nodes in creation order, fed to the draft level by level."""

    def __init__(self, drafter: DraftModelDrafter, context_len: int):
        self.d, self.c = drafter, context_len
        self.tok: list[int] = []
        self.par: list[int] = []
        self.lp: list[float] = []  # own draft log-prob
        self.score: list[float] = []  # cumulative draft log-prob of the path
        self.fed: list[int] = []  # nodes in draft-cache order after the committed context

    def add(self, token: int, parent: int, lp: float) -> int:
        self.tok.append(token)
        self.par.append(parent)
        self.lp.append(lp)
        self.score.append(lp + (self.score[parent] if parent >= 0 else 0.0))
        return len(self.tok) - 1

    def feed(self, nodes: list[int]) -> torch.Tensor:  # [len(nodes), V] log-probs
        device, dtype = self.d.model.device, self.d.model.dtype
        depth = depths(tuple(self.par))
        ids = torch.tensor([[self.tok[n] for n in nodes]], device=device)
        pos = torch.tensor([[self.c - 1 + depth[n] for n in nodes]], device=device)
        anc = [set(path_to(self.par, n)) for n in nodes]
        cols = self.fed + nodes
        if len(nodes) == 1 and all(m in anc[0] for m in self.fed):
            mask = None
        else:
            visible = torch.tensor([[m in a for m in cols] for a in anc], device=device)
            mask = torch.zeros(1, 1, len(nodes), self.c + len(cols), dtype=dtype, device=device)
            mask[0, 0, :, self.c:].masked_fill_(~visible, torch.finfo(dtype).min)
        self.fed.extend(nodes)
        return torch.log_softmax(self.d._forward(ids, pos, mask).float(), dim=-1)

    def tree(self, keep: list[int]) -> DraftTree:
        keep = sorted(keep)
        index = {n: i for i, n in enumerate(keep)}
        device = self.d.model.device
        parents = tuple(index[self.par[n]] if self.par[n] >= 0 else -1 for n in keep)
        tokens = torch.tensor([self.tok[n] for n in keep], dtype=torch.long, device=device)
        probs = torch.tensor([self.lp[n] for n in keep], device=device).exp()
        return DraftTree(parents, tokens, probs)

    def dynamic(self, logp0: torch.Tensor, config: StepConfig) -> DraftTree:
        k = config.topk
        v, i = logp0.topk(k)
        frontier = [self.add(t, -1, lp) for t, lp in zip(i.tolist(), v.tolist())]
        for _ in range(config.depth - 1):
            v, i = self.feed(frontier).topk(k, dim=-1)  # [len(frontier), k]
            new = [self.add(t, n, lp) for n, ts, lps in zip(frontier, i.tolist(), v.tolist())
                   for t, lp in zip(ts, lps)]
            frontier = sorted(new, key=lambda n: -self.score[n])[:k]
        order = sorted(range(len(self.tok)), key=lambda n: (-self.score[n], n))
        return self.tree(order[:config.num_draft_tokens or len(order)])

    def static(self, logp0: torch.Tensor, shape: tuple[int, ...]) -> DraftTree:
        kids = children(shape)
        self.tok, self.par = [0] * len(shape), list(shape)
        self.lp, self.score = [0.0] * len(shape), [0.0] * len(shape)
        self._assign(kids[0], logp0)
        depth = depths(shape)
        for d in range(1, max(depth, default=0)):
            level = [n for n in range(len(shape)) if depth[n] == d and kids[n + 1]]
            if level:
                for n, logp in zip(level, self.feed(level)):
                    self._assign(kids[n + 1], logp)
        return self.tree(list(range(len(shape))))

    def _assign(self, nodes: tuple[int, ...], logp: torch.Tensor) -> None:
        if nodes:
            v, i = logp.topk(len(nodes))
            for n, t, lp in zip(nodes, i.tolist(), v.tolist()):
                self.tok[n], self.lp[n] = t, lp
