"""Batched decoding: several requests share one target forward per step (continuous batching).

Layout: the batch is packed into ONE sequence (batch dim 1), so the single-request machinery (a
DynamicCache, explicit position ids, tree masks and acceptance) carries over:
- rows: for each active request its root (last committed token) then its drafted nodes. Requests may
  run plain, chains or trees of any shape, from any drafter, side by side in one forward;
- cache: one DynamicCache of every active request's committed tokens, interleaved in commit order;
  `owner` [S] names the request of each cached position, kept in step with the cache;
- positions: a row's position id is its request's context length so far plus its depth in the tree;
- attention (engine/packed.py, swapped in for the forward only): requests bucketed by their number of
  new rows; in a bucket each request's keys (its cached positions, then its new rows) are gathered into
  a padded [B, L] block and its rows into [B, N]; a row sees its own cached keys and its own ancestors
  (`layout`), never another request's keys; a request alone in the batch, whose cache is then its own,
  takes the single-request forward instead (engine/verify.forward_args);
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

Greedy, or sampled (temperature > 0, top_p) with each request's own generator, seeded seed + its index, so
a request samples what engine.generate samples for it alone with that seed (given the same trees: static
configs). A draft model drafts for all its requests of a step at once
(engine/drafters/batched.py): one draft cache packed as the target's, and one packed forward for the
catch-up on committed tokens, then one per tree level, whatever the requests' shapes; each request's tree
is what its own DraftModelDrafter would propose. Other drafters run per request, in turn, each request
owning a shallow copy (prefilled afresh, so an n-gram index is its own).

Budgets: an eviction budget evicts its own request's rows (engine/batch_eviction.py), so requests with
and without budgets share a forward; substitution budgets are dropped (see `_batchable`).

Shape legend: B requests in the forward, T new rows (over requests: root + drafted nodes, or prompt
tokens at prefill), N the most new rows of one request, S cached positions (all requests), L the most keys
of one request (cached + new), H attention heads (Hkv key/value heads), D head size, V vocabulary.
"""
from __future__ import annotations

import copy
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import replace

import torch

from moetune.driver import check_passive_draft, step_stats
from moetune.policies.base import Policy
from moetune.policies.static import Static
from moetune.step import PLAIN, BatchContext, DecodeState, StepConfig

from . import kv
from .accept import accept_greedy_packed, accept_tree
from .batch_eviction import Group, RowReport, evict_rows
from .batch_request import BatchResult, Request, check_arguments, emit, throughput
from .drafters import DraftModelDrafter, Proposer
from .drafters.batched import BatchedDraftModel, Seat
from .eviction import node_rank
from .generate import drafter_pool, fit_tree, get_drafter, offload_counters, passive_lookahead, prompt_token_ids
from .offload import handle_of
from .loader import moe_shape
from .packed import layout, packed_attention
from .routing import Routing, capture_routing
from .telemetry import gpu_snapshot
from .tree import DraftTree, ancestors, depths
from .verify import forward_args

__all__ = ["BatchResult", "generate_batch", "throughput"]


def _batchable(config: StepConfig) -> StepConfig:
    """The config a batched step runs: eviction budgets stay (each evicts its own request's rows, see
    engine/batch_eviction.py); substitution budgets are dropped (they re-route the experts of a whole
    forward, and here one forward serves every request). StepStats carry this config, so a policy learns
    what ran. Agreement evaluation is not run in a batch."""
    if config.budgets is not None and config.budget_mode != "evict":
        return replace(config, budgets=None, eval_agreement=False)
    return replace(config, eval_agreement=False) if config.eval_agreement else config


class PackedBatch:
    """The active requests and their shared cache; one method per decoding phase of a batched step."""

    def __init__(self, target, policy: Policy, eos: frozenset, routing: bool, sampling: tuple = (0.0, 1.0)):
        self.target, self.policy, self.eos, self.routing = target, policy, eos, routing
        self.temperature, self.top_p = sampling
        self.passive = check_passive_draft(getattr(policy, "passive_draft", None))  # after policy.setup
        self.shape = moe_shape(target)
        self.offload = handle_of(target)  # the experts' offload store (engine/offload.py), None when resident
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
        forward, each seeing only its own prompt, causally; each request's drafters start afresh. A batched
        draft model reads a joiner's prompt at its first draft (in that step's catch-up forward), so a
        request that never drafts with it never pays for it. The forward's time is shared among the joiners
        by prompt rows."""
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
                self.target.model(input_ids=ids, position_ids=pos, cache=self.cache,
                                  use_cache=True, packed_layout=lay)
            self.owner = torch.cat([self.owner, row_owner])
        shared, rows = self.clock() - t0, sum(len(r.ids) - 1 for r in fed) or 1
        for r in joiners:
            t0 = self.clock()
            for d in r.pool.values():
                d.prefill(r.ids)  # a reset only: each drafter reads the context at its first draft
            r.t_start = self.clock()
            r.prefill_time = shared * (len(r.ids) - 1) / rows + r.t_start - t0
        self.active.extend(joiners)

    def draft(self) -> None:
        """Each request's policy decision (with its passive lookahead) and its drafted tree: requests seated
        at a batched draft model draft together after every decision (`draft_together`), the others in turn."""
        seated: dict[BatchedDraftModel, list[Request]] = {}
        for r in self.active:
            t0 = self.clock()
            look = None
            if self.passive is not None:
                look, r.chain = passive_lookahead(r.pool, self.passive, r.ids, self.target)
            t1 = self.clock()
            batch = r.batch if r.batch is not None else BatchContext.unseen(len(self.active) - 1)
            state = DecodeState(r.request_id, r.step, len(r.ids), r.generated, r.max_new_tokens - r.generated, look,
                                batch)
            r.config = _batchable(self.policy.decide(state))
            t2 = self.clock()
            r.tree = self.empty
            drafter = get_drafter(r.pool, r.config.drafter, self.target) if r.config.speculate else None
            if isinstance(drafter, Seat):
                seated.setdefault(drafter.shared, []).append(r)
            elif drafter is not None:
                r.tree = fit_tree(drafter.draft(r.ids, r.config), r.max_new_tokens - r.generated)
            r.t_decide, r.t_draft, r.draft_forward = t2 - t1, t1 - t0 + self.clock() - t2, None
        for drafter, group in seated.items():
            self.draft_together(drafter, group)

    def draft_together(self, drafter: BatchedDraftModel, group: list[Request]) -> None:
        """The group's trees from one packed draft forward per round (catch-up, then each level); the
        shared time is divided among the group by drafted nodes, as verify's is by verified rows; in a batch,
        each also carries the whole draft forward (StepStats.batch_draft_*)."""
        t0 = self.clock()
        trees = drafter.draft([(r.index, r.ids, r.config) for r in group])
        elapsed, nodes = self.clock() - t0, sum(len(tree) for tree in trees)
        forward = None if len(self.active) == 1 or not nodes else dict(
            batch_draft_depth=max(tree.depth for tree in trees), batch_draft_nodes=nodes, batch_t_draft=elapsed,
            batch_draft_requests=len(group))
        for r, tree in zip(group, trees):
            r.draft_forward = forward
            r.tree = fit_tree(tree, r.max_new_tokens - r.generated)
            r.t_draft += elapsed * (len(tree) / nodes if nodes else 1 / len(group))

    @torch.no_grad()
    def verify(self) -> tuple[torch.Tensor, list[int], torch.Tensor, Routing | None, RowReport | None]:
        """One target forward over every request's [root, nodes]; the cache grows by T. Returns logits
        [T, V], each row's input token [T] (host), the request index of each row [T], the routing when
        captured and, when a request runs an eviction budget, what each layer kept per request."""
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
        capture = capture_routing(self.target) if self.routing else nullcontext()
        if self._alone():
            with capture as routing:
                out = self.target(**forward_args(self.target, self.cache, ids[0], self.active[0].tree))
            return out.logits[0], ids, row_owner, routing, None
        lay = layout(self.owner, [(r.index, ancestors(r.tree.parents)) for r in self.active], self.target.dtype)
        with capture as routing, packed_attention(self.target), self.budgets() as kept:
            out = self.target(input_ids=torch.tensor([ids], device=device),  # [1, T]
                              position_ids=torch.tensor([pos], device=device),
                              cache=self.cache, use_cache=True, packed_layout=lay)
        return out.logits[0], ids, row_owner, routing, kept

    def _alone(self) -> bool:
        """One request runs and the cache holds only its tokens (a finished request's went at its last commit),
        without an eviction budget: its forward is the single-request engine's (engine/verify.forward_args:
        causal for a chain, its tree's mask otherwise). Why: the packed layout and its gathers cost a lone
        request ~0.9 ms a step on the embedded target (batch 1 ran 0.86x the single-request engine)."""
        return len(self.active) == 1 and self.active[0].config.budgets is None \
            and len(self.owner) == len(self.active[0].ids) - 1

    def budgets(self):
        """The forward's eviction (engine/batch_eviction.py) when a request runs a budget, else nothing."""
        if all(r.config.budgets is None for r in self.active):
            return nullcontext()
        groups = [Group.of([row + r.rows.start for row in node_rank(r.tree)], r.config.budgets, self.shape)
                  for r in self.active]
        return evict_rows(self.target, groups)

    def accept(self, logits: torch.Tensor,  # [T, V]
               row_tokens: list[int],  # [T] each row's input token
               kept: RowReport | None) -> None:
        """Each request's tree against its own rows (those its budget kept): greedy for all requests from one
        host transfer (the time shared evenly), or sampled with each request's own generator."""
        if self.temperature == 0:
            t0 = self.clock()
            alive = [None if kept is None or (rows := kept.survivors(i)) is None else {x - r.rows.start for x in rows}
                     for i, r in enumerate(self.active)]
            accs = accept_greedy_packed([(r.tree.parents, r.rows.start, a) for r, a in zip(self.active, alive)],
                                        row_tokens, logits)
            share = (self.clock() - t0) / len(self.active)
            for r, acc in zip(self.active, accs):
                r.acc, r.t_accept = acc, share
            return
        for i, r in enumerate(self.active):
            t0 = self.clock()
            alive = None
            if kept is not None and (rows := kept.survivors(i)) is not None:
                alive = torch.zeros(len(r.tree) + 1, dtype=torch.bool, device=logits.device)
                alive[torch.tensor(rows) - r.rows.start] = True
            r.acc = accept_tree(r.tree, logits[r.rows], self.temperature, self.top_p, r.generator, alive)
            r.t_accept = self.clock() - t0

    def commit(self, row_owner: torch.Tensor) -> float:  # row_owner [T]
        """Emit each request's tokens, then keep in the cache the root and accepted rows of every request
        still running and nothing of those that finished. Returns the cache compaction's seconds."""
        for r in self.active:
            t0 = self.clock()
            emit(r, self.eos)
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

    def observe(self, t_verify: float, t_compact: float, routing: Routing | None, kept: RowReport | None,
                offload: dict | None, now: float) -> None:
        """Each request's StepStats (built by moetune.driver.step_stats, as a single request's are) go to
        the policy. The shared verify forward and cache compaction are divided among the requests by
        verified rows; draft, accept and commit bookkeeping are each request's own. Each also carries the
        whole forward (StepStats.batch_*), and its next decision sees the others of this step (BatchContext).
        Under eviction the experts counted are those of the rows each layer kept, as the forward loaded them;
        with experts offloaded, each carries what the forward read from the slow tier (StepStats.offload_*)."""
        total = sum(r.rows.stop - r.rows.start for r in self.active)
        device = self.target.device
        unique, computed, others, experts = self.experts(routing, kept)
        alone = len(self.active) == 1
        forward = None if alone else dict(batch_tokens=total, batch_experts=experts, batch_t_verify=t_verify,
                                          batch_context=sum(len(r.ids) - len(r.emitted) for r in self.active))
        for i, r in enumerate(self.active):
            mine = r.rows.stop - r.rows.start
            share = mine / total
            evicted = {} if kept is None else dict(kept=computed[i])
            if kept is not None and r.config.budgets is not None:
                evicted["nodes_kept"] = kept.kept[-1][i] - 1
            r.batch = None if alone else BatchContext(len(self.active) - 1, total - mine, others[i])
            stats = step_stats(
                r.request_id, r.step, r.config, accepted=r.acc.accepted, emitted=r.emitted, tree_size=len(r.tree),
                tree_depth=r.tree.depth, context_len=len(r.ids) - len(r.emitted),
                times=(r.t_draft, t_verify * share, r.t_accept, r.t_commit + t_compact * share),
                t_control=r.t_decide + r.t_observe, unique=unique[i], passive=self.passive,
                chain=r.chain if self.temperature == 0 else None,  # checked under greedy decoding only
                gpu=gpu_snapshot(device), draft_forward=r.draft_forward, offload=offload,
                forward=forward if forward is None or experts is None else dict(
                    forward, batch_experts_others=sum(others[i])),
                **evicted)
            r.steps.append(stats)
            t0 = self.clock()
            self.policy.observe(stats)
            r.t_observe = self.clock() - t0
            r.step += 1
            if r.step == 1:
                r.first_token = now

    def experts(self, routing: Routing | None, kept: RowReport | None) -> tuple[list, list, list, int | None]:
        """Per request its unique experts per layer (of the rows entering each layer), the experts its kept
        rows computed (eviction only), the union of the other requests' per layer; and the forward's experts
        summed over layers (None without routing). Without eviction all from one scatter of the routing."""
        B, L = len(self.active), self.shape.num_layers
        if kept is not None:  # each request's kept experts, as the forward loaded them
            demand, loads = zip(*(kept.loads(i) for i in range(B)))  # [B][L] sets each
            rest = [tuple(len(set().union(*layer)) for layer in zip(*(loads[:i] + loads[i + 1:]))) for i in range(B)]
            return ([tuple(len(d) for d in ds) for ds in demand], [tuple(len(x) for x in ld) for ld in loads],
                    rest, sum(len(set().union(*layer)) for layer in zip(*loads)))
        if routing is None:
            return [()] * B, [], [()] * B, None
        sizes = torch.tensor([r.rows.stop - r.rows.start for r in self.active])
        hits = routing.group_hits(torch.repeat_interleave(torch.arange(B), sizes).to(self.target.device), B)
        loads = hits.sum(0)  # [L, E] requests loading each expert
        own, rest = hits.sum(2), ((loads[None] - hits.int()) > 0).sum(2)  # [B, L] each
        host = torch.cat([own.flatten(), rest.flatten(), (loads > 0).sum()[None]]).tolist()  # one transfer
        per = [tuple(host[i * L:(i + 1) * L]) for i in range(2 * B)]
        return per[:B], [], per[B:], host[-1]

    def leave(self, now: float) -> None:
        """Finished requests leave the batch (their target cache positions went at this step's commit, their
        batched draft model's go here)."""
        done = [r for r in self.active if r.done]
        for r in done:
            r.finish = now
            self.policy.end(r.request_id)
        for drafter, group in _seated(done).items():
            drafter.leave([r.index for r in group])
        self.active = [r for r in self.active if not r.done]

    def step(self) -> None:
        """draft -> verify -> accept -> commit -> observe for every active request, one target forward."""
        self.draft()
        before = None if self.offload is None else offload_counters(self.offload)
        t0 = self.clock()
        logits, row_tokens, row_owner, routing, kept = self.verify()
        t_verify = self.clock() - t0
        offload = None
        if before is not None:  # what the shared forward read from the slow tier: every request's StepStats
            misses, nbytes, stall = (b - a for a, b in zip(before, offload_counters(self.offload)))
            offload = dict(offload_misses=misses, offload_bytes=nbytes, offload_stall=stall,
                           offload_capacity=self.offload.config.capacity)
        self.accept(logits, row_tokens, kept)
        t_compact = self.commit(row_owner)
        now = self.clock()
        self.observe(t_verify, t_compact, routing, kept, offload, now)
        self.leave(now)


def generate_batch(target, tokenizer, prompts, drafter=None, policy: Policy | None = None,
                   config: StepConfig | None = None, batch_size: int = 8, max_new_tokens: int = 64,
                   eos_token_id: int | list[int] | None = None, arrivals=None, request_ids=None,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, routing: bool | None = None
                   ) -> list[BatchResult]:
    """Decoding of every prompt, at most `batch_size` requests per target forward; greedy (temperature 0),
    each request's output equals its own greedy decoding (HF `generate` on it alone). Sampled, request i
    draws from its own generator seeded `seed + i` (its distribution is the target's: engine/accept.py).

    prompts, drafter, policy, config, eos_token_id, request_ids, routing: as engine.generate.generate (each
    request gets its own copy of every drafter, but a draft model's requests draft together in one
    BatchedDraftModel). A request that finishes (EOS or max_new_tokens) leaves and the next waiting one
    joins at the next step. arrivals: per-request arrival times in seconds after
    the call (None: all at once); a request never joins before its arrival. Results come in prompt order.
    """
    prompts = [prompts] if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)) else list(prompts)
    ids, times = check_arguments(prompts, policy, config, batch_size, max_new_tokens, arrivals, request_ids,
                                  temperature, top_p)
    if policy is None:
        policy = Static(config if config is not None else (StepConfig() if drafter is not None else PLAIN))
    if eos_token_id is None:
        eos_token_id = getattr(target.generation_config, "eos_token_id", None)
    eos = frozenset([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pool = _batch_pool(target, drafter, batch_size)
    requests = [Request(i, rid, prompt_token_ids(tokenizer, p), max_new_tokens, _own_drafters(pool, i), t,
                        torch.Generator().manual_seed(seed + i) if temperature > 0 else None)
                for i, (rid, p, t) in enumerate(zip(ids, prompts, times))]
    policy.setup(moe_shape(target))
    routing = getattr(policy, "wants_routing", True) if routing is None else routing
    batch = PackedBatch(target, policy, eos, routing, (temperature, top_p))
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


def _batch_pool(target, drafter, batch_size: int) -> dict[str, Proposer | BatchedDraftModel]:
    """The given drafters, a draft model (a bare one, or a DraftModelDrafter proper) as one BatchedDraftModel
    that every request shares. The others stay per request: n-gram lookups cost no forward, and a subclass
    (SelfDrafter) runs its own forward, which the batched drafter does not know. At batch size 1 nothing is
    shared, and the packed layout would only add its cost (about 2 ms a step on the embedded draft model)."""
    pool = drafter_pool(target, drafter)
    if batch_size == 1:
        return pool
    return {name: BatchedDraftModel(p.model) if type(p) is DraftModelDrafter else p for name, p in pool.items()}


def _own_drafters(pool: dict[str, Proposer | BatchedDraftModel], index: int) -> dict[str, Proposer]:
    """Request `index`'s drafters: its seat at each batched draft model, a shallow copy of any other (its
    prefill gives it fresh state: an n-gram index, a self-drafter's cache)."""
    return {name: p.seat(index) if isinstance(p, BatchedDraftModel) else copy.copy(p) for name, p in pool.items()}


def _seated(requests: list[Request]) -> dict[BatchedDraftModel, list[Request]]:
    """The requests seated at each batched draft model (in their pools), in order."""
    out: dict[BatchedDraftModel, list[Request]] = {}
    for r in requests:
        for d in r.pool.values():
            if isinstance(d, Seat):
                out.setdefault(d.shared, []).append(r)
    return out
