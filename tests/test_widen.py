"""`moetune widen`: the widened target computes the same function (logits to float32 rounding, identical
greedy generations on held-out prompts), loads as a target of the new width, and bad requests fail as one
clear error before anything is written."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from cli_check import fails
from tiny import FAMILIES, VOCAB, tiny_moe
from transformers import AutoModelForCausalLM

from moetune import DEFAULT_TARGET, MODELS_DIR
from moetune.cli import main
from moetune.engine.loader import load_target, moe_shape
from moetune.outputs import OutputError
from moetune.prompts import read_prompts
from moetune.widen import neuron_map, widen, widen_experts, widen_model

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def original():
    return load_target(DEFAULT_TARGET, "cpu", "float32")


@pytest.fixture(scope="module")
def held_out(original):
    """Four held-out prompts (every kind, then one more) as token ids."""
    prompts = read_prompts(MODELS_DIR / "prompts.json", "--prompts")
    kinds = sorted({p["kind"] for p in prompts})
    texts = [next(p["text"] for p in prompts if p["kind"] == k) for k in kinds] + [prompts[-1]["text"]]
    return [original[1](t, return_tensors="pt").input_ids for t in texts[:4]]


def _greedy(model, ids, pad):
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)[0, ids.shape[1]:]


def test_neuron_map_copies_every_neuron_evenly():
    g = neuron_map(80, 200, torch.Generator().manual_seed(0))
    assert g[:80].tolist() == list(range(80))
    counts = torch.bincount(g, minlength=80)
    assert set(counts.tolist()) == {2, 3} and counts.sum() == 200


def test_widened_experts_compute_the_same_output():
    gen = torch.Generator().manual_seed(1)
    gate_up = torch.randn(3, 2 * 5, 4, generator=gen)  # [E, 2I, H]
    down = torch.randn(3, 4, 5, generator=gen)  # [E, H, I]
    new_gate_up, new_down = widen_experts(gate_up, down, 13, gen)
    assert new_gate_up.shape == (3, 26, 4) and new_down.shape == (3, 4, 13)
    x = torch.randn(7, 4, generator=gen)  # [T, H]

    def expert(gu, d, e):
        gate, up = (x @ gu[e].T).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ d[e].T

    for e in range(3):
        torch.testing.assert_close(expert(new_gate_up, new_down, e), expert(gate_up, down, e))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_widens_and_reloads(tmp_path, family):
    """The width lands in the config key the family sizes its experts by (a wrong key would not reload);
    Qwen2-MoE's shared expert is left as it was."""
    model = tiny_moe(family)
    ids = torch.randint(2, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    shared = [p.clone() for n, p in model.named_parameters() if "shared_expert" in n]
    with torch.inference_mode():
        before = model(ids).logits
    widen_model(model, 72)
    model.save_pretrained(tmp_path)
    wide = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert moe_shape(wide).expert_intermediate_size == 72
    assert all(torch.equal(a, b) for a, b in zip(shared, [p for n, p in wide.named_parameters()
                                                          if "shared_expert" in n]))
    with torch.inference_mode():
        torch.testing.assert_close(wide(ids).logits, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("width", [120, 160])
def test_widening_preserves_the_function(tmp_path, original, held_out, width):
    model, tokenizer = original
    out = widen(DEFAULT_TARGET, tmp_path / "wide", width)
    wide, _ = load_target(out, "cpu", "float32")
    assert moe_shape(wide).expert_intermediate_size == width
    assert replace(moe_shape(wide), expert_intermediate_size=80) == moe_shape(model)
    with torch.inference_mode():
        for ids in held_out:
            torch.testing.assert_close(wide(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
    pad = tokenizer.pad_token_id
    for ids in held_out:
        assert _greedy(wide, ids, pad).tolist() == _greedy(model, ids, pad).tolist()


def test_refuses_an_existing_output_without_force(tmp_path):
    out = tmp_path / "wide"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="--force"):
        widen(DEFAULT_TARGET, out, 96)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    with pytest.raises(OutputError, match="not a model folder"):
        widen(DEFAULT_TARGET, tmp_path / "notes", 96, force=True)
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep"


def test_refuses_a_narrower_width(tmp_path):
    with pytest.raises(ValueError, match="below the experts' current intermediate size 80"):
        widen(DEFAULT_TARGET, tmp_path / "wide", 64)
    assert not (tmp_path / "wide").exists() and not (tmp_path / "wide.partial").exists()


def test_refuses_a_width_grouped_mm_cannot_run():
    with pytest.raises(ValueError, match="not a multiple of 8.*pass --intermediate 88"):
        widen_model(tiny_moe("qwen3_moe"), 84)


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "wide"
    assert main(["widen", "--intermediate", "96", "--out", str(out), "--dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "0.15 MB per expert (bfloat16)" in printed
    assert not (tmp_path / "wide.partial").exists()
    fails(capsys, ["widen", "--intermediate", "96", "--out", str(out)], "--force")
    fails(capsys, ["widen", "--intermediate", "40", "--out", str(tmp_path / "narrow")], "--intermediate 40")
    assert main(["widen", "--intermediate", "96", "--out", str(out), "--force"]) == 0
    assert "(float32)" in capsys.readouterr().out
