"""Memory stays flat over long generations: caches hold the committed context and nothing more."""
import pytest
from tiny import tiny_dense, tiny_moe

from moetune.engine import generate as gen_mod
from moetune.engine import kv
from moetune.engine.drafters import DraftModelDrafter
from moetune.step import StepConfig


@pytest.mark.parametrize("config", [StepConfig(depth=4), StepConfig(depth=3, topk=2, num_draft_tokens=6)])
def test_caches_track_the_context_over_a_long_generation(monkeypatch, config):
    target, draft = tiny_moe("qwen3_moe"), tiny_dense()
    drafter = DraftModelDrafter(draft)
    caches = []
    real_new_cache = kv.new_cache

    def spy(model):
        cache = real_new_cache(model)
        if model is target:
            caches.append(cache)
        return cache

    monkeypatch.setattr(gen_mod.kv, "new_cache", spy)
    checks = []

    def on_step(_r, stats):
        committed = stats.context_len + stats.emitted
        # The target cache holds every committed token but the last (the next root); the draft's at most all.
        checks.append((kv.cache_len(caches[-1]), committed - 1, kv.cache_len(drafter.cache), committed))

    res = gen_mod.generate(target, None, [[5, 9, 17, 33]], drafter=drafter, config=config, max_new_tokens=150,
                           eos_token_id=[], on_step=on_step)[0]
    assert len(res.token_ids) == 150
    assert len(checks) == len(res.steps) and len(checks) > 10
    for target_len, expected, draft_len, committed in checks:
        assert target_len == expected
        assert draft_len <= committed
