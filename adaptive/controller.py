"""The adaptive controller: per step, the configuration with the highest expected goodput.

Why this shape: expected goodput of a config = expected emitted tokens / expected step time. The
numerator is per request (acceptance differs per request and phase, adaptive/acceptance.py); the
denominator is global (one machine, one model: adaptive/latency.py, experts.py, fidelity.py). The
global parts change slowly, so a *plan* (per candidate: experts computed, per-layer budgets at each
fidelity level, acceptance factors) is recomputed every few steps; the per-step part is a Thompson draw
of acceptance and a few vectorised operations over (candidates x budget levels).

Per-layer budgets come from adaptive/plan.py (experts removed in order of least marginal fidelity loss).
Per step, the latency model's coefficients fold the context length into three numbers, so predicted step
times of every option are one small matrix-vector product; the Thompson draw and the posterior mean share
one batched evaluation of expected emitted tokens. The global models queue observations and fold them
in when the plan is recomputed, so observe is a few scalar updates.

Lookahead (moetune.step.Lookahead): before each step the controller sees the n-gram match order and
chain length. N-gram acceptance is learned per order (rows past the grid's families), and choices are
kept per order in slots, each held and revised on its own: after a long match a deep n-gram chain, after
a short one the draft model or plain decoding.

Latency-target mode: among configs predicted to meet the target time per output token, take the best
fidelity (lossless whenever possible), then the best goodput. A request behind its target aims lower to
catch up, but goes lossy for it only when no lossless config meets the target with the usual margin. A
target the seeded latency model proves unreachable raises InfeasibleTarget at setup; one found unreachable
online is flagged in the decision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from moetune.step import DecodeState, ModelShape, StepConfig, StepStats

from .acceptance import AcceptanceConfig, AcceptanceModel
from .config import ControllerConfig
from .candidates import CandidateGrid, label
from .experts import ExpertModel
from .fidelity import FidelityModel
from .latency import LatencyConfig, OnlineLatency
from .plan import allocate
from .yields import DraftYield, YieldConfig

MIN_EVIDENCE = 8  # steps of a request before its target is declared infeasible online
NGRAM_ORDERS = 4  # n-gram match orders with their own acceptance curves (the drafter's max_n; longer share)


class InfeasibleTarget(ValueError):
    """The requested latency target cannot be met on this machine and model."""


@dataclass(frozen=True)
class Decision:
    """One step's choice and why: predicted goodput (tokens/s) and time per output token, target status."""

    config: StepConfig
    goodput: float
    ms_per_token: float
    agreement_loss: float = 0.0
    switched: bool = False
    infeasible: bool = False
    message: str = ""


@dataclass
class _Slot:
    """A request's choice in one situation (one lookahead order): choices differ by order, and each is
    held and revised on its own, so steps alternating between orders do not force full decisions."""

    option: int = -1  # flat index into (candidates x levels)
    dwell: int = 0
    last: Decision | None = None  # the last full decision, held for interval - 1 steps
    hold: int = 0  # steps the last decision is still held
    interval: int = 1  # steps between full decisions now (decide_every .. decide_every_max)


@dataclass
class _Request:
    slots: dict = field(default_factory=dict)  # lookahead order (None: no lookahead) -> _Slot
    slot: _Slot = field(default_factory=_Slot)  # this step's
    order: int | None = None  # the lookahead's n-gram order at this step (None: no lookahead)
    loss: float = 0.0  # predicted agreement loss of this step's decision
    time: float = 0.0
    emitted: int = 0
    steps: int = 0
    infeasible: bool = False
    notes: list = field(default_factory=list)
    mean: np.ndarray | None = None  # posterior mean acceptance (families, depths) at the last full decision


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
        self.shape: ModelShape | None = None

    # ---- setup --------------------------------------------------------------------------------------
    def setup(self, shape: ModelShape) -> None:
        c = self.config
        self.shape = shape
        self.grid = CandidateGrid(c.drafters, c.widths, c.max_depth)
        F = len(self.grid.families)
        # the passive n-gram draft (moetune.step.Probe): the deepest n-gram chain, observed every step
        self.probe = StepConfig(drafter="ngram", depth=c.max_depth) if c.probe and "ngram" in c.drafters else None
        self._probe_family = None if self.probe is None else self.grid.family_of(self.probe)
        # with a lookahead (moetune.step.Lookahead) n-gram acceptance is learned per match order: rows
        # F .. F + NGRAM_ORDERS - 1; _rows[o] maps the grid's families to rows when the order is o
        self._orders = NGRAM_ORDERS if self.probe is not None else 0
        self._rows = np.tile(np.arange(F), (self._orders + 1, 1))
        if self._orders:
            self._rows[1:, self._probe_family] = F + np.arange(self._orders)
        self.acceptance = AcceptanceModel(AcceptanceConfig(
            max_depth=c.max_depth, families=F + self._orders, prior_strength=c.prior_strength,
            request_decay=c.request_decay, global_decay=c.global_decay))
        self.yields = DraftYield(YieldConfig(families=len(self.grid.families), request_decay=c.request_decay))
        self.latency = OnlineLatency(c.drafters, LatencyConfig(forgetting=c.latency_forgetting))
        max_tokens = int(self.grid.tokens.max())
        self.experts = ExpertModel(shape, max_tokens)
        self.fidelity = FidelityModel(shape.num_layers)
        if self.profile is not None:
            self.latency.seed(self.profile)
        levels = [x for x in c.loss_levels if c.latency_target_ms is not None or x <= c.max_agreement_loss]
        self.levels = np.array(levels if c.budgets else [])
        self.requests: dict[int, _Request] = {}
        self._handed: dict = {}  # the last ended request's slots: a new request's first choices
        self.current: int | None = None
        self.steps = 0
        self._since_plan = 0
        self._powers = np.arange(1, c.max_depth + 1, dtype=float)
        F = len(self.grid.families)
        self._curve_buffer = np.zeros((2, F, c.max_depth))
        # 64 decisions' random numbers at a time: [i, 0] normals, [i, 1] uniforms (see _gamma)
        self._draws, self._draw_next = np.zeros((64, 2, 2, F, c.max_depth)), 64
        self._config_cache: dict = {}
        self._token_counts, self._token_index = np.unique(self.grid.tokens, return_inverse=True)
        self._draft_features = self._drafting_rows()
        self._plan()
        self._look_masks = self._lookahead_masks()
        self._calibration = self._calibration_options()
        self._warmup = len(self._calibration) if c.warmup_steps is None else c.warmup_steps
        if c.latency_target_ms is not None and self.latency.seeded:
            lb = self.lower_bound_ms()
            if lb > c.latency_target_ms:
                raise InfeasibleTarget(
                    f"latency target {c.latency_target_ms:g} ms/token is infeasible: the hardware profile's lower "
                    f"bound is {lb:.3g} ms/token even if every drafted token were accepted; set "
                    f"latency_target_ms >= {lb:.3g}")

    def _drafting_rows(self) -> list:
        """Per drafter: which candidates it drafts and their draft-time features (const, depth, nodes),
        fixed by the grid, so built once instead of at every plan."""
        g, out = self.grid, []
        for di, d in enumerate(g.drafters):
            sel = g.drafter == di
            out.append((d, sel, np.stack([np.ones(int(sel.sum())), g.depth[sel], g.nodes[sel]], axis=1).astype(float)))
        return out

    def _lookahead_masks(self) -> np.ndarray:
        """(D + 1, options): +inf added to the step time of n-gram options deeper than the m tokens the
        lookahead holds (they draft the same m tokens as depth m; m = 0: no n-gram option drafts)."""
        g, D = self.grid, self.config.max_depth
        masks = np.zeros((D + 1, len(g) * self.J))
        if self._probe_family is not None:
            depth = np.repeat(np.where(g.family == self._probe_family, g.depth, 0), self.J)
            masks[depth[None, :] > np.arange(D + 1)[:, None]] = np.inf
        return masks

    def lower_bound_ms(self) -> float:
        """Fastest time per output token the latency model allows: all drafts accepted, minimal experts."""
        th = self.latency.verify.theta
        min_experts = self.shape.num_layers * (1 if self.levels.size else self.shape.top_k)
        t = th[0] + th[1] * self.grid.tokens + th[2] * min_experts
        return float(max(np.min(t / (self.grid.depth + 1)), 0.0) * 1e3)

    def _calibration_options(self) -> list[int]:
        """Configs (flat option indices) that make the latency fit identifiable before it has data: the
        first drafter's deepest chain once (the verify fit's widest token range), then per drafter its
        shallowest chain and its widest family at half depth, which separate the draft fit's (const, depth,
        nodes). Why not every drafter's deepest chain: a calibration step is paid at full cost and emits
        little, and the deepest chain of a slow drafter (self-speculation d8 on a CPU: 14 plain steps) cost
        more than the rest of the warm-up together; draft costs are linear in depth and nodes, and every
        later step refines the fit."""
        g, D, J = self.grid, self.config.max_depth, self.J
        cands = [0, D]
        for d in g.drafters:
            fams = sorted((f for f, (name, _) in enumerate(g.families) if name == d), key=lambda f: g.families[f][1])
            cands += [g.first(fams[0]), g.first(fams[-1]) + max(D // 2 - 1, 0)]
        cands = list(dict.fromkeys(cands))  # small grids (max_depth 1, one width): some coincide
        opts = [c * J for c in cands]
        budgeted = [D * J + j for j in range(1, J) if self._valid[D * J + j]]
        return opts + budgeted[-1:]

    # ---- plan (global, every refresh_every steps) ---------------------------------------------------
    def _plan(self) -> None:
        g = self.grid
        # fold queued observations in, and reset any estimator that degraded (adaptive/health.py)
        for model in (self.acceptance, self.yields, self.latency, self.experts, self.fidelity):
            model.check()
        C, J = len(g), 1 + len(self.levels)
        self.J = J
        a = allocate(self.experts.predict(self._token_counts), self.levels, self.fidelity.w, self.experts.gamma,
                     self.shape.num_experts)
        inv = self._token_index
        kept, loss, valid = a.kept[inv], a.loss[inv], a.valid[inv]
        valid[0, 1:] = False  # plain decoding has nothing to budget
        self._w = self.fidelity.w.tolist()  # per-layer sensitivity, for observe's loss of a budgeted step
        factor = self.fidelity.acceptance_factor(loss)
        mpow = (factor[:, :, None] ** self._powers) * g.depth_mask[:, None, :]  # (C, J, D)
        # expected emitted tokens of every option = 1 + _M @ cumprod(p).ravel(): each option's depth weights
        # sit in its family's block of (F * D) columns, so a decision is one matrix product
        F, D = len(g.families), self.config.max_depth
        M = np.zeros((C, J, F, D))
        M[np.arange(C)[:, None], np.arange(J)[None, :], g.family[:, None]] = mpow
        self._M = M.reshape(C * J, F * D)
        self._loss = loss.ravel()
        self._valid = valid.ravel()
        self._lossy = np.where(self._loss > self.config.max_agreement_loss, -np.inf, 0.0)
        self._budgets = a.budgets[inv]  # (C, J, L)
        draft = np.zeros(C)
        for d, sel, features in self._draft_features:
            draft[sel] = self.latency.predict_draft(d, features)
        # step seconds of every option = t0 + t1 * context_len (verify features with the context folded out)
        th = self.latency.verify.theta
        n = np.repeat(g.tokens.astype(float), J)
        # an invalid option (a budget level that removes nothing new) takes forever: zero goodput, never chosen
        # (clamped: a step takes some time, and a longer context never makes it faster)
        t0 = np.maximum(th[0] + th[1] * n + th[2] * kept.ravel() + np.repeat(draft, J), 1e-6)
        t1 = np.maximum(th[3] + th[4] * n, 0.0) / 1000.0
        # verify time of an option's draft nodes (over plain's): what a step that drafts fewer saves
        n0 = np.maximum(th[1] * (n - 1) + th[2] * (kept.ravel() - kept[0, 0]), 0.0)
        n1 = np.maximum(th[4] * (n - 1), 0.0) / 1000.0
        # times = _X @ [1, ctx, short_1..F, short_1..F * ctx] (short_f: the share of family f's requested
        # nodes this request is not expected to draft), one matrix-vector product per decision
        fam = np.repeat(g.family, J)
        X = np.zeros((C * J, 2 + 2 * F))
        X[:, 0], X[:, 1] = np.where(self._valid, t0, np.inf), t1
        X[np.arange(C * J), 2 + fam] = -n0
        X[np.arange(C * J), 2 + F + fam] = -n1
        self._X = X
        self._since_plan = 0

    def _config(self, option: int) -> StepConfig:
        """The StepConfig of a flat option index (budgets from the current plan), built once and cached."""
        c, j = divmod(option, self.J)
        base = self.grid.configs[c]
        if j == 0:
            return base
        budgets = tuple(int(b) for b in self._budgets[c, j])
        key = (c, budgets)
        cfg = self._config_cache.get(key)
        if cfg is None:
            if len(self._config_cache) > 4096:
                self._config_cache.clear()
            cfg = StepConfig(drafter=base.drafter, depth=base.depth, topk=base.topk,
                             num_draft_tokens=base.num_draft_tokens, budgets=budgets)
            self._config_cache[key] = cfg
        return cfg

    # ---- per request --------------------------------------------------------------------------------
    def begin(self, request_id: int, prompt_len: int = 0) -> None:
        """A new request; its first choice per lookahead order is the last ended request's, held for
        decide_every - 1 steps (a full decision per order at every request start cost ~17% of steps
        live), then decided afresh from its own posterior."""
        hold = self.config.decide_every - 1
        self.requests[request_id] = _Request(slots={
            o: _Slot(s.option, 0, s.last, hold, self.config.decide_every)
            for o, s in self._handed.items() if s.last is not None and hold > 0})
        self.acceptance.begin(request_id)
        self.yields.begin(request_id)

    def end(self, request_id: int) -> None:
        r = self.requests.pop(request_id, None)
        if r is not None:
            self._handed = r.slots
        self.acceptance.end(request_id)
        self.yields.end(request_id)

    def _request(self, request_id: int) -> _Request:
        if request_id not in self.requests:
            self.begin(request_id)
        return self.requests[request_id]

    # ---- decide -------------------------------------------------------------------------------------
    def _times(self, request_id: int, context_len: int, order: int | None, drafted: int) -> np.ndarray:
        """Predicted step seconds of every option (flat): verify(tokens, experts, context) + draft, less
        the verify time of the nodes this request's drafter is not expected to draft (adaptive/yields.py).
        With a lookahead the n-gram drafter's nodes are known: options deeper than its chain are masked
        and the rest draft in full."""
        short = [1.0 - y for y in self.yields.fill(request_id)]
        if order is not None:
            short[self._probe_family] = 0.0
        T = self._X.dot([1.0, context_len, *short, *(x * context_len for x in short)])
        if order is not None:
            T += self._look_masks[min(drafted, self.config.max_depth) if order else 0]
        return T

    def _emitted(self, p: np.ndarray, remaining: int) -> np.ndarray:
        """Expected emitted tokens of every option (C*J, S) for S stacked acceptance curves p (S, F, D)."""
        e = self._M @ np.cumprod(p, axis=-1).reshape(len(p), -1).T
        return np.minimum(e + 1.0, max(remaining, 1))

    def _curves(self, r: _Request, request_id: int) -> np.ndarray:
        """(ranking curve, posterior mean) of per-depth acceptance (2, F, D): the ranking curve is a
        Thompson draw, an upper confidence bound or the mean itself, by config.exploration. The mean is
        kept for observe."""
        c = self.config
        ab = self.acceptance.posterior_stacked(request_id)  # (2, F + orders, D): alpha, beta
        if self._orders:
            ab = ab[:, self._rows[r.order or 0]]  # (2, F, D): the n-gram family's row for this order
        n = ab[0] + ab[1]
        mean = r.mean = ab[0] / n
        out = self._curve_buffer
        out[1] = mean
        if c.exploration == "thompson":
            g = self._gamma(ab)
            np.divide(g[0], g[0] + g[1], out=out[0])
        elif c.exploration == "greedy":
            out[0] = mean
        else:
            np.minimum(mean + c.ucb_c * np.sqrt(mean * (1.0 - mean) / (n + 1.0)), 1.0, out=out[0])
        return out

    def _gamma(self, k: np.ndarray) -> np.ndarray:
        """Gamma(k) draws (k > 0, any shape <= (2, F, D)) from normals and uniforms drawn in blocks, so a
        Thompson draw Beta(a, b) = Ga / (Ga + Gb) is arithmetic only.

        Why: live on a CPU a decision runs right after a forward pass has evicted the caches, and there
        any numpy random call cost ~100 us (rng.beta, standard_gamma; arithmetic ~2 us), while decide +
        observe must stay within 2% of a step. How: Gamma(k + 1) by the Wilson-Hilferty cube of a normal
        (close for shapes >= 1), times U ** (1 / k), which is exactly Gamma(k) for an independent uniform
        U; so weak posteriors keep Beta's U shape (a Gaussian draw explored them far less)."""
        if self._draw_next == len(self._draws):
            self._draws, self._draw_next = self.rng.random(self._draws.shape), 0
            self._draws[:, 0] = self.rng.standard_normal(self._draws[:, 0].shape)
        z, u = self._draws[self._draw_next]
        self._draw_next += 1
        h = 1.0 / (9.0 * (k + 1.0))
        cube = np.maximum(1.0 - h + z * np.sqrt(h), 0.0) ** 3
        return (k + 1.0) * cube * u ** (1.0 / k)

    def decide(self, state: DecodeState) -> Decision:
        c = self.config
        r = self._request(state.request_id)
        self.current = state.request_id
        look = state.lookahead
        r.order = None if look is None or not self._orders else min(look.order, self._orders) if look.drafted else 0
        slot = r.slots.get(r.order)
        if slot is None:
            slot = r.slots[r.order] = _Slot()
        r.slot = slot
        if slot.hold > 0:
            return self._hold(r, slot)
        T = self._times(state.request_id, state.context_len, r.order, 0 if look is None else look.drafted)
        if not self.latency.seeded and self.steps < self._warmup:
            best = self._calibration[self.steps % len(self._calibration)]
            r.mean = self.acceptance.mean(state.request_id)[self._rows[r.order or 0]]
            E = self._emitted(r.mean[None], state.remaining)[:, 0]
            return self._commit(r, best, E, T, switched=best != slot.option)
        e = self._emitted(self._curves(r, state.request_id), state.remaining)
        E, mean_E = e[:, 0], e[:, 1]
        util = E / T
        if c.latency_target_ms is None:
            mean = mean_E / T
            top = float(mean.max())
            if c.exploration != "greedy" and c.explore_slack < 1.0:
                # explore only among options whose expected goodput is within explore_slack of the best,
                # so a lucky draw cannot buy a step far worse than the known best (bounded regret)
                util = util * (mean >= (1.0 - c.explore_slack) * top)
            best, cur = int(np.argmax(util)), slot.option
            keep = cur >= 0 and self._valid[cur] and (
                slot.dwell < c.min_dwell or util[cur] * (1 + c.hysteresis) >= util[best])
            choice = cur if keep else best
            # hold a choice the posterior mean also ranks first, longer each time a full decision confirms
            # it (up to decide_every_max); an exploratory draw is tried for one step
            if mean[choice] < top * (1 - c.hysteresis):
                slot.interval, slot.hold = c.decide_every, 0
            else:
                slot.interval = min(2 * slot.interval, c.decide_every_max) if choice == cur else c.decide_every
                slot.hold = slot.interval - 1
            return self._commit(r, choice, mean_E, T, switched=not keep and best != cur)
        d = self._decide_target(state, r, E, T, util, mean_E)
        slot.interval = c.decide_every if d.switched else min(2 * slot.interval, c.decide_every_max)
        slot.hold = slot.interval - 1
        return d

    def _decide_target(self, state: DecodeState, r: _Request, E, T, util, mean_E) -> Decision:
        c = self.config
        nominal = target = c.latency_target_ms / 1e3 * (1 - c.target_margin)
        if r.emitted >= 8 and r.time / r.emitted > c.latency_target_ms / 1e3:
            target *= max(0.5, c.latency_target_ms / 1e3 / (r.time / r.emitted))
        # feasibility from the posterior mean (a target is a promise, not an experiment); the Thompson
        # draw only ranks goodput among the feasible options of the best fidelity
        tpt = T / mean_E
        feasible = (tpt <= target) & np.isfinite(util)
        lossless = (tpt <= nominal) & (self._loss <= 0.0) & np.isfinite(util)
        if lossless.any() and not (feasible & lossless).any():
            # a request behind its target (slow early steps) tightens the target to catch up, but never
            # by giving up fidelity: a lossless option that meets the target with the usual margin wins
            feasible = lossless
        if not feasible.any():
            # unreachable as sampled: the fastest option within the default fidelity bound, flagged once
            # the request's own evidence (posterior mean, >= MIN_EVIDENCE steps) and its time so far agree
            best = int(np.argmax(util + self._lossy))
            infeasible = r.steps >= MIN_EVIDENCE and (T[best] / mean_E[best]) > c.latency_target_ms / 1e3 \
                and r.time > r.emitted * c.latency_target_ms / 1e3  # ... and the request is not meeting it
            msg = ""
            if infeasible and not r.notes:
                msg = (f"latency target {c.latency_target_ms:g} ms/token is infeasible for this request: "
                       f"best predicted {T[best] / mean_E[best] * 1e3:.3g} ms/token "
                       f"({label(self._config(best))}); running at the fastest configuration")
                r.notes.append(msg)
            r.infeasible = infeasible
            return self._commit(r, best, mean_E, T, switched=best != r.slot.option, infeasible=infeasible,
                                message=msg)
        loss = np.where(feasible, self._loss, np.inf)
        cand = loss <= loss.min() + 1e-12
        best = int(np.argmax(np.where(cand, util, -np.inf)))
        cur, dwell = r.slot.option, r.slot.dwell
        keep = cur >= 0 and feasible[cur] and self._loss[cur] <= self._loss[best] + 1e-12 and (
            dwell < c.min_dwell or util[cur] * (1 + c.hysteresis) >= util[best])
        r.infeasible = False
        return self._commit(r, cur if keep else best, mean_E, T, switched=not keep and best != cur)

    def _commit(self, r: _Request, option: int, E, T, switched: bool, infeasible: bool = False,
                message: str = "") -> Decision:
        slot = r.slot
        slot.dwell = 1 if switched else slot.dwell + 1
        slot.option = option
        r.loss = float(self._loss[option])
        e, t = float(E[option]), float(T[option])
        slot.last = Decision(self._config(option), e / t, t / e * 1e3, r.loss, switched, infeasible, message)
        return slot.last

    def _hold(self, r: _Request, slot: _Slot) -> Decision:
        """The slot's last full decision again (no switch, no new message): decide_every > 1 spreads the
        cost of one full decision over several steps."""
        slot.hold -= 1
        slot.dwell += 1
        d = slot.last
        if d.switched or d.message:
            d = slot.last = Decision(d.config, d.goodput, d.ms_per_token, d.agreement_loss, False, d.infeasible)
        r.loss = d.agreement_loss
        return d

    # ---- observe ------------------------------------------------------------------------------------
    def observe(self, stats: StepStats) -> None:
        rid = self.current if stats.request_id is None else stats.request_id  # None: StepStats built by hand
        if rid is None:
            return
        r = self._request(rid)
        cfg = stats.config
        self.acceptance.decay(rid, None if cfg.speculate else self.config.idle_decay)
        L = self.shape.num_layers
        per_layer = len(stats.unique_experts) == L
        loss = r.loss
        if cfg.budgets is not None and len(stats.router_mass_kept) == L:
            # plain Python over L numbers: cheaper than numpy calls at this size (observe runs every step)
            loss = min(max(sum(w * (1.0 - m) for w, m in zip(self._w, stats.router_mass_kept)), 0.0), 1.0)
            if stats.agreement is not None:
                self.fidelity.observe_agreement(1.0 - np.asarray(stats.router_mass_kept, dtype=float),
                                                stats.agreement)
        fam = self.grid.family_of(cfg)
        # with a lookahead, n-gram acceptance is per match order and conditional on the drafted levels
        # (the chain's length was known when deciding); without one, levels the drafter did not draft
        # count as not accepted, so expected emitted tokens include the drafter's yield, priced by it
        ordered = r.order is not None and fam == self._probe_family
        probe = stats.probe
        if probe is not None and (cfg.budgets is not None or self.probe is None or probe.drafter != self.probe.drafter
                                  or (r.order is None and fam == self._probe_family)):
            # checked against budgeted outputs, or not ours, or (without a lookahead) an n-gram step whose
            # own outcome, yield included, already tells
            probe = None
        # an n-gram step's own outcome, unless the probe saw it and more (the level past an all-accepted chain)
        row = (self._rows[r.order][fam] if r.order and probe is None else None) if ordered else fam
        if row is not None:
            depth = min(cfg.depth, self.config.max_depth)
            if ordered:
                depth = min(depth, stats.tree_size)
            else:
                self.yields.observe(rid, fam, stats.tree_size, cfg.max_nodes)
            fail_weight = 1.0
            if loss > 0.0:
                # the posterior mean of the last full decision: a few steps old, but no numpy work per step
                mean = (r.mean if r.mean is not None else self.acceptance.mean(rid))[fam].tolist()
                expected, run = 0.0, 1.0
                for q in mean[:depth]:
                    run *= q
                    expected += run
                self.fidelity.observe_acceptance(loss, min(stats.accepted, depth), expected)
                q = mean[min(stats.accepted, depth - 1)]
                m = math.exp(-self.fidelity.lam * loss)
                fail_weight = (1.0 - q) / max(1.0 - q * m, 1e-9)
            self.acceptance.observe(rid, row, stats.accepted, depth, fail_weight)
        if probe is not None:
            if r.order is None:
                self.yields.observe(rid, self._probe_family, probe.drafted, probe.depth, decay=False)
                self.acceptance.observe(rid, self._probe_family, probe.accepted, probe.observed_depth)
            elif r.order:  # conditional on the drafted levels: running out of chain is not a failure
                seen = probe.accepted if probe.censored else min(probe.drafted, probe.depth)
                self.acceptance.observe(rid, self._rows[r.order][self._probe_family], probe.accepted, seen)
            if probe.accepted >= stats.accepted + 2:
                # the probe would have done clearly better: decide afresh next step instead of holding
                # (by one token it beats every whole-accepted n-gram chain; those wait for the hold to end)
                r.slot.hold = 0
        tokens = stats.tree_size + 1
        if per_layer:
            self.experts.observe(tokens, stats.unique_experts, stats.unique_experts_kept, stats.router_mass_kept)
            computed = sum(stats.unique_experts_kept) if len(stats.unique_experts_kept) == L \
                else sum(stats.unique_experts)
        else:
            computed = float(self.experts.predict([tokens]).sum())
        self.latency.observe(cfg.drafter if cfg.speculate else None, tokens, computed, stats.context_len,
                             stats.t_verify + stats.t_accept + stats.t_commit + stats.t_control,
                             stats.tree_depth, stats.tree_size, stats.t_draft)
        r.time += stats.step_time
        r.emitted += stats.emitted
        r.steps += 1
        self.steps += 1
        self._since_plan += 1
        if self._since_plan >= self.config.refresh_every or \
                (not self.latency.seeded and self.steps == self._warmup):
            self._plan()
