"""One request of a batch (engine/batch.py): what it holds between steps, its result, and the checks on
generate_batch's arguments."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moetune.policies.static import Static
from moetune.step import PLAIN, BatchContext, StepConfig, StepStats

from .accept import Acceptance
from .drafters import Proposer
from .generate import GenerationResult
from .tree import DraftTree


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
                 pool: dict[str, Proposer], arrival: float, generator: torch.Generator | None = None):
        self.index, self.request_id, self.pool, self.arrival = index, request_id, pool, arrival
        self.generator = generator  # its sampling draws (None: greedy)
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
        self.draft_forward: dict | None = None  # this step's shared draft forward (StepStats.batch_draft_*)

    def result(self, tokenizer) -> BatchResult:
        out = self.ids[len(self.prompt):]
        text = tokenizer.decode(out, skip_special_tokens=True) if tokenizer is not None else ""
        return BatchResult(text, out, self.prompt, self.steps, self.prefill_time, self.finish - self.t_start,
                           self.request_id, self.arrival, self.joined, self.first_token, self.finish)


def emit(r: Request, eos: frozenset) -> None:
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


def check_arguments(prompts, policy, config, batch_size, max_new_tokens, arrivals, request_ids,
                     temperature, top_p) -> tuple[list[int], list[float]]:
    """Request ids and arrival times, or a ValueError naming the argument and the fix."""
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt")
    if not (temperature >= 0 and 0 < top_p <= 1):
        raise ValueError(f"need temperature >= 0 (0: greedy) and 0 < top_p <= 1, got {temperature}, {top_p}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (requests decoded together), got {batch_size!r}; "
                         "pass batch_size=1 or more")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}; pass max_new_tokens=1 or more")
    if policy is not None and config is not None:
        raise ValueError("pass either a policy or a fixed config, not both")
    fixed = config if config is not None else getattr(policy, "config", None) if isinstance(policy, Static) else None
    if fixed is not None and fixed.budgets is not None and fixed.budget_mode != "evict":
        raise ValueError("generate_batch applies eviction budgets only (substitution re-routes a forward that "
                         "serves every request); pass budget_mode='evict' or budgets=None")
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
