"""Pure-PyTorch budgeted MoE expert FFN: the CPU path and the oracle the Triton kernel is tested against.

Only experts listed in `selected` are computed; a routing slot whose expert is -1 or not selected is
skipped, so work (and weight reads) fall with the budget. Tokens are grouped per expert by one sort and
each selected expert with at least one token costs one gate/up and one down matmul.

Shapes: T tokens, K top-k slots, E experts, H hidden, I expert intermediate size, B selected experts.
    out[t] = sum_k [expert_ids[t, k] in selected] * weights[t, k] * FFN_{expert_ids[t, k]}(hidden[t])
    FFN_e(x) = down[e] @ (silu(gate_e x) * up_e x),  [gate_e; up_e] = gate_up[e]  (HF layout, gate first)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def group_slots(expert_ids: torch.Tensor, selected: torch.Tensor, num_experts: int):
    """Sort the routing slots of selected experts by their position in `selected`.

    Why: both the reference and the Triton kernel process one contiguous run of slots per expert.
    expert_ids [T, K] (int, -1 = dropped), selected [B] -> (order [S] flat slot ids sorted by group,
    counts [B] slots per selected expert, offsets [B] start of each run in `order`), S = T*K (slots of
    unselected experts sort to the end, past offsets[-1] + counts[-1]).
    """
    B = selected.numel()
    flat = expert_ids.reshape(-1).long()  # [S]
    slot_of = torch.full((num_experts + 1,), B, dtype=torch.long, device=flat.device)
    slot_of[selected.long()] = torch.arange(B, device=flat.device)
    key = slot_of[torch.where(flat >= 0, flat, num_experts)]  # [S], B = not computed
    order = torch.argsort(key, stable=True)  # [S]
    # scatter_add rather than bincount: bincount sizes its output on the host, a sync the kernel avoids.
    counts = torch.zeros(B + 1, dtype=torch.long, device=flat.device).scatter_add_(0, key, torch.ones_like(key))[:B]
    offsets = torch.cumsum(counts, 0) - counts  # [B]
    return order, counts, offsets


def budgeted_moe_reference(hidden: torch.Tensor,  # [T, H]
                           expert_ids: torch.Tensor,  # [T, K] int, -1 = dropped slot
                           weights: torch.Tensor,  # [T, K] routing weights
                           gate_up: torch.Tensor,  # [E, 2I, H]
                           down: torch.Tensor,  # [E, H, I]
                           selected: torch.Tensor,  # [B] expert ids to compute
                           ) -> torch.Tensor:  # [T, H]
    """Budgeted SwiGLU expert mixture, computed in the weights' dtype and accumulated in fp32 (or wider)."""
    T, K = expert_ids.shape
    order, counts, offsets = group_slots(expert_ids, selected, gate_up.shape[0])
    acc = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.zeros(T, hidden.shape[-1], dtype=acc, device=hidden.device)
    spans = [(e, start, n) for e, start, n in zip(selected.tolist(), offsets.tolist(), counts.tolist()) if n]
    if not spans:
        return out.to(hidden.dtype)
    order = order[:sum(n for _, _, n in spans)]  # [S'] computed slots, grouped by expert
    tokens = order // K  # [S']
    xs = hidden[tokens].to(gate_up.dtype)  # [S', H]
    ys = torch.empty(order.numel(), hidden.shape[-1], dtype=gate_up.dtype, device=hidden.device)  # [S', H]
    for e, start, n in spans:
        gate, up = F.linear(xs[start:start + n], gate_up[e]).chunk(2, dim=-1)  # [n, I] each
        ys[start:start + n] = F.linear(F.silu(gate) * up, down[e])
    out.index_add_(0, tokens, ys.to(acc) * weights.reshape(-1)[order, None].to(acc))
    return out.to(hidden.dtype)
