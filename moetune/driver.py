"""One request, step by step: the decode-step protocol shared by live decoding and trace replay.

Why one driver: the protocol (what a policy sees before it decides, what each phase hands the next, how
StepStats are built and control time is counted) used to be written once for the engine and once for
replay, and the copies drifted. Here it is written once, torch-free, over a small `Backend` protocol
with two implementations: the live engine (moetune.engine.generate.LiveBackend: tensors, KV cache,
drafters, measured times) and a recorded trace (moetune.traces.replay.TraceBackend: recorded positions,
modelled times, replay accounting). Recording is the live backend plus a trace writer.

One step, in order:
    lookahead -> decide -> draft -> verify -> accept -> commit -> observe
- lookahead: what the policy's passive draft (Policy.passive_draft, an n-gram chain) would draft here,
  shown to the policy before it decides (only when it has one); after the step it is checked against the
  emitted tokens (StepStats.probe, a moetune.step.Probe);
- decide: the policy turns a DecodeState into a StepConfig (timed: control);
- draft / verify / accept / commit: the backend's work; commit emits tokens and says when the request is
  done (EOS, max_new_tokens, or the end of the recorded output);
- observe: the backend reports the step as a StepStats (built by `step_stats`, the only place one is
  built) and the policy learns from it (timed: control). A policy that keeps Policy's no-op observe gets
  no StepStats unless the backend keeps them (live results do): building one costs about a third of a
  replayed step.

Worked example: a prompt of 10 tokens, max_new_tokens=8, greedy, a static chain of depth 4, request 7:
    step 0: DecodeState(request_id=7, step=0, context_len=10, generated=0, remaining=8)
            -> StepConfig(depth=4): 4 drafted nodes, 5 verified rows (root + 4); the first 2 agree with
            the target -> commit 2 accepted + 1 bonus token
            -> observe StepStats(request_id=7, step=0, accepted=2, emitted=3, tree_size=4, context_len=10)
    step 1: DecodeState(7, 1, context_len=13, generated=3, remaining=5) -> all 4 accepted + bonus
            -> commit 5 tokens: 8 generated, so commit sets done and the policy's `end` follows.
In code, with any Policy and Backend:
    backend = LiveBackend(target, drafters, prompt_ids, max_new_tokens=8, ...)   # or TraceBackend(...)
    control_s = decode(policy, backend, request_id=7)
"""
from __future__ import annotations

from time import perf_counter
from typing import Any, Callable, Protocol, Sequence

from moetune.policies.base import Policy
from moetune.step import DRAFTER_TRAITS, DecodeState, Lookahead, Probe, StepConfig, StepStats


class Backend(Protocol):
    """What does the work of one request's steps. Phases hand their results on through the driver, so a
    backend may return whatever suits it (a DraftTree and logits live; a recorded tree and its
    counterfactual outcome in replay)."""

    prompt_len: int  # tokens in the prompt
    max_new_tokens: int  # the request's limit on generated tokens
    generated: int  # tokens committed so far (commit advances it)
    done: bool  # set by commit when the request ends
    keeps_steps: bool  # keeps every StepStats (so they are built even for a policy that ignores them)

    def prefill(self, passive: StepConfig | None) -> None:
        """Set up the request (caches, drafters, the passive drafter's lookup)."""

    def lookahead(self, passive: StepConfig) -> Lookahead | None:
        """What the passive draft `passive` would draft at this step (None: unknown here)."""

    def draft(self, config: StepConfig) -> Any:
        """The tree this step verifies."""

    def verify(self, config: StepConfig, tree: Any) -> Any:
        """The target's verdict on the tree."""

    def accept(self, tree: Any, verdict: Any) -> Any:
        """The accepted path (plus the bonus token)."""

    def commit(self, config: StepConfig, tree: Any, verdict: Any, accepted: Any) -> None:
        """Emit the step's tokens: advance `generated`, set `done`."""

    def stats(self, request_id: int, step: int, config: StepConfig, passive: StepConfig | None, tree: Any,
              verdict: Any, accepted: Any, t_control: float) -> StepStats:
        """The step just committed, as a StepStats (through `step_stats`)."""


def check_passive_draft(passive: StepConfig | None) -> StepConfig | None:
    """A passive draft must be a chain of a drafter that may run passively (DrafterTraits.passive): it
    runs beside every step, so it must cost microseconds, and a chain is what moetune.step.Probe checks
    against the emitted tokens."""
    if passive is not None and (not DRAFTER_TRAITS[passive.drafter].passive or passive.topk != 1
                                or passive.tree is not None):
        allowed = [name for name, traits in DRAFTER_TRAITS.items() if traits.passive]
        raise ValueError(f"Policy.passive_draft must be a chain (topk=1) of a drafter that may run passively "
                         f"{allowed}; got drafter={passive.drafter!r}, topk={passive.topk}")
    return passive


def observes(policy) -> bool:
    """Whether the policy learns from StepStats (it overrides Policy's no-op observe)."""
    return getattr(type(policy), "observe", None) is not Policy.observe


def decode(policy: Policy, backend: Backend, request_id: int,
           on_step: Callable[[StepStats], None] | None = None) -> float:
    """Run one request to its end (see the module docstring); returns the policy's control seconds
    (begin, every decide and observe, end). Each StepStats carries t_control = this step's decide plus
    the previous step's observe (the observe of a step runs after its stats are built)."""
    clock = perf_counter
    passive = check_passive_draft(getattr(policy, "passive_draft", None))  # duck-typed policies may omit it
    t0 = clock()
    policy.begin(request_id, backend.prompt_len)
    control = clock() - t0
    backend.prefill(passive)  # after begin: live decode time runs from here, without the policy's set-up
    report = backend.keeps_steps or on_step is not None or observes(policy)
    prompt_len, max_new = backend.prompt_len, backend.max_new_tokens
    decide, draft, verify, accept, commit = policy.decide, backend.draft, backend.verify, backend.accept, backend.commit
    step, t_observe = 0, 0.0
    while not backend.done:
        generated = backend.generated
        look = None if passive is None else backend.lookahead(passive)
        t0 = clock()
        config = decide(DecodeState(request_id, step, prompt_len + generated, generated, max_new - generated, look))
        t_decide = clock() - t0
        tree = draft(config)
        verdict = verify(config, tree)
        accepted = accept(tree, verdict)
        commit(config, tree, verdict, accepted)
        if report:
            stats = backend.stats(request_id, step, config, passive, tree, verdict, accepted, t_decide + t_observe)
            t0 = clock()
            policy.observe(stats)
            t_observe = clock() - t0
            control += t_observe
            if on_step is not None:
                on_step(stats)
        control += t_decide
        step += 1
    t0 = clock()
    policy.end(request_id)
    return control + clock() - t0


def step_stats(request_id: int, step: int, config: StepConfig, *, accepted: int, emitted: Sequence[int],
               tree_size: int, tree_depth: int, context_len: int, times: tuple[float, float, float, float],
               t_control: float, unique: tuple = (), kept: tuple | None = None, mass_kept: tuple | None = None,
               substituted: tuple | None = None, nodes_kept: int | None = None, agreement: float | None = None,
               passive: StepConfig | None = None, chain: Sequence[int] | None = None,
               gpu: dict | None = None, forward: dict | None = None, draft_forward: dict | None = None,
               offload: dict | None = None) -> StepStats:
    """The one place a StepStats is built, live and in replay alike.

    emitted: the tokens the step committed (its count goes into StepStats.emitted; the passive draft is
    checked against them). times: (draft, verify, accept, commit) seconds. Per-layer routing (`unique`, one
    entry per MoE layer, or empty when not captured): without a budget nothing is dropped, so kept defaults
    to unique, mass kept to 1 and substituted tokens to 0. passive: the policy's passive draft; chain: its
    chain at this step, None when unknown (sampling, where emitted tokens are not the target's argmax, or a
    trace without that drafter): then StepStats.probe is None. forward: in a batch, the shared forward's
    StepStats.batch_* fields; draft_forward: the shared draft forward's (batch_draft_*). offload: with experts
    offloaded, the verify forward's StepStats.offload_* fields.
    """
    layers = len(unique)
    return StepStats(
        step=step, config=config, accepted=accepted, emitted=len(emitted), tree_size=tree_size,
        tree_depth=tree_depth, context_len=context_len, unique_experts=unique,
        unique_experts_kept=unique if kept is None else kept,
        router_mass_kept=(1.0,) * layers if mass_kept is None else mass_kept,
        tokens_substituted=(0,) * layers if substituted is None else substituted, nodes_kept=nodes_kept,
        t_draft=times[0], t_verify=times[1], t_accept=times[2], t_commit=times[3], t_control=t_control,
        agreement=agreement, gpu=gpu,
        probe=None if passive is None or chain is None else Probe.check(passive.drafter, passive.depth, chain,
                                                                        emitted),
        request_id=request_id, **(forward or {}), **(draft_forward or {}), **(offload or {}))
