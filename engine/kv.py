"""KV cache bookkeeping for tree verification: crop back to the committed prefix and compact the
accepted path (whose rows need not be contiguous) into place, so memory tracks the context only.

Works on the transformers 5.x DynamicCache layer list directly (`layer.keys` / `layer.values`,
[1, heads, S, head_dim]) because `Cache.crop` changed meaning across 5.x releases. Its layers are
AppendLayers: HF's DynamicLayer copies the whole cache at every forward (a torch.cat), AppendLayer writes
the new entries into spare capacity, so a step costs what it adds, not what the context holds.

Shape legend: S cached positions, R verified rows (root + N nodes).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class AppendLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views [B, heads, S, head_dim] of position-major buffers
    [B, capacity, heads, head_dim] with spare positions: an update writes into the spare ones (growing the
    buffers by half when full) instead of concatenating, so a decode step copies its new entries only.
    Position-major so a position's heads sit together: gathering positions (engine/packed.py) copies rows,
    where a head-major buffer's view made index_select take its strided path (2-3x slower). Anything that
    crops, gathers in place or slices `keys`/`values` as HF's layer allows keeps working: a prefix view of
    the buffer is written after; any other tensor put there is copied into fresh buffers at the next update."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.key_buffer = self.value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,  # [B, heads, T, head_dim]
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:  # [B, heads, S + T, head_dim]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past = self.get_seq_length()
        end = past + key_states.shape[-2]
        if not (self._holds(self.keys, self.key_buffer, end) and self._holds(self.values, self.value_buffer, end)):
            self.key_buffer = _grown(self.keys, key_states, end)
            self.value_buffer = _grown(self.values, value_states, end)
        self.key_buffer[:, past:end].copy_(key_states.transpose(1, 2))
        self.value_buffer[:, past:end].copy_(value_states.transpose(1, 2))
        self.keys = self.key_buffer[:, :end].transpose(1, 2)
        self.values = self.value_buffer[:, :end].transpose(1, 2)
        return self.keys, self.values

    @staticmethod
    def _holds(view: torch.Tensor,  # [B, heads, S, head_dim] as held now
               buffer: torch.Tensor | None,  # [B, capacity, heads, head_dim]
               length: int) -> bool:
        """Whether `view` is still a prefix of `buffer` and `length` positions fit. Plain comparisons: this
        runs twice per layer per forward, where building views to compare cost as much as HF's torch.cat
        of a 200-position cache."""
        if buffer is None or length > buffer.shape[1] or view.dim() != 4 or view.dtype != buffer.dtype:
            return False
        b, c, h, d = buffer.stride()
        return view.data_ptr() == buffer.data_ptr() and view.stride() == (b, h, c, d) \
            and view.shape[0] == buffer.shape[0] and view.shape[1] == buffer.shape[2]


def _grown(held: torch.Tensor,  # [B, heads, S, head_dim], or empty before the first update
           new: torch.Tensor,  # [B, heads, T, head_dim]
           length: int) -> torch.Tensor:  # [B, capacity, heads, head_dim], the first S positions `held`
    """A buffer for `length` positions and half as many again (at least 64), starting with `held`."""
    B, heads, _, head_dim = new.shape
    buffer = new.new_empty(B, length + max(length // 2, 64), heads, head_dim)
    if held.numel():
        buffer[:, :held.shape[-2]].copy_(held.transpose(1, 2))
    return buffer


def new_cache(model) -> DynamicCache:
    """An empty cache for `model` with AppendLayers; sliding-window attention is refused (its cache cannot
    be compacted)."""
    cache = DynamicCache(config=model.config)
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        raise ValueError(f"{type(model).__name__} uses sliding-window attention, which tree verification "
                         "does not support; disable sliding_window in its config")
    cache.layers = [AppendLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
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
