"""What crosses the line between the engine and the deciders, as plain numbers (no torch).

Policies and the adaptive controller see only these types, so the same decision code runs live on a
model and offline in trace replay. The engine turns a `StepConfig` into tensors and work, and reports
each decode step back as a `StepStats`.

Definitions used everywhere (see docs/design.md):
- accepted length a: drafted tokens accepted in a step; a step emits a + 1 tokens (the bonus token),
  fewer only when EOS or max_new_tokens lands inside the accepted path.
- goodput: emitted tokens per second of wall time, drafting and control included.
- budget B_l: the most unique experts MoE layer l may compute in one verification pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from moetune.ngram import MAX_N


@dataclass(frozen=True)
class DrafterTraits:
    """What the engine, replay and the deciders may assume about a drafter from its name alone: code asks
    this table rather than comparing names."""

    # drafts by lookup in the context, without a model forward: it costs microseconds, and it may have
    # fewer than topk continuations to offer where a model drafter always offers topk
    model_free: bool
    # drafted and recorded as a chain only: its "tree" (a trie of several earlier continuations) is rare
    chain_only: bool
    # may be a policy's passive draft (Policy.passive_draft), drafted beside every step
    passive: bool
    # engine/batch.py drafts it for every request of a batch in one forward per level (its time is the
    # batch's, shared), where the others draft per request, in turn
    batched: bool = False
    max_order: int = 0  # the longest n-gram it matches by default (moetune.ngram.MAX_N); 0: none
    # drafts with the target's own layers: with the target's experts offloaded, drafting reads them too
    runs_target: bool = False


DRAFTER_TRAITS = {
    "draft_model": DrafterTraits(model_free=False, chain_only=False, passive=False, batched=True),
    "ngram": DrafterTraits(model_free=True, chain_only=True, passive=True, max_order=MAX_N),
    "self": DrafterTraits(model_free=False, chain_only=False, passive=False, runs_target=True),
}
DRAFTERS = tuple(DRAFTER_TRAITS)
SELECTIONS = ("prob_sum", "hit_count", "accept_weighted")
SUBSTITUTIONS = ("renormalize", "reselect")
# What a budget does to what does not fit: "evict" drops tree nodes (lossless: kept nodes are exact, only
# acceptance is lost), "substitute" drops experts and re-routes tokens onto the kept ones (lossy, MoE-Spec).
BUDGET_MODES = ("evict", "substitute")
# What one step may cost, checked before anything is built: nodes verified (the attention mask and KV
# grow with it; topk=1000 at depth 4 would ask for terabytes) and candidates grown before num_draft_tokens
# keeps the best (topk + (depth - 1) * topk**2, each a Python object and a draft-forward row).
MAX_DRAFT_NODES = 1024
MAX_GROWN_NODES = 65536


@dataclass(frozen=True)
class ModelShape:
    """The target's MoE shape, as policies and replay need it."""

    num_layers: int  # MoE layers (L)
    num_experts: int  # routed experts per layer (E)
    top_k: int  # experts per token (K)
    hidden_size: int = 0
    expert_intermediate_size: int = 0
    shared_expert: bool = False

    def __post_init__(self):
        if self.num_layers < 1 or self.num_experts < 1:
            raise ValueError(f"ModelShape needs num_layers >= 1 and num_experts >= 1, got {self}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"ModelShape.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")

    def check_budgets(self, budgets: tuple[int, ...], what: str) -> None:
        """One rule for expert budgets, live and in replay alike (the engine's BudgetPlan.validate
        enforces the same): each in [top_k, num_experts]. Below top_k a token loses experts it must
        have; above num_experts a budget would be silently meaningless, so it is refused, not clamped."""
        bad = next((b for b in budgets if not self.top_k <= b <= self.num_experts), None)
        if bad is not None:
            raise ValueError(f"{what}: expert budget {bad} is outside [{self.top_k}, {self.num_experts}] (top_k to "
                             f"num_experts of this model); use a budget in that range")


@dataclass(frozen=True)
class StepConfig:
    """One decode step's speculation settings, as a policy decides them.

    speculate=False means plain decoding (one target token, no draft). A chain is topk=1. With
    topk > 1 the drafter grows a tree by top-k expansion, keeping at most `num_draft_tokens` nodes
    ranked by cumulative draft probability (EAGLE-2 style); `tree` (a parent array, -1 = child of the
    root/last committed token) fixes a static shape instead. `budgets` caps unique experts per MoE
    layer during verification (None: no budget). budget_mode says how: "evict" (the default) drops the
    tree nodes whose experts do not fit and stays lossless; "substitute" drops experts, re-routing tokens
    by `selection` and `substitution` (lossy). eval_agreement (evaluation mode) also runs each budgeted
    verification unbudgeted, so StepStats.agreement measures what the budget cost; it roughly doubles
    verification time and is a no-op without budgets.
    """

    speculate: bool = True
    drafter: str = "draft_model"
    depth: int = 4  # draft steps (SGLang --speculative-num-steps, vLLM num_speculative_tokens)
    topk: int = 1  # branching per expanded node (SGLang --speculative-eagle-topk)
    num_draft_tokens: int | None = None  # node budget (SGLang --speculative-num-draft-tokens)
    tree: tuple[int, ...] | None = None  # static tree: parent array over draft nodes
    budgets: tuple[int, ...] | None = None  # per-layer expert budgets B_l, or None
    selection: str = "prob_sum"
    substitution: str = "reselect"
    eval_agreement: bool = False  # also verify unbudgeted and report argmax agreement (StepStats.agreement)
    budget_mode: str = "evict"  # BUDGET_MODES: evict nodes (lossless) or substitute experts (lossy)

    def __post_init__(self):
        if self.drafter not in DRAFTERS:
            raise ValueError(f"StepConfig.drafter must be one of {DRAFTERS}, got {self.drafter!r}")
        if self.depth < 1:
            raise ValueError(f"StepConfig.depth must be >= 1 (use speculate=False for plain decoding), got {self.depth}")
        if self.topk < 1:
            raise ValueError(f"StepConfig.topk must be >= 1, got {self.topk}")
        if self.num_draft_tokens is not None and self.num_draft_tokens < 1:
            raise ValueError(f"StepConfig.num_draft_tokens must be >= 1 or None, got {self.num_draft_tokens}")
        self._check_cost()
        if self.tree is not None:
            for i, p in enumerate(self.tree):
                if not -1 <= p < i:
                    raise ValueError(f"StepConfig.tree must be a parent array with -1 <= parent[i] < i; "
                                     f"node {i} has parent {p}")
        if self.budgets is not None and any(b < 1 for b in self.budgets):
            raise ValueError(f"StepConfig.budgets must be positive expert counts, got {self.budgets}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"StepConfig.selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.substitution not in SUBSTITUTIONS:
            raise ValueError(f"StepConfig.substitution must be one of {SUBSTITUTIONS}, got {self.substitution!r}")
        if self.budget_mode not in BUDGET_MODES:
            raise ValueError(f"StepConfig.budget_mode must be one of {BUDGET_MODES} (evict: lossless, drops tree "
                             f"nodes; substitute: lossy, drops experts), got {self.budget_mode!r}")
        if not isinstance(self.eval_agreement, bool):
            raise ValueError(f"StepConfig.eval_agreement must be True or False, got {self.eval_agreement!r}")

    def _check_cost(self) -> None:
        """Bound a step's work before any tree is built (see MAX_DRAFT_NODES)."""
        if self.tree is not None:
            if len(self.tree) > MAX_DRAFT_NODES:
                raise ValueError(f"StepConfig.tree has {len(self.tree)} nodes, above the limit of "
                                 f"{MAX_DRAFT_NODES}; pass a smaller tree")
            return
        if self.depth > MAX_DRAFT_NODES:
            raise ValueError(f"StepConfig.depth must be <= {MAX_DRAFT_NODES} (the most draft nodes a step may "
                             f"verify), got {self.depth}")
        if self.grown_nodes > MAX_GROWN_NODES:
            raise ValueError(f"StepConfig with depth={self.depth}, topk={self.topk} grows {self.grown_nodes} "
                             f"candidate nodes per step (topk + (depth - 1) * topk^2), above the limit of "
                             f"{MAX_GROWN_NODES}; lower topk (--topk) or depth (--depth)")
        if self.max_nodes > MAX_DRAFT_NODES:
            raise ValueError(f"StepConfig with depth={self.depth}, topk={self.topk} verifies up to "
                             f"{self.max_nodes} draft nodes per step, above the limit of {MAX_DRAFT_NODES}; set "
                             f"num_draft_tokens (--num-draft-tokens) to at most {MAX_DRAFT_NODES}, or lower "
                             f"topk or depth")

    @property
    def grown_nodes(self) -> int:
        """Candidate nodes a dynamic tree grows before num_draft_tokens keeps the best: the first level's
        topk, then each further level expands the topk best nodes by topk children (EAGLE-2). An n-gram
        trie (at most topk continuations of depth tokens) stays within it."""
        return self.topk + (self.depth - 1) * self.topk ** 2

    @property
    def max_nodes(self) -> int:
        """Upper bound on drafted nodes this config verifies (excluding the root)."""
        if not self.speculate:
            return 0
        if self.tree is not None:
            return len(self.tree)
        return min(self.grown_nodes, self.num_draft_tokens or self.grown_nodes)


PLAIN = StepConfig(speculate=False)


@dataclass(frozen=True)
class Sampling:
    """How output tokens are chosen: greedy (temperature 0) or sampled with nucleus top_p. Only the CLI
    builds it (from --temperature and --top-p), so its messages name those flags."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"--temperature must be >= 0 and finite (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Probe:
    """The outcome of a passive draft (Policy.passive_draft): what a model-free drafter would have
    proposed at this step, checked against the tokens the step emitted, so a policy learns its acceptance
    without spending a step on it (and, on that drafter's own steps, one level beyond a shallower chain
    that was accepted whole).

    Why it is sound: under greedy decoding a drafted token is accepted iff it equals the target's output
    there, and the step's emitted tokens are that output, so the probe's accepted length is the common
    prefix of its draft and the emitted tokens. Only that many outputs are known, so a probe that matched
    every emitted token and drafted more is `censored`: depths 1..accepted succeeded, the rest is unknown.
    Otherwise depth accepted + 1 failed (a mismatch, or the drafter proposed nothing more), unless every
    requested depth was accepted.
    """

    drafter: str
    depth: int  # depth the passive draft asked for
    drafted: int  # nodes it proposed (<= depth: a chain)
    accepted: int  # common prefix of its draft and the emitted tokens
    censored: bool  # accepted == emitted tokens < drafted: acceptance beyond is unknown

    @classmethod
    def check(cls, drafter: str, depth: int, drafted, emitted) -> "Probe":
        """From the drafted chain and the tokens the step emitted (both token sequences)."""
        a = 0
        for d, e in zip(drafted, emitted):
            if d != e:
                break
            a += 1
        return cls(drafter, depth, len(drafted), a, a == len(emitted) < len(drafted))

    @property
    def observed_depth(self) -> int:
        """Depths whose outcome is known: accepted ones, plus the first failure when one was seen."""
        return self.accepted if self.censored or self.accepted >= self.depth else self.accepted + 1


@dataclass(frozen=True)
class StepStats:
    """What one decode step did and cost. Times are seconds; per-layer tuples have one entry per MoE layer."""

    step: int
    config: StepConfig
    accepted: int  # drafted tokens accepted
    emitted: int  # tokens committed this step (accepted + bonus, cut by EOS / max_new_tokens)
    tree_size: int  # drafted nodes verified (excluding the root)
    tree_depth: int
    context_len: int  # committed tokens before this step
    unique_experts: tuple[int, ...] = ()  # per layer, over all verified tokens, before any budget
    unique_experts_kept: tuple[int, ...] = ()  # per layer, after the budget (== unique_experts when off)
    router_mass_kept: tuple[float, ...] = ()  # per layer, mean over tokens of top-k routing mass kept
    tokens_substituted: tuple[int, ...] = ()  # per layer, tokens that lost at least one top-k expert
    t_draft: float = 0.0
    t_verify: float = 0.0
    t_accept: float = 0.0
    t_commit: float = 0.0
    t_control: float = 0.0  # policy decide + observe
    agreement: float | None = None  # eval mode: argmax agreement of budgeted vs unbudgeted verification
    # over the verified rows (root + nodes); None unless eval_agreement is set on a budgeted step
    gpu: dict | None = field(default=None, compare=False)  # pynvml snapshot when a GPU is present
    probe: Probe | None = None  # the outcome of the policy's passive draft (Policy.passive_draft), if it ran
    # DecodeState.request_id of the step's request (moetune.driver sets it), so a policy files what it
    # observes without remembering whom it last decided for; None in StepStats built by hand
    request_id: int | None = None
    nodes_kept: int | None = None  # eviction budget: drafted nodes that survived every layer (None: no eviction)
    # in a batch, the whole forward this step shared (None alone): the latency fit learns from these, as
    # t_verify above is only this request's row share of it. Rows verified, unique experts summed over layers
    # (the union over requests; None when routing was not captured), context summed over requests, seconds.
    batch_tokens: int | None = None
    batch_experts: int | None = None
    batch_context: int | None = None
    batch_t_verify: float | None = None
    # in a batch with routing captured, the union of the other requests' unique experts, summed over layers:
    # batch_experts less it is what this request added to the forward (adaptive/experts.py learns the overlap)
    batch_experts_others: int | None = None
    # in a batch, the draft forward this request drafted in (engine/batch.py batches the drafters
    # DrafterTraits.batched; None alone, or when it drafted with none of them): the draft fit learns the whole
    # forward, as t_draft is only this request's node share of it. Its depth (deepest tree), nodes (summed),
    # seconds, and the requests that drafted in it (the controller learns what share of it a drafter pays).
    batch_draft_depth: int | None = None
    batch_draft_nodes: int | None = None
    batch_t_draft: float | None = None
    batch_draft_requests: int | None = None
    # experts offloaded to a slow tier (engine/offload.py live, traces/offload.py in replay; None when off): what
    # the verify forward (both, in evaluation mode; in a batch, the shared one) read from the slow tier on its
    # critical path. Misses: experts it computed that were not in the fast tier (summed over layers); bytes:
    # their reads; stall: seconds it waited on the slow tier, included in t_verify (live, also waits on
    # prefetches still in flight). The controller prices transfers with them (adaptive/transfers.py).
    offload_misses: int | None = None
    offload_bytes: int | None = None
    offload_stall: float | None = None
    offload_capacity: int | None = None  # experts per layer the fast tier holds (None: not reported)

    def __post_init__(self):
        forward = (self.batch_tokens, self.batch_context, self.batch_t_verify)
        if any(x is None for x in forward) != all(x is None for x in forward) or \
                (self.batch_experts is not None and self.batch_tokens is None) or \
                (self.batch_experts_others is not None and self.batch_experts is None):
            raise ValueError(f"StepStats: batch_tokens, batch_context and batch_t_verify are set together (a "
                             f"batched step) or not at all, batch_experts only with them and batch_experts_others "
                             f"only with batch_experts; got {forward}, batch_experts={self.batch_experts}, "
                             f"batch_experts_others={self.batch_experts_others}")
        draft = (self.batch_draft_depth, self.batch_draft_nodes, self.batch_t_draft, self.batch_draft_requests)
        if draft != (None,) * 4 and not (all(x is not None for x in draft) and min(draft[1], draft[3]) >= 1):
            raise ValueError(f"StepStats: batch_draft_depth, batch_draft_nodes (>= 1), batch_t_draft and "
                             f"batch_draft_requests (>= 1) are set together (a batched draft forward) or not at all; "
                             f"got {draft}")
        offload = (self.offload_misses, self.offload_bytes, self.offload_stall)
        if offload != (None, None, None) and not all(x is not None and x >= 0 for x in offload):
            raise ValueError(f"StepStats: offload_misses, offload_bytes and offload_stall are set together (experts "
                             f"offloaded), each >= 0, or not at all; got {offload}")
        if self.offload_capacity is not None and (self.offload_misses is None or self.offload_capacity < 1):
            raise ValueError(f"StepStats: offload_capacity (experts per layer in the fast tier) is >= 1 and comes with "
                             f"offload_misses; got {self.offload_capacity}, misses {self.offload_misses}")

    @property
    def step_time(self) -> float:
        return self.t_draft + self.t_verify + self.t_accept + self.t_commit + self.t_control


@dataclass(frozen=True)
class Lookahead:
    """What the policy's passive draft (Policy.passive_draft) would draft at this step, known before the
    policy decides: a model-free lookup costs microseconds. For the n-gram drafter, `order` is the length of
    the n-gram it matched (0: none, so it drafts nothing); acceptance depends strongly on it."""

    drafter: str
    order: int
    drafted: int  # tokens its chain holds (<= the passive draft's depth)


@dataclass(frozen=True)
class BatchContext:
    """The rest of the batch a request decodes in, as the previous step left it: what its options add to a
    forward that verifies the others anyway (adaptive/controller.py prices that marginal cost)."""

    requests: int  # the other active requests
    tokens: int  # rows they verified
    experts: tuple[int, ...]  # per layer, the union of their unique experts (empty: routing not captured)

    def __post_init__(self):
        if not 1 <= self.requests <= self.tokens:
            raise ValueError(f"BatchContext needs 1 <= requests <= tokens (each request verifies a row at least; "
                             f"a request alone has batch=None), got requests={self.requests}, tokens={self.tokens}")
        if any(e < 0 for e in self.experts):
            raise ValueError(f"BatchContext.experts must be non-negative counts per layer, got {self.experts}")

    @classmethod
    def unseen(cls, others: int) -> "BatchContext | None":
        """The context of a request whose last step did not share a forward with these `others` (its first
        step in the batch, or the batch grew around it): each verifies a row at least, experts unknown. None
        when alone. Why not None in a batch: the decision would price its options as if it ran alone, and
        calibrate serial drafters a batch waits for (adaptive/controller.py)."""
        return cls(others, others, ()) if others > 0 else None


@dataclass(frozen=True)
class DecodeState:
    """What a policy may look at when it decides the next step of one request."""

    request_id: int
    step: int  # steps taken so far in this request
    context_len: int  # committed tokens (prompt + generated)
    generated: int  # tokens generated so far
    remaining: int  # max_new_tokens - generated
    # only for a policy with a passive draft (live, and replay of traces with prompt ids)
    lookahead: Lookahead | None = None
    batch: BatchContext | None = None  # the other requests of a batch (None: decoding alone)
