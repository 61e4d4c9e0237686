"""Live decoding: the engine's side of moetune.driver (prefill, then per step draft -> verify -> accept ->
commit), around the policy's lookahead -> decide ... observe that the driver runs.

One request at a time (batch size 1). The target's KV cache holds every committed token except the last
one (the root of the next tree), so a step feeds [root, drafted nodes] and keeps the root plus the accepted
path. (Between a prefill that also ran the root and the first step, the cache holds the root too: that
step either takes its logits from the prefill or crops the root first; `prefill`.) Policies may change
drafter, shape or speculation on/off every step. `LiveBackend` owns the tensors, the caches, the drafters
and the timing; the step protocol itself (and the one function that builds StepStats) is moetune.driver's,
shared with trace replay.

Shape legend: N drafted nodes, V vocabulary, L MoE layers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch

from moetune.driver import decode, step_stats
from moetune.policies.base import Policy
from moetune.policies.static import Static
from moetune.step import DRAFTER_TRAITS, PLAIN, Lookahead, StepConfig, StepStats

from . import kv
from .accept import Acceptance, accept_tree
from .drafters import Proposer, make_drafter
from .loader import moe_shape
from .offload import OffloadHandle, handle_of
from .telemetry import StepTimer, gpu_snapshot
from .tree import DraftTree, depths, subtree
from .verify import Verification, verify


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated tokens (prompt excluded)
    prompt_ids: list[int]
    steps: list[StepStats] = field(default_factory=list)
    prefill_time: float = 0.0
    decode_time: float = 0.0  # wall seconds from the end of prefill to the end of the request

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.decode_time if self.decode_time > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        return sum(s.accepted for s in self.steps) / len(self.steps) if self.steps else 0.0


def drafter_pool(target, drafter) -> dict[str, Proposer]:
    if drafter is None:
        return {}
    if isinstance(drafter, Proposer):
        return {drafter.name: drafter}
    if isinstance(drafter, dict):
        return dict(drafter)
    return {"draft_model": make_drafter("draft_model", target, drafter)}  # a bare draft model


def get_drafter(pool: dict[str, Proposer], name: str, target) -> Proposer:
    """The drafter a step asks for; those that need no draft model are built on first use."""
    if name not in pool:
        pool[name] = make_drafter(name, target)
    return pool[name]


def passive_lookahead(pool: dict[str, Proposer], passive: StepConfig, ids: list[int],
                      target) -> tuple[Lookahead, list[int]]:
    """What the policy's passive draft (Policy.passive_draft, checked by the driver) drafts at this step,
    before the policy decides: the Lookahead it sees, and the chain itself (checked against the emitted
    tokens)."""
    order, chain = get_drafter(pool, passive.drafter, target).lookahead(ids, passive.depth)
    return Lookahead(passive.drafter, order, len(chain)), chain


def offload_counters(handle: OffloadHandle) -> tuple[int, int, float]:
    """What the store read on its critical path so far, summed over layers: (misses, demand bytes, stall
    seconds); a verify forward's StepStats.offload_* are their change over it."""
    layers = handle.store.snapshot()
    return sum(s.misses for s in layers), sum(s.demand_bytes for s in layers), sum(s.stall_s for s in layers)


def prompt_token_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer; pass token id lists otherwise")
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("a prompt must have at least one token")
    return ids


def fit_tree(tree: DraftTree, remaining: int) -> DraftTree:
    """Drop nodes deeper than the tokens still allowed (a step emits at most depth + 1 tokens)."""
    if len(tree) and tree.depth >= remaining:
        return subtree(tree, [i for i, d in enumerate(depths(tree.parents)) if d < remaining])
    return tree


@torch.no_grad()
def prefill(target, cache, ids: list[int], with_root: bool = False) -> torch.Tensor | None:
    """Fill the target cache with every prompt token but the last (the first root, verified with the first
    tree). with_root: the root too, returning its last hidden state [1, 1, H], so a first step that verifies
    the root alone (plain decoding) runs no forward of its own, as HF's prefill emits the first token."""
    if with_root:
        out = target.model(input_ids=torch.tensor([ids], device=target.device), cache=cache, use_cache=True)
        return out.last_hidden_state[:, -1:]
    if len(ids) > 1:
        target.model(input_ids=torch.tensor([ids[:-1]], device=target.device), cache=cache,
                     use_cache=True)
    return None


def generate(target, tokenizer, prompts, drafter=None, policy: Policy | None = None,
             config: StepConfig | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_token_id: int | list[int] | None = None,
             on_step=None, routing: bool | None = None, request_ids=None) -> list[GenerationResult]:
    """Speculative decoding of each prompt in turn; greedy (temperature 0) output equals plain greedy.

    prompts: a string, a list of strings, or a list of token-id lists. drafter: a Proposer, a draft
    model, or a dict name -> Proposer ("draft_model", "ngram", "self"); n-gram and self drafters are
    built when a step first asks for them. policy or config (not both) chooses each step; with neither,
    a draft chain of 4 when a drafter is given, plain decoding otherwise. on_step(request_index, stats).
    routing: capture per-layer routing into StepStats (unique experts); None: as the policy
    asks before each verify (Policy.routing_now), so plain and static decoding skip it. request_ids: one id per prompt
    (DecodeState and StepStats carry it; default 0, 1, ...), so a policy serving several calls can tell
    its requests apart.
    """
    if policy is not None and config is not None:
        raise ValueError("pass either a policy or a fixed config, not both")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if policy is None:
        policy = Static(config if config is not None else (StepConfig() if drafter is not None else PLAIN))
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    ids = list(range(len(prompts))) if request_ids is None else [int(r) for r in request_ids]
    if len(ids) != len(prompts):
        raise ValueError(f"request_ids needs one id per prompt: {len(prompts)} prompts, {len(ids)} ids")
    if eos_token_id is None:
        eos_token_id = getattr(target.generation_config, "eos_token_id", None)
    eos = frozenset([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pool = drafter_pool(target, drafter)
    policy.setup(moe_shape(target))
    # asked per step: a policy may want routing on some steps only (Policy.routing_now)
    routing_now = (lambda: routing) if routing is not None else getattr(
        policy, "routing_now", lambda: getattr(policy, "wants_routing", True))
    sampling = (temperature, top_p, torch.Generator().manual_seed(seed))
    results = []
    for index, (request_id, prompt) in enumerate(zip(ids, prompts)):
        backend = LiveBackend(target, pool, prompt_token_ids(tokenizer, prompt), max_new_tokens, sampling, eos,
                              routing_now, getattr(policy, "drafters", None))
        with torch.inference_mode():  # as HF's decoders run: no autograd bookkeeping on any tensor op
            decode(policy, backend, request_id, None if on_step is None else partial(on_step, index))
        results.append(backend.result(tokenizer))
    return results


class LiveBackend:
    """moetune.driver.Backend on a model: one request's caches, drafters and measured phase times.

    The lookahead is the passive drafter's own lookup (what it drafts when chosen), so it is timed as draft
    work. On CUDA the phases are timed by events and read once per step, in `stats` (one host sync)."""

    keeps_steps = True  # GenerationResult.steps holds every step

    def __init__(self, target, pool: dict[str, Proposer], prompt_ids: list[int], max_new_tokens: int,
                 sampling: tuple, eos: frozenset, routing_now, read_at_prefill: tuple[str, ...] | None = None):
        self.target, self.pool, self.eos = target, pool, eos
        self.routing_now = routing_now  # () -> bool, asked before each verify (Policy.routing_now)
        self.read_at_prefill = read_at_prefill  # the policy's drafters (Policy.drafters; None: all)
        self.temperature, self.top_p, self.generator = sampling
        self.prompt = list(prompt_ids)
        self.ids = list(prompt_ids)  # committed tokens (prompt + generated); ids[-1] is the next root
        self.prompt_len, self.max_new_tokens = len(self.prompt), max_new_tokens
        self.generated, self.done = 0, False
        self.timer = StepTimer(target.device)
        self.empty = DraftTree.empty(target.device)  # what a plain step verifies after its root
        self.steps: list[StepStats] = []
        self.emitted: list[int] = []  # the last step's committed tokens
        self.chain: list[int] | None = None  # the passive draft's chain at this step
        self.t_look = self.prefill_time = self.t_start = 0.0
        self.cache = None
        self.root_hidden: torch.Tensor | None = None  # [1, 1, H] when prefill also ran the first root
        self.offload = handle_of(target)  # the experts' offload store (engine/offload.py), None when resident
        self.verify_offload: dict | None = None  # the last verify forward's StepStats.offload_* fields

    def prefill(self, passive: StepConfig | None) -> None:
        """Target cache of the prompt (all but its last token, the first root, unless this backend's first step
        may take the root's logits from the prefill: see `prefill`); drafters forget the last request, and
        those the policy may draft with read the prompt (`reads_at_prefill`). Any other reads the context at its first draft, in
        that step's draft time (as a batched draft model does, engine/batch.py): plain decoding with a draft
        model at hand reads nothing. Why not always at the first draft: a policy would then see the read of
        a whole prompt as one step's draft time, which the controller's draft fit cannot explain (auto
        stopped drafting with the draft model)."""
        t0 = time.perf_counter()
        self.cache = kv.new_cache(self.target)
        # A step that captures routing or reads offloaded experts needs the root in its own forward.
        with_root = not self.routing_now() and self.offload is None
        self.root_hidden = prefill(self.target, self.cache, self.ids, with_root)
        for name, d in self.pool.items():
            d.prefill(self.ids)
            if self.reads_at_prefill(name):
                d.catch_up(self.ids)
        self.t_start = time.perf_counter()
        self.prefill_time = self.t_start - t0

    def reads_at_prefill(self, name: str) -> bool:
        """Whether drafter `name` reads the prompt in the prefill: the policy may draft with it, and reading
        does not cost a second prefill of the target (a drafter that runs the target's layers, the self
        drafter, reads only when asked: in a call of many prompts, once built it read every later prompt
        whether or not the policy tried it again)."""
        traits = DRAFTER_TRAITS.get(name)
        declared = self.read_at_prefill is None or name in self.read_at_prefill
        return declared and not (traits is not None and traits.runs_target)

    def lookahead(self, passive: StepConfig) -> Lookahead:
        t0 = time.perf_counter()
        look, self.chain = passive_lookahead(self.pool, passive, self.ids, self.target)
        self.t_look = time.perf_counter() - t0
        return look

    def draft(self, config: StepConfig) -> DraftTree:
        with self.timer.phase("draft"):
            if not config.speculate:
                return self.empty
            tree = get_drafter(self.pool, config.drafter, self.target).draft(self.ids, config)
            return fit_tree(tree, self.max_new_tokens - self.generated)

    def verify(self, config: StepConfig, tree: DraftTree) -> Verification:
        """Target forward over [root, N nodes]: logits [N+1, V], the cache grows by N+1 entries. With experts
        offloaded, what it read from the slow tier is kept for the step's StepStats (draft forwards that
        share the store are draft time, not counted)."""
        if self.root_hidden is not None:  # the first step, after a prefill that ran the root
            hidden, self.root_hidden = self.root_hidden, None
            if not len(tree) and config.budgets is None:
                with self.timer.phase("verify"):
                    logits = self.target.get_output_embeddings()(hidden)[0]  # [1, V]
                return Verification(logits, None, kv.cache_len(self.cache) - 1)
            kv.crop(self.cache, kv.cache_len(self.cache) - 1)  # the tree is verified with its root
        before = None if self.offload is None else offload_counters(self.offload)
        with self.timer.phase("verify"):
            ver = verify(self.target, self.cache, self.ids[-1], tree, config, self.routing_now())
        if before is not None:
            misses, nbytes, stall = (b - a for a, b in zip(before, offload_counters(self.offload)))
            self.verify_offload = dict(offload_misses=misses, offload_bytes=nbytes, offload_stall=stall,
                                       offload_capacity=self.offload.config.capacity)
        return ver

    def accept(self, tree: DraftTree, ver: Verification) -> Acceptance:
        with self.timer.phase("accept", on_host=True):
            return accept_tree(tree, ver.logits, self.temperature, self.top_p, self.generator, ver.alive)

    def commit(self, config: StepConfig, tree: DraftTree, ver: Verification, acc: Acceptance) -> None:
        """Keep the root and the accepted rows in the cache; emit up to max_new_tokens, through EOS."""
        with self.timer.phase("commit", on_host=True):
            kv.commit(self.cache, ver.past_len, acc.rows)
            emitted = list(acc.tokens[:self.max_new_tokens - self.generated])
            cut = next((i for i, t in enumerate(emitted) if t in self.eos), None) if self.eos else None
            if cut is not None:
                emitted = emitted[:cut + 1]
            self.ids.extend(emitted)
            self.generated += len(emitted)
            if config.speculate:
                self.pool[config.drafter].commit(emitted)
            self.done = cut is not None or self.generated >= self.max_new_tokens
            self.emitted = emitted

    def stats(self, request_id: int, step: int, config: StepConfig, passive: StepConfig | None, tree: DraftTree,
              ver: Verification, acc: Acceptance, t_control: float) -> StepStats:
        stats = _stats(request_id, step, config, acc.accepted, self.emitted, len(self.ids) - len(self.emitted), tree,
                       ver, self.timer.read(), self.t_look, t_control, self.target.device, passive,
                       self.chain if self.temperature == 0 else None,  # checked under greedy decoding only
                       self.verify_offload)
        self.steps.append(stats)
        return stats

    def result(self, tokenizer) -> GenerationResult:
        out = self.ids[self.prompt_len:]
        text = tokenizer.decode(out, skip_special_tokens=True) if tokenizer is not None else ""
        return GenerationResult(text, out, self.prompt, self.steps, self.prefill_time, time.perf_counter() - self.t_start)


def _stats(request_id, step, cfg, accepted, emitted, context_len, tree, ver, times, t_look, t_control, device,
           passive, chain, offload) -> StepStats:
    """StepStats of one live step (through driver.step_stats). It reads only what verify staged for the host
    (engine/host.py: no sync after acceptance's); per-layer fields stay empty when the step did not
    capture routing."""
    report = ver.budget_report
    if report is not None:  # the budget's own count of what each layer asked for (see BudgetReport)
        unique = tuple(report.unique_experts)
    else:
        unique = () if ver.unique_experts is None else tuple(ver.unique_experts.tolist())
    return step_stats(
        request_id, step, cfg, accepted=accepted, emitted=emitted, tree_size=len(tree), tree_depth=tree.depth,
        context_len=context_len, times=(times.get("draft", 0.0) + t_look, times.get("verify", 0.0),
                              times.get("accept", 0.0), times.get("commit", 0.0)),
        t_control=t_control, unique=unique, agreement=None if ver.agreement is None else float(ver.agreement),
        kept=None if report is None else tuple(report.unique_experts_kept),
        mass_kept=None if report is None else tuple(report.router_mass_kept),
        substituted=None if report is None else tuple(report.tokens_substituted),
        nodes_kept=None if ver.rows_kept is None else int(ver.rows_kept) - 1,
        passive=passive, chain=chain, gpu=gpu_snapshot(device), offload=offload)
