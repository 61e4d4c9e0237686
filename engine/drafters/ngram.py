"""Prompt lookup (n-gram) drafting: no model, the context predicts itself.

The longest recent n-gram (max_n down to min_n) ending the context is searched for earlier in the
context; what followed it is proposed. With topk > 1 up to topk distinct continuations (most recent
match first) are merged into a trie, so shared prefixes are verified once.
"""
from __future__ import annotations

import torch

from moetune.step import StepConfig

from ..tree import DraftTree
from .base import Proposer


class NgramDrafter(Proposer):
    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1, device: torch.device | str = "cpu"):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"NgramDrafter needs 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n, self.device = max_n, min_n, torch.device(device)

    def continuations(self, context: list[int], length: int, count: int) -> list[list[int]]:
        """Up to `count` distinct continuations of at most `length` tokens, longest n-gram match first."""
        found: list[list[int]] = []
        end = len(context)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            pattern = context[end - n:]
            for start in range(end - n - 1, -1, -1):
                if context[start:start + n] == pattern:
                    cont = context[start + n:start + n + length]
                    if cont and cont not in found:
                        found.append(cont)
                        if len(found) == count:
                            return found
            if found:
                return found
        return found

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
        return DraftTree(tuple(parents), t, torch.ones(len(tokens), device=self.device))
