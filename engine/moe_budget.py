"""Verification-time expert budgeting over Hugging Face MoE blocks, in one of two modes.

In one verification pass every draft-tree node is routed to its own top-k experts, so a tree touches
many unique experts per layer and the pass becomes bound by reading expert weights. A budget B_l caps
the unique experts layer l computes; only those are computed (tokens grouped per expert, so time falls
with B). What happens to the rest is the mode:
- evict (lossless, eviction.py): tree nodes whose experts do not fit are evicted, with their subtrees;
  every kept node keeps all its experts, so its logits are exact and only acceptance is lost.
- substitute (lossy, MoE-Spec): the B_l best experts are kept and tokens that lost an expert are
  re-routed onto them (selection.py).

Usage (what the engine's verify does):
    plan = BudgetPlan.from_step_config(config, node_weights=w)  # w: [N+1] root first, or None
    with apply_budget(target, plan) as report:
        out = target(...)
    report.unique_experts, report.unique_experts_kept, report.router_mass_kept, report.tokens_substituted

Budgets act only inside `apply_budget`: the engine enters it around the verification forward alone, so
prefill, plain decoding and drafting run HF's blocks unchanged. `install` patches each block instance's
forward (same weights, no copies); with no active plan the patched forward calls the original one, so
outputs are HF's bit for bit. The active plan travels in a ContextVar scoped to the with-block and to
the model it was applied to — never as an attribute on the model.

Supported: Mixtral, OLMoE, Qwen2-MoE (shared expert always computed) and Qwen3-MoE SparseMoeBlocks
(`.gate` TopKRouter, `.experts` with gate_up_proj [E, 2I, H], down_proj [E, H, I], SiLU).

Shapes: T tokens (batch x sequence, flattened), E experts, K top-k, L MoE layers, H hidden, B budget.
"""
from __future__ import annotations

import contextvars
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from moetune.engine import eviction, host, selection
from moetune.engine.kernels import reference
from moetune.engine.loader import moe_blocks, moe_shape
from moetune.engine.offload import is_offloaded, resident_experts
from moetune.step import BUDGET_MODES, SELECTIONS, SUBSTITUTIONS, ModelShape, StepConfig


@dataclass(frozen=True)
class BudgetPlan:
    """How one verification pass budgets experts.

    budgets: one int for every MoE layer, or one per MoE layer (a 1-tuple counts as one for all).
    mode: "evict" (lossless; needs `rank`) or "substitute" (lossy; uses selection and substitution).
    node_weights: [T] (or [N+1], root first, tiled over a batch) acceptance estimates used by
    selection="accept_weighted"; without them accept_weighted equals prob_sum. (Evaluation mode is a
    StepConfig setting the engine's verify acts on, not part of the plan: engine/verify.py.)
    rank: the T rows in the order eviction keeps them (eviction.node_rank), root first, as host ints.
    """

    budgets: int | tuple[int, ...]
    selection: str = "prob_sum"
    substitution: str = "reselect"
    node_weights: torch.Tensor | Sequence[float] | None = field(default=None, compare=False)
    mode: str = "substitute"
    rank: tuple[int, ...] | None = field(default=None, compare=False)

    def __post_init__(self):
        if isinstance(self.budgets, int):
            values = (self.budgets,)
        else:
            object.__setattr__(self, "budgets", tuple(int(b) for b in self.budgets))
            values = self.budgets
        if not values or any(b < 1 for b in values):
            raise ValueError(f"BudgetPlan.budgets must be a positive int or a non-empty tuple of them, got {self.budgets}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"BudgetPlan.selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.substitution not in SUBSTITUTIONS:
            raise ValueError(f"BudgetPlan.substitution must be one of {SUBSTITUTIONS}, got {self.substitution!r}")
        if self.mode not in BUDGET_MODES:
            raise ValueError(f"BudgetPlan.mode must be one of {BUDGET_MODES}, got {self.mode!r}")
        if self.rank is not None:
            if isinstance(self.rank, torch.Tensor):
                raise ValueError("BudgetPlan.rank must be host ints (eviction.node_rank), not a tensor")
            object.__setattr__(self, "rank", tuple(int(r) for r in self.rank))
        if self.mode == "evict" and not self.rank:
            raise ValueError("BudgetPlan(mode='evict') needs rank: the verified rows in keep order, root (row 0) "
                             "first; build it with eviction.node_rank(tree)")
        w = self.node_weights
        if w is not None:
            ndim = w.dim() if isinstance(w, torch.Tensor) else 1
            if ndim != 1 or len(w) == 0:
                raise ValueError("BudgetPlan.node_weights must be a non-empty 1-D sequence (one weight per tree node, "
                                 "root first) or None")

    @classmethod
    def from_step_config(cls, config: StepConfig, node_weights=None, rank=None) -> "BudgetPlan":
        if config.budgets is None:
            raise ValueError("StepConfig.budgets is None (no budget): verify without apply_budget instead")
        return cls(budgets=tuple(config.budgets), selection=config.selection, substitution=config.substitution,
                   node_weights=node_weights, mode=config.budget_mode, rank=rank)

    def validate(self, shape: ModelShape) -> tuple[int, ...]:
        """Per-layer budgets for `shape`; ValueError naming the limit when a budget cannot apply."""
        values = (self.budgets,) if isinstance(self.budgets, int) else self.budgets
        if len(values) == 1:
            values = values * shape.num_layers
        if len(values) != shape.num_layers:
            raise ValueError(f"budgets has {len(values)} entries but the model has {shape.num_layers} MoE layers: "
                             f"give one budget per MoE layer or a single int for all")
        for layer, b in enumerate(values):
            if b < shape.top_k:
                raise ValueError(f"budget {b} for MoE layer {layer} is below top_k={shape.top_k} (every token needs "
                                 f"its top-k experts): use a budget in [{shape.top_k}, {shape.num_experts}]")
            if b > shape.num_experts:
                raise ValueError(f"budget {b} for MoE layer {layer} is above num_experts={shape.num_experts}: "
                                 f"use a budget in [{shape.top_k}, {shape.num_experts}]")
        return tuple(values)


class BudgetReport:
    """Per-layer outcome of one budgeted pass. Tensors are kept until `stage` puts their per-layer table in
    one host copy (engine/host.py), read when a number is asked for.

    If the model runs several times inside one apply_budget block, each layer keeps its last call.
    """

    def __init__(self, num_layers: int):
        self._layers: list[tuple | None] = [None] * num_layers
        self._numbers: dict | None = None
        self._staged: torch.Tensor | None = None  # the table on its way to the host

    def stage(self) -> None:
        """Start the host copy of the per-layer table (call after the pass, before the step's sync)."""
        table = self._table()
        self._staged = None if table is None else host.stage(table)

    def _table(self) -> torch.Tensor | None:
        """[L, 3 + E] per layer: unique experts, mean mass kept, tokens substituted, experts computed (0/1)."""
        rows = [r for r in self._layers if r is not None]
        if not rows:
            return None
        E = rows[0][1].keep.numel()
        return torch.stack([torch.cat([
            selection.hit_mask(top_k_index, E).any(0).sum().float()[None],
            routing.mass_kept.detach().float().mean()[None],
            routing.substituted.sum().float()[None],
            selection.hit_mask(routing.expert_ids, E).any(0).float()]) for top_k_index, routing in rows])

    def _record(self, layer: int, top_k_index: torch.Tensor, routing: selection.BudgetedRouting) -> None:
        self._layers[layer] = (top_k_index.detach(), routing)
        self._numbers = self._staged = None

    def _compute(self) -> dict:
        if self._numbers is None:
            table = self._table() if self._staged is None else self._staged
            cols = {"unique": (), "kept": (), "mass": (), "subst": (), "selected": ()}
            if table is not None:
                values = table.tolist()  # [L, 3 + E]
                used = [tuple(e for e, u in enumerate(v[3:]) if u) for v in values]
                cols = {"unique": tuple(int(v[0]) for v in values), "kept": tuple(len(u) for u in used),
                        "mass": tuple(v[1] for v in values), "subst": tuple(int(v[2]) for v in values),
                        "selected": tuple(used)}
            self._numbers = cols
        return self._numbers

    @property
    def unique_experts(self) -> tuple[int, ...]:
        """Per layer: unique experts the layer's tokens are routed to, before the budget (under eviction,
        the tokens that entered the layer: rows evicted earlier no longer ask for experts)."""
        return self._compute()["unique"]

    @property
    def unique_experts_kept(self) -> tuple[int, ...]:
        """Per layer: unique experts actually computed (<= budget; when evicting offloaded experts only
        those read from the slow tier are bounded)."""
        return self._compute()["kept"]

    @property
    def router_mass_kept(self) -> tuple[float, ...]:
        """Per layer: mean over tokens of the fraction of top-k router probability that stayed."""
        return self._compute()["mass"]

    @property
    def tokens_substituted(self) -> tuple[int, ...]:
        """Per layer: tokens that lost at least one of their top-k experts."""
        return self._compute()["subst"]

    @property
    def computed_experts(self) -> tuple[tuple[int, ...], ...]:
        """Per layer: the expert ids actually computed, ascending."""
        return self._compute()["selected"]


class EvictionReport(BudgetReport):
    """Per-layer outcome of one pass under an eviction budget: how many rows (a prefix of the ranking) each
    layer kept. Every kept row keeps all its experts, so router mass kept is 1 and no token is substituted."""

    def __init__(self, num_layers: int, num_experts: int, position: torch.Tensor, rank: list[int]):  # position [T]
        super().__init__(num_layers)
        self.num_experts = num_experts
        self.position = position  # each row's place in the ranking (eviction.rank_positions)
        self.rank = rank  # the ranking itself (rows in keep order)
        self.kept_rows: list[torch.Tensor | int | None] = [None] * num_layers  # rows kept ([] or an int)

    @property
    def survivors(self) -> torch.Tensor | None:
        """[T] bool rows kept at every layer (None: all): the only rows whose logits acceptance may use."""
        count = self.kept_rows[-1]
        if isinstance(count, int) and count == self.position.numel():
            return None
        return self.position < count

    def _record_eviction(self, layer: int, top_k_index: torch.Tensor, count) -> None:
        self._layers[layer] = top_k_index.detach()
        self.kept_rows[layer] = count
        self._numbers = self._staged = None

    def _host_path(self) -> bool:
        """Every layer's kept rows are host ints (the CPU search): a few sets count the report from the
        routing itself, which is what gets staged."""
        return all(isinstance(c, int) for c in self.kept_rows)

    def _table(self) -> torch.Tensor:
        """The host path: [L, T, K] routing. Otherwise [L, 1 + E] per layer: demand (experts of the rows
        entering it), experts computed (0/1)."""
        index = torch.stack(self._layers)  # [L, T, K]
        if self._host_path():
            return index
        L, T, _ = index.shape
        counts = torch.stack([torch.as_tensor(c, device=index.device) for c in self.kept_rows])  # [L]
        kept = self.position[None, :] < counts[:, None]  # [L, T]
        entered = torch.cat([torch.ones_like(kept[:1]), kept[:-1]])  # [L, T]
        hits = torch.zeros(L, T, self.num_experts, dtype=torch.bool, device=index.device).scatter_(2, index, True)
        demand = (hits & entered[..., None]).any(1).sum(1)  # [L]
        used = (hits & kept[..., None]).any(1)  # [L, E]
        return torch.cat([demand[:, None], used.long()], dim=1)

    def _compute(self) -> dict:
        if self._numbers is None:
            values = (self._table() if self._staged is None else self._staged).tolist()
            if self._host_path():
                self._numbers = self._count_on_host(values)
            else:  # [L, 1 + E]
                sets = [tuple(e for e, u in enumerate(v[1:]) if u) for v in values]
                L = len(values)
                self._numbers = {"unique": tuple(v[0] for v in values), "kept": tuple(len(u) for u in sets),
                                 "mass": (1.0,) * L, "subst": (0,) * L, "selected": tuple(sets)}
        return self._numbers

    def _count_on_host(self, index: list) -> dict:  # index [L][T][K]
        demand, kept = eviction.prefix_experts(index, self.rank, self.kept_rows)
        L = len(index)
        return {"unique": tuple(len(d) for d in demand), "kept": tuple(len(k) for k in kept), "mass": (1.0,) * L,
                "subst": (0,) * L, "selected": tuple(tuple(sorted(k)) for k in kept)}


@dataclass(frozen=True)
class _Active:
    handle: "BudgetHandle"
    plan: BudgetPlan
    budgets: tuple[int, ...]
    report: BudgetReport
    rank: torch.Tensor | None = None  # evict mode: [T] plan.rank on the model's device
    position: torch.Tensor | None = None  # evict mode: [T] each row's position in plan.rank


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("moetune_budget", default=None)
_HANDLES: "weakref.WeakKeyDictionary[torch.nn.Module, BudgetHandle]" = weakref.WeakKeyDictionary()


def _expert_fn(device: torch.device) -> Callable:
    """Triton kernel on CUDA (when triton imports), the PyTorch reference elsewhere."""
    if device.type == "cuda":
        try:
            from moetune.engine.kernels.budgeted_moe import budgeted_moe
        except ImportError:
            return reference.budgeted_moe_reference
        return budgeted_moe
    return reference.budgeted_moe_reference


def _node_weights(plan: BudgetPlan, T: int, device: torch.device) -> torch.Tensor | None:
    """plan.node_weights as [T] on `device`, tiled when T is a whole number of trees (a batch)."""
    w = plan.node_weights
    if w is None or plan.selection != "accept_weighted":
        return None
    w = torch.as_tensor(w, dtype=torch.float32, device=device)
    if T % w.numel():
        raise ValueError(f"node_weights has {w.numel()} entries but the pass verifies {T} tokens: give one weight "
                         f"per verified token (root first)")
    return w.repeat(T // w.numel())


def _substitute(block: torch.nn.Module, layer: int, active: _Active, x: torch.Tensor,  # [T, H]
                router_logits: torch.Tensor,  # [T, E]
                top_k_weights: torch.Tensor, top_k_index: torch.Tensor,  # [T, K] x2
                ) -> selection.BudgetedRouting:
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    plan = active.plan
    scores = selection.selection_scores(probs, top_k_index, plan.selection,
                                        _node_weights(plan, x.shape[0], x.device))
    w = plan.node_weights
    roots = selection.root_rows(x.shape[0], None if w is None else len(w), x.device)  # [T] one root per tree
    return selection.substitute(probs, top_k_index, top_k_weights, scores, active.budgets[layer],
                                plan.substitution, getattr(block.gate, "norm_topk_prob", True), roots=roots)


def _gathers_kept_rows(device: torch.device) -> bool:
    """On CPU a host sync is free and computing only the kept rows saves work; elsewhere shapes stay static."""
    return device.type == "cpu"


def _evicted_forward(block: torch.nn.Module, layer: int, active: _Active, x: torch.Tensor,  # [T, H]
                     top_k_weights: torch.Tensor, top_k_index: torch.Tensor,  # [T, K] x2
                     num_experts: int) -> torch.Tensor:  # [T, H]
    """The layer's experts for the rows it keeps, through HF's own experts implementation (what an
    unbudgeted pass runs); evicted rows get 0. On CPU the prefix is searched on the host (a few dozen
    set operations cost less than ten small tensor ops) and the kept rows are gathered; on an accelerator
    the search is tensor ops (eviction.evict) and evicted rows point at the root's first expert, which is
    computed anyway, with weight 0: no other expert's weights are read and shapes stay static (no host
    sync). A budget that cannot bind (>= the experts T tokens could touch) costs nothing. Offloaded
    experts (CPU only, so only the host search meets them) count only the reads: the layer's resident
    experts are free against the budget (eviction.kept_prefix)."""
    plan, report, budget = active.plan, active.report, active.budgets[layer]
    T = top_k_index.shape[0]
    if len(plan.rank) != T:
        raise ValueError(f"eviction ranks {len(plan.rank)} rows but the pass verifies {T} tokens: "
                         f"evict budgets apply to one tree per forward")
    previous = report.kept_rows[layer - 1] if layer else T  # layer 0 starts each forward afresh
    if isinstance(previous, int) and previous == T and budget >= min(num_experts, T * top_k_index.shape[1]):
        report._record_eviction(layer, top_k_index, T)
        return block.experts(x, top_k_index, top_k_weights)
    if _gathers_kept_rows(x.device):
        kept = eviction.kept_prefix(top_k_index.tolist(), plan.rank, budget, previous,
                                    resident_experts(block.experts))
        report._record_eviction(layer, top_k_index, kept)
        if kept == T:  # everything fits: HF's own call
            return block.experts(x, top_k_index, top_k_weights)
        rows = active.rank[:kept]  # [T'] the kept rows: a prefix of the ranking
        out = torch.zeros_like(x)
        return out.index_copy_(0, rows, block.experts(x[rows], top_k_index[rows], top_k_weights[rows]))
    alive, count = eviction.evict(top_k_index, num_experts, active.rank, active.position, budget, previous)
    report._record_eviction(layer, top_k_index, count)
    keep = alive[:, None]  # [T, 1]
    return block.experts(x, torch.where(keep, top_k_index, top_k_index[0, 0]), top_k_weights * keep)


def _budgeted_forward(block: torch.nn.Module, layer: int, active: _Active,
                      hidden_states: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
    x = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
    router_logits, top_k_weights, top_k_index = block.gate(x)  # [T, E], [T, K], [T, K]; hooks fire
    if active.plan.mode == "evict":
        out = _evicted_forward(block, layer, active, x, top_k_weights, top_k_index, router_logits.shape[-1])
    else:
        routing = _substitute(block, layer, active, x, router_logits, top_k_weights, top_k_index)
        experts = block.experts
        if is_offloaded(experts):  # its weights live in an offload store: its own function streams them
            ids = routing.expert_ids
            out = experts(x, torch.where(torch.isin(ids, routing.selected), ids, -1), routing.weights)
        else:
            out = _expert_fn(x.device)(x, routing.expert_ids, routing.weights, experts.gate_up_proj,
                                       experts.down_proj, routing.selected)  # [T, H]
        active.report._record(layer, top_k_index, routing)
    if hasattr(block, "shared_expert"):
        out = out + F.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    return out.reshape(hidden_states.shape)


def _is_silu(act_fn: Callable) -> bool:
    x = torch.linspace(-4, 4, 9)
    return torch.allclose(act_fn(x), F.silu(x))


class BudgetHandle:
    """Budget-aware forwards installed on one model's MoE blocks; `remove()` restores the originals."""

    def __init__(self, model: torch.nn.Module):
        self.shape = moe_shape(model)
        self._blocks = moe_blocks(model)
        for layer, block in enumerate(self._blocks):
            if not _is_silu(block.experts.act_fn):
                raise ValueError(f"MoE layer {layer} uses {block.experts.act_fn!r}; the budgeted expert kernel "
                                 f"supports SwiGLU (silu) experts only")
        self._saved = [block.__dict__.get("forward") for block in self._blocks]
        for layer, block in enumerate(self._blocks):
            block.forward = self._wrap(block, layer, block.forward)
        self.installed = True

    def _wrap(self, block: torch.nn.Module, layer: int, original: Callable) -> Callable:
        handle = self

        def forward(hidden_states, *args, **kwargs):
            active = _ACTIVE.get()
            if active is None or active.handle is not handle:
                return original(hidden_states, *args, **kwargs)
            return _budgeted_forward(block, layer, active, hidden_states)

        return forward

    def remove(self) -> None:
        """Restore every block's original forward (idempotent)."""
        if not self.installed:
            return
        for block, saved in zip(self._blocks, self._saved):
            if saved is None:
                del block.__dict__["forward"]
            else:
                block.forward = saved
        self.installed = False
        for model, handle in list(_HANDLES.items()):
            if handle is self:
                del _HANDLES[model]


def install(model: torch.nn.Module) -> BudgetHandle:
    """Install budget-aware forwards over the model's MoE blocks (once; later calls return the same handle)."""
    handle = _HANDLES.get(model)
    if handle is None or not handle.installed:
        handle = BudgetHandle(model)
        _HANDLES[model] = handle
    return handle


@contextmanager
def apply_budget(model: torch.nn.Module, plan: BudgetPlan):
    """Budget the model's MoE layers for the duration of the with-block; yields the BudgetReport."""
    handle = install(model)
    budgets = plan.validate(handle.shape)
    rank = position = None
    if plan.mode == "evict":
        rank = torch.tensor(plan.rank, dtype=torch.long, device=model.device)
        position = eviction.rank_positions(rank)
        report = EvictionReport(len(budgets), handle.shape.num_experts, position, list(plan.rank))
    else:
        report = BudgetReport(len(budgets))
    token = _ACTIVE.set(_Active(handle=handle, plan=plan, budgets=budgets, report=report, rank=rank,
                                position=position))
    try:
        yield report
    finally:
        _ACTIVE.reset(token)


def argmax_agreement(budgeted_logits: torch.Tensor,  # [..., V]
                     reference_logits: torch.Tensor,  # [..., V]
                     ) -> torch.Tensor:  # []
    """Fraction of positions whose argmax token is the same under the budget as without it (on the
    logits' device: the step reads it after its one sync, engine/host.py)."""
    return (budgeted_logits.argmax(-1) == reference_logits.argmax(-1)).float().mean()
