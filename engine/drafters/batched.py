"""One draft model drafting for every request of a packed batch (engine/batch.py): one forward per level.

Why: a drafter per request runs the draft model once per request and level, so a batch of B requests
drafting chains of depth k costs B * k small forwards, each mostly per-call overhead; packed, it costs k.

Layout, as the target's in engine/batch.py: one DynamicCache holds every request's committed tokens
(unlike the target's, the root included), interleaved in the order they were fed; `owner` [S] names each
position's request. A step drafts in one packed forward per round:
- catch-up: each drafting request's committed tokens the cache has not seen (a joiner's whole prompt),
  causal within each request; it gives each request its root's log-probs;
- levels: every request's growth (draft_model.grow, the single-request code) is advanced in lockstep; a
  round feeds the next level of every request still growing, each row at its request's own positions,
  seeing its request's committed context and, among the nodes drafted at this step, its ancestors only
  (engine/packed.py `layout` with an [n, m] block over the request's drafted keys);
- the drafted positions were all appended after the catch-up, so a crop drops them.
A request that does not draft at a step is not fed; it catches up at the next step it drafts. A request
that leaves drops its positions (one gather along the sequence axis, as engine/batch.py's commit).

Shape legend: T rows fed in one forward (all requests), S cached positions (all requests), n a request's
rows at one level, m its nodes fed so far at this step (this level's included), V vocabulary.
"""
from __future__ import annotations

import torch

from moetune.step import StepConfig

from .. import kv
from ..packed import layout, packed_attention
from ..tree import DraftTree
from .base import Proposer
from .draft_model import Growth, Level, grow


class BatchedDraftModel:
    """A draft model's cache for all the requests of a batch, which draft together (see the module docstring).
    Requests are named by an index of the caller's, unique among the requests it serves."""

    def __init__(self, model):
        self.model = model
        self.cache = kv.new_cache(model)
        self.owner = torch.zeros(0, dtype=torch.long, device=model.device)  # [S] request index per position
        self.seen: dict[int, int] = {}  # request index -> its committed tokens in the cache
        self.root_logp: dict[int, torch.Tensor] = {}  # request index -> [V] log-probs after its last one

    def seat(self, index: int) -> Seat:
        """Request `index`'s entry in its drafter pool."""
        return Seat(self, index)

    @torch.no_grad()
    def catch_up(self, requests: list[tuple[int, list[int]]]) -> None:
        """Feed each (index, committed ids) request's tokens the cache has not seen, all in one forward."""
        new = [(i, ids, self.seen.get(i, 0)) for i, ids in requests if len(ids) > self.seen.get(i, 0)]
        if not new:
            return
        tokens, pos, owner, blocks = [], [], [], []
        for i, ids, seen in new:
            n = len(ids) - seen
            tokens += ids[seen:]
            pos += range(seen, len(ids))
            owner += [i] * n
            blocks.append((i, torch.ones(n, n, dtype=torch.bool).tril()))
        last = torch.tensor([len(ids) - seen for _, ids, seen in new], device=self.model.device).cumsum(0) - 1
        logp = torch.log_softmax(self._forward(tokens, pos, owner, blocks, last).float(), dim=-1)  # [len(new), V]
        for (i, ids, _), row in zip(new, logp):
            self.seen[i], self.root_logp[i] = len(ids), row

    @torch.no_grad()
    def draft(self, requests: list[tuple[int, list[int], StepConfig]]) -> list[DraftTree]:
        """The tree of each (index, committed ids, config) request, in order: what DraftModelDrafter would
        propose for it alone. One forward for the catch-up, then one per level of the deepest growth."""
        self.catch_up([(i, ids) for i, ids, _ in requests])
        past = len(self.owner)
        device = self.model.device
        growths = [grow(self.root_logp[i], config, device) for i, _, config in requests]

        def feed(levels: dict[int, Level]) -> list[torch.Tensor]:  # by request number: [n, V] log-probs
            return self._feed([(requests[k][0], len(requests[k][1]), level) for k, level in levels.items()])

        trees = drive_together(growths, feed)
        kv.crop(self.cache, past)
        self.owner = self.owner[:past]
        return trees

    def _feed(self, levels: list[tuple[int, int, Level]]) -> list[torch.Tensor]:  # per request [n, V]
        """One level of each (index, context length, level) request in one forward; their log-probs."""
        tokens, pos, owner, blocks = [], [], [], []
        for i, c, level in levels:
            tokens += level.tokens
            pos += [c - 1 + d for d in level.depths]
            owner += [i] * len(level.tokens)
            blocks.append((i, level.visible))
        logp = torch.log_softmax(self._forward(tokens, pos, owner, blocks).float(), dim=-1)  # [T, V]
        return list(logp.split([len(level.tokens) for _, _, level in levels]))

    def _forward(self, tokens: list[int], pos: list[int], owner: list[int],  # [T] each
                 blocks: list[tuple[int, torch.Tensor]],
                 keep: torch.Tensor | int = 0) -> torch.Tensor:  # [K, V] logits of the rows kept (0: all T)
        """One packed forward (each request's rows see its keys as its block says); the cache grows by T.
        keep: the rows whose logits are needed ([K] long), so a catch-up projects no prompt row on the vocabulary."""
        device = self.model.device
        lay = layout(self.owner, blocks, self.model.dtype)
        with packed_attention(self.model):
            out = self.model(input_ids=torch.tensor([tokens], device=device),  # [1, T]
                             position_ids=torch.tensor([pos], device=device),
                             cache=self.cache, use_cache=True, logits_to_keep=keep, packed_layout=lay)
        self.owner = torch.cat([self.owner, torch.tensor(owner, dtype=torch.long, device=device)])
        return out.logits[0]

    def leave(self, indices: list[int]) -> None:
        """These requests are done: their positions leave the cache (one gather from the first that moves)."""
        gone = [i for i in indices if self.seen.pop(i, None) is not None]
        for i in gone:
            del self.root_logp[i]
        dropped = torch.isin(self.owner, torch.tensor(gone, dtype=torch.long, device=self.owner.device))  # [S]
        if not bool(dropped.any()):
            return
        start = int(dropped.int().argmax())
        kept = (~dropped).nonzero().flatten()
        kv.commit(self.cache, start, (kept[start:] - start).tolist())
        self.owner = self.owner[kept]


def drive_together(growths: list[Growth], feed) -> list[DraftTree]:
    """Run every growth to its tree in lockstep: each round, feed({growth number: its next level}) returns
    their [n, V] log-probs in the same order. A growth that is done drops out; rounds = the most levels."""
    trees: list[DraftTree | None] = [None] * len(growths)
    sent: dict[int, torch.Tensor | None] = dict.fromkeys(range(len(growths)))
    while sent:
        levels = {}
        for k, logp in sent.items():
            try:
                levels[k] = growths[k].send(logp)
            except StopIteration as done:
                trees[k] = done.value
        sent = dict(zip(levels, feed(levels))) if levels else {}
    return trees


class Seat(Proposer):
    """A request's place at a BatchedDraftModel: the entry of its drafter pool that its configs name.
    engine/batch.py drafts the seats of a step together, each catching up on what it has not seen (a
    joiner's prompt at its first draft), so a seat's prefill and commit have nothing to do; alone, a seat
    drafts as a batch of one."""

    name = "draft_model"

    def __init__(self, shared: BatchedDraftModel, index: int):
        self.shared, self.index = shared, index

    def draft(self, context_ids: list[int], config: StepConfig) -> DraftTree:
        return self.shared.draft([(self.index, context_ids, config)])[0]
