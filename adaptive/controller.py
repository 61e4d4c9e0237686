"""The adaptive controller: per step, the configuration with the highest expected goodput.

Why this shape: expected goodput of a config = expected emitted tokens / expected step time. The
numerator is per request (acceptance differs per request and phase, adaptive/acceptance.py); the
denominator is global (one machine, one model: adaptive/latency.py, experts.py, fidelity.py). The
global parts change slowly, so a *plan* (per candidate: experts computed, per-layer budgets at each
fidelity level, acceptance factors) is recomputed every few steps; the per-step part is a Thompson draw
of acceptance and a few vectorised operations over (candidates x budget levels).

Per-layer budgets: removing an expert from layer l saves the same time in every layer but loses
w_l * (router mass it carried), so experts are removed greedily in order of least marginal fidelity
loss (exact for convex per-layer loss curves), giving one allocation per fidelity level.

Latency-target mode: among configs predicted to meet the target time per output token, take the best
fidelity (lossless whenever possible), then the best goodput. A target the seeded latency model proves
unreachable raises InfeasibleTarget at setup; one found unreachable online is flagged in the decision.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moetune.step import DRAFTERS, DecodeState, ModelShape, StepConfig, StepStats

from .acceptance import AcceptanceConfig, AcceptanceModel
from .candidates import CandidateGrid, label
from .experts import ExpertModel
from .fidelity import FidelityModel
from .latency import LatencyConfig, OnlineLatency

EXPLORATIONS = ("thompson", "ucb", "greedy")
MIN_EVIDENCE = 8  # steps of a request before its target is declared infeasible online


class InfeasibleTarget(ValueError):
    """The requested latency target cannot be met on this machine and model."""


@dataclass(frozen=True)
class ControllerConfig:
    """Everything the controller may choose among, and how it learns. Validated on construction."""

    drafters: tuple[str, ...] = ("draft_model",)
    widths: tuple[int, ...] = (1, 2)  # 1 = chain; w > 1 = top-w tree of at most w * depth nodes
    max_depth: int = 8
    budgets: bool = True  # may use per-layer expert budgets (lossy); False = always lossless
    max_agreement_loss: float = 0.03  # without a latency target: most predicted fidelity loss allowed
    loss_levels: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2)
    latency_target_ms: float | None = None  # per output token
    target_margin: float = 0.1  # aim this fraction below the target
    exploration: str = "thompson"
    ucb_c: float = 1.0
    explore_slack: float = 0.2  # explore only options predicted within this fraction of the best goodput
    hysteresis: float = 0.05  # switch only for a predicted gain above this fraction
    min_dwell: int = 1  # steps a choice is kept before it may change (unless it became infeasible)
    refresh_every: int = 32  # steps between plan recomputations
    warmup_steps: int = 24  # calibration steps when no hardware profile seeds the latency model
    prior_strength: float = 4.0
    request_decay: float = 0.94  # per speculative step: forgetting of a request's acceptance evidence
    idle_decay: float = 0.98  # per plain step: slower, so speculation is re-tried now and then
    global_decay: float = 0.998
    latency_forgetting: float = 0.995
    seed: int = 0

    def __post_init__(self):
        if not self.drafters or any(d not in DRAFTERS for d in self.drafters):
            raise ValueError(f"ControllerConfig.drafters must be a non-empty subset of {DRAFTERS}, got {self.drafters}")
        if len(set(self.drafters)) != len(self.drafters):
            raise ValueError(f"ControllerConfig.drafters has duplicates: {self.drafters}")
        if not self.widths or any(not isinstance(w, int) or w < 1 for w in self.widths) \
                or len(set(self.widths)) != len(self.widths):
            raise ValueError(f"ControllerConfig.widths must be distinct integers >= 1 (1 = chain), got {self.widths}")
        if not 1 <= self.max_depth <= 32:
            raise ValueError(f"ControllerConfig.max_depth must be in [1, 32], got {self.max_depth}")
        if not 0.0 <= self.max_agreement_loss < 1.0:
            raise ValueError(f"ControllerConfig.max_agreement_loss must be in [0, 1), got {self.max_agreement_loss}")
        if not self.loss_levels or any(not 0.0 < x < 1.0 for x in self.loss_levels) \
                or list(self.loss_levels) != sorted(set(self.loss_levels)):
            raise ValueError(f"ControllerConfig.loss_levels must be strictly increasing values in (0, 1), "
                             f"got {self.loss_levels}")
        if self.latency_target_ms is not None and not self.latency_target_ms > 0:
            raise ValueError(f"ControllerConfig.latency_target_ms must be > 0 (ms per output token) or None, "
                             f"got {self.latency_target_ms}")
        if not 0.0 <= self.target_margin < 0.5:
            raise ValueError(f"ControllerConfig.target_margin must be in [0, 0.5), got {self.target_margin}")
        if self.exploration not in EXPLORATIONS:
            raise ValueError(f"ControllerConfig.exploration must be one of {EXPLORATIONS}, got {self.exploration!r}")
        if not 0.0 <= self.explore_slack <= 1.0:
            raise ValueError(f"ControllerConfig.explore_slack must be in [0, 1] (1 = unrestricted exploration), "
                             f"got {self.explore_slack}")
        if self.ucb_c < 0:
            raise ValueError(f"ControllerConfig.ucb_c must be >= 0, got {self.ucb_c}")
        if self.hysteresis < 0:
            raise ValueError(f"ControllerConfig.hysteresis must be >= 0, got {self.hysteresis}")
        for name in ("min_dwell", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"ControllerConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.refresh_every < 1:
            raise ValueError(f"ControllerConfig.refresh_every must be >= 1, got {self.refresh_every}")
        # the estimators validate their own parameters; build them once here so errors surface early
        AcceptanceConfig(max_depth=self.max_depth, prior_strength=self.prior_strength,
                         request_decay=self.request_decay, global_decay=self.global_decay)
        if not 0.0 < self.idle_decay <= 1.0:
            raise ValueError(f"ControllerConfig.idle_decay must be in (0, 1], got {self.idle_decay}")
        LatencyConfig(forgetting=self.latency_forgetting)


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
class _Request:
    option: int = -1  # flat index into (candidates x levels)
    dwell: int = 0
    loss: float = 0.0  # predicted agreement loss of the last decision
    time: float = 0.0
    emitted: int = 0
    steps: int = 0
    infeasible: bool = False
    notes: list = field(default_factory=list)


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
        self.acceptance = AcceptanceModel(AcceptanceConfig(
            max_depth=c.max_depth, families=len(self.grid.families), prior_strength=c.prior_strength,
            request_decay=c.request_decay, global_decay=c.global_decay))
        self.latency = OnlineLatency(c.drafters, LatencyConfig(forgetting=c.latency_forgetting))
        max_tokens = int(self.grid.tokens.max())
        self.experts = ExpertModel(shape, max_tokens)
        self.fidelity = FidelityModel(shape.num_layers)
        if self.profile is not None:
            self.latency.seed(self.profile)
        levels = [x for x in c.loss_levels if c.latency_target_ms is not None or x <= c.max_agreement_loss]
        self.levels = np.array(levels if c.budgets else [])
        self.requests: dict[int, _Request] = {}
        self.current: int | None = None
        self.steps = 0
        self._since_plan = 0
        self._powers = np.arange(1, c.max_depth + 1, dtype=float)
        self._config_cache: dict = {}
        self._plan()
        self._calibration = self._calibration_options()
        if c.latency_target_ms is not None and self.latency.seeded:
            lb = self.lower_bound_ms()
            if lb > c.latency_target_ms:
                raise InfeasibleTarget(
                    f"latency target {c.latency_target_ms:g} ms/token is infeasible: the hardware profile's lower "
                    f"bound is {lb:.3g} ms/token even if every drafted token were accepted; set "
                    f"latency_target_ms >= {lb:.3g}")

    def lower_bound_ms(self) -> float:
        """Fastest time per output token the latency model allows: all drafts accepted, minimal experts."""
        th = self.latency.verify.theta
        min_experts = self.shape.num_layers * (1 if self.levels.size else self.shape.top_k)
        t = th[0] + th[1] * self.grid.tokens + th[2] * min_experts
        return float(max(np.min(t / (self.grid.depth + 1)), 0.0) * 1e3)

    def _calibration_options(self) -> list[int]:
        """Diverse configs (flat option indices) that make the latency fit identifiable before it has data."""
        D, J = self.config.max_depth, self.J
        cands = [0]
        for f in range(len(self.grid.families)):
            base = 1 + f * D
            cands += [base + D - 1, base, base + max(D // 2 - 1, 0)]
        opts = [c * J for c in cands]
        budgeted = [D * J + j for j in range(1, J) if self._valid[D * J + j]]
        return opts + budgeted[-1:]

    # ---- plan (global, every refresh_every steps) ---------------------------------------------------
    def _plan(self) -> None:
        g, L, E = self.grid, self.shape.num_layers, self.shape.num_experts
        C, J = len(g), 1 + len(self.levels)
        self.J = J
        U = self.experts.predict(g.tokens)  # (L, C)
        kept = np.repeat(U.sum(axis=0)[:, None], J, axis=1)
        loss = np.zeros((C, J))
        valid = np.zeros((C, J), dtype=bool)
        valid[:, 0] = True
        removed = np.zeros((C, J, L), dtype=int)
        Ui = np.maximum(np.rint(U.T), 1)  # (C, L)
        if J > 1 and E > 1:
            # marginal agreement loss of removing the k-th expert (k = 1..E-1) of layer l, inf past U - 1
            k = np.arange(1, E, dtype=float)
            gamma = self.experts.gamma[None, :, None]
            x1, x0 = k / Ui[:, :, None], (k - 1) / Ui[:, :, None]
            marg = self.fidelity.w[None, :, None] * (np.minimum(x1, 1.0) ** gamma - np.minimum(x0, 1.0) ** gamma)
            marg = np.where(k < Ui[:, :, None], marg, np.inf).reshape(C, -1)
            order = np.argsort(marg, axis=1, kind="stable")
            cum = np.cumsum(np.take_along_axis(marg, order, axis=1), axis=1)  # (C, L*(E-1))
            m = (cum[:, :, None] <= self.levels).sum(axis=1)  # removals per level (C, J-1)
            onehot = (order // (E - 1))[:, :, None] == np.arange(L)
            counts = np.cumsum(onehot, axis=1)  # removals per layer after the first i+1 (C, n, L)
            idx = np.maximum(m - 1, 0)
            removed[:, 1:] = np.take_along_axis(counts, idx[:, :, None], axis=1) * (m > 0)[:, :, None]
            loss[:, 1:] = np.where(m > 0, np.take_along_axis(cum, idx, axis=1), 0.0)
            fresh = (m > 0) & (m > np.concatenate([np.zeros((C, 1), dtype=int), m[:, :-1]], axis=1))
            valid[:, 1:] = fresh
            valid[0, 1:] = False  # plain decoding has nothing to budget
            kept[:, 1:] = (Ui.sum(axis=1)[:, None] - removed[:, 1:].sum(axis=2))
        factor = self.fidelity.acceptance_factor(loss)
        self._mpow = (factor[:, :, None] ** self._powers) * g.depth_mask[:, None, :]
        self._kept = kept
        self._loss = loss.ravel()
        self._valid = valid.ravel()
        self._neg = np.where(valid, 0.0, -np.inf)
        self._lossy = np.where(self._loss > self.config.max_agreement_loss, -np.inf, 0.0)
        self._n = g.tokens[:, None].astype(float)
        self._budgets = Ui[:, None, :] - removed  # (C, J, L)
        draft = np.zeros(C)
        for di, d in enumerate(g.drafters):
            sel = g.drafter == di
            draft[sel] = self.latency.predict_draft(d, g.depth[sel], g.nodes[sel])
        self._draft = draft[:, None]
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
        self.requests[request_id] = _Request()
        self.acceptance.begin(request_id)

    def end(self, request_id: int) -> None:
        self.requests.pop(request_id, None)
        self.acceptance.end(request_id)

    def _request(self, request_id: int) -> _Request:
        if request_id not in self.requests:
            self.begin(request_id)
        return self.requests[request_id]

    # ---- decide -------------------------------------------------------------------------------------
    def _times(self, context_len: int) -> np.ndarray:
        th = self.latency.verify.theta
        t = th[0] + th[1] * self._n + th[2] * self._kept + (th[3] + th[4] * self._n) * (context_len / 1000.0)
        return np.maximum(t + self._draft, 1e-6)

    def _emitted(self, p: np.ndarray, remaining: int) -> np.ndarray:
        P = np.cumprod(p, axis=1)[self.grid.family]  # (C, D)
        e = 1.0 + np.einsum("cjd,cd->cj", self._mpow, P)
        return np.minimum(e, max(remaining, 1))

    def _acceptance_draw(self, request_id: int) -> np.ndarray:
        c = self.config
        if c.exploration == "thompson":
            return self.acceptance.sample(request_id, self.rng)
        a, b = self.acceptance.posterior(request_id)
        mean = a / (a + b)
        if c.exploration == "greedy":
            return mean
        return np.minimum(mean + c.ucb_c * np.sqrt(mean * (1 - mean) / (a + b + 1)), 1.0)

    def decide(self, state: DecodeState) -> Decision:
        c = self.config
        r = self._request(state.request_id)
        self.current = state.request_id
        T = self._times(state.context_len)
        if not self.latency.seeded and self.steps < c.warmup_steps:
            best = self._calibration[self.steps % len(self._calibration)]
            E = self._emitted(self.acceptance.mean(state.request_id), state.remaining)
            return self._commit(r, best, E.ravel(), T.ravel(), switched=best != r.option, force=True)
        E = self._emitted(self._acceptance_draw(state.request_id), state.remaining)
        util = (E / T + self._neg).ravel()
        E, T = E.ravel(), T.ravel()
        if c.latency_target_ms is None:
            if c.exploration != "greedy" and c.explore_slack < 1.0:
                # explore only among options whose expected goodput is within explore_slack of the best,
                # so a lucky draw cannot buy a step far worse than the known best (bounded regret)
                mean = self._emitted(self.acceptance.mean(state.request_id), state.remaining).ravel() / T
                mean += self._neg.ravel()
                util = np.where(mean >= (1.0 - c.explore_slack) * mean.max(), util, -np.inf)
            best, cur = int(np.argmax(util)), r.option
            keep = cur >= 0 and self._valid[cur] and (
                r.dwell < c.min_dwell or util[cur] * (1 + c.hysteresis) >= util[best])
            return self._commit(r, cur if keep else best, E, T, switched=not keep and best != cur)
        return self._decide_target(state, r, E, T, util)

    def _decide_target(self, state: DecodeState, r: _Request, E, T, util) -> Decision:
        c = self.config
        target = c.latency_target_ms / 1e3 * (1 - c.target_margin)
        if r.emitted >= 8 and r.time / r.emitted > c.latency_target_ms / 1e3:
            target *= max(0.5, c.latency_target_ms / 1e3 / (r.time / r.emitted))
        # feasibility from the posterior mean (a target is a promise, not an experiment); the Thompson
        # draw only ranks goodput among the feasible options of the best fidelity
        mean_E = self._emitted(self.acceptance.mean(state.request_id), state.remaining).ravel()
        feasible = (T / mean_E <= target) & np.isfinite(util)
        if not feasible.any():
            # unreachable as sampled: the fastest option within the default fidelity bound, flagged once
            # the request's own evidence (posterior mean, >= MIN_EVIDENCE steps) agrees
            best = int(np.argmax(util + self._lossy))
            infeasible = r.steps >= MIN_EVIDENCE and (T[best] / mean_E[best]) > c.latency_target_ms / 1e3
            msg = ""
            if infeasible and not r.notes:
                msg = (f"latency target {c.latency_target_ms:g} ms/token is infeasible for request "
                       f"{state.request_id}: best predicted {T[best] / mean_E[best] * 1e3:.3g} ms/token "
                       f"({label(self._config(best))}); running at the fastest configuration")
                r.notes.append(msg)
            r.infeasible = infeasible
            return self._commit(r, best, E, T, switched=best != r.option, infeasible=infeasible, message=msg)
        loss = np.where(feasible, self._loss, np.inf)
        cand = loss <= loss.min() + 1e-12
        best = int(np.argmax(np.where(cand, util, -np.inf)))
        cur = r.option
        keep = cur >= 0 and feasible[cur] and self._loss[cur] <= self._loss[best] + 1e-12 and (
            r.dwell < c.min_dwell or util[cur] * (1 + c.hysteresis) >= util[best])
        r.infeasible = False
        return self._commit(r, cur if keep else best, E, T, switched=not keep and best != cur)

    def _commit(self, r: _Request, option: int, E, T, switched: bool, infeasible: bool = False,
                message: str = "", force: bool = False) -> Decision:
        r.dwell = 1 if switched else r.dwell + 1
        r.option = option
        r.loss = float(self._loss[option])
        return Decision(self._config(option), float(E[option] / T[option]), float(T[option] / E[option] * 1e3),
                        r.loss, switched, infeasible, message)

    # ---- observe ------------------------------------------------------------------------------------
    def observe(self, stats: StepStats) -> None:
        rid = self.current
        if rid is None:
            return
        r = self._request(rid)
        cfg = stats.config
        self.acceptance.decay(rid, None if cfg.speculate else self.config.idle_decay)
        L = self.shape.num_layers
        per_layer = len(stats.unique_experts) == L
        loss = r.loss
        if cfg.budgets is not None and len(stats.router_mass_kept) == L:
            drop = 1.0 - np.asarray(stats.router_mass_kept, dtype=float)
            loss = float(self.fidelity.agreement_loss(drop))
            if stats.agreement is not None:
                self.fidelity.observe_agreement(drop, stats.agreement)
        fam = self.grid.family_of(cfg)
        if fam is not None and stats.tree_depth > 0:
            depth = min(stats.tree_depth, self.config.max_depth)
            fail_weight = 1.0
            if loss > 0.0:
                mean = self.acceptance.mean(rid)[fam]
                expected = float(np.cumsum(np.cumprod(mean))[depth - 1])
                self.fidelity.observe_acceptance(loss, min(stats.accepted, depth), expected)
                q = mean[min(stats.accepted, depth - 1)]
                m = float(self.fidelity.acceptance_factor(loss))
                fail_weight = (1.0 - q) / max(1.0 - q * m, 1e-9)
            self.acceptance.observe(rid, fam, stats.accepted, depth, fail_weight)
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
                (not self.latency.seeded and self.steps == self.config.warmup_steps):
            self._plan()
