"""Self-speculation: the target drafts for itself, run cheaply, with no extra weights.

Cheap means top-1 routing in every MoE layer (the top-1 expert carries the whole top-k weight, so the
output keeps its scale) and/or only the first `layers` decoder layers followed by the final norm and
lm_head. Both live in a scoped context: hooks removed and nothing left on the model afterwards. The
drafting KV cache is separate from the target's (the cheap model's keys differ).

Shape legend: T tokens fed, V vocabulary, K top-k.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from .. import kv
from ..loader import moe_blocks
from .draft_model import DraftModelDrafter


@contextmanager
def top1_routing(model):
    """Every MoE block routes each token to its top-1 expert only, while inside the block."""
    def hook(module, args, output):
        logits, weights, index = output  # weights, index [T, K]
        return logits, weights.sum(dim=-1, keepdim=True), index[:, :1]

    handles = [b.gate.register_forward_hook(hook) for b in moe_blocks(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class SelfDrafter(DraftModelDrafter):
    name = "self"

    def __init__(self, target, layers: int | None = None, top1: bool = True):
        total = len(target.model.layers)
        if layers is not None and not 1 <= layers <= total:
            raise ValueError(f"SelfDrafter layers must be in [1, {total}] or None (all), got {layers}")
        if layers in (None, total) and not top1:
            raise ValueError("SelfDrafter with all layers and full routing is the target itself; "
                             "set top1=True or fewer layers")
        super().__init__(target)
        self.layers, self.top1 = layers, top1

    def _forward(self, ids: torch.Tensor,  # [1, T]
                 pos: torch.Tensor,  # [1, T]
                 mask: torch.Tensor | None,
                 last_only: bool = False) -> torch.Tensor:  # [T, V], or [1, V] when last_only
        scope = top1_routing(self.model) if self.top1 else nullcontext()
        with scope:
            if self.layers is None:
                return super()._forward(ids, pos, mask, last_only)
            return self._partial(ids, pos, mask, last_only)

    def _partial(self, ids, pos, mask, last_only):
        """Embed, the first `layers` decoder layers, final norm, lm_head."""
        inner = self.model.model
        if mask is None:  # one token that sees the whole cache
            mask = torch.zeros(1, 1, 1, kv.cache_len(self.cache) + 1, dtype=self.model.dtype, device=ids.device)
        h = inner.embed_tokens(ids)
        rope = inner.rotary_emb(h, position_ids=pos)
        for layer in inner.layers[:self.layers]:
            h = layer(h, attention_mask=mask, position_ids=pos, cache=self.cache, use_cache=True,
                      position_embeddings=rope)
            h = h[0] if isinstance(h, tuple) else h
        return self.model.lm_head(inner.norm(h[:, -1:] if last_only else h))[0]
