"""Counterfactual outcome of one step: what a StepConfig would have verified, accepted and cost at a
recorded position, derived from the recorded largest tree without running any model.

How a config selects a subtree of the recorded tree (the rule of the engine's drafters):
- dynamic trees (EAGLE-2, engine/drafters/draft_model.py): the root's `topk` most probable children;
  then per level, the `topk` most probable children of each frontier node, the new frontier being the
  `topk` created nodes of highest cumulative draft probability; to `depth` levels; finally, with
  `num_draft_tokens`, the best that many created nodes by cumulative probability (ties: lower node id,
  i.e. creation order). A chain is topk=1. The recording keeps every node its (larger) growth created,
  plus the chain and topk=2 growths (record.union), so a smaller config's tree is found inside it, except
  where its frontier holds a node recorded with fewer than `topk` children (a model drafter always has
  more): then `exact` is False and the missing children are absent.
- a static `tree` (parent array): node j is the r-th child (in order of appearance) of its parent, and maps
  to the recorded child of the mapped parent with draft-probability rank r.
The set is closed under ancestors, so its accepted length is the count of selected nodes on the recorded
accepted path. `exact` is also False when the config is deeper or wider than the recording, or is an
n-gram trie of several continuations (approximated by the rule above); missing nodes can only
under-state acceptance.

Eviction budgets (budget_mode="evict", engine/eviction.py) follow exactly from the recorded routing and
draft probabilities: nodes are ranked by cumulative draft probability (ties: depth, then node id), each
layer keeps the longest ranked prefix whose routed experts fit its budget (and the previous layer's),
and the accepted length is the number of surviving nodes on the recorded accepted path. Under offload
(`free`: the experts each layer's fast tier holds as it decides, traces/offload.CacheModel.contents) those
experts do not count against the budget, as live (engine/eviction.kept_prefix).

Substitution budgets: per layer, the root's routed experts are kept first (root protection), then experts
routed by a selected node are ranked as engine/selection.py
ranks them (reimplemented in numpy; replay imports no torch): prob_sum: router probability summed over
those tokens; hit_count: routed-token count + prob_sum / (tokens + 1) (so ties in the count go to the
larger probability); accept_weighted: router probability weighted by the node's cumulative draft
probability (root 1). Only routed experts are eligible and the best B_l are kept; exactly equal scores go
to the lower expert id (torch.topk does not promise an order there; real-valued sums make this rare).
The sums use the M recorded router entries per token, so the ranking is the engine's only when M = E
(`record --router-top E`); with M < E it approximates it from each token's top-M probabilities.
Unique experts kept, routing mass kept and substituted tokens then follow from the recorded routing
- which is the routing the engine sees only up to the first layer that drops an expert: later layers
route budgeted hidden states. `budget_layers_exact` says how many leading layers are exact (M = E:
through the first dropping layer; M < E: those before the first binding budget). A node whose routed
experts (and its ancestors') all survive is taken to compute the unbudgeted result; an affected node's
budgeted argmax is looked up in the recorded grid at the largest grid budget <= the smallest binding
B_l (rounding down is conservative: a smaller budget drops more). Emitted tokens under a budget follow
from those argmaxes. `budget_exact` is True only where the grid row is exactly what the engine computes
(the whole recorded tree at a uniform on-grid B); then every row's argmax is read from it.

Shape legend: n selected nodes (+1 with the root), L MoE layers, K top-k, M router entries, E experts.
"""
from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from moetune.step import StepConfig

from .derive import prepare
from .schema import TreeRecord
from .select import Subtree, selection


@dataclass(frozen=True)
class StepOutcome:
    """What one step of `config` does at one position. Without budgets the kept fields equal the full ones."""

    tree_size: int
    tree_depth: int
    accepted: int  # unbudgeted (lossless) accepted length
    unique_experts: tuple[int, ...]  # [L]
    exact: bool
    unique_kept: tuple[int, ...]  # [L]
    mass_kept: tuple[float, ...]  # [L] mean over verified tokens of routed weight kept
    substituted: tuple[int, ...]  # [L] tokens that lost at least one routed expert
    budget_accepted: int  # accepted length under the budgets (== accepted without binding budgets)
    budget_tokens: tuple[int, ...] | None  # tokens emitted under binding budgets; None: the greedy ones
    budget_exact: bool
    budget_layers_exact: int  # leading MoE layers whose unique_kept, mass_kept and substituted are exact
    nodes_kept: int | None = None  # eviction budget: selected nodes that survive every layer


def config_subtree(record: TreeRecord, config: StepConfig, max_depth: int | None = None) -> Subtree:
    """`config`'s subtree of `record`: cut from the selection over the record's whole batch (select.py),
    without nodes deeper than max_depth."""
    key = (config.drafter, config.depth, config.topk, config.num_draft_tokens, config.tree, max_depth)
    hit = record.subtrees.get(key)
    if hit is None:
        if record.batch is None:
            prepare([record])
        batch, i = record.batch
        hit = selection(batch, config).for_tree(i)
        if max_depth is not None and hit.tree_depth > max_depth:
            nodes = hit.nodes[record.depth[hit.nodes] <= max_depth]
            depth = int(record.depth[nodes].max()) if len(nodes) else 0
            hit = Subtree(nodes, int(np.count_nonzero(record.on_path[nodes])), depth,
                          record.unique_experts(np.concatenate(([0], nodes + 1))), hit.exact)
        record.subtrees[key] = hit
    return hit


def outcome(record: TreeRecord, config: StepConfig, max_depth: int | None = None,
            free: Sequence[AbstractSet[int]] | None = None) -> StepOutcome:
    """The counterfactual outcome of verifying `config`'s subtree of `record` (see module docstring).

    max_depth drops deeper nodes, as the engine does when fewer tokens remain than the tree is deep.
    free: [L] experts free against an eviction budget (under offload, the resident ones)."""
    if not config.speculate:  # the root alone routes to K distinct experts per layer
        layers = record.experts.shape[1]
        unique = (record.top_k,) * layers
        return StepOutcome(0, 0, 0, unique, True, unique, (1.0,) * layers, (0,) * layers, 0, None, True, layers)
    sub = config_subtree(record, config, max_depth)
    layers = len(sub.unique_experts)
    if config.budgets is not None and config.budget_mode == "evict":
        return evicted(record, config, sub, free)
    if config.budgets is None or all(b >= u for b, u in zip(config.budgets, sub.unique_experts)):
        if config.budgets is not None and len(config.budgets) != layers:
            raise ValueError(f"StepConfig.budgets has {len(config.budgets)} entries; this trace's model has "
                             f"{layers} MoE layers")
        return StepOutcome(len(sub.nodes), sub.tree_depth, sub.accepted, sub.unique_experts, sub.exact,
                           sub.unique_experts, (1.0,) * layers, (0,) * layers, sub.accepted, None, True, layers)
    return budgeted(record, config, sub)


def evicted(record: TreeRecord, config: StepConfig, sub: Subtree,
            free: Sequence[AbstractSet[int]] | None = None) -> StepOutcome:
    """An eviction budget's outcome (engine/eviction.py), exact: it needs only the recorded routing (which
    every kept node sees, being exact) and the draft probabilities that rank the nodes."""
    layers = len(sub.unique_experts)
    if len(config.budgets) != layers:
        raise ValueError(f"StepConfig.budgets has {len(config.budgets)} entries; this trace's model has "
                         f"{layers} MoE layers")
    rows, counts, sizes = evicted_rows(record, sub, config.budgets, free)
    entered = [len(rows), *counts[:-1]]  # rows reaching each layer
    demand = [int(sizes[n - 1, layer]) for layer, n in enumerate(entered)]
    kept = [int(sizes[n - 1, layer]) for layer, n in enumerate(counts)]
    count = int(counts[-1])
    survivors = rows[1:count] - 1
    accepted = int(np.count_nonzero(record.on_path[survivors]))
    return StepOutcome(len(sub.nodes), sub.tree_depth, sub.accepted, tuple(demand), sub.exact, tuple(kept),
                       (1.0,) * layers, (0,) * layers, accepted, None, sub.exact, layers, count - 1)


def evicted_rows(record: TreeRecord, sub: Subtree, budgets,
                 free: Sequence[AbstractSet[int]] | None = None,  # [L] experts the budget does not count
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # [n+1], [L], [n+1, L]
    """Eviction's ranked rows (root first), how many of them each layer keeps, and the experts each ranked
    prefix routes to per layer: nodes ranked by cumulative draft probability (ties: depth, then node id);
    each layer keeps the longest prefix whose routed experts (less the layer's `free` ones) fit its budget
    and the previous layer's."""
    nodes = sub.nodes
    order = np.lexsort((nodes, record.depth[nodes], -record.cum_prob[nodes]))  # last key first
    rows = np.concatenate(([0], nodes[order] + 1))  # [n+1] ranked rows, root first
    routed = record.experts[rows, :, :record.top_k].astype(np.int64)  # [n+1, L, K]
    hits = np.zeros((len(rows), routed.shape[1], int(routed.max()) + 1), dtype=bool)  # [n+1, L, E]
    np.put_along_axis(hits, routed, True, axis=2)
    sizes = np.logical_or.accumulate(hits, axis=0).sum(axis=2)  # [n+1, L] experts of each ranked prefix
    counted = sizes if free is None else _paid_sizes(hits, free)  # [n+1, L] what the budgets count
    counts, count = [], len(rows)
    for layer, budget in enumerate(budgets):
        count = min(count, int(np.count_nonzero(counted[:, layer] <= budget)))
        counts.append(count)
    return rows, np.array(counts, dtype=np.int64), sizes


def _paid_sizes(hits: np.ndarray,  # [n+1, L, E'] ranked rows' routed experts
                free: Sequence[AbstractSet[int]]) -> np.ndarray:  # [n+1, L]
    """Per ranked prefix and layer, its routed experts that are not free (under offload: the reads)."""
    if len(free) != hits.shape[1]:
        raise ValueError(f"free has {len(free)} sets but the trace's model has {hits.shape[1]} MoE layers: give "
                         f"one per layer (CacheModel.contents())")
    held = np.zeros(hits.shape[1:], dtype=bool)  # [L, E']
    for layer, experts in enumerate(free):
        held[layer, [e for e in experts if e < held.shape[1]]] = True
    return np.logical_or.accumulate(hits & ~held, axis=0).sum(axis=2)


def budgeted(record: TreeRecord, config: StepConfig, sub: Subtree) -> StepOutcome:
    layers = len(sub.unique_experts)
    if len(config.budgets) != layers:
        raise ValueError(f"StepConfig.budgets has {len(config.budgets)} entries; this trace's model has "
                         f"{layers} MoE layers")
    toks = np.concatenate(([0], sub.nodes + 1))  # [n+1] rows: root, then selected nodes
    budgets = np.asarray(config.budgets)
    lost, mass = keep(record, toks, budgets, config.selection)
    token_lost = lost.any(axis=(1, 2))
    affected = dict(zip(toks.tolist(), token_lost.tolist()))
    for node in sub.nodes.tolist():  # ascending: a parent is settled before its children
        affected[node + 1] |= affected[int(record.parents[node]) + 1]
    binding = budgets < np.asarray(sub.unique_experts)
    grid = record.grid
    g = int(np.searchsorted(grid, budgets[binding].min(), side="right")) - 1 if len(grid) else -1
    exact = (len(grid) > 0 and g >= 0 and len(sub.nodes) == record.num_nodes and len(set(config.budgets)) == 1
             and grid[g] == config.budgets[0])
    g = max(g, 0)
    if exact:  # the grid pass verified this very tree under this budget: read every row's argmax from it
        affected = dict.fromkeys(affected, True)
    tokens, accepted = walk(record, sub.nodes, affected, g if len(grid) else None)
    dropped = lost.any(axis=(0, 2))  # [L] the budget dropped some routed expert in this layer
    # Layer l's routing is the recorded one while no earlier layer dropped anything (later layers see
    # budgeted hidden states); the ranking is the engine's only with the full router distribution.
    # Without it, layers before the first binding budget (nothing to rank there) are exact.
    first_drop = int(np.argmax(dropped)) + 1 if dropped.any() else layers
    layers_exact = first_drop if record.router_full else int(np.argmax(binding))
    return StepOutcome(len(sub.nodes), sub.tree_depth, sub.accepted, sub.unique_experts, sub.exact,
                       tuple(np.minimum(budgets, sub.unique_experts).tolist()),
                       tuple(mass.mean(axis=0).tolist()), tuple(lost.any(axis=2).sum(axis=0).tolist()),
                       accepted, tuple(tokens), exact, layers_exact)


def keep(record: TreeRecord, toks: np.ndarray, budgets: np.ndarray, selection: str) -> tuple[np.ndarray, np.ndarray]:
    """Which routed experts of tokens `toks` ([n+1] rows) a budget drops, per layer ([L] budgets).

    Returns lost [n+1, L, K] (bool) and mass [n+1, L] (share of each token's routed weight kept).
    """
    layers, k = record.experts.shape[1], record.top_k
    ent = record.experts[toks].astype(np.int64)  # [n+1, L, M]
    e = max(int(ent.max()) + 1, 1)
    offs = (np.arange(layers) * e)[None, :, None]
    routed = ent[:, :, :k] + offs  # [n+1, L, K] flat (layer, expert) ids
    hits = np.bincount(routed.ravel(), minlength=layers * e)  # [L*E] routed-token count
    w = np.ones(len(toks))
    if selection == "accept_weighted":
        w[1:] = record.cum_prob[toks[1:] - 1]
    probs = record.router_probs[toks].astype(float) * w[:, None, None]  # [n+1, L, M]
    score = np.bincount((ent + offs).ravel(), weights=probs.ravel(), minlength=layers * e)  # [L*E]
    if selection == "hit_count":  # engine/selection.py: hits, ties broken by the summed probability
        score = hits + score / (len(toks) + 1)
    score = np.where(hits > 0, score, -np.inf)
    score[routed[0].ravel()] = np.inf  # the root's experts are kept first (engine/selection.py root protection)
    score = score.reshape(layers, e)
    order = np.argsort(-score, axis=1, kind="stable")  # [L, E] ties: lower expert id first
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(e)[None, :].repeat(layers, 0), axis=1)
    kept = (rank < budgets[:, None]).ravel() & (hits > 0)  # [L*E]
    lost = ~kept[routed]
    wts = record.weights[toks].astype(float)  # [n+1, L, K]
    mass = (wts * ~lost).sum(axis=2) / np.maximum(wts.sum(axis=2), 1e-12)
    return lost, mass


def walk(record: TreeRecord, nodes: np.ndarray, affected: dict[int, bool], g: int | None) -> tuple[list, int]:
    """Tokens emitted under the budget: from the root, emit the node's (budgeted) argmax and move to the
    selected child carrying that token, until none does. Returns (tokens, accepted length)."""
    child = {(int(record.parents[n]) + 1, int(record.tokens[n])): n + 1 for n in nodes.tolist()}
    row, tokens = 0, []
    while True:
        use_grid = affected[row] and g is not None
        tok = int(record.budget_argmax[g, row] if use_grid else record.argmax[row])
        tokens.append(tok)
        row = child.get((row, tok))
        if row is None:
            return tokens, len(tokens) - 1
