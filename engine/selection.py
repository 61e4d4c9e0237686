"""Which experts a budgeted MoE layer keeps, and how tokens that lost an expert are re-routed.

Why separate from the layer: the same scores and substitutions are used by the live budgeted forward
and can be replayed on recorded routing. Everything here is pure tensor math on one layer's routing.

Shapes: T tokens (tree nodes, root first), E experts, K top-k, B budget (experts kept).

Selection scores (higher = kept first):
- prob_sum: summed router probability over the T tokens (MoE-Spec, arXiv 2602.16052).
- hit_count: how many tokens have the expert in their top-k (ties broken by prob_sum).
- accept_weighted: router probability summed with each node weighted by the draft's estimate that the
  node lies on the accepted path (root weight 1). Without node weights it equals prob_sum.
Only experts in some token's top-k are eligible, so a budget never adds an expert no token asked for
and a budget >= the unique experts hit is lossless.

Root protection (every method): the experts in a root row's top-k are kept before any other, inside the
budget B (B >= K, so one root always fits). Why: the root's output token is emitted every step and every
node attends to it, yet it is one row of T, so a score summed over rows would drop one of its experts in
most steps (measured: 96% of steps at B=12 of ~18 touched). Causal attention lets the root see only the
cache and itself, so with its experts kept in every layer its logits are the unbudgeted ones given the
cache (up to the expert kernel's rounding), and so is the token it emits. A pass that tiles several
trees has one root per tree (root_rows); if their experts together exceed B, the best-scoring are kept.

Substitution for a token that lost some of its top-k experts:
- renormalize: keep its surviving top-k slots, rescaled so their weights sum to what all K summed.
  A token that lost all K experts falls back to reselect (an empty mixture would zero its MLP output).
- reselect: take the token's top-k by router probability among the kept experts; weights are those
  probabilities, renormalised to sum 1 when the router normalises its top-k (norm_topk_prob).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moetune.step import SELECTIONS, SUBSTITUTIONS


@dataclass(frozen=True)
class BudgetedRouting:
    """One layer's budgeted routing: what the expert kernel computes, plus the numbers to report."""

    expert_ids: torch.Tensor  # [T, K] int64, -1 = slot dropped
    weights: torch.Tensor  # [T, K] routing weights (0 on dropped slots)
    selected: torch.Tensor  # [min(B, E)] expert ids allowed to compute (root experts first, then top scores)
    keep: torch.Tensor  # [E] bool, experts kept (selected and hit by some token)
    mass_kept: torch.Tensor  # [T] fraction of each token's original top-k probability that stayed
    substituted: torch.Tensor  # [T] bool, token lost at least one of its top-k experts


def hit_mask(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """top_k_index [T, K] (-1 = no expert) -> [T, E] bool, True where the expert is in the token's top-k."""
    index = top_k_index.long()
    hits = torch.zeros(index.shape[0], num_experts + 1, dtype=torch.bool, device=index.device)
    return hits.scatter_(1, torch.where(index >= 0, index, num_experts), True)[:, :num_experts]


def root_rows(num_rows: int, tree_size: int | None = None,
              device: torch.device | str | None = None) -> torch.Tensor:  # [T] bool
    """Root rows of a pass over T // tree_size trees back to back, each root first (None: one tree, row 0)."""
    size = num_rows if tree_size is None else tree_size
    if size < 1 or num_rows % size:
        raise ValueError(f"a pass of {num_rows} rows is not a whole number of trees of {size} rows: give "
                         f"tree_size = rows per tree (root + drafted nodes)")
    return torch.arange(num_rows, device=device) % size == 0


def selection_scores(probs: torch.Tensor,  # [T, E] full router softmax (fp32)
                     top_k_index: torch.Tensor,  # [T, K]
                     method: str,
                     node_weights: torch.Tensor | None = None,  # [T] or None
                     ) -> torch.Tensor:  # [E]
    """Per-expert score for one layer; -inf for experts no token routed to."""
    if method not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {method!r}")
    hits = hit_mask(top_k_index, probs.shape[1])  # [T, E]
    prob_sum = probs.sum(0)  # [E]
    if method == "prob_sum":
        scores = prob_sum
    elif method == "hit_count":
        scores = hits.sum(0).to(probs.dtype) + prob_sum / (probs.shape[0] + 1)
    elif node_weights is None:
        scores = prob_sum
    else:
        scores = (node_weights.to(probs.device, probs.dtype)[:, None] * probs).sum(0)
    return scores.masked_fill(~hits.any(0), float("-inf"))


def substitute(probs: torch.Tensor,  # [T, E] full router softmax (fp32)
               top_k_index: torch.Tensor,  # [T, K]
               top_k_weights: torch.Tensor,  # [T, K] the router's weights
               scores: torch.Tensor,  # [E] from selection_scores
               budget: int,
               method: str,
               normalized: bool,  # the router renormalises its top-k (norm_topk_prob)
               roots: torch.Tensor | None = None,  # [T] bool, rows whose top-k is kept first; None: row 0
               ) -> BudgetedRouting:
    """Keep the root rows' experts, then the best-scoring others up to `budget`; re-route every token onto them."""
    if method not in SUBSTITUTIONS:
        raise ValueError(f"substitution must be one of {SUBSTITUTIONS}, got {method!r}")
    T, E = probs.shape
    K = top_k_index.shape[1]
    if roots is None:
        roots = root_rows(T, device=probs.device)
    elif roots.shape != (T,) or roots.dtype != torch.bool:
        raise ValueError(f"roots must be a [T={T}] bool tensor marking the root rows (see root_rows), got "
                         f"{roots.dtype} of shape {tuple(roots.shape)}")
    index = top_k_index.long()
    protected = (hit_mask(index, E) & roots[:, None]).any(0)  # [E]
    selected = _ranked(scores, protected)[:min(budget, E)]  # [B]
    keep = torch.zeros(E, dtype=torch.bool, device=probs.device)
    keep[selected] = True
    keep &= torch.isfinite(scores)
    slot_kept = keep[index]  # [T, K]
    orig_mass = probs.gather(1, index)  # [T, K]
    mass_kept = (orig_mass * slot_kept).sum(1) / orig_mass.sum(1).clamp_min(1e-30)  # [T]
    substituted = ~slot_kept.all(1)  # [T]

    masked = probs.masked_fill(~keep, -1.0)  # [T, E]; -1 ranks below every real probability
    re_prob, re_index = torch.topk(masked, K, dim=1)  # [T, K]
    re_weights = re_prob / re_prob.sum(1, keepdim=True) if normalized else re_prob
    if method == "reselect":
        ids, weights = re_index, re_weights
    else:
        total = top_k_weights.float().sum(1, keepdim=True)  # [T, 1]
        kept_w = top_k_weights.float() * slot_kept
        kept_w = kept_w * (total / kept_w.sum(1, keepdim=True).clamp_min(1e-30))
        ids = torch.where(slot_kept, index, -1)
        lost_all = ~slot_kept.any(1, keepdim=True)  # [T, 1]
        ids = torch.where(lost_all, re_index, ids)
        weights = torch.where(lost_all, re_weights, kept_w)
    return BudgetedRouting(expert_ids=ids, weights=weights.to(top_k_weights.dtype), selected=selected, keep=keep,
                           mass_kept=mass_kept, substituted=substituted)


def _ranked(scores: torch.Tensor,  # [E]
            protected: torch.Tensor,  # [E] bool
            ) -> torch.Tensor:  # [E] expert ids
    """Protected experts first, each group by descending score (two stable sorts: no host sync)."""
    order = torch.argsort(scores, descending=True, stable=True)  # [E]
    return order[torch.argsort(protected[order].to(torch.uint8), descending=True, stable=True)]
