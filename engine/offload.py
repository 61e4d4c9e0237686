"""Expert offloading: compute a MoE model's experts through a small fast tier, prefetched from speculation.

    handle = enable_offload(model, capacity=8, slow="auto", prefetch="both")
    generate(model, tok, prompt, ...)          # unchanged: greedy output is plain greedy's, bit for bit
    handle.report().markdown()                 # hits, misses, bytes, stall, prefetch precision/recall
    handle.remove()                            # the model's own experts and forward, restored

How it plugs in: transformers dispatches every experts module's forward through `ExpertsInterface` by
`config._experts_implementation`; "moetune_offload" is registered there, and each offloaded experts
module maps to its MoE layer at enable time. The function asks the store for the experts its tokens are
routed to and computes each with the fetched weights as transformers' grouped_mm does (same per-expert
matmuls, same per-token sum over the top-k in slot order), so logits are bit-identical to the default
(grouped_mm; to float rounding where a model was set to "eager" or "batched_mm").

Memory: at enable the experts are written to the slow tier's file; the model's gate_up_proj/down_proj
then become zero-byte "meta" placeholders of the same shape and dtype (moe_shape still reads them, and
any code that would compute with them fails loudly instead of silently using stale weights); the only
resident expert weights are the fast tier's L x capacity slots. remove() reads the experts back.

Prefetch predictors, both issued in the same forward before the layer computes:
- "pregate": when MoE layer l-1 starts (its post-attention norm runs), layer l's norm and router are
  applied to the residual stream as it stands, and layer l's predicted top-k experts are fetched while
  layer l-1 and layer l's attention compute. Layer 0 is predicted from the stream entering its layer.
- "history": per layer, the experts each token id was last routed to; when a forward starts, the
  experts of its tokens (the draft tree's, or the plain root) are fetched for every layer. A drafted
  token verified last step routes much as it did then.
"both" issues both; "none" loads on demand only.

Shape legend: T tokens in the forward (batch x sequence), K top-k, E experts, L MoE layers, H hidden,
I expert intermediate, C capacity.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections import Counter
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .loader import moe_blocks, moe_shape
from .offload_slow import SLOW_KINDS, SlowTier, write_slow_tier
from .offload_store import EVICTIONS, ExpertStore, LayerStats, LayerTier, OffloadError

IMPLEMENTATION = "moetune_offload"
PREFETCH = ("none", "pregate", "history", "both")
__all__ = ["OffloadConfig", "OffloadError", "OffloadHandle", "OffloadReport", "enable_offload", "handle_of",
           "is_offloaded", "resident_experts"]


@dataclass(frozen=True)
class OffloadConfig:
    """capacity: experts per MoE layer in the fast tier (1..E). slow: SLOW_KINDS (offload_slow.py).
    slow_gbps: pace slow-tier reads to this rate (needed by "paced"). timeout_s: the longest wait for one
    read before OffloadError. workdir: where the slow tier's file goes (a new temporary folder if None).
    prefetch_min_prob: pre-gating prefetches a token's predicted expert only at this router probability or
    more (on the widened embedded model, predictions under 0.1 were right about half the time, those above
    over 90%: when transfers are the bottleneck a wrong prefetch costs a read and evicts a useful expert)."""

    capacity: int
    slow: str = "auto"
    slow_gbps: float | None = None
    prefetch: str = "both"
    eviction: str = "lru"
    timeout_s: float = 30.0
    workdir: str | None = None
    prefetch_min_prob: float = 0.1

    def __post_init__(self):
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < 1:
            raise ValueError(f"capacity must be a whole number of experts per layer, >= 1, got {self.capacity!r}; "
                             f"pass e.g. capacity=8 (a quarter of 32 experts)")
        if self.slow not in SLOW_KINDS:
            raise ValueError(f"slow must be one of {SLOW_KINDS}, got {self.slow!r}")
        if self.slow_gbps is not None and not self.slow_gbps > 0:
            raise ValueError(f"slow_gbps must be a positive rate in GB/s or None, got {self.slow_gbps!r}")
        if self.slow == "paced" and self.slow_gbps is None:
            raise ValueError("slow='paced' is a rate-limited copy and needs slow_gbps (e.g. slow_gbps=4.0)")
        if self.prefetch not in PREFETCH:
            raise ValueError(f"prefetch must be one of {PREFETCH}, got {self.prefetch!r}")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {self.eviction!r}")
        if not 0 <= self.prefetch_min_prob < 1:
            raise ValueError(f"prefetch_min_prob must be in [0, 1) (0: prefetch every predicted top-k expert), got "
                             f"{self.prefetch_min_prob!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {self.timeout_s!r}")

    def check(self, num_experts: int) -> None:
        if self.capacity > num_experts:
            raise ValueError(f"capacity {self.capacity} is above the model's {num_experts} experts per layer; "
                             f"pass capacity in [1, {num_experts}]")


_BOUND: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[OffloadHandle, int]]" = weakref.WeakKeyDictionary()


def is_offloaded(experts: torch.nn.Module) -> bool:
    """Whether this experts module computes through an offload store (its weights are placeholders)."""
    return experts in _BOUND


def handle_of(model) -> "OffloadHandle | None":
    """The handle offloading `model`, or None: how the engine finds the store to report per-step counters."""
    bound = _BOUND.get(moe_blocks(model)[0].experts)
    return None if bound is None else bound[0]


def resident_experts(experts: torch.nn.Module) -> frozenset[int]:
    """The experts this module's layer would not read from the slow tier now: those its fast tier holds or
    has given a slot (a prefetch still in flight). Empty when it is not offloaded. Eviction budgets count
    only the others (engine/eviction.kept_prefix). Slotted rather than arrived, so that the set is
    deterministic: slots are assigned on the main thread (prefetches included) and only a failed read
    frees one (that expert is then read on demand, beyond the budget), so the set follows from the
    forwards, not from when reads land. Replay's CacheModel.contents is this set with prefetch="none"
    (replay models no prefetch)."""
    bound = _BOUND.get(experts)
    if bound is None:
        return frozenset()
    handle, layer = bound
    return frozenset(handle.store.layers[layer].slot_of)


def offloaded_experts(self: torch.nn.Module, hidden_states: torch.Tensor,  # [T, H]
                      top_k_index: torch.Tensor, top_k_weights: torch.Tensor,  # [T, K] x2
                      ) -> torch.Tensor:  # [T, H]
    """transformers' experts function "moetune_offload" (config._experts_implementation)."""
    bound = _BOUND.get(self)
    if bound is None:
        raise RuntimeError(f"{type(self).__name__} is set to experts implementation {IMPLEMENTATION!r} but is not "
                           f"offloaded; call moetune.engine.offload.enable_offload(model, capacity=...)")
    handle, layer = bound
    return handle._compute(layer, self, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, offloaded_experts)


def expert_mixture(store: ExpertStore, layer: int, module: torch.nn.Module, x: torch.Tensor,  # [T, H]
                   top_k_index: torch.Tensor, top_k_weights: torch.Tensor,  # [T, K] x2 (index -1: no expert)
                   ) -> torch.Tensor:  # [T, H]
    """The layer's expert mixture with weights streamed from the store, one expert at a time, computed as
    transformers' grouped_mm computes it (per-expert matmuls, then a sum over the K slots in order)."""
    T, K = top_k_index.shape
    flat = top_k_index.reshape(-1)  # [S], S = T*K
    order = torch.argsort(flat, stable=True)  # [S] slots grouped by expert
    ids, counts = torch.unique_consecutive(flat[order], return_counts=True)
    rows, start = {}, 0
    for e, n in zip(ids.tolist(), counts.tolist()):
        if e >= 0:
            rows[e] = order[start:start + n]  # [n] slots routed to e
        start += n
    dtype = module.gate_up_proj.dtype  # the placeholder keeps the experts' dtype
    xs, w = x.to(dtype), top_k_weights.reshape(-1)  # [T, H], [S]
    ys = torch.zeros(T * K, x.shape[-1], dtype=dtype, device=x.device)  # [S, H]
    for e, gate_up, down in store.stream(layer, list(rows)):  # [2I, H], [H, I]
        slots = rows[e]
        ys[slots] = F.linear(module._apply_gate(F.linear(xs[slots // K], gate_up)), down) * w[slots, None]
    return ys.view(T, K, -1).sum(dim=1).to(x.dtype)


def _ranked(index: torch.Tensor, scores: torch.Tensor) -> list[int]:  # [T, K] or [M] x2
    """Experts in `index`, by their summed score, highest first (any shapes, the same for both)."""
    total = Counter()
    for e, s in zip(index.reshape(-1).tolist(), scores.reshape(-1).tolist()):
        total[e] += s
    return [e for e, _ in total.most_common()]


class _PreGate:
    """"pregate": layer l's router applied to the residual stream as it enters layer l-1's MoE block."""

    def __init__(self, handle: "OffloadHandle", model):
        decoder = model.model.layers
        mlps = [layer.mlp for layer in decoder]
        at = [mlps.index(b) for b in handle.blocks]  # decoder index of each MoE layer
        self.norms = [decoder[d].post_attention_layernorm for d in at]
        points = [decoder[at[0]].input_layernorm] + self.norms[:-1]  # where layer l's prediction starts
        self.handle = handle
        self.hooks = [p.register_forward_pre_hook(self._hook(l)) for l, p in enumerate(points)]

    def _hook(self, layer: int):
        def hook(module, args):
            self.predict(layer, args[0])
        return hook

    def predict(self, layer: int, residual: torch.Tensor) -> None:  # [B, S, H]
        """Hooks bypassed on purpose: the norm's and router's own hooks (routing capture) see real calls only."""
        gate = self.handle.blocks[layer].gate
        x = self.norms[layer].forward(residual).reshape(-1, residual.shape[-1])  # [T, H]
        probs = torch.softmax(F.linear(x, gate.weight).float(), dim=-1)  # [T, E]
        top, index = probs.topk(gate.top_k, dim=-1)  # [T, K] x2
        sure = top >= self.handle.config.prefetch_min_prob  # [T, K]
        self.handle.store.prefetch(layer, _ranked(index[sure], top[sure]))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


class _History:
    """"history": per layer, token id -> the experts it was last routed to; prefetched as a forward starts."""

    def __init__(self, handle: "OffloadHandle", model):
        self.handle = handle
        self.table: list[dict[int, list[int]]] = [{} for _ in handle.blocks]
        self.ids: list[int] | None = None  # this forward's token ids, flattened (T)
        self.hook = model.model.register_forward_pre_hook(self._start, with_kwargs=True)

    def _start(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.ids = None if ids is None else ids.reshape(-1).tolist()
        if self.ids:
            for layer, table in enumerate(self.table):
                rows = [table[t] for t in self.ids if t in table]
                if rows:
                    index = torch.tensor(rows)  # [T', K]
                    self.handle.store.prefetch(layer, _ranked(index, torch.ones(index.shape)))

    def observe(self, layer: int, top_k_index: torch.Tensor) -> None:  # [T, K]
        """Only full top-k routing: a self-drafting forward's top-1 routing is not how verification routes."""
        T, K = top_k_index.shape
        if self.ids is not None and len(self.ids) == T and K == self.handle.blocks[layer].gate.top_k:
            self.table[layer].update(zip(self.ids, top_k_index.tolist()))

    def remove(self) -> None:
        self.hook.remove()


def _check_model(model, blocks: list, prefetch: str) -> None:
    """Refuse what offloading cannot serve exactly, before anything is changed."""
    for layer, block in enumerate(blocks):
        experts = block.experts
        if experts in _BOUND:
            raise ValueError("the model is already offloaded; call its OffloadHandle.remove() before enabling again")
        if experts.gate_up_proj.device.type != "cpu":
            raise ValueError(f"MoE layer {layer}'s experts are on {experts.gate_up_proj.device}; offload keeps its "
                             f"fast tier in CPU memory: load the model with device='cpu'")
        layout = [getattr(experts, a, None) for a in ("has_gate", "has_bias", "is_transposed", "_is_expert_parallel")]
        if layout != [True, False, False, False] or not getattr(experts, "is_concatenated", True):
            raise ValueError(f"MoE layer {layer}: {type(experts).__name__} is not in the fused gate_up [E, 2I, H] / "
                             f"down [E, H, I] layout without bias that offload supports (families: Mixtral, OLMoE, "
                             f"Qwen2-MoE, Qwen3-MoE)")
    norms = ("input_layernorm", "post_attention_layernorm")
    if prefetch in ("pregate", "both") and not all(hasattr(d, n) for d in model.model.layers for n in norms):
        raise ValueError(f"{type(model).__name__}'s decoder layers lack input/post_attention_layernorm, which "
                         f"prefetch='pregate' reads; use prefetch='history' or 'none'")


@dataclass(frozen=True)
class OffloadReport:
    """Per-layer offload counters over some forwards, with what the slow tier is (every report says it)."""

    layers: tuple[LayerStats, ...]
    slow_tier: str
    capacity: int
    num_experts: int
    resident_bytes: int  # the fast tiers' slots, all layers
    expert_bytes: int  # one expert's gate_up + down

    def _combine(self, other: "OffloadReport", op) -> "OffloadReport":
        return OffloadReport(tuple(op(a, b) for a, b in zip(self.layers, other.layers)), self.slow_tier,
                             self.capacity, self.num_experts, self.resident_bytes, self.expert_bytes)

    def __add__(self, other: "OffloadReport") -> "OffloadReport":
        """Counts of two disjoint stretches (e.g. two requests)."""
        return self._combine(other, LayerStats.__add__)

    def __sub__(self, other: "OffloadReport") -> "OffloadReport":
        """Counts between an earlier report and this one (e.g. a request's decode, after its prefill)."""
        return self._combine(other, LayerStats.__sub__)

    @staticmethod
    def _summary(s: LayerStats) -> dict:
        ratio = lambda a, b: round(a / b, 4) if b else None
        return dict(calls=s.calls, needed=s.needed, hits=s.hits, late=s.late, misses=s.misses,
                    hit_rate=ratio(s.hits, s.needed), precision=ratio(s.predicted_needed, s.predicted),
                    recall=ratio(s.predicted_needed, s.needed), predicted=s.predicted,
                    predicted_needed=s.predicted_needed, bytes=s.demand_bytes + s.prefetch_bytes,
                    demand_bytes=s.demand_bytes, prefetch_bytes=s.prefetch_bytes, stall_s=round(s.stall_s, 6),
                    read_s=round(s.read_s, 6), read_gbps=ratio((s.demand_bytes + s.prefetch_bytes) / 1e9, s.read_s),
                    prefetch_failed=s.prefetch_failed, peak_pinned=s.peak_pinned)

    def per_layer(self) -> list[dict]:
        return [self._summary(s) for s in self.layers]

    def total(self) -> dict:
        total = LayerStats(**{f.name: sum(getattr(s, f.name) for s in self.layers) for f in fields(LayerStats)})
        total.peak_pinned = max(s.peak_pinned for s in self.layers)
        return self._summary(total)

    def markdown(self) -> str:
        cols = ("needed", "hits", "late", "misses", "hit_rate", "precision", "recall", "bytes", "stall_s")
        rows = [("all", self.total())] + list(enumerate(self.per_layer()))
        return "\n".join([f"Slow tier: {self.slow_tier} (measured {_gbps(self.total()['read_gbps'])}). Fast tier: "
                          f"{self.capacity} of {self.num_experts} experts per layer "
                          f"({self.resident_bytes / 1e6:.1f} MB resident).", "",
                          "| layer | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
                         + [f"| {l} | " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |"
                            for l, r in rows]) + "\n"


def _gbps(rate: float | None) -> str:
    return "no reads yet" if rate is None else f"{rate:.2f} GB/s per read"


class OffloadHandle:
    """An offloaded model: its store, the experts-function binding and the prefetch hooks (see enable_offload)."""

    def __init__(self, model, config: OffloadConfig):
        self.model, self.config = model, config
        self.blocks = moe_blocks(model)
        shape = moe_shape(model)
        config.check(shape.num_experts)
        _check_model(model, self.blocks, config.prefetch)
        self.workdir = config.workdir or tempfile.mkdtemp(prefix="moetune-offload-")
        fd, self.path = tempfile.mkstemp(suffix=".safetensors", prefix="experts-", dir=self.workdir)
        os.close(fd)
        weights = [(b.experts.gate_up_proj.detach(), b.experts.down_proj.detach()) for b in self.blocks]
        try:
            spans = write_slow_tier(self.path, [gu for gu, _ in weights], [d for _, d in weights])
            tier = SlowTier(self.path, spans, config.slow, config.slow_gbps)
        except OSError:
            self._delete_file()
            raise
        gu, d = weights[0]
        self.store = ExpertStore(tier, [LayerTier(config.capacity, shape.num_experts, gu.shape[1:], d.shape[1:],
                                                  gu.dtype) for _ in self.blocks], config.eviction, config.timeout_s)
        self.expert_bytes = gu[0].nbytes + d[0].nbytes
        del weights, gu, d
        self._requires_grad = [b.experts.gate_up_proj.requires_grad for b in self.blocks]
        for layer, block in enumerate(self.blocks):
            _placeholders(block.experts)
            _BOUND[block.experts] = (self, layer)
        self.previous = model.config._experts_implementation
        model.set_experts_implementation(IMPLEMENTATION)
        self._predictors: list = []
        self.history: _History | None = None
        self.set_prefetch(config.prefetch)
        self.installed = True

    def _compute(self, layer, module, x, top_k_index, top_k_weights):  # [T, H], [T, K] x2 -> [T, H]
        if self.history is not None:
            self.history.observe(layer, top_k_index)
        return expert_mixture(self.store, layer, module, x, top_k_index, top_k_weights)

    def set_prefetch(self, prefetch: str) -> None:
        """Switch prefetch predictors (PREFETCH) from the next forward on."""
        if prefetch not in PREFETCH:
            raise ValueError(f"prefetch must be one of {PREFETCH}, got {prefetch!r}")
        for p in self._predictors:
            p.remove()
        self.history = _History(self, self.model) if prefetch in ("history", "both") else None
        self._predictors = ([_PreGate(self, self.model)] if prefetch in ("pregate", "both") else []) + \
            ([self.history] if self.history else [])
        self.prefetch = prefetch

    def clear(self) -> None:
        """Empty the fast tiers and the routing history (a cold start for the next request), keep the stats."""
        self.store.clear()
        if self.history is not None:
            self.history.table = [{} for _ in self.blocks]

    def report(self) -> OffloadReport:
        return OffloadReport(tuple(self.store.snapshot()), self.store.tier.describe(), self.config.capacity,
                             self.store.layers[0].num_experts, sum(t.nbytes for t in self.store.layers),
                             self.expert_bytes)

    def reset_stats(self) -> None:
        self.store.reset_stats()

    def remove(self) -> None:
        """Read every expert back into the model's own parameters, restore its experts implementation and
        remove the hooks, the reader thread and the slow tier's file (idempotent)."""
        if not self.installed:
            return
        _restore(self.blocks, self.path, self._requires_grad)
        for p in self._predictors:
            p.remove()
        self.model.set_experts_implementation(self.previous)
        for block in self.blocks:
            _BOUND.pop(block.experts, None)
        self.store.close()
        self._delete_file()
        self.installed = False

    def _delete_file(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)
        if self.config.workdir is None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _placeholders(experts: torch.nn.Module) -> None:
    """Zero-byte stand-ins of the expert weights: same shape and dtype on the meta device."""
    for name in ("gate_up_proj", "down_proj"):
        p = getattr(experts, name)
        setattr(experts, name, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                  requires_grad=False))


def _restore(blocks: list, path: str, requires_grad: list[bool]) -> None:
    """The experts read back from the slow tier's file into full parameters (the bytes written at enable)."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        for layer, (block, grad) in enumerate(zip(blocks, requires_grad)):
            E = block.experts.gate_up_proj.shape[0]
            for name, key in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
                full = torch.stack([f.get_tensor(f"layers.{layer}.experts.{e}.{key}") for e in range(E)])
                setattr(block.experts, name, torch.nn.Parameter(full, requires_grad=grad))


def enable_offload(model, capacity: int, slow: str = "auto", slow_gbps: float | None = None, prefetch: str = "both",
                   eviction: str = "lru", timeout_s: float = 30.0, workdir: str | None = None,
                   prefetch_min_prob: float = 0.1) -> OffloadHandle:
    """Offload the experts of a CPU MoE model (see the module docstring and OffloadConfig); returns the handle
    whose report() measures it and whose remove() restores the model."""
    return OffloadHandle(model, OffloadConfig(capacity, slow, slow_gbps, prefetch, eviction, timeout_s, workdir,
                                              prefetch_min_prob))
