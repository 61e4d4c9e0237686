"""Batched greedy decoding: several requests share one target forward per step (continuous batching).

Layout: the batch is packed into ONE sequence (batch dim 1), so the single-request machinery (a
DynamicCache, explicit position ids, tree masks and acceptance) carries over:
- rows: for each active request its root (last committed token) then its drafted nodes. Requests may
  run plain, chains or trees of any shape, from any drafter, side by side in one forward;
- cache: one DynamicCache of every active request's committed tokens, interleaved in commit order;
  `owner` [S] names the request of each cached position, kept in step with the cache;
- positions: a row's position id is its request's context length so far plus its depth in the tree;
- attention (engine/packed.py, swapped in for the forward only): each request's keys (its
  cached positions, then its new rows) are gathered into a padded [B, L] block and its rows into [B, N];
  a row sees its own cached keys and its own ancestors (`layout`), never another request's keys;
- commit keeps, per request, the root and the accepted rows, and drops every position of a request that
  finished: one gather along the cache's sequence axis from the first position that moves (usually only
  the new rows, as in engine/kv.commit).
Why: a padded [B, S_max] cache would need per-request padding, ragged compaction (each request accepts a
different number of rows) and re-padding whenever a request joins or leaves; packed, those are an append
and a gather, and trees of any size mix. Attending through one [1, 1, T, S + T] additive mask over the
whole packed cache (the obvious packed form) reads every request's keys for every row (B times a padded
batch's attention) and makes HF's SDPA path copy the keys for GQA; gathering per request costs what a
padded batch does. One plain decode forward on the embedded target (CPU, 1 thread, each request ~200
cached tokens, best of 24, ms): batch 1: full mask 5.4, gathered 5.7, padded 5.2, one request alone 4.9;
batch 8: 11.7, 10.5, 9.2, eight single-request forwards 42.1; batch 16: 21.1, 14.6, 13.3, 92.0.

Greedy only (temperature 0). Drafting runs per request, in turn: each request owns its drafters (a
shallow copy of each one given, prefilled afresh, so an n-gram index or draft-model cache is its own);
the draft model's forward is not batched across requests. Expert budgets are not applied: a budget caps
the experts of a forward, and here one forward serves every request (see `_unbudgeted`).

Shape legend: B requests in the forward, T new rows (over requests: root + drafted nodes, or prompt
tokens at prefill), N the most new rows of one request, S cached positions (all requests), L the most keys
of one request (cached + new), H attention heads (Hkv key/value heads), D head size, V vocabulary.
"""
from __future__ import annotations

import copy
import math
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

from moetune.driver import check_passive_draft, step_stats
from moetune.policies.base import Policy
from moetune.policies.static import Static
from moetune.step import PLAIN, BatchContext, DecodeState, StepConfig, StepStats

from . import kv
from .accept import Acceptance, accept_greedy
from .drafters import Proposer
from .generate import (GenerationResult, drafter_pool, fit_tree, get_drafter, passive_lookahead,
                       prompt_token_ids)
from .loader import moe_shape
from .packed import layout, packed_attention
from .routing import Routing, capture_routing
from .telemetry import gpu_snapshot
from .tree import DraftTree, ancestors, depths


@dataclass
class BatchResult(GenerationResult):
    """A GenerationResult plus when the request was served, in seconds after generate_batch started.
    decode_time runs from the end of its prefill to its last token, as for a single request."""

    request_id: int = 0
    arrival: float = 0.0
    joined: float = 0.0  # it entered the batch (its prefill started)
    first_token: float = 0.0  # its first step committed
    finish: float = 0.0  # its last step committed

    @property
    def time_to_first_token(self) -> float:
        return self.first_token - self.arrival

    @property
    def time_per_output_token(self) -> float:
        """Seconds per token after the first (0 for a single token), as serving benchmarks report it."""
        n = len(self.token_ids)
        return (self.finish - self.first_token) / (n - 1) if n > 1 else 0.0


def throughput(results: list[BatchResult]) -> float:
    """Generated tokens per second over the whole run: from the first arrival to the last finish."""
    span = max(r.finish for r in results) - min(r.arrival for r in results)
    return sum(len(r.token_ids) for r in results) / span if span > 0 else 0.0


class Request:
    """One request in the batch: its committed tokens and drafters, this step's plan and outcome, times."""

    def __init__(self, index: int, request_id: int, prompt_ids: list[int], max_new_tokens: int,
                 pool: dict[str, Proposer], arrival: float):
        self.index, self.request_id, self.pool, self.arrival = index, request_id, pool, arrival
        self.prompt, self.ids = list(prompt_ids), list(prompt_ids)  # ids[-1]: the next root, not cached
        self.max_new_tokens, self.generated, self.done = max_new_tokens, 0, False
        self.steps: list[StepStats] = []
        self.step, self.t_observe = 0, 0.0  # t_observe: the last observe, counted in the next t_control
        self.joined = self.first_token = self.finish = self.prefill_time = self.t_start = 0.0
        self.config: StepConfig = PLAIN  # this step's config, tree, passive chain, rows, outcome
        self.tree: DraftTree | None = None
        self.chain: list[int] | None = None
        self.rows = slice(0, 0)  # its rows in the packed forward
        self.acc: Acceptance | None = None
        self.emitted: list[int] = []
        self.t_decide = self.t_draft = self.t_accept = self.t_commit = 0.0
        self.batch: BatchContext | None = None  # the others of its last step, for its next decision

    def result(self, tokenizer) -> BatchResult:
        out = self.ids[len(self.prompt):]
        text = tokenizer.decode(out, skip_special_tokens=True) if tokenizer is not None else ""
        return BatchResult(text, out, self.prompt, self.steps, self.prefill_time, self.finish - self.t_start,
                           self.request_id, self.arrival, self.joined, self.first_token, self.finish)


def _unbudgeted(config: StepConfig) -> StepConfig:
    """The config a batched step runs: expert budgets dropped (one forward serves every request, so a
    per-request cap on experts has nothing to apply to). StepStats carry this config, so a policy learns
    what ran."""
    return config if config.budgets is None else replace(config, budgets=None, eval_agreement=False)


def _emit(r: Request, eos: frozenset) -> None:
    """The request's accepted tokens, up to max_new_tokens and through EOS, join its context."""
    emitted = list(r.acc.tokens[:r.max_new_tokens - r.generated])
    cut = next((i for i, t in enumerate(emitted) if t in eos), None) if eos else None
    if cut is not None:
        emitted = emitted[:cut + 1]
    r.ids.extend(emitted)
    r.generated += len(emitted)
    if r.config.speculate:
        r.pool[r.config.drafter].commit(emitted)
    r.done = cut is not None or r.generated >= r.max_new_tokens
    r.emitted = emitted


class PackedBatch:
    """The active requests and their shared cache; one method per decoding phase of a batched step."""

    def __init__(self, target, policy: Policy, eos: frozenset, routing: bool):
        self.target, self.policy, self.eos, self.routing = target, policy, eos, routing
        self.passive = check_passive_draft(getattr(policy, "passive_draft", None))  # after policy.setup
        self.cache = kv.new_cache(target)
        self.owner = torch.zeros(0, dtype=torch.long, device=target.device)  # [S] request index per position
        self.active: list[Request] = []
        self.empty = DraftTree.empty(target.device)
        self.t0 = time.perf_counter()

    def clock(self) -> float:
        """Seconds since the batch started (every time a request records is on this clock)."""
        return time.perf_counter() - self.t0

    @torch.no_grad()
    def prefill(self, joiners: list[Request]) -> None:
        """Joining prompts (all but their last token, the first root) go through the target in one packed
        forward, each seeing only its own prompt, causally; each request's drafters start afresh. The
        forward's time is shared among the joiners by prompt rows."""
        fed = [r for r in joiners if len(r.ids) > 1]
        t0 = self.clock()
        if fed:
            device = self.target.device
            row_owner = torch.tensor([r.index for r in fed for _ in r.ids[1:]], device=device)  # [T]
            ids = torch.tensor([[t for r in fed for t in r.ids[:-1]]], device=device)  # [1, T]
            pos = torch.tensor([[p for r in fed for p in range(len(r.ids) - 1)]], device=device)  # [1, T]
            lay = layout(self.owner, [(r.index, torch.ones(len(r.ids) - 1, len(r.ids) - 1, dtype=torch.bool).tril())
                                      for r in fed], self.target.dtype)
            with packed_attention(self.target):
                self.target.model(input_ids=ids, position_ids=pos, attention_mask=lay.mask, cache=self.cache,
                                  use_cache=True, packed_layout=lay)
            self.owner = torch.cat([self.owner, row_owner])
        shared, rows = self.clock() - t0, sum(len(r.ids) - 1 for r in fed) or 1
        for r in joiners:
            t0 = self.clock()
            for d in r.pool.values():
                d.prefill(r.ids)
            r.t_start = self.clock()
            r.prefill_time = shared * (len(r.ids) - 1) / rows + r.t_start - t0
        self.active.extend(joiners)

    def draft(self) -> None:
        """Each request's policy decision (with its passive lookahead) and its drafted tree, in turn."""
        for r in self.active:
            t0 = self.clock()
            look = None
            if self.passive is not None:
                look, r.chain = passive_lookahead(r.pool, self.passive, r.ids, self.target)
            t1 = self.clock()
            state = DecodeState(r.request_id, r.step, len(r.ids), r.generated, r.max_new_tokens - r.generated, look,
                                r.batch)
            r.config = _unbudgeted(self.policy.decide(state))
            t2 = self.clock()
            if r.config.speculate:
                tree = get_drafter(r.pool, r.config.drafter, self.target).draft(r.ids, r.config)
                r.tree = fit_tree(tree, r.max_new_tokens - r.generated)
            else:
                r.tree = self.empty
            r.t_decide, r.t_draft = t2 - t1, t1 - t0 + self.clock() - t2

    @torch.no_grad()
    def verify(self) -> tuple[torch.Tensor, torch.Tensor, Routing | None]:
        """One target forward over every request's [root, nodes]; the cache grows by T. Returns logits
        [T, V], the request index of each row [T] and the routing when captured."""
        ids: list[int] = []
        pos: list[int] = []
        owner: list[int] = []
        for r in self.active:
            past = len(r.ids) - 1  # the request's cached tokens: its root sits at this position
            r.rows = slice(len(ids), len(ids) + len(r.tree) + 1)
            ids += [r.ids[-1], *r.tree.tokens.tolist()]
            pos += [past, *(past + d for d in depths(r.tree.parents))]
            owner += [r.index] * (len(r.tree) + 1)
        device = self.target.device
        row_owner = torch.tensor(owner, device=device)
        lay = layout(self.owner, [(r.index, ancestors(r.tree.parents)) for r in self.active], self.target.dtype)
        capture = capture_routing(self.target) if self.routing else nullcontext()
        with capture as routing, packed_attention(self.target):
            out = self.target(input_ids=torch.tensor([ids], device=device),  # [1, T]
                              position_ids=torch.tensor([pos], device=device), attention_mask=lay.mask,
                              cache=self.cache, use_cache=True, packed_layout=lay)
        return out.logits[0], row_owner, routing

    def accept(self, logits: torch.Tensor) -> None:  # logits [T, V]
        """Greedy acceptance of each request's tree against its own rows."""
        for r in self.active:
            t0 = self.clock()
            r.acc = accept_greedy(r.tree, logits[r.rows])
            r.t_accept = self.clock() - t0

    def commit(self, row_owner: torch.Tensor) -> float:  # row_owner [T]
        """Emit each request's tokens, then keep in the cache the root and accepted rows of every request
        still running and nothing of those that finished. Returns the cache compaction's seconds."""
        for r in self.active:
            t0 = self.clock()
            _emit(r, self.eos)
            r.t_commit = self.clock() - t0
        t0 = self.clock()
        past = len(self.owner)
        device = self.owner.device
        kept = [r.rows.start + i for r in self.active if not r.done for i in r.acc.rows]  # new rows that stay
        rows = torch.tensor(kept, dtype=torch.long, device=device)
        gone = [r.index for r in self.active if r.done]
        dropped = torch.isin(self.owner, torch.tensor(gone, device=device)) if gone else None  # [S]
        if dropped is None or not bool(dropped.any()):  # kv.commit crops when nothing moves (plain, chains)
            kv.commit(self.cache, past, kept)
            self.owner = torch.cat([self.owner, row_owner[rows]])
        else:
            start = int(dropped.int().argmax())  # the first position that moves
            old = (~dropped).nonzero().flatten()
            kv.commit(self.cache, start, (torch.cat([old[start:], rows + past]) - start).tolist())
            self.owner = torch.cat([self.owner[old], row_owner[rows]])
        return self.clock() - t0

    def observe(self, t_verify: float, t_compact: float, routing: Routing | None, now: float) -> None:
        """Each request's StepStats (built by moetune.driver.step_stats, as a single request's are) go to
        the policy. The shared verify forward and cache compaction are divided among the requests by
        verified rows; draft, accept and commit bookkeeping are each request's own. Each also carries the
        whole forward (StepStats.batch_*), and its next decision sees the others of this step (BatchContext)."""
        total = sum(r.rows.stop - r.rows.start for r in self.active)
        device = self.target.device
        forward = self.forward(total, t_verify, routing)
        for r in self.active:
            share = (r.rows.stop - r.rows.start) / total
            unique = () if routing is None else tuple(
                routing.unique_experts(torch.arange(r.rows.start, r.rows.stop, device=device)).tolist())
            r.batch = self.others(r, total, routing)
            stats = step_stats(
                r.request_id, r.step, r.config, accepted=r.acc.accepted, emitted=r.emitted, tree_size=len(r.tree),
                tree_depth=r.tree.depth, context_len=len(r.ids) - len(r.emitted),
                times=(r.t_draft, t_verify * share, r.t_accept, r.t_commit + t_compact * share),
                t_control=r.t_decide + r.t_observe, unique=unique, passive=self.passive, chain=r.chain,
                gpu=gpu_snapshot(device), forward=forward)
            r.steps.append(stats)
            t0 = self.clock()
            self.policy.observe(stats)
            r.t_observe = self.clock() - t0
            r.step += 1
            if r.step == 1:
                r.first_token = now

    def forward(self, total: int, t_verify: float, routing: Routing | None) -> dict | None:
        """The whole forward as StepStats' batch_* fields (None alone): the latency fit learns from it."""
        if len(self.active) == 1:
            return None
        experts = None if routing is None else int(routing.unique_experts().sum())
        return dict(batch_tokens=total, batch_experts=experts,
                    batch_context=sum(len(r.ids) - len(r.emitted) for r in self.active), batch_t_verify=t_verify)

    def others(self, r: Request, total: int, routing: Routing | None) -> BatchContext | None:
        """The other requests' rows and per-layer union of experts at this step: r's next BatchContext."""
        if len(self.active) == 1:
            return None
        rows, others = total - (r.rows.stop - r.rows.start), len(self.active) - 1
        if routing is None:
            return BatchContext(others, rows, ())
        mask = torch.ones(total, dtype=torch.bool)
        mask[r.rows] = False
        return BatchContext(others, rows, tuple(routing.unique_experts(mask.nonzero().flatten().to(
            self.target.device)).tolist()))

    def leave(self, now: float) -> None:
        """Finished requests leave the batch (their cache positions went at this step's commit)."""
        for r in self.active:
            if r.done:
                r.finish = now
                self.policy.end(r.request_id)
        self.active = [r for r in self.active if not r.done]

    def step(self) -> None:
        """draft -> verify -> accept -> commit -> observe for every active request, one target forward."""
        self.draft()
        t0 = self.clock()
        logits, row_owner, routing = self.verify()
        t_verify = self.clock() - t0
        self.accept(logits)
        t_compact = self.commit(row_owner)
        now = self.clock()
        self.observe(t_verify, t_compact, routing, now)
        self.leave(now)


def generate_batch(target, tokenizer, prompts, drafter=None, policy: Policy | None = None,
                   config: StepConfig | None = None, batch_size: int = 8, max_new_tokens: int = 64,
                   eos_token_id: int | list[int] | None = None, arrivals=None, request_ids=None,
                   temperature: float = 0.0, routing: bool | None = None) -> list[BatchResult]:
    """Greedy decoding of every prompt, at most `batch_size` requests per target forward; each request's
    output equals its own greedy decoding (HF `generate` on it alone).

    prompts, drafter, policy, config, eos_token_id, request_ids, routing: as engine.generate.generate (each
    request gets its own copy of every drafter). A request that finishes (EOS or max_new_tokens) leaves
    and the next waiting one joins at the next step. arrivals: per-request arrival times in seconds after
    the call (None: all at once); a request never joins before its arrival. Results come in prompt order.
    """
    prompts = [prompts] if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)) else list(prompts)
    ids, times = _check_arguments(prompts, policy, config, batch_size, max_new_tokens, arrivals, request_ids,
                                  temperature)
    if policy is None:
        policy = Static(config if config is not None else (StepConfig() if drafter is not None else PLAIN))
    if eos_token_id is None:
        eos_token_id = getattr(target.generation_config, "eos_token_id", None)
    eos = frozenset([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    requests = [Request(i, rid, prompt_token_ids(tokenizer, p), max_new_tokens, _own_drafters(target, drafter),
                        t)
                for i, (rid, p, t) in enumerate(zip(ids, prompts, times))]
    policy.setup(moe_shape(target))
    routing = getattr(policy, "wants_routing", True) if routing is None else routing
    batch = PackedBatch(target, policy, eos, routing)
    with torch.inference_mode():  # as HF's decoders run: no autograd bookkeeping on any tensor op
        _serve(batch, requests, batch_size)
    return [r.result(tokenizer) for r in requests]


def _serve(batch: PackedBatch, requests: list[Request], batch_size: int) -> None:
    """Continuous batching: admit arrived requests into free slots, prefill them, step, until all are done."""
    waiting = deque(sorted(requests, key=lambda r: (r.arrival, r.index)))
    while waiting or batch.active:
        now = batch.clock()
        joiners = []
        while waiting and waiting[0].arrival <= now and len(batch.active) + len(joiners) < batch_size:
            r = waiting.popleft()
            r.joined = now
            batch.policy.begin(r.request_id, len(r.prompt))
            joiners.append(r)
        if not joiners and not batch.active:
            time.sleep(waiting[0].arrival - now)  # idle until the next arrival
            continue
        if joiners:
            batch.prefill(joiners)
        batch.step()


def _own_drafters(target, drafter) -> dict[str, Proposer]:
    """A request's own drafters: a shallow copy of each given one (its prefill gives it fresh state: an
    n-gram index, a draft-model cache), a new DraftModelDrafter for a bare draft model."""
    return {name: copy.copy(p) for name, p in drafter_pool(target, drafter).items()}


def _check_arguments(prompts, policy, config, batch_size, max_new_tokens, arrivals, request_ids,
                     temperature) -> tuple[list[int], list[float]]:
    """Request ids and arrival times, or a ValueError naming the argument and the fix."""
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt")
    if temperature != 0:
        raise ValueError(f"generate_batch decodes greedily only: temperature must be 0, got {temperature}; "
                         "use moetune.engine.generate.generate for sampling")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (requests decoded together), got {batch_size!r}; "
                         "pass batch_size=1 or more")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}; pass max_new_tokens=1 or more")
    if policy is not None and config is not None:
        raise ValueError("pass either a policy or a fixed config, not both")
    fixed = config if config is not None else getattr(policy, "config", None) if isinstance(policy, Static) else None
    if fixed is not None and fixed.budgets is not None:
        raise ValueError("generate_batch applies no expert budgets (one forward serves every request); "
                         "pass a config with budgets=None")
    ids = list(range(len(prompts))) if request_ids is None else [int(r) for r in request_ids]
    if len(ids) != len(prompts):
        raise ValueError(f"request_ids needs one id per prompt: {len(prompts)} prompts, {len(ids)} ids; pass "
                         f"{len(prompts)} ids or request_ids=None")
    if len(set(ids)) != len(ids):
        raise ValueError("request_ids must be distinct (policies keep per-request state by id); pass unique ids")
    times = [0.0] * len(prompts) if arrivals is None else [float(t) for t in arrivals]
    if len(times) != len(prompts):
        raise ValueError(f"arrivals needs one time per prompt: {len(prompts)} prompts, {len(times)} times; pass "
                         f"{len(prompts)} times or arrivals=None (all at once)")
    if any(not 0 <= t < math.inf for t in times):
        raise ValueError("arrivals must be finite seconds >= 0 after the call; pass None for all at once")
    return ids, times
