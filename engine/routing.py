"""Capture what every MoE router decided during one forward, without changing the model.

Hooks sit on each sparse block's `.gate` module (the top-k router) only for the duration of a `with`
block, so they see the unbudgeted routing even when a budget later restricts the experts computed. A hook
only keeps references to the router's outputs; the softmax over all experts is computed when asked for,
because most steps only need the unique-expert counts.

Shape legend: T tokens in the forward, E experts, K top-k, L MoE layers.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .loader import moe_blocks


@dataclass
class LayerRouting:
    top_k_index: torch.Tensor  # [T, K] long
    top_k_weights: torch.Tensor  # [T, K] the weights the experts would be mixed with
    router_logits: torch.Tensor  # [T, E] the router's raw scores

    @property
    def router_probs(self) -> torch.Tensor:
        """[T, E] float32 softmax over all experts."""
        return torch.softmax(self.router_logits.float(), dim=-1)


@dataclass
class Routing:
    """Per MoE layer routing of the last forward run inside `capture_routing` (None: layer not run)."""

    num_experts: int
    layers: list[LayerRouting | None] = field(default_factory=list)

    def unique_experts(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[L] number of distinct experts any of the (selected) tokens is routed to, per layer."""
        index = torch.stack([lr.top_k_index if rows is None else lr.top_k_index[rows]
                             for lr in self.layers])  # [L, T, K]
        hit = torch.zeros(len(self.layers), self.num_experts, dtype=torch.bool, device=index.device)
        return hit.scatter_(1, index.flatten(1), True).sum(dim=1)

    def group_hits(self, group: torch.Tensor,  # [T] each token's group (a batch's request), in [0, groups)
                   groups: int) -> torch.Tensor:  # [groups, L, E] bool
        """Which experts each group's tokens are routed to, per layer: a batch's per-request loads at once."""
        index = torch.stack([lr.top_k_index for lr in self.layers])  # [L, T, K]
        L, T, K = index.shape
        hit = torch.zeros(groups, L, self.num_experts, dtype=torch.bool, device=index.device)
        layer = torch.arange(L, device=index.device)[:, None, None].expand(L, T, K)
        hit[group[None, :, None].expand(L, T, K), layer, index] = True
        return hit


_BLOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its MoE blocks (found once)


@contextmanager
def capture_routing(model):
    """Yield a `Routing` that fills in as `model` runs; hooks are removed on exit, even on error."""
    blocks = _BLOCKS.get(model)
    if blocks is None:
        blocks = _BLOCKS[model] = moe_blocks(model)
    routing = Routing(num_experts=int(blocks[0].experts.gate_up_proj.shape[0]), layers=[None] * len(blocks))

    def hook_for(l):
        def hook(module, args, output):
            logits, weights, index = output
            routing.layers[l] = LayerRouting(index, weights, logits)
        return hook

    handles = [b.gate.register_forward_hook(hook_for(l)) for l, b in enumerate(blocks)]
    try:
        yield routing
    finally:
        for h in handles:
            h.remove()
