"""Packed attention (engine/packed.py) equals plain per-request attention on random inputs, with requests
of every row count bucketed together, and its padding stays within twice a request's rows."""
import pytest
import torch

from moetune.engine.packed import layout, packed_attention_forward

H, HKV, D = 4, 2, 8


def reference(owner, groups, query, key, value):  # [1, H, T, D], [1, Hkv, S + T, D] -> [1, T, H, D]
    """Each request's rows, one at a time, against exactly the keys its block lets it see."""
    S, out, start = len(owner), [], 0
    for index, block in groups:
        n, m = block.shape
        mine = (owner == index).nonzero().flatten().tolist() + list(range(S + start, S + start + n))
        for i in range(n):
            seen = [j < len(mine) - m or bool(block[i, j - (len(mine) - m)]) for j in range(len(mine))]
            keys = torch.tensor([k for k, s in zip(mine, seen) if s])
            q = query[0, :, start + i]  # [H, D]
            k = key[0][:, keys].repeat_interleave(H // HKV, 0)  # [H, n_seen, D]
            v = value[0][:, keys].repeat_interleave(H // HKV, 0)
            weights = torch.softmax((k @ q[:, :, None])[..., 0] / D ** 0.5, dim=-1)  # [H, n_seen]
            out.append((weights[:, None, :] @ v)[:, 0])  # [H, D]
        start += n
    return torch.stack(out)[None]


def random_case(seed):
    g = torch.Generator().manual_seed(seed)
    requests = 7
    owner = torch.randint(0, requests, (60,), generator=g)
    groups = []
    for index in torch.randperm(requests, generator=g)[:5].tolist():
        n = int(torch.randint(1, 10, (1,), generator=g))
        extra = int(torch.randint(0, 3, (1,), generator=g)) if (owner == index).sum() >= 2 else 0
        block = torch.rand(n, n + extra, generator=g) < 0.6
        block[:, extra:] &= torch.ones(n, n, dtype=torch.bool).tril()
        block[torch.arange(n), extra + torch.arange(n)] = True  # a row sees itself
        groups.append((index, block))
    T = sum(b.shape[0] for _, b in groups)
    qkv = [torch.randn(1, H, T, D, generator=g), torch.randn(1, HKV, 60 + T, D, generator=g),
           torch.randn(1, HKV, 60 + T, D, generator=g)]
    return owner, groups, qkv


@pytest.mark.parametrize("position_major", [False, True])
def test_packed_attention_equals_per_request_attention(position_major):
    """Head-major inputs are gathered along positions, position-major ones (engine/kv.AppendLayer's views, a
    projected query) row by row: both equal the reference."""
    for seed in range(6):
        owner, groups, qkv = random_case(seed)
        if position_major:  # same values, each position's heads adjacent in memory
            qkv = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in qkv]
        query, key, value = qkv
        lay = layout(owner, groups, torch.float32)
        got, _ = packed_attention_forward(None, query, key, value, None, packed_layout=lay)
        torch.testing.assert_close(got, reference(owner, groups, query, key, value), atol=1e-5, rtol=1e-5)


def test_buckets_pad_at_most_twice_a_request():
    owner = torch.zeros(0, dtype=torch.long)
    sizes = [1, 6, 1, 2, 3, 9, 1, 4]
    lay = layout(owner, [(i, torch.ones(n, n, dtype=torch.bool).tril()) for i, n in enumerate(sizes)], torch.float32)
    assert len(lay.buckets) == 5  # n = 1 | 2 | 3-4 | 5-8 | 9-16
    padded = sum(b.rows.numel() for b in lay.buckets)
    assert padded == 3 * 1 + 1 * 2 + 2 * 4 + 1 * 6 + 1 * 9
    assert sorted(lay.unpad.tolist()) == lay.unpad.unique().tolist() and len(lay.unpad) == sum(sizes)
