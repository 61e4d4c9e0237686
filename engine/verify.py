"""Verify a draft tree: one target forward over [root, nodes] after the KV cache.

A chain (or plain decoding) attends causally, so it takes HF's own causal path: no mask and no position
ids, exactly what HF's decoders run. A branching tree passes its 4D mask and position ids as forward
arguments (transformers 5.x returns a 4D mask as-is). The routers are observed through scoped hooks only
when the caller needs routing (a policy that learns from it, a trace writer, a budget), and an expert
budget, when the step asks for one, is applied by moetune.engine.moe_budget inside the same scoped
forward. In evaluation mode (StepConfig.eval_agreement on a budgeted step) the same tree is first
verified unbudgeted, the cache is cropped back, and the argmax agreement of the two passes is reported;
the budgeted pass then sees exactly the cache it would have seen. Under an eviction budget
(budget_mode="evict") the verification also says which rows survived (`alive`): acceptance may use only
those, and their logits are exact. What the step reports besides its logits (unique experts per layer, a
budget's report, rows kept, agreement) is staged for the host right after the forward (engine/host.py),
so the step's one sync is acceptance's transfer.

Shape legend: N drafted nodes, C cached tokens, V vocabulary, L MoE layers.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from moetune.step import StepConfig

from . import eviction
from .host import stage
from .kv import cache_len, crop
from .routing import Routing, capture_routing
from .tree import DraftTree, attention_mask, is_chain, path_weights, position_ids


@dataclass
class Verification:
    logits: torch.Tensor  # [N+1, V] target logits at the root and every node
    routing: Routing | None  # unbudgeted routing of the N+1 verified tokens (None: not captured)
    past_len: int  # C, cache length before verification
    alive: torch.Tensor | None = None  # [N+1] bool, evict mode: rows that survived every layer (None: all)
    # staged for the host (engine/host.py): read them after acceptance's transfer
    budget_report: object | None = None  # moe_budget's report when the step was budgeted
    agreement: torch.Tensor | None = None  # [] eval mode: argmax agreement with the unbudgeted pass, N+1 rows
    rows_kept: torch.Tensor | int | None = None  # [] evict mode: how many rows survived (None: no eviction)
    unique_experts: torch.Tensor | None = None  # [L] distinct experts per layer (None: routing not captured)


def _budget(model, tree: DraftTree, config: StepConfig, rank: tuple[int, ...] | None):  # rank: N+1 rows or None
    """The budget context for this step (a no-op context without budgets)."""
    if config.budgets is None:
        return nullcontext()
    from . import moe_budget  # lazily: unbudgeted decoding never needs it
    if config.budget_mode == "evict":
        plan = moe_budget.BudgetPlan.from_step_config(config, rank=rank)
    else:
        plan = moe_budget.BudgetPlan.from_step_config(config, node_weights=path_weights(tree))
    return moe_budget.apply_budget(model, plan)


def forward_args(model, cache, root: int, tree: DraftTree) -> dict:
    """The target forward's arguments: causal for a chain, the tree's mask and positions otherwise."""
    device = model.device
    root_t = torch.tensor([root], dtype=torch.long, device=device)
    input_ids = (torch.cat([root_t, tree.tokens.to(device)]) if len(tree) else root_t)[None]  # [1, N+1]
    args = dict(input_ids=input_ids, cache=cache, use_cache=True)
    if not is_chain(tree.parents):
        past = cache_len(cache)
        args["attention_mask"] = attention_mask(tree.parents, past, model.dtype, device)  # [1, 1, N+1, C+N+1]
        args["position_ids"] = position_ids(tree.parents, past, device)  # [1, N+1]
    return args


@torch.no_grad()
def verify(model, cache, root: int, tree: DraftTree, config: StepConfig, routing: bool = True) -> Verification:
    """Run the target on the tree; the cache grows by N+1 entries (see kv.commit to keep the accepted ones).

    routing=False skips routing capture (a budgeted step still reports its own per-layer counts)."""
    past = cache_len(cache)
    args = forward_args(model, cache, root, tree)
    unbudgeted = None
    if config.budgets is not None and config.eval_agreement:
        unbudgeted = model(**args).logits[0]  # [N+1, V]
        crop(cache, past)
    capture = capture_routing(model) if routing else nullcontext()
    rank = eviction.node_rank(tree) if config.budgets is not None and config.budget_mode == "evict" else None
    with capture as captured, _budget(model, tree, config, rank) as report:
        out = model(**args)
    alive, kept = (None, None) if rank is None else (report.survivors, report.kept_rows[-1])
    agreement = None
    if unbudgeted is not None:  # over the rows acceptance may use (under eviction, the survivors)
        from .moe_budget import argmax_agreement
        rows = slice(None) if alive is None else alive
        agreement = stage(argmax_agreement(out.logits[0][rows], unbudgeted[rows]))
    if report is not None:
        report.stage()
    unique = stage(captured.unique_experts()) if routing and captured.layers else None
    return Verification(out.logits[0], captured, past, alive, report, agreement,
                        stage(kept) if isinstance(kept, torch.Tensor) else kept, unique)
