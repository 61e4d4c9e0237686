"""KV cache bookkeeping for tree verification: crop back to the committed prefix and compact the
accepted path (whose rows need not be contiguous) into place, so memory tracks the context only.

Works on the transformers 5.x DynamicCache layer list directly (`layer.keys` / `layer.values`,
[1, heads, S, head_dim]) because `Cache.crop` changed meaning across 5.x releases.

Shape legend: S cached positions, R verified rows (root + N nodes).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache


def new_cache(model) -> DynamicCache:
    """An empty cache for `model`; sliding-window attention is refused (its cache cannot be compacted)."""
    cache = DynamicCache(config=model.config)
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        raise ValueError(f"{type(model).__name__} uses sliding-window attention, which tree verification "
                         "does not support; disable sliding_window in its config")
    return cache


def cache_len(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def crop(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of every layer."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def commit(cache: DynamicCache, past_len: int, rows: list[int]) -> None:
    """After verifying R rows at positions past_len.., keep `rows` (ascending, root first) and drop the rest.

    A chain's accepted rows are a prefix (0..a), so only a crop is needed; a tree's accepted path can skip
    rows, and those entries are gathered into place first.
    """
    n = len(rows)
    if rows != list(range(n)):
        for layer in cache.layers:
            if not getattr(layer, "is_initialized", False):
                continue
            idx = torch.tensor(rows, dtype=torch.long, device=layer.keys.device) + past_len
            layer.keys[..., past_len:past_len + n, :] = layer.keys.index_select(-2, idx)
            layer.values[..., past_len:past_len + n, :] = layer.values.index_select(-2, idx)
    crop(cache, past_len + n)
