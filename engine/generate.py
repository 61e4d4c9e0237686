"""The decoding loop: prefill, then per step decide -> draft -> verify -> accept -> commit -> observe.

One request at a time (batch size 1). The target's KV cache always holds every committed token except
the last one (the root of the next tree), so a step feeds [root, drafted nodes] and keeps the root plus
the accepted path. Policies may change drafter, shape or speculation on/off every step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from moetune.policies.base import Policy
from moetune.policies.static import Static
from moetune.step import PLAIN, PROBE_DRAFTERS, DecodeState, Lookahead, Probe, StepConfig, StepStats

from . import kv
from .accept import accept_greedy, accept_sample
from .drafters import DraftModelDrafter, NgramDrafter, Proposer, SelfDrafter
from .loader import moe_shape
from .telemetry import StepTimer, gpu_snapshot
from .tree import DraftTree, depths, subtree
from .verify import verify


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated tokens (prompt excluded)
    prompt_ids: list[int]
    steps: list[StepStats] = field(default_factory=list)
    prefill_time: float = 0.0
    decode_time: float = 0.0  # wall seconds from the first decide to the last commit

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.decode_time if self.decode_time > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        return sum(s.accepted for s in self.steps) / len(self.steps) if self.steps else 0.0


def _drafters(target, drafter) -> dict[str, Proposer]:
    if drafter is None:
        return {}
    if isinstance(drafter, Proposer):
        return {drafter.name: drafter}
    if isinstance(drafter, dict):
        return dict(drafter)
    return {"draft_model": DraftModelDrafter(drafter)}  # a bare draft model


def _get_drafter(pool: dict[str, Proposer], name: str, target) -> Proposer:
    """The drafter a step asks for; the model-free ones are built on first use."""
    if name not in pool:
        if name == "ngram":
            pool[name] = NgramDrafter(device=target.device)
        elif name == "self":
            pool[name] = SelfDrafter(target)
        else:
            raise ValueError(f"the step asks for drafter {name!r} but none was given; pass a draft model "
                             f"or a dict of drafters to generate")
    return pool[name]


def _lookahead(pool: dict[str, Proposer], probe: StepConfig | None, ids: list[int],
               target) -> tuple[Lookahead | None, list[int]]:
    """What the policy's probe drafter (Policy.probe) drafts at this step, before the policy decides:
    the Lookahead it sees, and the chain itself (checked against the emitted tokens afterwards)."""
    if probe is None:
        return None, []
    if probe.drafter not in PROBE_DRAFTERS or probe.topk != 1 or probe.tree is not None:
        raise ValueError(f"Policy.probe must be a chain (topk=1) of a model-free drafter {PROBE_DRAFTERS}; "
                         f"got drafter={probe.drafter!r}, topk={probe.topk}")
    order, chain = _get_drafter(pool, probe.drafter, target).lookahead(ids, probe.depth)
    return Lookahead(probe.drafter, order, len(chain)), chain


def _probe(probe: StepConfig | None, chain: list[int], emitted: list[int], temperature: float) -> Probe | None:
    """The probe's chain checked against the emitted tokens under greedy decoding (the emitted tokens are
    the target's argmax only then). Also on the probe drafter's own steps: a chain shallower than the
    probe's that was accepted whole learns one level more from the bonus token."""
    if probe is None or temperature != 0:
        return None
    return Probe.check(probe.drafter, probe.depth, chain, emitted)


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer; pass token id lists otherwise")
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("a prompt must have at least one token")
    return ids


def _fit(tree: DraftTree, remaining: int) -> DraftTree:
    """Drop nodes deeper than the tokens still allowed (a step emits at most depth + 1 tokens)."""
    if len(tree) and tree.depth >= remaining:
        return subtree(tree, [i for i, d in enumerate(depths(tree.parents)) if d < remaining])
    return tree


@torch.no_grad()
def prefill(target, cache, ids: list[int]) -> None:
    """Fill the target cache with every prompt token but the last (the first root)."""
    if len(ids) > 1:
        target.model(input_ids=torch.tensor([ids[:-1]], device=target.device), cache=cache,
                     use_cache=True)


def generate(target, tokenizer, prompts, drafter=None, policy: Policy | None = None,
             config: StepConfig | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_token_id: int | list[int] | None = None,
             on_step=None, routing: bool | None = None) -> list[GenerationResult]:
    """Speculative decoding of each prompt in turn; greedy (temperature 0) output equals plain greedy.

    prompts: a string, a list of strings, or a list of token-id lists. drafter: a Proposer, a draft
    model, or a dict name -> Proposer ("draft_model", "ngram", "self"); n-gram and self drafters are
    built when a step first asks for them. policy or config (not both) chooses each step; with neither,
    a draft chain of 4 when a drafter is given, plain decoding otherwise. on_step(request_index, stats).
    routing: capture per-layer routing into StepStats (unique experts, router mass); None: as the policy
    asks (Policy.wants_routing), so plain and static decoding skip it.
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
    if eos_token_id is None:
        eos_token_id = getattr(target.generation_config, "eos_token_id", None)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pool = _drafters(target, drafter)
    policy.setup(moe_shape(target))
    routing = getattr(policy, "wants_routing", True) if routing is None else routing
    generator = torch.Generator().manual_seed(seed)
    results = []
    for r, prompt in enumerate(prompts):
        res = _request(target, tokenizer, r, _prompt_ids(tokenizer, prompt), pool, policy, max_new_tokens,
                       temperature, top_p, generator, eos, on_step, routing)
        results.append(res)
    return results


def _request(target, tokenizer, r, ids, pool, policy, max_new, temperature, top_p, generator, eos, on_step,
             routing):
    prompt = list(ids)
    ids = list(ids)
    t0 = time.perf_counter()
    cache = kv.new_cache(target)
    prefill(target, cache, ids)
    for d in pool.values():
        d.prefill(ids)
    policy.begin(r, len(prompt))
    t1 = time.perf_counter()
    timer = StepTimer(target.device)
    steps: list[StepStats] = []
    t_observe = 0.0
    done = False
    while not done:
        generated = len(ids) - len(prompt)
        # the lookahead is the probe drafter's own lookup (what it drafts when chosen): timed as draft work
        c0 = time.perf_counter()
        probe = getattr(policy, "probe", None)
        look, probed = _lookahead(pool, probe, ids, target)
        c1 = time.perf_counter()
        cfg = policy.decide(DecodeState(r, len(steps), len(ids), generated, max_new - generated, look))
        t_look, t_decide = c1 - c0, time.perf_counter() - c1
        with timer.phase("draft"):
            if cfg.speculate:
                tree = _fit(_get_drafter(pool, cfg.drafter, target).draft(ids, cfg), max_new - generated)
            else:
                tree = DraftTree.empty(target.device)
        with timer.phase("verify"):
            ver = verify(target, cache, ids[-1], tree, cfg, routing)
        with timer.phase("accept"):
            acc = (accept_greedy(tree, ver.logits) if temperature == 0 else
                   accept_sample(tree, ver.logits, temperature, top_p, generator))
        with timer.phase("commit"):
            kv.commit(cache, ver.past_len, acc.rows)
            emitted = list(acc.tokens[:max_new - generated])
            cut = next((i for i, t in enumerate(emitted) if t in eos), None)
            if cut is not None:
                emitted = emitted[:cut + 1]
            ids.extend(emitted)
            if cfg.speculate:
                pool[cfg.drafter].commit(emitted)
            done = cut is not None or len(ids) - len(prompt) >= max_new
        times = timer.read()
        times["draft"] = times.get("draft", 0.0) + t_look
        stats = _stats(len(steps), cfg, acc.accepted, len(emitted), tree, len(ids) - len(emitted), ver,
                       times, t_decide + t_observe, target.device,
                       _probe(probe, probed, emitted, temperature))
        steps.append(stats)
        c0 = time.perf_counter()
        policy.observe(stats)
        t_observe = time.perf_counter() - c0
        if on_step is not None:
            on_step(r, stats)
    policy.end(r)
    out = ids[len(prompt):]
    text = tokenizer.decode(out, skip_special_tokens=True) if tokenizer is not None else ""
    return GenerationResult(text, out, prompt, steps, t1 - t0, time.perf_counter() - t1)


def _stats(step, cfg, accepted, emitted, tree, context_len, ver, times, t_control, device, probe) -> StepStats:
    """StepStats from one step; one host transfer for the per-layer routing numbers (none when the step
    did not capture routing: its per-layer fields stay empty)."""
    routing = ver.routing
    num_layers = len(routing.layers) if routing is not None else 0
    per_layer = (torch.cat([routing.unique_experts().float(), routing.router_mass()]).tolist()
                 if num_layers else [])
    unique = tuple(int(u) for u in per_layer[:num_layers])
    report = ver.budget_report
    return StepStats(
        step=step, config=cfg, accepted=accepted, emitted=emitted, tree_size=len(tree), tree_depth=tree.depth,
        context_len=context_len, unique_experts=unique,
        unique_experts_kept=tuple(report.unique_experts_kept) if report is not None else unique,
        router_mass_kept=tuple(report.router_mass_kept) if report is not None else (1.0,) * num_layers,
        tokens_substituted=tuple(report.tokens_substituted) if report is not None else (0,) * num_layers,
        t_draft=times.get("draft", 0.0), t_verify=times.get("verify", 0.0), t_accept=times.get("accept", 0.0),
        t_commit=times.get("commit", 0.0), t_control=t_control, agreement=ver.agreement, gpu=gpu_snapshot(device),
        router_mass=tuple(per_layer[num_layers:]), probe=probe)
