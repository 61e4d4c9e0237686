"""Eviction budgets in a packed batch: each request's budget evicts its own drafted rows, in one forward.

Why per request: each request's policy decides its own budget and pays for it with its own acceptance,
so the rule is the single-request one (engine/eviction.py) applied to each request's rows: rank them by
path probability (root first, always kept), and at each layer keep the longest prefix of the ranking
whose expert union fits the request's budget, never longer than at the layer before. The forward then
loads the union of what the requests kept, which is what traces/batch.py replays. Requests without a
budget keep every row. Lossless as alone: every kept row's logits are exact. Under offload the experts
the layer's fast tier holds are free against each budget, as alone (eviction.kept_prefix).

How it plugs in: through transformers' experts-implementation hook, so the router and the rest of the
block run as HF wrote them. For the forward the model's experts implementation is "moetune_evict_rows":
it searches each request's prefix on the host (the batch engine syncs every step anyway), and runs the
implementation that was set before (HF's own, or an offload store's) on the kept rows only; evicted rows
get 0. With every row kept it is that implementation's own call.

Example: a request's rows ranked r0 {1,2}, r1 {2,3}, r2 {4,5} (top-2) under budget 3 keep r0 and r1 at
that layer; another request's rows beside them, with no budget, keep all theirs.

Shape legend: T rows of the packed forward (all requests), K top-k, H hidden, L MoE layers.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moetune.step import ModelShape

from .eviction import kept_prefix, prefix_experts
from .loader import moe_blocks
from .offload import resident_experts

IMPLEMENTATION = "moetune_evict_rows"


@dataclass(frozen=True)
class Group:
    """One request's rows in the forward: in keep order (eviction.node_rank shifted to its first row, root
    first) and its per-layer budgets (None: never evicted)."""

    rank: tuple[int, ...]
    budgets: tuple[int, ...] | None

    @classmethod
    def of(cls, rank: list[int], budgets: tuple[int, ...] | None, shape: ModelShape) -> "Group":
        """A group with its budgets checked against the model and spread over its MoE layers."""
        if budgets is None:
            return cls(tuple(rank), None)
        if len(budgets) not in (1, shape.num_layers):
            raise ValueError(f"budgets has {len(budgets)} entries but the model has {shape.num_layers} MoE layers: "
                             f"give one budget per MoE layer or a single one for all")
        shape.check_budgets(budgets, "eviction budget")
        return cls(tuple(rank), tuple(budgets) * (shape.num_layers // len(budgets)))


class RowReport:
    """What each layer kept, per request: counts of each group's ranking, and each layer's routing."""

    def __init__(self, groups: list[Group], num_layers: int):
        self.groups = groups
        self.kept: list[list[int]] = [[len(g.rank) for g in groups] for _ in range(num_layers)]  # [L][groups]
        self.routing: list[list[list[int]] | None] = [None] * num_layers  # [L][T][K]

    def survivors(self, group: int) -> list[int] | None:
        """The group's rows kept at every layer (None: all of them)."""
        rank, count = self.groups[group].rank, self.kept[-1][group]
        return None if count == len(rank) else list(rank[:count])

    def loads(self, group: int) -> tuple[list[set[int]], list[set[int]]]:
        """Per layer, the group's experts of the rows that entered the layer and of the rows it kept (as
        EvictionReport's unique_experts / unique_experts_kept count them)."""
        counts = [layer[group] for layer in self.kept]
        return prefix_experts(self.routing, list(self.groups[group].rank), counts)


@dataclass(frozen=True)
class _Active:
    layers: dict  # experts module -> its MoE layer index
    previous: str  # the experts implementation the kept rows run through
    report: RowReport


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("moetune_evict_rows", default=None)


def evicted_rows_experts(self: torch.nn.Module, hidden_states: torch.Tensor,  # [T, H]
                         top_k_index: torch.Tensor, top_k_weights: torch.Tensor,  # [T, K] x2
                         ) -> torch.Tensor:  # [T, H]
    """transformers' experts function "moetune_evict_rows": the previous implementation on the kept rows."""
    active = _ACTIVE.get()
    if active is None or self not in active.layers:
        raise RuntimeError(f"experts implementation {IMPLEMENTATION!r} runs only inside "
                           "moetune.engine.batch_eviction.evict_rows(model, groups)")
    layer, report = active.layers[self], active.report
    run = ALL_EXPERTS_FUNCTIONS.get_interface(active.previous, type(self).forward.__wrapped__)
    routing = top_k_index.tolist()
    report.routing[layer] = routing
    previous = report.kept[layer - 1] if layer else [len(g.rank) for g in report.groups]
    free = resident_experts(self)  # before the layer's own reads
    counts = [prev if g.budgets is None else kept_prefix(routing, list(g.rank), g.budgets[layer], prev, free)
              for g, prev in zip(report.groups, previous)]
    report.kept[layer] = counts
    if all(c == len(g.rank) for c, g in zip(counts, report.groups)):
        return run(self, hidden_states, top_k_index, top_k_weights)
    rows = torch.tensor(sorted(r for g, c in zip(report.groups, counts) for r in g.rank[:c]),
                        device=hidden_states.device)  # [T'] kept rows
    out = torch.zeros_like(hidden_states)
    return out.index_copy_(0, rows, run(self, hidden_states[rows], top_k_index[rows], top_k_weights[rows]))


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, evicted_rows_experts)


@contextmanager
def evict_rows(model, groups: list[Group]):
    """Evict each group's rows by its budgets in the model's forwards inside the with-block; yields the
    RowReport. Groups must cover every row of the forward (a row in no group would be dropped)."""
    blocks = moe_blocks(model)
    previous = model.config._experts_implementation
    report = RowReport(groups, len(blocks))
    token = _ACTIVE.set(_Active({b.experts: i for i, b in enumerate(blocks)}, previous, report))
    model.set_experts_implementation(IMPLEMENTATION)
    try:
        yield report
    finally:
        model.set_experts_implementation(previous)
        _ACTIVE.reset(token)
