"""A wider, expert-bound stand-in of a MoE target, built by function-preserving (Net2Net) widening.

Why: the embedded target's experts are so small (hidden 256, intermediate 80) that a verification forward
is bound by per-op overhead, so expert budgets and unique-expert counts cannot show in its step times.
Widening every expert's intermediate layer makes the time per unique expert real memory traffic while the
model computes exactly the same function: routing, logits and acceptance stay the trained model's.

How: new neuron j copies old neuron g(j) (j < I: j itself; beyond: balanced seeded random choices), so the
gate and up rows of every copy are the old neuron's and its down column is split evenly between its
copies; the sum over copies gives back the old output (exactly in real arithmetic, to float32 rounding in
practice, hence float32 by default).

It is a stand-in: it models the memory traffic of wide experts, NOT their extra capacity or quality (the
copies add no information), attention and router cost stay those of the tiny model, and a shared expert
(Qwen2-MoE) is left as it was.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from moetune.outputs import OutputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# model_type -> the config key that sizes the routed experts' intermediate layer
WIDTH_KEYS = {"qwen3_moe": "moe_intermediate_size", "qwen2_moe": "moe_intermediate_size",
              "olmoe": "intermediate_size", "mixtral": "intermediate_size"}
ALIGN = 8  # expert widths a multiple of this keep torch._grouped_mm's 16-byte row alignment in bfloat16


def neuron_map(old: int, new: int, generator: torch.Generator) -> torch.Tensor:
    """g: new neuron -> old neuron, [new]. The first `old` are the identity; the rest walk through seeded
    random permutations of the old neurons, so copy counts differ by at most one between neurons (with
    new a multiple of old every neuron has the same count)."""
    rounds = -(-(new - old) // old)  # ceil
    extra = [torch.randperm(old, generator=generator) for _ in range(rounds)]
    return torch.cat([torch.arange(old), *extra])[:new]


def widen_experts(gate_up: torch.Tensor, down: torch.Tensor, new: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Widened copies of one layer's fused expert weights, each expert with its own neuron map.

    gate_up [E, 2I, H] (gate rows, then up rows) -> [E, 2I', H]; down [E, H, I] -> [E, H, I']."""
    E, I = down.shape[0], down.shape[2]
    g = torch.stack([neuron_map(I, new, generator) for _ in range(E)])  # [E, I']
    counts = torch.zeros(E, I, dtype=down.dtype).scatter_add_(1, g, torch.ones(E, new, dtype=down.dtype))  # [E, I]
    gate, up = gate_up[:, :I], gate_up[:, I:]  # [E, I, H] each
    rows = g[:, :, None].expand(E, new, gate_up.shape[2])  # [E, I', H]
    new_gate_up = torch.cat([gate.gather(1, rows), up.gather(1, rows)], dim=1)  # [E, 2I', H]
    cols = g[:, None, :].expand(E, down.shape[1], new)  # [E, H, I']
    new_down = down.gather(2, cols) / counts.gather(1, g)[:, None, :]  # [E, H, I']
    return new_gate_up, new_down


def widen_model(model, intermediate: int, seed: int = 0) -> None:
    """Widen the routed experts of every MoE layer of `model` in place and record the width in its config."""
    from moetune.engine.loader import moe_blocks, moe_shape

    model_type = model.config.model_type
    if model_type not in WIDTH_KEYS:
        raise ValueError(f"cannot widen model_type {model_type!r}: its expert width config key is unknown; "
                         f"moetune widen supports {tuple(WIDTH_KEYS)}")
    current = moe_shape(model).expert_intermediate_size
    if intermediate < current:
        raise ValueError(f"--intermediate {intermediate} is below the experts' current intermediate size "
                         f"{current}; widening only grows experts, pass --intermediate {current} or more")
    if intermediate % ALIGN:
        raise ValueError(f"--intermediate {intermediate} is not a multiple of {ALIGN}: transformers' default "
                         f"grouped_mm expert path needs 16-byte rows ({ALIGN} bfloat16 values); pass "
                         f"--intermediate {-(-intermediate // ALIGN) * ALIGN}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in moe_blocks(model):
            experts = block.experts
            gate_up, down = widen_experts(experts.gate_up_proj.float(), experts.down_proj.float(), intermediate,
                                          generator)
            experts.gate_up_proj = torch.nn.Parameter(gate_up.to(experts.gate_up_proj.dtype), requires_grad=False)
            experts.down_proj = torch.nn.Parameter(down.to(experts.down_proj.dtype), requires_grad=False)
            if hasattr(experts, "intermediate_dim"):
                experts.intermediate_dim = intermediate
    setattr(model.config, WIDTH_KEYS[model_type], intermediate)


def check_out(out: Path, source: Path, force: bool) -> None:
    """Refuse an output that is a file, the source itself, or a non-empty folder without --force; with
    --force, only a model folder (config.json) is replaced, so a mistyped path never wipes other files."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder path for the widened model")
    if source.exists() and out.resolve() == source.resolve():
        raise OutputError(f"--out {out} is the --target folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise OutputError(f"--out {out} exists and is not empty; pass --force to replace it or choose "
                              f"another path")
        if not (out / "config.json").is_file():
            raise OutputError(f"--out {out} is not a model folder (no config.json); --force only replaces a "
                              f"model folder, choose another path")


def widen(source_dir: str | Path, out_dir: str | Path, intermediate: int, seed: int = 0, dtype: str = "float32",
          force: bool = False) -> Path:
    """Write a function-preserving widening of the MoE model in `source_dir` to `out_dir`, experts of
    `intermediate` neurons, saved in `dtype`. Written into OUT.partial/ and renamed to OUT on success."""
    from moetune.engine.loader import load_target

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    check_out(out, Path(str(source_dir)), force)
    model, tokenizer = load_target(source_dir, device="cpu", dtype="float32")
    widen_model(model, intermediate, seed)
    model.to(DTYPES[dtype])
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed run
    try:
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        check_out(out, Path(str(source_dir)), force)  # again: it may have appeared while this one ran
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out
