"""Triton budgeted MoE expert FFN: SwiGLU experts computed for the selected experts only.

Same signature and semantics as `reference.budgeted_moe_reference` (see there for the formula). Why a
kernel: in verification T is small (a draft tree, 1-64 tokens), so the layer is bound by reading expert
weights; each selected expert's weights are streamed once and an unselected expert is never touched.

Small T (T <= SMALL_T, decode and verification), two launches and no other GPU work, no host sync, no
sort: (1) one program per (selected expert, intermediate column block) streams that slice of the
expert's gate/up weights for all T tokens at once (the token tile is padded to >= 16 for tl.dot; tokens
not routed to the expert cost compute, never weight reads) and finds its tokens itself from
expert_ids, writing silu(gate) * up to [B, T, I]; programs of an expert no token uses return at once.
(2) one program per output column block streams those columns of every used expert's down projection,
scales each expert's rows by the tokens' routing weights and sums over experts in a fixed order
(deterministic, no atomics), writing the output in the input dtype. Many programs per expert keep all
SMs streaming even when B is small.

Large T (prefill asked to budget): tokens are grouped per expert (sync-free sort and counts) and two
launches over (selected expert, token block, column block) compute only routed tokens, the down
projection writing per slot into [S, H] fp32, summed over the K slots of each token in PyTorch.

Shapes: T tokens, K top-k slots, S = T*K slots, E experts, H hidden, I intermediate, B selected experts.
Precision: fp32 inputs use IEEE fp32 dots (no TF32) so they match the reference to ~1e-5; bf16/fp16
inputs multiply in the input dtype with fp32 accumulation. Runs on CUDA, or on CPU tensors under
TRITON_INTERPRET=1 (set before triton is imported) for tests. The interpreter stores bf16 as raw uint16
and its tl.dot on such tiles is wrong, so under the interpreter bf16 tiles are upcast to fp32 before
the dot (UPCAST); compiled CUDA runs never take that branch.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import group_slots

SMALL_T = 64  # up to this many tokens, the token-dense weight-streaming kernels
BLOCK_M = 16  # large T: token rows per program (tl.dot needs >= 16)
BLOCK_N = 64  # large T: output columns per program
BLOCK_K = 64  # reduction tile
SMALL_N_GATE = 32  # small T: intermediate columns per gate/up program (more programs, all SMs streaming)
SMALL_N_DOWN = 16  # small T: hidden columns per down program (the grid is H / 16 programs)
SMALL_K = 128  # small T: reduction tile (long contiguous weight rows per load)


@triton.jit
def _routing_tile(ids_ptr, wts_ptr, expert, T, K, BT: tl.constexpr, KP: tl.constexpr):
    """Routing weight of `expert` for each of the T tokens ([BT] fp32, 0 when not routed) and whether any
    token routes to it (a slot holds each expert at most once; -1 = dropped)."""
    t = tl.arange(0, BT)
    k = tl.arange(0, KP)
    m = (t[:, None] < T) & (k[None, :] < K)
    ids = tl.load(ids_ptr + t[:, None] * K + k[None, :], mask=m, other=-1)  # [BT, KP]
    match = ids.to(tl.int64) == expert
    w = tl.load(wts_ptr + t[:, None] * K + k[None, :], mask=m, other=0.0).to(tl.float32)
    return tl.sum(tl.where(match, w, 0.0), axis=1), tl.sum(match.to(tl.int32), axis=None) > 0


@triton.jit
def _small_gate_up_kernel(x_ptr, ids_ptr, wts_ptr, selected_ptr, w_ptr, inter_ptr, T, K, H, I,
                          stride_xt, stride_we, stride_wn, stride_wk,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr, BT: tl.constexpr, KP: tl.constexpr,
                          BN: tl.constexpr, BK: tl.constexpr):
    b = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(selected_ptr + b).to(tl.int64)
    _, used = _routing_tile(ids_ptr, wts_ptr, expert, T, K, BT, KP)
    if used:
        rows = tl.arange(0, BT)
        row_mask = rows < T
        cols = pid_n * BN + tl.arange(0, BN)
        col_mask = cols < I
        acc_gate = tl.zeros((BT, BN), dtype=tl.float32)
        acc_up = tl.zeros((BT, BN), dtype=tl.float32)
        w_base = w_ptr + expert * stride_we
        for k0 in range(0, H, BK):
            ks = k0 + tl.arange(0, BK)
            k_mask = ks < H
            x = tl.load(x_ptr + rows[:, None] * stride_xt + ks[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BT, BK]
            w_mask = k_mask[:, None] & col_mask[None, :]
            w_gate = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk, mask=w_mask, other=0.0)
            w_up = tl.load(w_base + (cols[None, :] + I) * stride_wn + ks[:, None] * stride_wk, mask=w_mask,
                           other=0.0)  # [BK, BN]
            if UPCAST:
                x, w_gate, w_up = x.to(tl.float32), w_gate.to(tl.float32), w_up.to(tl.float32)
            else:
                x = x.to(w_gate.dtype)
            acc_gate += tl.dot(x, w_gate, input_precision=PRECISION)
            acc_up += tl.dot(x, w_up, input_precision=PRECISION)
        act = acc_gate * tl.sigmoid(acc_gate) * acc_up
        out_ptrs = inter_ptr + (b * T + rows)[:, None] * I + cols[None, :]
        tl.store(out_ptrs, act.to(inter_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _small_down_kernel(inter_ptr, ids_ptr, wts_ptr, selected_ptr, w_ptr, y_ptr, T, K, H, I, B,
                       stride_we, stride_wn, stride_wk,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr, BT: tl.constexpr, KP: tl.constexpr,
                       BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    rows = tl.arange(0, BT)
    row_mask = rows < T
    cols = pid_n * BN + tl.arange(0, BN)
    col_mask = cols < H
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    for b in range(0, B):
        expert = tl.load(selected_ptr + b).to(tl.int64)
        route, used = _routing_tile(ids_ptr, wts_ptr, expert, T, K, BT, KP)  # [BT]
        if used:
            acc_e = tl.zeros((BT, BN), dtype=tl.float32)
            w_base = w_ptr + expert * stride_we
            for k0 in range(0, I, BK):
                ks = k0 + tl.arange(0, BK)
                k_mask = ks < I
                h = tl.load(inter_ptr + (b * T + rows)[:, None] * I + ks[None, :],
                            mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BT, BK]
                w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                            mask=k_mask[:, None] & col_mask[None, :], other=0.0)  # [BK, BN]
                if UPCAST:
                    h, w = h.to(tl.float32), w.to(tl.float32)
                else:
                    h = h.to(w.dtype)
                acc_e += tl.dot(h, w, input_precision=PRECISION)
            acc += acc_e * route[:, None]
    tl.store(y_ptr + rows[:, None] * H + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _gate_up_kernel(x_ptr, order_ptr, counts_ptr, offsets_ptr, selected_ptr, w_ptr, inter_ptr,
                    num_slots_per_token, H, I,
                    stride_xt, stride_we, stride_wn, stride_wk,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    b = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    count = tl.load(counts_ptr + b)
    if pid_m * BM >= count:
        return
    start = tl.load(offsets_ptr + b)
    expert = tl.load(selected_ptr + b).to(tl.int64)
    rows = pid_m * BM + tl.arange(0, BM)
    row_mask = rows < count
    slots = tl.load(order_ptr + start + rows, mask=row_mask, other=0)
    tokens = slots // num_slots_per_token
    cols = pid_n * BN + tl.arange(0, BN)
    col_mask = cols < I
    acc_gate = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    w_base = w_ptr + expert * stride_we
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        k_mask = ks < H
        x = tl.load(x_ptr + tokens[:, None] * stride_xt + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        w_mask = k_mask[:, None] & col_mask[None, :]
        w_gate = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk, mask=w_mask, other=0.0)
        w_up = tl.load(w_base + (cols[None, :] + I) * stride_wn + ks[:, None] * stride_wk, mask=w_mask, other=0.0)
        if UPCAST:
            x, w_gate, w_up = x.to(tl.float32), w_gate.to(tl.float32), w_up.to(tl.float32)
        else:
            x = x.to(w_gate.dtype)
        acc_gate += tl.dot(x, w_gate, input_precision=PRECISION)
        acc_up += tl.dot(x, w_up, input_precision=PRECISION)
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out_ptrs = inter_ptr + (start + rows)[:, None] * I + cols[None, :]
    tl.store(out_ptrs, act.to(inter_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _down_kernel(inter_ptr, order_ptr, counts_ptr, offsets_ptr, selected_ptr, w_ptr, route_ptr, y_ptr,
                 H, I, stride_we, stride_wn, stride_wk,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    b = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    count = tl.load(counts_ptr + b)
    if pid_m * BM >= count:
        return
    start = tl.load(offsets_ptr + b)
    expert = tl.load(selected_ptr + b).to(tl.int64)
    rows = pid_m * BM + tl.arange(0, BM)
    row_mask = rows < count
    slots = tl.load(order_ptr + start + rows, mask=row_mask, other=0)
    cols = pid_n * BN + tl.arange(0, BN)
    col_mask = cols < H
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    w_base = w_ptr + expert * stride_we
    for k0 in range(0, I, BK):
        ks = k0 + tl.arange(0, BK)
        k_mask = ks < I
        h = tl.load(inter_ptr + (start + rows)[:, None] * I + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)  # [BK, BN]
        if UPCAST:
            h, w = h.to(tl.float32), w.to(tl.float32)
        else:
            h = h.to(w.dtype)
        acc += tl.dot(h, w, input_precision=PRECISION)
    route = tl.load(route_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
    acc = acc * route[:, None]
    tl.store(y_ptr + slots[:, None] * H + cols[None, :], acc, mask=row_mask[:, None] & col_mask[None, :])


def budgeted_moe(hidden: torch.Tensor,  # [T, H]
                 expert_ids: torch.Tensor,  # [T, K] int, -1 = dropped slot
                 weights: torch.Tensor,  # [T, K] routing weights
                 gate_up: torch.Tensor,  # [E, 2I, H]
                 down: torch.Tensor,  # [E, H, I]
                 selected: torch.Tensor,  # [B] expert ids to compute
                 ) -> torch.Tensor:  # [T, H]
    """Budgeted SwiGLU expert mixture over `selected` experts (Triton); see the module docstring.

    Never synchronises with the host, so it can run inside a CUDA graph."""
    T, K = expert_ids.shape
    E, two_i, H = gate_up.shape
    I = two_i // 2
    if down.shape != (E, H, I) or hidden.shape != (T, H):
        raise ValueError(f"budgeted_moe shapes disagree: hidden {tuple(hidden.shape)}, gate_up {tuple(gate_up.shape)}, "
                         f"down {tuple(down.shape)}; need hidden [T, H], gate_up [E, 2I, H], down [E, H, I]")
    B = selected.numel()
    if T == 0 or B == 0:
        return torch.zeros_like(hidden)
    hidden, gate_up, down = hidden.contiguous(), gate_up.contiguous(), down.contiguous()
    expert_ids, weights, selected = expert_ids.contiguous(), weights.contiguous(), selected.contiguous()
    upcast = os.environ.get("TRITON_INTERPRET") == "1" and gate_up.dtype == torch.bfloat16
    precision = "ieee" if gate_up.dtype == torch.float32 or upcast else "tf32"
    if T <= SMALL_T:
        bt, kp = max(16, triton.next_power_of_2(T)), triton.next_power_of_2(K)
        inter = torch.empty(B * T, I, dtype=gate_up.dtype, device=hidden.device)  # [B*T, I]
        out = torch.empty_like(hidden)  # [T, H]
        _small_gate_up_kernel[(B, triton.cdiv(I, SMALL_N_GATE))](
            hidden, expert_ids, weights, selected, gate_up, inter, T, K, H, I,
            hidden.stride(0), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2),
            PRECISION=precision, UPCAST=upcast, BT=bt, KP=kp, BN=SMALL_N_GATE, BK=SMALL_K)
        _small_down_kernel[(triton.cdiv(H, SMALL_N_DOWN),)](
            inter, expert_ids, weights, selected, down, out, T, K, H, I, B,
            down.stride(0), down.stride(1), down.stride(2),
            PRECISION=precision, UPCAST=upcast, BT=bt, KP=kp, BN=SMALL_N_DOWN, BK=SMALL_K)
        return out
    order, counts, offsets = group_slots(expert_ids, selected, E)
    route = weights.reshape(-1)  # [S]
    inter = torch.empty(T * K, I, dtype=gate_up.dtype, device=hidden.device)  # [S, I], sorted slot order
    y = torch.zeros(T * K, H, dtype=torch.float32, device=hidden.device)  # [S, H], original slot order
    m_blocks = triton.cdiv(T, BLOCK_M)  # a token uses an expert at most once, so count <= T
    _gate_up_kernel[(B, m_blocks, triton.cdiv(I, BLOCK_N))](
        hidden, order, counts, offsets, selected, gate_up, inter, K, H, I,
        hidden.stride(0), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2),
        PRECISION=precision, UPCAST=upcast, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K)
    _down_kernel[(B, m_blocks, triton.cdiv(H, BLOCK_N))](
        inter, order, counts, offsets, selected, down, route, y, H, I,
        down.stride(0), down.stride(1), down.stride(2),
        PRECISION=precision, UPCAST=upcast, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K)
    return y.view(T, K, H).sum(1).to(hidden.dtype)
