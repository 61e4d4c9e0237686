"""Expert offloading (engine/offload.py): exact outputs at every capacity, with and without prefetch; a fast
tier that never exceeds its capacity; failed and stuck transfers that raise errors naming layer and expert;
remove() restoring the model bit for bit; arguments refused with messages that say what to fix."""
import copy
import os
import threading

import pytest
import torch
from safetensors import safe_open
from tiny import FAMILIES, tiny_moe

from moetune.engine.drafters import DraftModelDrafter
from moetune.engine.generate import generate
from moetune.engine.offload import OffloadError, enable_offload, handle_of, is_offloaded
from moetune.engine.offload_slow import ALIGN
from moetune.step import PLAIN, StepConfig

PROMPT = [5, 17, 33, 17, 33, 90, 4, 17, 33]
N = 12
E = 8  # tiny_moe's experts per layer


@pytest.fixture(scope="module")
def reference():
    """The unoffloaded model, its logits over PROMPT and its HF greedy continuation."""
    model = tiny_moe("qwen3_moe")
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits
    out = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=N, pad_token_id=1)
    return model, logits, out[0, len(PROMPT):].tolist()


@pytest.fixture
def offloaded(reference):
    """A fresh copy of the reference model to offload; every handle made is removed afterwards."""
    model = copy.deepcopy(reference[0])
    handles = []

    def enable(**kw):
        handles.append(enable_offload(model, **kw))
        return handles[-1]

    yield model, enable
    for h in handles:
        h.remove()


def _greedy(model, config, drafter=None):
    return generate(model, None, [PROMPT], drafter=drafter, config=config, max_new_tokens=N, eos_token_id=-1)[0]


@pytest.mark.parametrize("prefetch", ["none", "both"])
def test_greedy_matches_hf_at_every_capacity(reference, offloaded, prefetch):
    """Plain and speculative greedy output through the store equal HF greedy without offload, at 1..E."""
    _, _, expected = reference
    model, enable = offloaded
    for capacity in range(1, E + 1):
        handle = enable(capacity=capacity, prefetch=prefetch)
        assert _greedy(model, PLAIN).token_ids == expected, capacity
        spec = _greedy(model, StepConfig(depth=3, topk=2, num_draft_tokens=5), DraftModelDrafter(model))
        assert spec.token_ids == expected, capacity
        assert spec.mean_accepted > 1  # the target drafts for itself, through the same store
        handle.remove()


@pytest.mark.parametrize("prefetch", ["history", "both"])
def test_self_speculation_with_history_prefetch(reference, offloaded, prefetch):
    """The self drafter routes the offloaded target top-1: the routing history keeps verification's top-k only."""
    _, _, expected = reference
    model, enable = offloaded
    handle = enable(capacity=3, prefetch=prefetch)
    assert _greedy(model, StepConfig(drafter="self", depth=3)).token_ids == expected
    assert all(len(experts) == 2 for table in handle.history.table for experts in table.values())  # top-2


@pytest.mark.parametrize("prefetch,eviction", [("pregate", "lru"), ("history", "lfu"), ("both", "lfu")])
def test_prefetch_and_eviction_never_change_logits(reference, offloaded, prefetch, eviction):
    model, enable = offloaded
    handle = enable(capacity=3, prefetch=prefetch, eviction=eviction)
    with torch.no_grad():
        for _ in range(3):  # later passes run on what earlier ones left and predicted
            assert torch.equal(model(torch.tensor([PROMPT])).logits, reference[1])
    total = handle.report().total()
    assert total["precision"] is not None and total["recall"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_bit_exact_in_every_family(family):
    model = tiny_moe(family)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = model(ids).logits
        handle = enable_offload(model, capacity=2, prefetch="both")
        try:
            assert torch.equal(model(ids).logits, expected)
        finally:
            handle.remove()


def test_fast_tier_never_exceeds_capacity(reference, offloaded):
    """At every expert computed: pinned and resident experts fit the capacity, and the slot holds exactly
    that expert's weights."""
    original, _, expected = reference
    model, enable = offloaded
    for capacity in (1, 3):
        handle = enable(capacity=capacity, prefetch="both")
        store, stream = handle.store, handle.store.stream

        def checked(layer, needed):
            t = store.layers[layer]
            for e, gate_up, down in stream(layer, needed):
                assert len(t.pins) <= capacity and len(t.slot_of) <= capacity == t.gate_up.shape[0]
                experts = original.model.layers[layer].mlp.experts
                assert torch.equal(gate_up, experts.gate_up_proj[e]) and torch.equal(down, experts.down_proj[e])
                yield e, gate_up, down

        store.stream = checked
        spec = _greedy(model, StepConfig(depth=4, topk=2, num_draft_tokens=8), DraftModelDrafter(model))
        assert spec.token_ids == expected
        report = handle.report()
        assert report.total()["peak_pinned"] <= capacity and report.total()["misses"] > 0
        assert report.resident_bytes == 2 * capacity * report.expert_bytes  # 2 layers
        handle.remove()


def test_eviction_budget_runs_through_the_store(reference, offloaded):
    model, enable = offloaded
    enable(capacity=2)
    res = _greedy(model, StepConfig(depth=4, topk=2, num_draft_tokens=8, budgets=(4,)), DraftModelDrafter(model))
    assert res.token_ids == reference[2]


def test_lossy_budget_streams_only_the_selected_experts(reference, offloaded):
    """A substitution (lossy) budget through the store emits what the same budget emits on the model itself."""
    config = StepConfig(depth=3, topk=2, num_draft_tokens=6, budgets=(3,), budget_mode="substitute")
    plain_model = copy.deepcopy(reference[0])
    expected = _greedy(plain_model, config, DraftModelDrafter(plain_model)).token_ids
    model, enable = offloaded
    enable(capacity=2)
    assert _greedy(model, config, DraftModelDrafter(model)).token_ids == expected


def test_failed_transfer_names_layer_and_expert(offloaded):
    model, enable = offloaded
    handle = enable(capacity=2, prefetch="both")

    def failing(layer, expert, gate_up, down):
        raise OSError("injected read failure")

    handle.store.tier.chunks = failing
    with pytest.raises(OffloadError, match=r"MoE layer 0 expert \d+: reading it from the slow tier failed.*injected"):
        with torch.no_grad():
            model(torch.tensor([PROMPT]))


@pytest.mark.parametrize("expert", range(E))
def test_failed_prefetch_is_read_again_on_demand(reference, offloaded, expert):
    """Whether the expert is needed (retried as a demand read) or not (its slot freed), the output is exact."""
    model, enable = offloaded
    handle = enable(capacity=2, prefetch="none")
    store, read = handle.store, handle.store.tier.chunks

    def failing(*args, **kw):
        raise OSError("injected read failure")

    store.tier.chunks = failing
    store.prefetch(0, [expert])
    store.layers[0].loading[expert].exception(timeout=5)  # wait for it to fail
    store.tier.chunks = read
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([PROMPT])).logits, reference[1])
    assert handle.report().layers[0].prefetch_failed == 1


def test_stuck_transfer_times_out(reference, offloaded):
    model, enable = offloaded
    handle = enable(capacity=2, prefetch="none", timeout_s=0.2)
    release = threading.Event()
    read = handle.store.tier.chunks

    def stuck(*args, **kw):
        release.wait(10)
        return read(*args, **kw)

    handle.store.tier.chunks = stuck
    with torch.no_grad():
        timed_out = r"MoE layer 0 expert \d+: the slow-tier read did not finish within 0.2 s"
        with pytest.raises(OffloadError, match=timed_out):
            model(torch.tensor([PROMPT]))
        with pytest.raises(OffloadError, match="remove\\(\\) the offload and enable it again"):
            model(torch.tensor([PROMPT]))
        release.set()
        handle.remove()
        assert torch.equal(model(torch.tensor([PROMPT])).logits, reference[1])


def test_remove_restores_the_model_bit_exactly(reference, offloaded):
    original, logits, _ = reference
    model, enable = offloaded
    handle = enable(capacity=3, prefetch="both")
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.is_meta and is_offloaded(experts)  # nothing of the model's own stays resident
    assert handle_of(model) is handle
    with safe_open(handle.path, framework="pt") as f:  # the slow tier is a valid safetensors file
        assert torch.equal(f.get_tensor("layers.1.experts.5.down"), original.model.layers[1].mlp.experts.down_proj[5])
    assert all(span.offset % ALIGN == 0 for span in handle.store.tier.spans.values())
    with torch.no_grad():
        model(torch.tensor([PROMPT]))
    path = handle.path
    handle.remove()
    handle.remove()  # idempotent
    assert model.config._experts_implementation == original.config._experts_implementation
    assert not is_offloaded(experts) and handle_of(model) is None
    assert not any(m._forward_pre_hooks for m in model.modules())
    for a, b in zip(model.state_dict().values(), original.state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([PROMPT])).logits, logits)
    assert not os.path.exists(path)


def test_paced_tier_is_rate_limited_and_says_so(offloaded):
    model, enable = offloaded
    handle = enable(capacity=2, slow="paced", slow_gbps=0.01, prefetch="none")
    with torch.no_grad():
        model(torch.tensor([PROMPT]))
    report = handle.report()
    total = report.total()
    assert "rate-limited copy" in report.slow_tier and "0.01 GB/s" in report.markdown()
    assert total["read_s"] >= 0.95 * total["bytes"] / 0.01e9


@pytest.mark.parametrize("kwargs,message", [
    (dict(capacity=0), "capacity must be a whole number of experts per layer, >= 1"),
    (dict(capacity=2.5), "capacity must be a whole number"),
    (dict(capacity=E + 1), rf"capacity {E + 1} is above the model's {E} experts per layer; pass capacity in "
                           rf"\[1, {E}\]"),
    (dict(capacity=2, slow="ssd"), "slow must be one of"),
    (dict(capacity=2, slow="paced"), "needs slow_gbps"),
    (dict(capacity=2, slow_gbps=-1.0), "slow_gbps must be a positive rate"),
    (dict(capacity=2, prefetch="always"), "prefetch must be one of"),
    (dict(capacity=2, eviction="fifo"), "eviction must be one of"),
    (dict(capacity=2, timeout_s=0), "timeout_s must be a positive number of seconds"),
    (dict(capacity=2, prefetch_min_prob=1.0), r"prefetch_min_prob must be in \[0, 1\)"),
])
def test_invalid_arguments_say_what_to_fix(offloaded, kwargs, message):
    model, enable = offloaded
    with pytest.raises(ValueError, match=message):
        enable(**kwargs)
    assert not is_offloaded(model.model.layers[0].mlp.experts)


def test_enabling_twice_is_refused(offloaded):
    model, enable = offloaded
    enable(capacity=2)
    with pytest.raises(ValueError, match="already offloaded; call its OffloadHandle.remove"):
        enable_offload(model, capacity=2)
