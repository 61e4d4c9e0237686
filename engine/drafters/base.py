"""The proposer interface every drafter implements (like vLLM v1 spec-decode proposers).

A drafter sees the committed context as a list of token ids whose last entry is the root (the last
committed token, not yet in the target's KV cache) and proposes a DraftTree below it. A drafter with
its own KV cache catches up on tokens it has not seen at the next `draft` and rolls back what it
drafted, so steps that used another drafter (or none) in between need no special handling.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from moetune.step import StepConfig

from ..tree import DraftTree


class Proposer(ABC):
    name: str = "proposer"

    def prefill(self, prompt_ids: list[int]) -> None:
        """A new request starts with these prompt tokens (forget the previous request). A drafter with its own
        cache reads them later, in `catch_up`, so a request that never drafts with it never pays for it."""

    def catch_up(self, context_ids: list[int]) -> None:
        """Read the committed tokens this drafter has not seen (a drafter with its own cache). `draft` catches
        up by itself; calling this first only chooses when the work happens, and whose clock counts it."""

    @abstractmethod
    def draft(self, context_ids: list[int], config: StepConfig) -> DraftTree:
        """Propose a tree below context_ids[-1] shaped by config (depth, topk, num_draft_tokens, tree)."""

    def commit(self, accepted_token_ids: list[int]) -> None:
        """The tokens the last step committed (accepted path plus bonus), after any cut by EOS."""
