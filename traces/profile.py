"""Hardware profiling: verification latency over a grid of (tokens verified, unique experts per layer,
context length), measured by forcing which experts the tokens use, then fitted into a LatencyModel.

Why forced experts: with real routing, unique experts and tokens move together; to separate their costs
the gate's top-k output is overridden (scoped hooks, removed on exit) so the T tokens use exactly U
distinct experts in every MoE layer. Works from a model config alone (random weights of the right shape),
so a GPU can profile OLMoE-1B-7B, Qwen3-30B-A3B or Mixtral-8x7B without their weights; `layers` truncates
the stack for memory and time, and the fitted model is scaled back to the full depth (per-layer terms
times L_full / L_measured; per-expert cost is already per layer).

Shape legend: T tokens, K top-k, E experts, U unique experts per layer, C context length.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError

from moetune.engine import kv
from moetune.engine.loader import moe_blocks, moe_shape
from moetune.errors import UserError, read_json
from moetune.features import VERIFY_FEATURES
from moetune.step import MAX_DRAFT_NODES

from .latency import LatencyModel

MAX_TOKENS = MAX_DRAFT_NODES + 1  # a verification pass is at most the largest draft tree plus its root
MAX_PASSES = 10_000  # forward passes a grid may ask for (grid points x (repeats + 1))
CONFIG_FIX = "pass a Hugging Face config.json of a supported MoE model (e.g. traces/configs/olmoe-1b-7b.json)"


@dataclass(frozen=True)
class ProfileGrid:
    """What to measure. Unique counts above T*K (or E) are skipped: T tokens cannot reach them. Its size
    is bounded on construction, and measure() checks the contexts fit the model, so a grid that cannot
    finish fails before any work rather than running out of memory or time."""

    tokens: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    unique_fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)  # U = K + f * (E - K), capped at T*K
    contexts: tuple[int, ...] = (64, 512)
    repeats: int = 3

    def __post_init__(self):
        if not self.tokens or min(self.tokens) < 1 or not self.contexts or min(self.contexts) < 1:
            raise ValueError(f"ProfileGrid needs tokens and contexts >= 1, got {self.tokens}, {self.contexts}")
        if not self.unique_fractions or any(not 0.0 <= f <= 1.0 for f in self.unique_fractions) or self.repeats < 1:
            raise ValueError(f"ProfileGrid needs unique_fractions in [0, 1] and repeats >= 1, got "
                             f"{self.unique_fractions}, {self.repeats}")
        if max(self.tokens) > MAX_TOKENS:
            raise ValueError(f"ProfileGrid tokens must be <= {MAX_TOKENS} (the most a verification pass holds: "
                             f"{MAX_DRAFT_NODES} draft nodes and the root), got {max(self.tokens)}; pass smaller "
                             f"--tokens")
        passes = len(self.tokens) * len(self.unique_fractions) * len(self.contexts) * (self.repeats + 1)
        if passes > MAX_PASSES:
            raise ValueError(f"ProfileGrid asks for up to {passes} forward passes, above the limit of {MAX_PASSES}; "
                             f"pass fewer --tokens, --unique or --contexts values, or fewer --repeats")

    def check_positions(self, max_positions: int | None) -> None:
        """The longest context plus the most tokens must fit the model's positions (max_position_embeddings;
        None: no limit known): beyond them a model computes garbage or runs out of memory."""
        need = max(self.contexts) + max(self.tokens)
        if max_positions is not None and need > max_positions:
            raise ValueError(f"ProfileGrid context {max(self.contexts)} plus {max(self.tokens)} tokens needs "
                             f"{need} positions, but the model has {max_positions} (max_position_embeddings); pass "
                             f"--contexts of at most {max_positions - max(self.tokens)}")

    def points(self, k: int, e: int) -> list[tuple[int, int, int]]:
        """(T, U, C) triples, each U reachable by T tokens of top-K."""
        out = []
        for c in self.contexts:
            for t in self.tokens:
                us = sorted({min(k + round(f * (e - k)), t * k, e) for f in self.unique_fractions})
                out += [(t, u, c) for u in us]
        return out


@contextmanager
def force_experts(model, unique: int, seed: int = 0):
    """Inside the block, every MoE layer routes the forward's T tokens to exactly min(U, T*K) experts
    (token t takes slots t*K .. t*K+K-1 of a per-layer random pool of U experts, modulo U), weights 1/K."""
    blocks = moe_blocks(model)
    shape = moe_shape(model)
    if not shape.top_k <= unique <= shape.num_experts:
        raise ValueError(f"force_experts needs top_k={shape.top_k} <= unique <= num_experts={shape.num_experts}, "
                         f"got {unique}")
    gen = torch.Generator().manual_seed(seed)
    pools = [torch.randperm(shape.num_experts, generator=gen)[:unique] for _ in blocks]

    def hook_for(pool):
        def hook(module, args, output):
            logits, weights, index = output  # index, weights [T, K]
            t, k = index.shape
            slots = (torch.arange(t * k) % unique).view(t, k)
            return logits, torch.full_like(weights, 1.0 / k), pool[slots].to(index.device, index.dtype)
        return hook

    handles = [b.gate.register_forward_hook(hook_for(p)) for b, p in zip(blocks, pools)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def model_from_config(path: str | Path, layers: int | None = None, device: str = "cpu",
                      dtype: torch.dtype = torch.float32):
    """A randomly initialised model of the config's shape (optionally only the first `layers` layers).

    Returns (model, full number of layers)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    data = read_json(path, f"--config {path}", CONFIG_FIX)
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise UserError(f"--config {path}: no \"model_type\"; {CONFIG_FIX}")
    try:
        cfg = AutoConfig.for_model(data["model_type"], **{k: v for k, v in data.items()
                                                          if not k.startswith("_") and k != "model_type"})
    except (ValueError, TypeError, StrictDataclassError) as e:
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--config {path}: not a usable model config ({cause}); {CONFIG_FIX}") from None
    full = cfg.num_hidden_layers
    if layers is not None:
        if not 1 <= layers <= full:
            raise ValueError(f"--layers must be in [1, {full}] for {path}, got {layers}")
        cfg.num_hidden_layers = layers
        if hasattr(cfg, "layer_types") and cfg.layer_types is not None:
            cfg.layer_types = cfg.layer_types[:layers]
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval(), full


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model, grid: ProfileGrid, seed: int = 0, log=None) -> list[dict]:
    """Verification seconds for every grid point (a forward of T tokens after C cached ones): the fastest
    of `repeats` runs, since on a shared machine interference only ever adds time."""
    grid.check_positions(getattr(model.config, "max_position_embeddings", None))
    shape = moe_shape(model)
    points = grid.points(shape.top_k, shape.num_experts)
    if len(points) < len(VERIFY_FEATURES):  # fail before measuring, not at the fit
        raise ValueError(f"ProfileGrid gives {len(points)} distinct measurements on this model, but the fit needs "
                         f"at least {len(VERIFY_FEATURES)}; pass more --tokens, --unique or --contexts values")
    device = model.device
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for c in grid.contexts:
        cache = kv.new_cache(model)
        model(input_ids=torch.randint(2, vocab, (1, c), generator=gen).to(device), cache=cache,
              use_cache=True)
        for _ in range(3):  # warm up allocator and kernels at this context length
            model(input_ids=torch.randint(2, vocab, (1, max(grid.tokens)), generator=gen).to(device),
                  cache=cache, use_cache=True)
            kv.crop(cache, c)
        for t, u, cc in points:
            if cc != c:
                continue
            ids = torch.randint(2, vocab, (1, t), generator=gen).to(device)
            times = []
            with force_experts(model, u, seed):
                for r in range(grid.repeats + 1):  # the first run warms up
                    _sync(device)
                    t0 = time.perf_counter()
                    model(input_ids=ids, cache=cache, use_cache=True)
                    _sync(device)
                    if r:
                        times.append(time.perf_counter() - t0)
                    kv.crop(cache, c)
            rows.append(dict(tokens=t, unique=u, context=c, seconds=min(times)))
            if log:
                log(f"T={t:3d} U={u:3d} C={c:5d}  {1e3 * rows[-1]['seconds']:8.3f} ms")
    return rows


def fit_profile(rows: list[dict], num_layers: int, full_layers: int | None = None, source: str = "") -> LatencyModel:
    """LatencyModel from measurements; scaled from `num_layers` measured to `full_layers`."""
    fitted = LatencyModel.fit([r["tokens"] for r in rows], [r["unique"] * num_layers for r in rows],
                              [r["context"] for r in rows], [r["seconds"] for r in rows],
                              num_layers=num_layers, source=source)
    if not full_layers or full_layers == num_layers:
        return fitted
    s = full_layers / num_layers
    c0, ct, ce, cc, cct = fitted.verify
    return LatencyModel(verify=(c0 * s, ct * s, ce, cc * s, cct * s), draft=fitted.draft,
                        step_overhead=fitted.step_overhead, num_layers=full_layers,
                        error=dict(fitted.error, scaled_from_layers=num_layers), source=source)


def hardware(device: torch.device) -> dict:
    """What ran the measurements (for the profile and trace headers)."""
    import platform
    info = dict(device=device.type, torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
