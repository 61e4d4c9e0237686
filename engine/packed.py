"""Attention for a packed batch: several requests' rows in one sequence, each reading only its own keys.

engine/batch.py packs a batch into one sequence and one cache; this is the attention it swaps in for its
forwards, and engine/drafters/batched.py its draft model's. Requests are bucketed by their number of new
rows (1, 2, 3-4, 5-8, ...); in a bucket each request's keys (its cached positions, then its new rows) are
gathered into a padded [B, L] block and its rows into [B, N], so a row never reads another request's keys
and attention costs what a padded batch's does, with padding at most twice a request's rows: one request
drafting 6 nodes beside 15 plain ones no longer pads all 16 to 7 rows.

Shape legend: B requests in a bucket, T new rows, N the most new rows of one request in a bucket, M the
widest visibility block of one request (its new rows, plus at a draft level the nodes drafted before them),
S cached positions (all requests), L the most keys of one request in a bucket (cached + new), H attention
heads (Hkv key/value heads), D head size.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface


@dataclass(frozen=True)
class Bucket:
    """Requests of one packed forward with about as many new rows each, as one padded attention."""

    keys: torch.Tensor  # [B, L] long: cache positions (after this forward's append) of each request's keys, padded
    rows: torch.Tensor  # [B, N] long: each request's new rows, padded with its last one
    mask: torch.Tensor  # [B, 1, N, L] additive: which of its keys each row sees


@dataclass(frozen=True)
class Layout:
    """Where each request of one packed forward sits, as packed_attention_forward reads it."""

    buckets: tuple[Bucket, ...]
    unpad: torch.Tensor  # [T] long: each new row's place among the buckets' padded rows, concatenated


def layout(owner: torch.Tensor,  # [S] request index of each cached position
           groups: list[tuple[int, torch.Tensor]],  # per request in row order: (index, [n, m] bool block, m >= n)
           dtype: torch.dtype) -> Layout:
    """A request's keys are its cached positions and then its n new rows. Its block says which of its last
    m keys (its last m - n cached positions, then its new rows) each row sees; the keys before those are
    all visible. m = n: the rows see every cached position and each other as the block says (tree
    ancestry at verification; causal for a prompt). m > n: a draft level (engine/drafters/batched.py),
    whose rows see the nodes drafted at this step's earlier levels only along their own paths.

    Example: rows n = [1, 6, 1, 2] make buckets {n=1: requests 0, 2}, {n=2: 3}, {n=5-8: 1}, and unpad
    sends request 0's row to padded row 0, request 1's six rows to 4..9 (after the 2 + 2 padded rows of the
    first buckets, in bucket order), request 2's to 1, request 3's to 2, 3."""
    sizes = [block.shape[0] for _, block in groups]
    starts = [sum(sizes[:g]) for g in range(len(groups))]
    classes: dict[int, list[int]] = {}
    for g, n in enumerate(sizes):
        classes.setdefault((n - 1).bit_length(), []).append(g)
    buckets, place, offset = [], [0] * sum(sizes), 0
    for members in (classes[c] for c in sorted(classes)):
        N = max(sizes[g] for g in members)
        buckets.append(_bucket(owner, [groups[g] for g in members], [starts[g] for g in members], dtype))
        for b, g in enumerate(members):
            place[starts[g]:starts[g] + sizes[g]] = range(offset + b * N, offset + b * N + sizes[g])
        offset += len(members) * N
    return Layout(tuple(buckets), torch.tensor(place, device=owner.device))


def _bucket(owner: torch.Tensor,  # [S]
            groups: list[tuple[int, torch.Tensor]],  # as layout's, for the bucket's requests
            starts: list[int],  # each request's first new row among all T
            dtype: torch.dtype) -> Bucket:
    """One bucket's padded keys, rows and mask (layout's docstring says what a block means)."""
    device, S, B = owner.device, len(owner), len(groups)
    index = torch.tensor([g[0] for g in groups], device=device)
    n = torch.tensor([g[1].shape[0] for g in groups], device=device)  # [B]
    m = torch.tensor([g[1].shape[1] for g in groups], device=device)  # [B]
    start = torch.tensor(starts, device=device)  # [B]
    mine = owner[None, :] == index[:, None]  # [B, S]
    cached = mine.sum(dim=1)  # [B]
    order = torch.cat([mine.nonzero()[:, 1], owner.new_zeros(1)])  # cached positions grouped by request
    first = cached.cumsum(0) - cached  # [B] their offsets in `order`
    L, N, M = int((cached + n).max()), int(n.max()), int(m.max())
    j = torch.arange(L, device=device)[None]  # [1, L]
    is_cached, is_new = j < cached[:, None], (j >= cached[:, None]) & (j < (cached + n)[:, None])  # [B, L]
    keys = torch.where(is_cached, order[(first[:, None] + j).clamp(max=len(order) - 1)],
                       torch.where(is_new, S + start[:, None] + j - cached[:, None], 0))
    blocks = torch.zeros(B, N, M, dtype=torch.bool)
    for b, (_, block) in enumerate(groups):
        blocks[b, :block.shape[0], :block.shape[1]] = block
    tail = (cached + n - m)[:, None]  # [B, 1] the first key its block covers
    in_block = (j >= tail) & (j < (cached + n)[:, None])  # [B, L]
    col = (j - tail).clamp(0, M - 1)[:, None, :].expand(B, N, L)
    visible = (j < tail)[:, None, :] | (blocks.to(device).gather(2, col) & in_block[:, None, :])  # [B, N, L]
    i = torch.arange(N, device=device)[None]  # [1, N]
    mask = torch.zeros(B, 1, N, L, dtype=dtype, device=device).masked_fill_(~visible[:, None], torch.finfo(dtype).min)
    return Bucket(keys, start[:, None] + torch.minimum(i, n[:, None] - 1), mask)


def packed_attention_forward(module, query: torch.Tensor,  # [1, H, T, D]
                             key: torch.Tensor, value: torch.Tensor,  # [1, Hkv, S + T, D], cache included
                             attention_mask: None,  # PACKED has no mask function: the masks are the layout's
                             dropout: float = 0.0, scaling: float | None = None, packed_layout: Layout | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:  # [1, T, H, D]
    """Attention of a packed forward, bucket by bucket: each request's keys are gathered into a padded
    [B, L] block and its rows into [B, N], so a row never reads another request's keys and attention
    costs what a padded batch's does."""
    H, Hkv = query.shape[1], key.shape[1]
    outs = []
    for bucket in packed_layout.buckets:
        (B, L), N = bucket.keys.shape, bucket.rows.shape[1]
        flat = bucket.keys.flatten()
        k, v = _gather(key, flat, B, L), _gather(value, flat, B, L)  # [B, Hkv, L, D]
        q = _gather(query, bucket.rows.flatten(), B, N)  # [B, H, N, D]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bucket.mask, scale=scaling,
                                                               enable_gqa=H != Hkv)  # [B, H, N, D]
        outs.append(out.transpose(1, 2).reshape(B * N, H, -1))
    padded = outs[0] if len(outs) == 1 else torch.cat(outs)  # [sum B * N, H, D]
    return padded.index_select(0, packed_layout.unpad)[None], None


def _gather(states: torch.Tensor,  # [1, heads, S, D]
            index: torch.Tensor,  # [B * L] long: positions
            B: int, L: int) -> torch.Tensor:  # [B, heads, L, D]
    """states at `index`, as B blocks of L positions: whole rows (every head of a position) where the
    positions are rows in memory (engine/kv.AppendLayer's buffers, a query projected position-major), which
    index_select copies fast; else along the position dimension."""
    rows = states[0].transpose(0, 1)  # [S, heads, D]
    if rows.is_contiguous():
        return rows.index_select(0, index).view(B, L, *rows.shape[1:]).transpose(1, 2)
    return states[0].index_select(1, index).view(states.shape[1], B, L, -1).transpose(0, 1)


PACKED = "moetune_packed"
AttentionInterface.register(PACKED, packed_attention_forward)


@contextmanager
def packed_attention(model):
    """The model's attention layers call packed_attention_forward inside the block only (each layer looks
    its attention function up by config._attn_implementation at every forward); restored even on error."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = PACKED
    try:
        yield
    finally:
        config._attn_implementation = before
