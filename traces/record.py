"""Recording counterfactual traces with the engine: per request, one live run of a policy through
engine.generate (moetune.driver over the live backend: what ran, and its measured step times; or, with
record_batch, one batched run of all the requests through engine.batch), then a pass along the greedy output that, at every position, asks each drafter for its largest tree, verifies
it (unbudgeted, and once per grid budget) and keeps the verdicts and the routing of every node.

Why a second pass: the live policy lands on some positions only and verifies its own small trees; replay
of any other policy needs the largest tree at every position. With greedy decoding both passes follow
the same output (lossless), so the pass is teacher-forced on the live output; `mismatches` counts
positions where the target's argmax at the root differs from it (numerical near-ties), which should be 0.

Shape legend: N draft nodes, L MoE layers, K top-k, M router entries kept, E experts, V vocabulary.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from moetune.engine import kv
from moetune.engine.drafters import Proposer
from moetune.engine.generate import generate, prefill
from moetune.engine.loader import moe_shape
from moetune.engine.tree import DraftTree
from moetune.engine.verify import verify
from moetune.policies.base import Policy
from moetune.step import DRAFTER_TRAITS, StepConfig, StepStats

from .schema import FORWARD_COLUMNS, LIVE_TIMES, LiveRun, TreeLimits, TreeRecord
from .writer import TraceWriter, expert_dtype


@dataclass
class RecordedRequest:
    """What `record_request` wrote, for the caller's summary."""

    positions: int
    live_goodput: float
    mismatches: int
    seconds: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def live_run(steps: list[StepStats], policy_name: str) -> LiveRun:
    """The live run's steps as arrays (position = output tokens committed before the step)."""
    configs: dict[StepConfig, int] = {}
    index = [configs.setdefault(s.config, len(configs)) for s in steps]
    emitted = np.array([s.emitted for s in steps], dtype=np.int32)
    return LiveRun(policy=policy_name, configs=list(configs), config_index=np.array(index, dtype=np.int32),
                   position=np.concatenate(([0], np.cumsum(emitted)[:-1])).astype(np.int32),
                   accepted=np.array([s.accepted for s in steps], dtype=np.int32), emitted=emitted,
                   tree_size=np.array([s.tree_size for s in steps], dtype=np.int32),
                   unique_experts=np.array([s.unique_experts for s in steps], dtype=np.int16).reshape(len(steps), -1),
                   times=np.array([[getattr(s, t) for t in LIVE_TIMES] for s in steps], dtype=np.float64).reshape(-1, 5),
                   forward=_forwards(steps))


def _forwards(steps: list[StepStats]) -> np.ndarray | None:
    """[S, 4] each step's shared forward (FORWARD_COLUMNS, -1 where unknown or alone); None if none was shared."""
    if all(s.batch_tokens is None for s in steps):
        return None
    return np.array([[-1.0 if getattr(s, c) is None else float(getattr(s, c)) for c in FORWARD_COLUMNS]
                     for s in steps], dtype=np.float64)


def routing_arrays(routing, router_top: int) -> tuple[np.ndarray, np.ndarray]:
    """experts [N+1, L, M] (by descending router probability; the first K are the routed ones) and
    their probabilities [N+1, L, M], from the engine's captured routing."""
    probs = torch.stack([lr.router_probs for lr in routing.layers], dim=1)  # [N+1, L, E]
    top = probs.topk(router_top, dim=-1)
    return top.indices.cpu().numpy(), top.values.to(torch.float16).cpu().numpy()


def union(trees: list[DraftTree]) -> DraftTree:
    """The first tree plus the nodes of the others it lacks (matched by token path), parents first.

    Why: EAGLE-2 growth keeps only the `topk` best nodes per level, so the largest tree may not expand
    the nodes a narrower config (a chain, topk=2) would; drafting those too keeps them replayable."""
    first = trees[0]
    parents, tokens, probs = list(first.parents), first.tokens.tolist(), first.probs.float().tolist()
    index = {(p, t): i for i, (p, t) in enumerate(zip(parents, tokens))}
    for extra in trees[1:]:
        mapped: list[int] = []
        for p, t, q in zip(extra.parents, extra.tokens.tolist(), extra.probs.float().tolist()):
            key = (-1 if p < 0 else mapped[p], t)
            if key not in index:
                index[key] = len(parents)
                parents.append(key[0])
                tokens.append(t)
                probs.append(q)
            mapped.append(index[key])
    device = first.tokens.device
    return DraftTree(tuple(parents), torch.tensor(tokens, dtype=torch.long, device=device),
                     torch.tensor(probs, device=device))


@torch.no_grad()
def record_request(writer: TraceWriter, target, drafters: dict[str, Proposer], limits: dict[str, TreeLimits],
                   policy: Policy, request_id: int, prompt_ids: list[int], kind: str = "", prompt: str = "",
                   max_new_tokens: int = 48, budget_grid: tuple[int, ...] = (), router_top: int | None = None,
                   eos_token_id=None) -> RecordedRequest:
    """Record one request into `writer` (see module docstring)."""
    t_start = time.perf_counter()
    # the live run is the engine's own decoding loop (moetune.driver over the live backend), routing kept
    live = generate(target, None, [prompt_ids], drafter=dict(drafters), policy=policy, max_new_tokens=max_new_tokens,
                    eos_token_id=eos_token_id, routing=True, request_ids=[request_id])[0]
    return _write_request(writer, target, drafters, limits, _policy_name(policy), request_id, prompt_ids, live.steps,
                          live.token_ids, kind, prompt, max_new_tokens, budget_grid, router_top, t_start)


@torch.no_grad()
def record_batch(writer: TraceWriter, target, drafters: dict[str, Proposer], limits: dict[str, TreeLimits],
                 policy: Policy, requests: list[tuple[int, list[int], str, str]], batch_size: int,
                 max_new_tokens: int = 48, budget_grid: tuple[int, ...] = (), router_top: int | None = None,
                 eos_token_id=None) -> list[RecordedRequest]:
    """Record requests (request id, prompt ids, kind, prompt text) whose live run decodes them together,
    at most `batch_size` at once (engine/batch.py, all arriving at once): each request's LiveRun holds
    its own steps of that run (its row share of each shared forward, as the batch engine reports it), so
    replay_batch at `batch_size` replays the run that was measured. The counterfactual pass is each
    request's own: a node's verdict and routing depend on its request's context only."""
    from moetune.engine.batch import generate_batch

    if writer.meta.live_batch_size != batch_size:
        raise ValueError(f"the trace header says live_batch_size={writer.meta.live_batch_size} but the run decodes "
                         f"{batch_size} together; build TraceMeta with live_batch_size={batch_size}")
    t_start = time.perf_counter()
    live = generate_batch(target, None, [ids for _, ids, _, _ in requests], drafter=dict(drafters), policy=policy,
                          batch_size=batch_size, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                          routing=True, request_ids=[rid for rid, _, _, _ in requests])
    share = (time.perf_counter() - t_start) / len(requests)  # each summary's seconds: its share, then its pass
    return [_write_request(writer, target, drafters, limits, _policy_name(policy), rid, ids, res.steps,
                           res.token_ids, kind, text, max_new_tokens, budget_grid, router_top,
                           time.perf_counter() - share)
            for (rid, ids, kind, text), res in zip(requests, live)]


def _policy_name(policy: Policy) -> str:
    return getattr(policy, "name", type(policy).__name__)


def _write_request(writer: TraceWriter, target, drafters: dict[str, Proposer], limits: dict[str, TreeLimits],
                   policy_name: str, request_id: int, prompt_ids: list[int], steps: list[StepStats],
                   output: list[int], kind: str, prompt: str, max_new_tokens: int, budget_grid: tuple[int, ...],
                   router_top: int | None, t_start: float) -> RecordedRequest:
    """One request's record: its live steps, then the counterfactual pass along its output."""
    shape = moe_shape(target)
    m = router_top or writer.meta.router_top  # the header's M unless told otherwise
    run = live_run(steps, policy_name)
    writer.begin_request(request_id, len(prompt_ids), kind, prompt, run, max_new_tokens, prompt_ids)
    cache = kv.new_cache(target)
    prefill(target, cache, prompt_ids)
    for d in drafters.values():
        d.prefill(list(prompt_ids))
        d.catch_up(list(prompt_ids))  # read here, so position 0's draft time is its own drafting
    context = list(prompt_ids)
    mismatches = 0
    for token in output:
        trees = {}
        for name, drafter in drafters.items():
            lim = limits[name]
            tree, t_draft = _draft_largest(drafter, name, lim, context, target.device)
            trees[name] = _verify_recorded(target, cache, context[-1], tree, StepConfig(drafter=name, depth=lim.depth,
                                           topk=lim.topk), budget_grid, shape, m, t_draft)
            mismatches += int(trees[name].argmax[0] != token)
        writer.position(token, trees)
        # Commit the token: the cache gains the root, the next root is `token`.
        root = torch.tensor([[context[-1]]], device=target.device)
        target.model(input_ids=root, cache=cache, use_cache=True)
        context.append(int(token))
    writer.end_request("eos" if len(output) < max_new_tokens else "max_new_tokens")
    return RecordedRequest(len(output), run.goodput, mismatches // max(len(drafters), 1),
                           time.perf_counter() - t_start)


def _draft_largest(drafter: Proposer, name: str, lim: TreeLimits, context: list[int],
                   device: torch.device) -> tuple[DraftTree, float]:
    """The drafter's largest tree at this position (with its narrower growths, see union()) and the
    seconds its largest growth alone took."""
    _sync(device)
    t0 = time.perf_counter()
    tree = drafter.draft(context, StepConfig(drafter=name, depth=lim.depth, topk=lim.topk))
    _sync(device)
    t_draft = time.perf_counter() - t0
    if not DRAFTER_TRAITS[name].chain_only and lim.topk > 1:
        narrower = [drafter.draft(context, StepConfig(drafter=name, depth=lim.depth, topk=k))
                    for k in sorted({1, 2} - {lim.topk}) if k < lim.topk]
        tree = union([tree, *narrower])
    return tree, t_draft


def _verify_recorded(target, cache, root: int, tree: DraftTree, config: StepConfig, budget_grid: tuple[int, ...],
                     shape, router_top: int, t_draft: float) -> TreeRecord:
    """Verify `tree` (N nodes) unbudgeted, then once per grid budget, and keep every verdict and the
    routing; the cache is cropped back after each pass."""
    device = target.device
    _sync(device)
    t1 = time.perf_counter()
    ver = verify(target, cache, root, tree, config)
    argmax = ver.logits.argmax(dim=-1).cpu().numpy().astype(np.int32)  # [N+1]
    _sync(device)
    t2 = time.perf_counter()
    experts, probs = routing_arrays(ver.routing, router_top)  # [N+1, L, M] each
    kv.crop(cache, ver.past_len)
    grid_argmax = np.zeros((len(budget_grid), len(tree) + 1), dtype=np.int32)  # [G, N+1]
    for g, b in enumerate(budget_grid):
        budgeted = verify(target, cache, root, tree, replace(config, budgets=(b,) * shape.num_layers,
                                                             budget_mode="substitute"))
        grid_argmax[g] = budgeted.logits.argmax(dim=-1).cpu().numpy()
        kv.crop(cache, budgeted.past_len)
    return TreeRecord(parents=np.array(tree.parents, dtype=np.int16), tokens=tree.tokens.cpu().numpy().astype(np.int32),
                      probs=tree.probs.float().cpu().numpy().astype(np.float16), argmax=argmax,
                      experts=experts.astype(expert_dtype(shape.num_experts)), router_probs=probs,
                      budget_argmax=grid_argmax, t_draft=t_draft, t_verify=t2 - t1)
