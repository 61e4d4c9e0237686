"""The adaptive controller: per step, the configuration with the highest expected goodput.

Why this shape: expected goodput of a config = expected emitted tokens / expected step time. The
numerator is per request (acceptance differs per request and phase, adaptive/acceptance.py); the
denominator is global (one machine, one model: adaptive/latency.py, experts.py, fidelity.py). The global
parts change slowly, so a frozen *plan* (adaptive/plan.py: per option, experts computed, per-layer budgets
at each fidelity level, acceptance factors, step-time terms) is rebuilt every refresh_every steps; a full
decision is a ranking draw of acceptance (adaptive/ranking.py) and an evaluation of every option
(candidates x budget levels) under the plan. Choices are held per slot (adaptive/slots.py) between full
decisions, and a drafter the posterior gave up on is tried again on a bounded schedule (adaptive/explore.py).

Cost: decide + observe run right after a forward pass has evicted the CPU caches, where a numpy call costs
~5 us and a full decision of ~60 of them cost ~300 us. So per-step work on the few dozen numbers of a
decision is plain Python (matrix products only for budgeted menus of 100-400 options), and observe only
counts the step: what it teaches the estimators (adaptive/learners.py) is learned, in order, at the next
full decision, replan, begin or end, several steps in a row while the learning code is warm.

Lookahead (moetune.step.Lookahead): before each step the controller sees the n-gram match order and
chain length. N-gram acceptance is learned per order, and choices are kept per order in slots
(adaptive/slots.py), each held and revised on its own: after a long match a deep n-gram chain, after a
short one the draft model or plain decoding.

Latency-target mode (adaptive/target.py): the best fidelity, then the best goodput, among options predicted
to meet the target time per output token. A target the seeded latency model proves unreachable raises
InfeasibleTarget at setup; one found unreachable online is flagged in the decision.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from moetune.step import DRAFTER_TRAITS, BatchContext, DecodeState, Lookahead, ModelShape, StepConfig, StepStats

from . import target
from .candidates import CandidateGrid, label
from .config import ControllerConfig
from .decision import Decision, InfeasibleTarget
from .eviction import EvictionChooser, EvictionConfig
from .explore import ExplorationSchedule
from .fidelity import EvalSampler
from .learners import Learners
from .plan import Menu, Plan, at_rate, build_menu, build_plan, calibration_options
from .ranking import Ranking
from .slots import RequestState, Slot

__all__ = ["Controller", "ControllerConfig", "Decision", "InfeasibleTarget"]

CONFIG_CACHE = 4096  # budgeted StepConfigs kept for reuse
EVAL_EVERY = 32  # one lossy budgeted step in this many (on average) also verifies unbudgeted (eval mode)
ROUTING_WARMUP, ROUTING_EVERY = 64, 8  # decoded alone: routing on each of the first 64 steps, then on 1 in 8


class Controller:
    """Global models shared across requests; per-request acceptance posteriors and choices."""

    def __init__(self, config: ControllerConfig = ControllerConfig(), profile=None):
        """`profile`: optional hardware profile (traces.latency.LatencyModel) seeding the latency model."""
        if profile is not None and not (hasattr(profile, "verify") and hasattr(profile, "draft")):
            raise ValueError(f"Controller profile must be a latency profile (traces.latency.LatencyModel), "
                             f"got {type(profile).__name__}")
        self.config = config
        self.profile = profile
        self.rng = np.random.default_rng(config.seed)
        # set up per model shape (setup):
        self.shape: ModelShape | None = None
        self.probe: StepConfig | None = None  # the passive n-gram draft (moetune.step.Probe) run every step
        self.menu: Menu | None = None
        self.plan: Plan | None = None
        self.learners: Learners | None = None
        self.ranking: Ranking | None = None
        self.exploration: ExplorationSchedule | None = None  # when a drafter is tried against the odds
        self.eviction: EvictionChooser | None = None  # lossless eviction budgets on chosen options
        self.eval_sampler: EvalSampler | None = None  # which lossy steps also measure their agreement
        self.unique: list = []  # per candidate: the plan's predicted unique experts per layer (L floats)
        self.floor: list = []  # per layer: predicted unique experts of the root and one node (L ints)
        self.evictable: list = []  # per candidate: experts are predicted to be a sizeable share of its verify
        self.calibration: list[int] = []  # options tried in turn before the latency model has data
        # drafters that draft request by request with a model forward (neither model-free nor batched by the
        # engine: DrafterTraits): in a batch every request waits while one runs, so a batch neither
        # calibrates nor force-tries them (at batch 16 auto ran 0.85x plain with them calibrated there, 0.91x
        # without); they stay on the menu at their price
        self.serial: frozenset[str] = frozenset()
        self.batch_calibration: list[int] = []  # calibration without them
        self.warmup = 0  # calibration steps
        # running state:
        self.requests: dict[int, RequestState] = {}
        self.handed: dict = {}  # the last ended request's slots: a new request's first choices
        self.current: int | None = None  # the request of the last decision (StepStats built by hand lack one)
        self.steps = 0
        # forwards observed, exploration's clock: a batch of B requests advances it by 1/B per request, so a
        # batch forces tries as often in time as one request does, not B times as often (each try holds the
        # shared forward)
        self.forwards = 0.0
        self.steps_since_plan = 0
        self.step_configs: dict = {}  # (candidate, budgets) -> StepConfig, built once
        self.unlearned: list = []  # steps observed but not yet learned from (see observe)
        self.calibrating = 0  # calibration decisions since the last observe (a batch decides several)

    # ---- setup --------------------------------------------------------------------------------------
    def setup(self, shape: ModelShape) -> None:
        c = self.config
        self.shape = shape
        grid = CandidateGrid(c.drafters, c.widths, c.max_depth)
        self.probe = StepConfig(drafter="ngram", depth=c.max_depth) if c.probe and "ngram" in c.drafters else None
        probe_family = None if self.probe is None else grid.family_of(self.probe)
        levels = [x for x in c.loss_levels if c.latency_target_ms is not None or x <= c.max_agreement_loss]
        self.menu = build_menu(grid, np.array(levels if c.budgets else []), probe_family)
        self.learners = Learners(c, grid, shape, None if self.probe is None else self.probe.drafter, probe_family,
                                 self.profile)
        self.ranking = Ranking(c.exploration, c.ucb_c, self.rng, len(grid.families), c.max_depth)
        self.exploration = ExplorationSchedule(c.drafters, 0 if c.exploration == "greedy" else c.explore_every,
                                               c.explore_every_max)
        self.eviction = EvictionChooser(EvictionConfig(levels=c.eviction_levels), len(grid.families), self.rng) \
            if c.eviction_levels else None
        self.requests, self.handed, self.current, self.unlearned = {}, {}, None, []
        self.eval_sampler = EvalSampler(EVAL_EVERY, c.seed)
        self.steps = self.calibrating = 0
        self.forwards = 0.0
        self.step_configs = {}
        self.replan()
        self.calibration = calibration_options(self.menu, self.plan)
        traits = {d: DRAFTER_TRAITS[d] for d in c.drafters}
        self.serial = frozenset(d for d, t in traits.items() if not (t.model_free or t.batched))
        self.batch_calibration = [o for o in self.calibration if self._drafter(o) not in self.serial]
        self.warmup = len(self.calibration) if c.warmup_steps is None else c.warmup_steps
        if c.latency_target_ms is not None and self.learners.latency.seeded:
            lb = self.lower_bound_ms()
            if lb > c.latency_target_ms:
                raise InfeasibleTarget(
                    f"latency target {c.latency_target_ms:g} ms/token is infeasible: the hardware profile's lower "
                    f"bound is {lb:.3g} ms/token even if every drafted token were accepted; set "
                    f"latency_target_ms >= {lb:.3g}")

    def lower_bound_ms(self) -> float:
        """Fastest time per output token the latency model allows (adaptive/target.py)."""
        latency, g = self.learners.latency, self.menu.grid
        min_experts = self.shape.num_layers * (1 if self.menu.levels.size else self.shape.top_k)
        return target.lower_bound_ms(latency.verify.theta, latency.overhead.value, g.tokens, g.depth, min_experts)

    # the estimators, for inspection (tests, health checks), with every observed step learned
    acceptance = property(lambda self: self.learn().acceptance)
    yields = property(lambda self: self.learn().yields)
    latency = property(lambda self: self.learn().latency)
    experts = property(lambda self: self.learn().experts)
    fidelity = property(lambda self: self.learn().fidelity)

    # ---- plan (global, every refresh_every steps) ---------------------------------------------------
    def replan(self) -> None:
        self.learn().check()
        estimates = self.learners.estimates(self.menu)
        self.plan = build_plan(self.menu, estimates)
        self.unique = estimates.unique[:, self.menu.token_index].T.tolist()
        self.floor = [math.ceil(u) for u in self.learners.experts.predict([2])[:, 0].tolist()]
        if self.eviction is not None:
            th, tokens = estimates.verify_theta, self.menu.grid.tokens
            experts_s = self.plan.expert_seconds[::self.menu.levels_per_candidate]  # (C,) unbudgeted, transfers in
            share = experts_s / np.maximum(th[0] + th[1] * tokens + experts_s, 1e-9)
            # trees only: a chain's eviction cuts it short, a depth the plan already chose against (Qwen3-shape
            # replay, batch 1: auto 0.94 of the best static config evicting its n-gram chains, 0.97 not; live,
            # a d4 chain at B = 12 ran as fast as unbudgeted, bench/results/eviction.md)
            trees = np.array([c.topk > 1 for c in self.menu.grid.configs])
            self.evictable = ((share >= self.eviction.config.min_expert_share) & trees).tolist()
        self.steps_since_plan = 0

    def _drafter(self, option: int) -> str | None:
        """The drafter of a flat option index (None: plain decoding)."""
        config = self.menu.grid.configs[option // self.menu.levels_per_candidate]
        return config.drafter if config.speculate else None

    def _config(self, option: int) -> StepConfig:
        """The StepConfig of a flat option index (budgets from the current plan), built once and cached."""
        c, j = divmod(option, self.menu.levels_per_candidate)
        base = self.menu.grid.configs[c]
        if j == 0:
            return base
        budgets = self.plan.budgets[option]
        cfg = self.step_configs.get((c, budgets))
        if cfg is None:
            if len(self.step_configs) > CONFIG_CACHE:
                self.step_configs.clear()
            cfg = self.step_configs[(c, budgets)] = StepConfig(
                drafter=base.drafter, depth=base.depth, topk=base.topk, num_draft_tokens=base.num_draft_tokens,
                budgets=budgets, budget_mode="substitute")
        return cfg

    # ---- per request --------------------------------------------------------------------------------
    def begin(self, request_id: int, prompt_len: int = 0) -> None:
        """A new request; its first choice per lookahead order is the last ended request's, held for
        decide_every - 1 steps (a full decision per order at every request start cost ~17% of steps
        live), then decided afresh from its own posterior."""
        hold, every = self.config.decide_every - 1, self.config.decide_every
        self.requests[request_id] = RequestState(slots={
            o: s.handed(hold, every) for o, s in self.handed.items() if s.settled is not None and hold > 0})
        self.learn().begin(request_id)

    def end(self, request_id: int) -> None:
        r = self.requests.pop(request_id, None)
        if r is not None:
            self.handed = r.slots
        self.learn().end(request_id)

    def _request(self, request_id: int) -> RequestState:
        if request_id not in self.requests:
            self.begin(request_id)
        return self.requests[request_id]

    def routing_now(self) -> bool:
        """Whether a request's next step, decoded alone, should capture per-layer routing: on the controller's
        first ROUTING_WARMUP steps, then on one in ROUTING_EVERY. Why sampled: routing teaches the unique-experts
        model, whose means per token count need no step-by-step record, while capturing it costs each verify
        a hook per layer and a host transfer (the latency fit takes the model's prediction on other steps).
        A batch captures it on every step: its requests price each other's experts with it."""
        return self.steps < ROUTING_WARMUP or self.steps % ROUTING_EVERY == 0

    # ---- decide -------------------------------------------------------------------------------------
    def decide(self, state: DecodeState) -> Decision:
        d = self._decide(state)
        if self.eval_sampler.want(d.config):  # eval mode: the fidelity model learns from measured agreement
            d = replace(d, config=replace(d.config, eval_agreement=True))
        return d

    def _decide(self, state: DecodeState) -> Decision:
        r = self._request(state.request_id)
        self.current = state.request_id
        r.share, r.miss = 1.0, 1.0
        if state.batch is not None:  # plan.Plan.batch_times; adaptive/experts.py for the overlap
            loaded = sum(state.batch.experts) / (self.shape.num_layers * self.shape.num_experts)
            r.share, r.miss = 1.0 / (state.batch.requests + 1), (1.0 - loaded) ** self.plan.overlap
        slot = r.enter(self._order(state.lookahead))
        if slot.hold > 0 and (state.batch is None or self._drafter(slot.option) not in self.serial):
            d = r.decision = slot.held()
            r.trying = False
            r.loss = d.agreement_loss
            return d
        self.learn()
        T = self._times(state.request_id, state.context_len, r, state.lookahead, state.batch)
        if not self.learners.latency.seeded and self.steps < self.warmup:
            return self._calibrate(state, r, T)
        curves, r.mean = self.ranking.rank(*self.learners.posterior(state.request_id, r.order))
        E, mean_E = self.plan.emitted((curves, r.mean), state.remaining)
        if state.batch is not None and self.config.latency_target_ms is None:
            # by the posterior mean, not a draw: each draw was a depth tried on the whole batch's clock
            # (Qwen3-shape replay, batch 64, serial drafting: 0.89 of the best static config with draws, 0.94
            # without); an n-gram chain accepted whole still learns the level past it from the probe
            # (adaptive/learners.py), and forced tries still come (adaptive/explore.py)
            E, T = mean_E, at_rate(self.learners.batch_goodput.value, mean_E, T)
        trial = self._trial(r, E, T)
        if trial is not None:
            return self._explore(r, slot, trial, mean_E, T)
        if self.config.latency_target_ms is None:
            return self._choose(r, slot, E, mean_E, T)
        d = self._decide_target(r, np.asarray(E), np.asarray(T), np.asarray(mean_E))
        slot.reschedule(not d.switched, False, self.config.decide_every, self.config.decide_every_max)
        return d

    def _order(self, look: Lookahead | None) -> int | None:
        """The lookahead's n-gram order as a slot key: None without one, 0 when it drafts nothing."""
        if look is None or not self.learners.orders:
            return None
        return min(look.order, self.learners.orders) if look.drafted else 0

    def _times(self, request_id: int, context_len: int, r: RequestState, look: Lookahead | None,
               batch: BatchContext | None):
        """Predicted step seconds of every option (flat): verify(tokens, experts, context) + draft, less
        the verify time of the nodes this request's drafter is not expected to draft (adaptive/yields.py).
        With a lookahead the n-gram drafter's nodes are known: options deeper than its chain are masked
        and the rest draft in full. In a batch, what each option adds to the shared forward plus its share
        of the forward's constant (plan.Plan.batch_times; why: priced as if alone, a drafted token paid for
        experts the batch loads anyway, and auto ran plain at batch 8 and more)."""
        masked, order = (), r.order
        if order is not None:
            masked = self.menu.masked[min(0 if look is None else look.drafted, self.config.max_depth) if order else 0]
        times = self.plan.step_times(self.learners.shortfall(request_id, order), context_len, masked)
        if batch is None:
            return times
        return self.plan.batch_times(times, r.miss, batch.requests + 1)

    def _calibrate(self, state: DecodeState, r: RequestState, T) -> Decision:
        """The next calibration option (the latency model has no data yet: see plan.calibration_options).
        Counted over decisions, not observed steps: a batch's requests all decide before any observe, and
        counting steps gave them all the same option (only plain decoding calibrated at batch 8)."""
        options = self.calibration if state.batch is None else self.batch_calibration
        best = options[(self.steps + self.calibrating) % len(options)]
        self.calibrating += 1
        r.mean = self.learners.mean(state.request_id, r.order)
        [E] = self.plan.emitted((r.mean,), state.remaining)
        return self._commit(r, best, E, T, switched=best != r.slot.option, evict=False)

    def _trial(self, r: RequestState, E, T) -> int | None:
        """A forced try due now (adaptive/explore.py): the due drafter's unbudgeted option of the best
        ranked goodput. With a latency target only while the request runs ahead of it with the usual
        margin (a target is a promise, not an experiment)."""
        drafter = self.exploration.due(self.forwards)
        waited_for = drafter in self.serial and r.share < 1.0  # a serial drafter in a batch
        if drafter is None or waited_for or self.config.latency_target_ms is not None and not target.ahead(
                self.config, r):
            return None
        option = max(self.menu.drafter_options[drafter], key=lambda o: E[o] / T[o])
        return option if self.exploration.priced(drafter, self.forwards, T[option] / T[0]) else None

    def _explore(self, r: RequestState, slot: Slot, option: int, mean_E, T) -> Decision:
        """A forced try, for one step; it pays if it reaches the best option's predicted goodput."""
        self.exploration.tried(self.menu.grid.configs[option // self.menu.levels_per_candidate].drafter,
                               max(e / t for e, t in zip(mean_E, T)), T[0])
        slot.reschedule(False, True, self.config.decide_every, self.config.decide_every_max)
        return self._commit(r, option, mean_E, T, switched=option != slot.option, evict=False)

    def _choose(self, r: RequestState, slot: Slot, E, mean_E, T) -> Decision:
        """Goodput mode: the option of the best ranked goodput, kept unless beaten by the hysteresis. The
        selection is plain Python (numpy calls cost ~5 us each right after a forward pass); a budgeted
        menu's arrays (plan.Plan) become lists in one division."""
        c = self.config
        if isinstance(T, np.ndarray):
            util, mean = (np.array((E, mean_E)) / T).tolist()
        else:
            util, mean = [e / t for e, t in zip(E, T)], [e / t for e, t in zip(mean_E, T)]
        top = max(mean)
        if c.exploration != "greedy" and c.explore_slack < 1.0:
            # explore only among options whose expected goodput is within explore_slack of the best,
            # so a lucky draw cannot buy a step far worse than the known best (bounded regret)
            least = (1.0 - c.explore_slack) * top
            util = [u if m >= least else 0.0 for u, m in zip(util, mean)]
        best, cur = max(range(len(util)), key=util.__getitem__), slot.option
        keep = cur >= 0 and self.plan.valid[cur] and (
            slot.dwell < c.min_dwell or util[cur] * (1 + c.hysteresis) >= util[best])
        choice = cur if keep else best
        # an option the posterior mean ranks clearly lower is an exploratory draw: tried for one step
        slot.reschedule(choice == cur, mean[choice] < top * (1 - c.hysteresis), c.decide_every, c.decide_every_max)
        return self._commit(r, choice, mean_E, T, switched=not keep and best != cur)

    def _decide_target(self, r: RequestState, E: np.ndarray, T: np.ndarray, mean_E: np.ndarray) -> Decision:
        """Latency-target mode (adaptive/target.py), vectorized: its menu holds every budget level."""
        choice = target.choose(self.config, self.plan, r, E, T, mean_E)
        if choice is not None:
            option, switched = choice
            r.infeasible = False
            return self._commit(r, option, mean_E, T, switched=switched)
        option, infeasible, msg = target.fastest(self.config, self.plan, r, T, E / T, mean_E,
                                                 lambda o: label(self._config(o)))
        r.infeasible = infeasible
        if msg:
            r.notes.append(msg)
        return self._commit(r, option, mean_E, T, switched=option != r.slot.option, infeasible=infeasible,
                            message=msg)

    def _commit(self, r: RequestState, option: int, E, T, switched: bool, infeasible: bool = False,
                message: str = "", evict: bool = True) -> Decision:
        """Commit `option` (evict=False: as it is, and not handed to the next request; calibration and forced
        tries measure the option itself)."""
        r.loss = self.plan.loss[option]
        r.trying = not evict
        e, t = float(E[option]), float(T[option])
        # no eviction in a batch: the step's experts are the batch's union, so a request's share of the step
        # (its rows) falls when it evicts while the step does not, and the chooser, which learns from the
        # goodput a request's steps delivered, took that for a gain (Qwen3-shape replay, batch 8 / 16 / 32:
        # auto 0.94 / 0.90 / 0.88 of the best static config evicting, 0.95 / 0.94 / 0.91 without)
        config, eviction = self._evict(option) if evict and r.share == 1.0 else (self._config(option), None)
        r.decision = r.slot.commit(option, Decision(config, e / t, t / e * 1e3, r.loss, switched, infeasible,
                                                    message, eviction), settled=evict)
        return r.decision

    def _evict(self, option: int) -> tuple[StepConfig, tuple[int, int] | None]:
        """The option's config, with the eviction level the chooser draws for its family applied (a
        speculative option without a lossy budget only, whose experts are a sizeable share of its time);
        the (family, level) drawn, None for no choice."""
        config = self._config(option)
        c, j = divmod(option, self.menu.levels_per_candidate)
        family = self.menu.grid.family_of(config)
        if self.eviction is None or j or family is None or not self.evictable[c]:
            return config, None
        level = self.eviction.choose(family)
        if level == 0:
            return config, (family, 0)
        budgets = self.eviction.budgets(level, self.unique[c], self.floor, self.shape.num_experts)
        if budgets is None:
            return config, (family, 0)
        key = (c, budgets, "evict")
        cfg = self.step_configs.get(key)
        if cfg is None:
            if len(self.step_configs) > CONFIG_CACHE:
                self.step_configs.clear()
            cfg = self.step_configs[key] = replace(config, budgets=budgets, budget_mode="evict")
        return cfg, (family, level)

    # ---- observe ------------------------------------------------------------------------------------
    def observe(self, stats: StepStats) -> None:
        """Count the step and release a hold the probe beat; what the step teaches the estimators is
        learned at the next full decision, replan, begin or end (learn), in order, as if learned now: right
        after a forward pass the learning code runs cold (~40 us a step on a CPU), several steps in a row
        warm."""
        rid = self.current if stats.request_id is None else stats.request_id  # None: StepStats built by hand
        if rid is None:
            return
        r = self._request(rid)
        if self.learners.beaten(stats, r.order):
            r.slot.release()  # the probe would have done clearly better: decide afresh next step
        self.unlearned.append((rid, stats, r.order, r.loss, r.mean))
        self.calibrating = 0
        self._judge_eviction(r.decision, stats)
        r.count(stats.step_time, stats.emitted)
        if stats.batch_t_verify is not None and not r.trying:  # the batch's goodput under its settled choices
            rows = (stats.tree_size + 1) / stats.batch_tokens
            self.learners.batch_goodput.observe(stats.emitted, stats.step_time, rows)
        self.steps += 1
        self.forwards += r.share
        self._seen(stats)
        self.steps_since_plan += 1
        if self.steps_since_plan >= self.config.refresh_every or \
                (not self.learners.latency.seeded and self.steps == self.warmup):
            self.replan()

    def _judge_eviction(self, decision: Decision | None, stats: StepStats) -> None:
        """Teach the eviction chooser what the step delivered against its option's predicted goodput."""
        if self.eviction is None or decision is None or decision.eviction is None or stats.step_time <= 0 \
                or decision.config != stats.config:
            return
        family, level = decision.eviction
        self.eviction.observe(family, level, stats.emitted / stats.step_time / decision.goodput)

    def learn(self) -> Learners:
        """Learn from the steps observed since the last call (each with its decision's lookahead order,
        predicted loss and posterior mean, and the plan it ran under); returns the learners."""
        for rid, stats, order, loss, mean in self.unlearned:
            self.learners.observe(rid, stats, order, loss, mean, self.plan.layer_weights)
        self.unlearned.clear()
        return self.learners

    def _seen(self, stats: StepStats) -> None:
        """Tell the exploration schedule which drafters this step observed (its own, and the probe's). The
        first step with experts offloaded takes drafters that run the target itself out of calibration:
        each of their draft levels reads the target's missing experts from the slow tier (self-speculation
        calibrating took 0.3-0.7 s a step against 60 ms for plain decoding, 8 of 32 experts resident)."""
        if stats.offload_misses is not None and self.steps < self.warmup:
            runs = {d for d in self.config.drafters if DRAFTER_TRAITS[d].runs_target}
            self.calibration = [o for o in self.calibration if self._drafter(o) not in runs]
            self.batch_calibration = [o for o in self.batch_calibration if self._drafter(o) not in runs]
        drafter = stats.config.drafter if stats.config.speculate else None
        self.exploration.judge(drafter, stats.emitted, stats.step_time)
        if drafter is not None:
            self.exploration.observed(drafter, self.forwards)
        if stats.probe is not None:
            self.exploration.observed(stats.probe.drafter, self.forwards)
