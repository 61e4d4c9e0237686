"""Capture what every MoE router decided during one forward, without changing the model.

Hooks sit on each sparse block's `.gate` module (the top-k router) only for the duration of a `with`
block, so they see the unbudgeted routing even when a budget later restricts the experts computed.

Shape legend: T tokens in the forward, E experts, K top-k, L MoE layers.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .loader import moe_blocks


@dataclass
class LayerRouting:
    top_k_index: torch.Tensor  # [T, K] long
    top_k_weights: torch.Tensor  # [T, K] the weights the experts would be mixed with
    router_probs: torch.Tensor  # [T, E] float32 softmax over all experts


@dataclass
class Routing:
    """Per MoE layer routing of the last forward run inside `capture_routing` (None: layer not run)."""

    num_experts: int
    layers: list[LayerRouting | None] = field(default_factory=list)

    def unique_experts(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[L] number of distinct experts any of the (selected) tokens is routed to, per layer."""
        hit = torch.zeros(len(self.layers), self.num_experts, dtype=torch.bool, device=self._device())
        for l, lr in enumerate(self.layers):
            idx = lr.top_k_index if rows is None else lr.top_k_index[rows]
            hit[l, idx.reshape(-1)] = True
        return hit.sum(dim=1)

    def router_mass(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[L] mean over tokens of the router probability on their top-k experts (how peaked routing is)."""
        out = []
        for lr in self.layers:
            probs, idx = (lr.router_probs, lr.top_k_index) if rows is None else (lr.router_probs[rows],
                                                                                lr.top_k_index[rows])
            out.append(probs.gather(1, idx).sum(dim=1).mean())
        return torch.stack(out) if out else torch.zeros(0)

    def _device(self):
        return self.layers[0].top_k_index.device if self.layers else "cpu"


@contextmanager
def capture_routing(model):
    """Yield a `Routing` that fills in as `model` runs; hooks are removed on exit, even on error."""
    blocks = moe_blocks(model)
    routing = Routing(num_experts=int(blocks[0].experts.gate_up_proj.shape[0]), layers=[None] * len(blocks))

    def hook_for(l):
        def hook(module, args, output):
            logits, weights, index = output
            routing.layers[l] = LayerRouting(index, weights, torch.softmax(logits.float(), dim=-1))
        return hook

    handles = [b.gate.register_forward_hook(hook_for(l)) for l, b in enumerate(blocks)]
    try:
        yield routing
    finally:
        for h in handles:
            h.remove()
