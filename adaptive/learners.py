"""What one step teaches the controller's estimators, and what they predict when a plan is built.

Why one place: a step's outcome feeds five estimators (per-request acceptance and draft yield, global
latency, unique experts and fidelity) under rules that depend on the lookahead and the probe; written as
one short method per lesson, each rule can be read on its own.

Acceptance rows: with a lookahead (moetune.step.Lookahead) n-gram acceptance is learned per match order
(rows F .. F + max_order - 1 past the grid's F families, `rows[o]` mapping families to rows at order
o), and conditional on the levels drafted (the chain's length was known when deciding). Without one,
levels a drafter did not draft count as not accepted, so expected emitted tokens include its draft yield,
priced by it.
"""
from __future__ import annotations

import math

import numpy as np

from moetune.step import DRAFTER_TRAITS, ModelShape, Probe, StepStats

from .acceptance import AcceptanceConfig, AcceptanceModel
from .candidates import CandidateGrid
from .config import ControllerConfig
from .experts import ExpertModel
from .fidelity import FidelityModel
from .latency import LatencyConfig, OnlineLatency
from .plan import Estimates, Menu
from .transfers import TransferModel, split
from .yields import DraftYield, YieldConfig



def _observed_depth(stats: StepStats) -> int:
    """Depths whose acceptance the step observed: all of them, unless an eviction budget dropped nodes. A
    chain keeps its first nodes_kept levels; a tree's evicted nodes may sit at any depth, so only its
    accepted levels are known (the level after them may have failed by eviction, not by the draft)."""
    if stats.nodes_kept is None or stats.nodes_kept >= stats.tree_size:
        return stats.config.depth
    return stats.nodes_kept if stats.config.topk == 1 and stats.config.tree is None else stats.accepted


class BatchGoodput:
    """Emitted tokens per second of the batches a request decoded in, exponentially weighted: each batched
    request-step adds its tokens and its seconds (its share of the forward, its own draft), so the sums
    are the batches' own. The controller prices a batched request's options against it (plan.at_rate)."""

    def __init__(self, forgetting: float):
        self.forgetting = forgetting
        self.tokens = self.seconds = 0.0

    def observe(self, tokens: int, seconds: float, weight: float = 1.0) -> None:
        """One request-step; weight: its share of the forward (a batch's forward ages the sums once)."""
        if seconds > 0.0 and math.isfinite(seconds):
            decay = self.forgetting ** weight
            self.tokens = decay * self.tokens + tokens
            self.seconds = decay * self.seconds + seconds

    @property
    def value(self) -> float | None:
        """Tokens per second, None before any batched step."""
        return self.tokens / self.seconds if self.seconds > 0.0 else None


class Learners:
    """The estimators, and the rules by which a step's statistics update them."""

    def __init__(self, config: ControllerConfig, grid: CandidateGrid, shape: ModelShape, probe_drafter: str | None,
                 probe_family: int | None, profile=None):
        c, F = config, len(grid.families)
        self.config = config
        self.grid = grid
        self.num_layers = shape.num_layers
        self.probe_drafter = probe_drafter
        self.probe_family = probe_family
        # one acceptance curve per n-gram match order the passive drafter can report (its max order)
        self.orders = DRAFTER_TRAITS[probe_drafter].max_order if probe_family is not None else 0
        self.rows = [list(range(F)) for _ in range(self.orders + 1)]
        for order in range(1, self.orders + 1):
            self.rows[order][probe_family] = F + order - 1
        self.acceptance = AcceptanceModel(AcceptanceConfig(
            max_depth=c.max_depth, families=F + self.orders, prior_strength=c.prior_strength,
            request_decay=c.request_decay, global_decay=c.global_decay))
        self.yields = DraftYield(YieldConfig(families=F, request_decay=c.request_decay))
        self.latency = OnlineLatency(c.drafters, LatencyConfig(forgetting=c.latency_forgetting))
        self.experts = ExpertModel(shape, int(grid.tokens.max()))
        self.fidelity = FidelityModel(shape.num_layers)
        self.transfers = TransferModel(c.latency_forgetting)
        self.batch_goodput = BatchGoodput(c.latency_forgetting)
        # verified-token count -> experts per layer, as the last plan predicted them: a step that captured
        # no routing is fitted with these (a prediction per step cost ~60 us right after a forward)
        self.predicted: dict[int, list] = {}
        if profile is not None:
            self.latency.seed(profile)

    # ---- per request ---------------------------------------------------------------------------------
    def begin(self, request_id: int) -> None:
        self.acceptance.begin(request_id)
        self.yields.begin(request_id)

    def end(self, request_id: int) -> None:
        self.acceptance.end(request_id)
        self.yields.end(request_id)

    def posterior(self, request_id: int, order: int | None) -> tuple[list, list]:
        """Beta parameters (alpha, beta: F lists of D) of this request at this lookahead order (the n-gram
        family's row is the order's)."""
        return self.acceptance.posterior_rows(request_id, self.rows[order or 0])

    def mean(self, request_id: int, order: int | None) -> list:
        """Posterior mean acceptance (F lists of D) of this request at this lookahead order."""
        return self.acceptance.mean(request_id)[self.rows[order or 0]].tolist()

    def shortfall(self, request_id: int, order: int | None) -> list[float]:
        """Per family, the share of requested draft nodes this request is not expected to draft; with a
        lookahead none for the n-gram family (its chain is known: deeper options are masked instead)."""
        short = [1.0 - y for y in self.yields.fill(request_id)]
        if order is not None:
            short[self.probe_family] = 0.0
        return short

    # ---- learn from a step ---------------------------------------------------------------------------
    def observe(self, request_id: int, stats: StepStats, order: int | None, predicted_loss: float,
                mean: list | None, layer_weights: list) -> None:
        """Learn from one step decided at lookahead `order` with `predicted_loss`, `mean` the posterior
        mean (F lists of D) of the last full decision."""
        cfg = stats.config
        self.acceptance.decay(request_id, None if cfg.speculate else self.config.idle_decay)
        loss = self._budget_loss(stats, predicted_loss, layer_weights)
        family = self.grid.family_of(cfg)
        probe = self._usable_probe(stats, order, family)
        self._learn_outcome(request_id, stats, order, family, probe is None, loss, mean,
                            self._probe_beyond(stats, order, family))
        if probe is not None:
            self._learn_probe(request_id, probe, order)
        self._learn_costs(stats)

    def beaten(self, stats: StepStats, order: int | None) -> bool:
        """The step's probe would have done clearly better: by two tokens (by one it beats every
        whole-accepted n-gram chain: those wait for the hold to end)."""
        probe = self._usable_probe(stats, order, self.grid.family_of(stats.config))
        return probe is not None and probe.accepted >= stats.accepted + 2

    def _budget_loss(self, stats: StepStats, predicted: float, layer_weights: list) -> float:
        """A budgeted step's agreement loss from the router mass it kept (the prediction otherwise); an
        eval-mode step's measured agreement also teaches the per-layer weights."""
        kept = stats.router_mass_kept
        if stats.config.budgets is None or stats.config.budget_mode == "evict" or len(kept) != self.num_layers:
            return predicted
        # plain Python over L numbers: right after a forward pass a numpy call costs ~10 us
        drop = [1.0 - m for m in kept]
        loss = min(max(sum(w * d for w, d in zip(layer_weights, drop)), 0.0), 1.0)
        if stats.agreement is not None:
            self.fidelity.observe_agreement(drop, stats.agreement)
        return loss

    def _usable_probe(self, stats: StepStats, order: int | None, family: int | None) -> Probe | None:
        """The step's passive probe, unless checked against budgeted outputs, not ours, or (without a
        lookahead) beside an n-gram step whose own outcome, yield included, already tells."""
        probe = stats.probe
        lossy = stats.config.budgets is not None and stats.config.budget_mode != "evict"
        if probe is None or lossy or probe.drafter != self.probe_drafter \
                or (order is None and family == self.probe_family):
            return None
        return probe

    def _probe_beyond(self, stats: StepStats, order: int | None, family: int | None) -> Probe | None:
        """Without a lookahead, beside an unbudgeted n-gram chain accepted whole: the probe, the same chain
        drafted deeper, also saw the level past it (else a deep level is learned only by steps that draft
        it, and a chain a level short of the best was kept: on the Qwen3-shape replay auto drafted 4-5
        levels where 6 ran 8% faster, level 6 held at the prior's 1/2 while it accepted 97%)."""
        probe = stats.probe
        if order is not None or family != self.probe_family or probe is None or stats.config.budgets is not None \
                or probe.drafter != self.probe_drafter or stats.accepted < stats.tree_size \
                or probe.drafted <= stats.tree_size:
            return None
        return probe

    def _learn_outcome(self, request_id: int, stats: StepStats, order: int | None, family: int | None,
                       unprobed: bool, loss: float, mean: list | None, beyond: Probe | None = None) -> None:
        """The step's own acceptance (and draft yield); with a lookahead an n-gram step's only when no
        probe saw it and more (the level past an all-accepted chain); without one, an n-gram chain
        accepted whole learns its levels and the next from the probe (`beyond`)."""
        ordered = order is not None and family == self.probe_family
        row = (self.rows[order][family] if order and unprobed else None) if ordered else family
        if row is None:
            return
        cfg = stats.config
        depth = min(cfg.depth, self.config.max_depth)
        if ordered:
            depth = min(depth, stats.tree_size)
        else:
            self.yields.observe(request_id, family, stats.tree_size, cfg.max_nodes)
        depth = min(depth, _observed_depth(stats))
        if beyond is not None:
            self.acceptance.observe(request_id, row, beyond.accepted, min(beyond.observed_depth, self.config.max_depth))
            return
        fail_weight = 1.0
        if loss > 0.0:
            fail_weight = self._budget_fail_weight(request_id, family, loss, stats.accepted, depth, mean)
        self.acceptance.observe(request_id, row, stats.accepted, depth, fail_weight)

    def _budget_fail_weight(self, request_id: int, family: int, loss: float, accepted: int, depth: int,
                            mean: list | None) -> float:
        """How much a budgeted step's rejection counts against the drafter: the budget may have caused it.
        Also teaches the fidelity model's acceptance factor (observed vs expected acceptances)."""
        # the posterior mean of the last full decision: a few steps old, but no numpy work per step
        q_depth = mean[family] if mean is not None else self.acceptance.mean(request_id)[family].tolist()
        expected, run = 0.0, 1.0
        for q in q_depth[:depth]:
            run *= q
            expected += run
        self.fidelity.observe_acceptance(loss, min(accepted, depth), expected)
        q = q_depth[min(accepted, depth - 1)]
        m = math.exp(-self.fidelity.lam * loss)
        return (1.0 - q) / max(1.0 - q * m, 1e-9)

    def _learn_probe(self, request_id: int, probe: Probe, order: int | None) -> None:
        """The probe's acceptance (and yield, without a lookahead)."""
        f = self.probe_family
        if order is None:
            self.yields.observe(request_id, f, probe.drafted, probe.depth, decay=False)
            self.acceptance.observe(request_id, f, probe.accepted, probe.observed_depth)
        elif order:  # conditional on the drafted levels: running out of chain is not a failure
            seen = probe.accepted if probe.censored else min(probe.drafted, probe.depth)
            self.acceptance.observe(request_id, self.rows[order][f], probe.accepted, seen)

    def _learn_costs(self, stats: StepStats) -> None:
        """Unique experts per layer, the step's verify and draft times and, with experts offloaded, what its
        transfers cost (the verify fit learns the time less the stall: adaptive/transfers.py)."""
        cfg, L = stats.config, self.num_layers
        tokens = stats.tree_size + 1
        evicted = stats.nodes_kept is not None and stats.nodes_kept < stats.tree_size
        if len(stats.unique_experts) == L and not evicted:  # evicted rows ask no experts past their layer
            self.experts.observe(tokens, stats.unique_experts, stats.unique_experts_kept, stats.router_mass_kept)
            kept = stats.unique_experts_kept
            layers = kept if len(kept) == L else stats.unique_experts
        elif len(stats.unique_experts_kept) == L:
            layers = stats.unique_experts_kept
        else:
            layers = self.predicted.get(tokens)
            if layers is None:
                layers = self.experts.predict([tokens])[:, 0].tolist()
        computed = sum(layers)
        if stats.batch_experts_others is not None and L in (len(stats.unique_experts), len(stats.unique_experts_kept)):
            self.experts.observe_batch(computed, stats.batch_experts_others, stats.batch_experts)  # what it added
        if cfg.eval_agreement:  # eval mode verified twice: its time is not one verification's
            return
        overhead = stats.t_accept + stats.t_commit + stats.t_control
        stall = 0.0 if stats.offload_stall is None else stats.offload_stall
        if stats.offload_misses is not None:
            fitting, forced = split(layers, stats.offload_capacity) if stats.batch_experts is None else (
                float(stats.batch_experts), 0.0)  # a batch's per-layer union is not in its StepStats
            self.transfers.observe(stats.offload_misses, stall, fitting, forced, stats.offload_capacity)
        # batched: the whole forward (a share would price a token, a drafted node, as alone), worth this
        # request's share of one observation (every request sees the forward); its overhead is its own
        draft = (stats.tree_depth, stats.tree_size, stats.t_draft) if stats.batch_t_draft is None else (
            stats.batch_draft_depth, stats.batch_draft_nodes, stats.batch_t_draft)
        drafter = cfg.drafter if cfg.speculate else None
        shared = {}
        if stats.batch_t_draft is not None:
            shared = dict(draft_weight=stats.tree_size / stats.batch_draft_nodes,
                          draft_share=1.0 / stats.batch_draft_requests)
        elif stats.batch_tokens is not None and drafter is not None and stats.tree_size:
            shared = dict(draft_share=1.0)  # drafted in a batch, but alone: it paid its whole draft forward
        if stats.batch_experts is None:
            self.latency.observe(drafter, tokens, computed, stats.context_len, stats.t_verify - stall, *draft,
                                 overhead=overhead, **shared)
        else:
            self.latency.observe(drafter, stats.batch_tokens, stats.batch_experts, stats.batch_context,
                                 stats.batch_t_verify - stall, *draft, weight=tokens / stats.batch_tokens,
                                 overhead=overhead, **shared)

    # ---- plan ----------------------------------------------------------------------------------------
    def check(self) -> None:
        """Fold queued observations in, and reset any estimator that degraded (adaptive/health.py)."""
        for model in (self.acceptance, self.yields, self.latency, self.experts, self.fidelity, self.transfers):
            model.check()

    def estimates(self, menu: Menu) -> Estimates:
        """The global models' predictions a plan is built from."""
        draft, shared, paid = np.zeros(len(menu.grid)), np.zeros(len(menu.grid)), np.ones(len(menu.grid))
        for name, sel, features in menu.drafting:
            draft[sel] = self.latency.predict_draft(name, features)
            if DRAFTER_TRAITS[name].batched:
                shared[sel] = self.latency.predict_draft_shared(name, features)
                paid[sel] = self.latency.draft_share[name].value
        unique = self.experts.predict(menu.token_counts)  # (L, len(token_counts))
        self.predicted = dict(zip(menu.token_counts.tolist(), unique.T.tolist()))
        return Estimates(unique, self.fidelity.w, self.experts.gamma,
                         self.fidelity.lam, self.latency.verify.theta, draft, self.experts.shape.num_experts,
                         self.config.max_agreement_loss, self.transfers.seconds_per_expert, shared, paid,
                         self.latency.overhead.value, self.experts.shape.top_k, self.experts.overlap,
                         self.transfers.capacity, self.transfers.seconds_per_miss)
