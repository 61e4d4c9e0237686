"""Prompt lookup (n-gram) drafting: no model, the context predicts itself.

The lookup itself (the longest recent n-gram ending the context, what followed it) lives in the
torch-free moetune.ngram.NgramIndex, shared with trace replay; this drafter turns its continuations
into a tree. With topk > 1 up to topk distinct continuations (most recent match first) are merged
into a trie, so shared prefixes are verified once.
"""
from __future__ import annotations

import torch

from moetune.ngram import MAX_N, MIN_N, NgramIndex
from moetune.step import StepConfig

from ..tree import DraftTree
from .base import Proposer


class NgramDrafter(NgramIndex, Proposer):
    name = "ngram"

    def __init__(self, max_n: int = MAX_N, min_n: int = MIN_N, device: torch.device | str = "cpu"):
        super().__init__(max_n, min_n)
        self.device = torch.device(device)

    def draft(self, context_ids: list[int], config: StepConfig) -> DraftTree:
        conts = self.continuations(context_ids, config.depth, config.topk)
        parents: list[int] = []
        tokens: list[int] = []
        index: dict[tuple[int, ...], int] = {}
        budget = config.num_draft_tokens or config.max_nodes
        for cont in conts:
            for d in range(len(cont)):
                key = tuple(cont[:d + 1])
                if key in index:
                    continue
                if len(tokens) == budget:
                    break
                index[key] = len(tokens)
                parents.append(index[key[:-1]] if d else -1)
                tokens.append(cont[d])
        t = torch.tensor(tokens, dtype=torch.long, device=self.device)
        return DraftTree(tuple(parents), t, torch.ones(len(tokens), device=self.device), (1.0,) * len(tokens))
