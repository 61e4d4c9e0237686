"""engine/kv.AppendLayer (in-place appends into spare capacity) against HF's DynamicLayer (a torch.cat per
update) under every operation the engine and HF apply to a cache layer, and a strided view of the same
memory, on random inputs."""
import random

import torch
from tiny import tiny_moe
from transformers.cache_utils import DynamicLayer

from moetune.engine import kv


class Pair:
    """One cache with an AppendLayer and one with HF's DynamicLayer, driven alike."""

    def __init__(self):
        self.caches = []
        for layer in (kv.AppendLayer(), DynamicLayer()):
            cache = kv.new_cache(tiny_moe("qwen3_moe"))
            cache.layers = [layer]
            self.caches.append(cache)

    def same(self) -> bool:
        (ours,), (ref,) = (c.layers for c in self.caches)
        return (ours.get_seq_length() == ref.get_seq_length() and torch.equal(ours.keys, ref.keys)
                and torch.equal(ours.values, ref.values))


def _states(gen, batch, length):  # [B, heads, T, head_dim] keys and values
    return [torch.randn(batch, 2, length, 8, generator=gen) for _ in range(2)]


def test_append_layer_equals_dynamic_layer_under_random_updates_crops_commits_and_selects():
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    for trial in range(20):
        pair, batch = Pair(), rng.choice([1, 3])
        for _ in range(40):
            length = pair.caches[1].get_seq_length()
            op = rng.random()
            if op < 0.5 or length == 0:
                new = _states(gen, batch, rng.randint(1, 90))
                outs = [cache.layers[0].update(*new) for cache in pair.caches]
                assert all(torch.equal(a, b) for a, b in zip(*outs))
            elif op < 0.65:
                keep_len = rng.randint(0, length)
                for cache in pair.caches:
                    kv.crop(cache, keep_len)
            elif op < 0.8:
                past = rng.randint(0, length - 1)
                rows = sorted(rng.sample(range(length - past), rng.randint(1, length - past)))
                for cache in pair.caches:
                    kv.commit(cache, past, list(rows))
            elif op < 0.85:
                cut = rng.randint(1, length)
                for cache in pair.caches:
                    cache.layers[0].crop(-cut)
            elif op < 0.9:  # a view of the same memory that is not a prefix: every other position
                for cache in pair.caches:
                    layer = cache.layers[0]
                    layer.keys, layer.values = layer.keys[..., ::2, :], layer.values[..., ::2, :]
            else:
                keep = torch.tensor(sorted(rng.sample(range(batch), rng.randint(1, batch))))
                for cache in pair.caches:
                    cache.layers[0].batch_select_indices(keep)
                batch = len(keep)
            assert pair.same(), f"trial {trial}: the caches differ"


def test_append_layer_grows_by_half_and_copies_rarely():
    """A long decode reallocates O(log n) times and never holds more than 1.5x its context plus 64."""
    layer, gen = kv.AppendLayer(), torch.Generator().manual_seed(1)
    layer.update(*_states(gen, 1, 100))
    growths, buffer = 0, layer.key_buffer
    for step in range(2000):
        layer.update(*_states(gen, 1, 1))
        growths += layer.key_buffer is not buffer
        buffer = layer.key_buffer
        assert layer.key_buffer.shape[1] <= 1.5 * layer.get_seq_length() + 64
        assert layer.keys.data_ptr() == layer.key_buffer.data_ptr()  # a view, not a copy
    assert growths == 7  # 165 -> 249 -> 375 -> 564 -> 847 -> 1272 -> 1909 -> 2865 positions
