"""Per-layer expert budgets of every candidate tree at every fidelity level: the slow half of a decision.

Why greedy by marginal loss: removing an expert from layer l saves the same time in every layer but loses
w_l * (router mass it carried), so experts are removed in order of least marginal fidelity loss (exact for
convex per-layer loss curves), giving one allocation per fidelity level.

Why per distinct token count: the allocation depends on a candidate only through the unique experts it
is predicted to touch, which depends only on how many tokens it verifies, and many candidates share a
count (one tree shape under several drafters). Allocating once per count and broadcasting keeps a plan
cheap enough to recompute often (it was the largest share of decide + observe with three drafters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate, chain
from operator import mul

import numpy as np

from .candidates import CandidateGrid


@dataclass(frozen=True)
class Allocation:
    """Per distinct token count (rows) and fidelity level (columns; column 0 = no budget)."""

    kept: np.ndarray  # (T, J) experts computed, summed over layers (column 0: the unrounded prediction)
    loss: np.ndarray  # (T, J) predicted agreement loss
    valid: np.ndarray  # (T, J) the level removes more experts than the one before (else a duplicate)
    budgets: np.ndarray  # (T, J, L) per-layer expert budgets


def allocate(U: np.ndarray, levels: np.ndarray, w: np.ndarray, gamma: np.ndarray, num_experts: int,
             top_k: int = 1) -> Allocation:
    """Budgets for predicted unique experts U (L, T) at agreement-loss levels (J - 1,).

    w (L,): per-layer agreement loss per unit of router mass dropped; gamma (L,): mass dropped ~=
    (fraction of unique experts dropped) ** gamma. A layer keeps top_k experts at least (each token needs
    its top-k: engine/moe_budget.py refuses a smaller budget), or all it is predicted to touch if fewer.
    """
    L, T = U.shape
    J, E = 1 + len(levels), num_experts
    Ui = np.maximum(np.rint(U.T), 1)  # (T, L)
    kept = np.repeat(U.sum(axis=0)[:, None], J, axis=1)
    loss = np.zeros((T, J))
    valid = np.zeros((T, J), dtype=bool)
    valid[:, 0] = True
    removed = np.zeros((T, J, L), dtype=int)
    if J > 1 and E > 1:
        # marginal agreement loss of removing the k-th expert (k = 1..E-1) of layer l, inf past U - top_k
        k = np.arange(1, E, dtype=float)
        x1, x0 = k / Ui[:, :, None], (k - 1) / Ui[:, :, None]
        g = gamma[None, :, None]
        marg = w[None, :, None] * (np.minimum(x1, 1.0) ** g - np.minimum(x0, 1.0) ** g)
        removable = Ui - np.minimum(Ui, top_k)  # (T, L)
        marg = np.where(k <= removable[:, :, None], marg, np.inf).reshape(T, -1)
        order = np.argsort(marg, axis=1, kind="stable")
        cum = np.cumsum(np.take_along_axis(marg, order, axis=1), axis=1)  # (T, L*(E-1))
        m = (cum[:, :, None] <= levels).sum(axis=1)  # removals per level (T, J-1)
        onehot = (order // (E - 1))[:, :, None] == np.arange(L)
        counts = np.cumsum(onehot, axis=1)  # removals per layer after the first i+1 (T, n, L)
        idx = np.maximum(m - 1, 0)
        removed[:, 1:] = np.take_along_axis(counts, idx[:, :, None], axis=1) * (m > 0)[:, :, None]
        loss[:, 1:] = np.where(m > 0, np.take_along_axis(cum, idx, axis=1), 0.0)
        valid[:, 1:] = (m > 0) & (m > np.concatenate([np.zeros((T, 1), dtype=int), m[:, :-1]], axis=1))
        kept[:, 1:] = Ui.sum(axis=1)[:, None] - removed[:, 1:].sum(axis=2)
    return Allocation(kept, loss, valid, Ui[:, None, :] - removed)


@dataclass(frozen=True, eq=False)
class Menu:
    """The fixed menu of options: every grid candidate at every budget level, flattened as option =
    candidate * levels_per_candidate + level (level 0: no budget). Built once per model shape, so a plan
    or a decision never recomputes what the grid fixes."""

    grid: CandidateGrid
    levels: np.ndarray  # (J - 1,) agreement-loss levels of the budgeted columns
    token_counts: np.ndarray  # distinct verified-token counts of the candidates
    token_index: np.ndarray  # (C,) each candidate's index into token_counts
    drafting: tuple  # per drafter: (name, candidates it drafts (C,) bool, draft features (const, depth, nodes))
    drafter_options: dict  # drafter -> its unbudgeted options (flat indices)
    probe_family: int | None  # the passive n-gram probe's acceptance family (None: no probe)
    # [m]: the n-gram options deeper than the m tokens a lookahead holds (they draft the same m tokens as
    # depth m: masked; m = 0: every n-gram option)
    masked: tuple

    @property
    def levels_per_candidate(self) -> int:
        return 1 + len(self.levels)


def build_menu(grid: CandidateGrid, levels: np.ndarray, probe_family: int | None) -> Menu:
    J, D = 1 + len(levels), grid.max_depth
    token_counts, token_index = np.unique(grid.tokens, return_inverse=True)
    drafting, options = [], {}
    for di, d in enumerate(grid.drafters):
        sel = grid.drafter == di
        features = np.stack([np.ones(int(sel.sum())), grid.depth[sel], grid.nodes[sel]], axis=1).astype(float)
        drafting.append((d, sel, features))
        options[d] = tuple((np.flatnonzero(sel) * J).tolist())
    depth = np.repeat(np.where(grid.family == probe_family, grid.depth, 0) if probe_family is not None
                      else np.zeros(len(grid), dtype=int), J)
    masked = tuple(tuple(np.flatnonzero(depth > m).tolist()) for m in range(D + 1))
    return Menu(grid, levels, token_counts, token_index, tuple(drafting), options, probe_family, masked)


@dataclass(frozen=True, eq=False)
class Estimates:
    """What the global models predict when a plan is built: the only inputs of build_plan."""

    unique: np.ndarray  # (L, len(token_counts)) unique experts per layer at each verified-token count
    layer_weights: np.ndarray  # (L,) agreement loss per unit of router mass dropped
    gamma: np.ndarray  # (L,) mass dropped ~= (fraction of unique experts dropped) ** gamma
    acceptance_loss_rate: float  # lambda: each depth's acceptance is multiplied by exp(-lambda * loss)
    verify_theta: np.ndarray  # verify-time coefficients (adaptive.latency.VERIFY_FEATURES)
    draft_seconds: np.ndarray  # (C,) predicted draft time of every candidate
    num_experts: int
    max_agreement_loss: float
    # experts offloaded: the expected slow-tier seconds each unique expert computed that fits the fast tier
    # adds (adaptive/transfers.py, miss rate x seconds per miss); 0 with every expert resident
    transfer_seconds: float = 0.0
    # (C,) the part of draft_seconds a batched draft forward shares among its requests (its constant and
    # per-level forwards: OnlineLatency.predict_draft_shared); None: nothing shared (no batched drafter)
    draft_shared: np.ndarray | None = None
    # (C,) the share of that part a request drafting with it pays (OnlineLatency.draft_share; 0: split by the
    # whole batch); None: 1
    draft_paid: np.ndarray | None = None
    overhead_seconds: float = 0.0  # a request's own seconds per step outside the forwards (OnlineLatency.overhead)
    top_k: int = 1  # experts each token is routed to: the least a budget may keep per layer
    # in a batch, the share of a request's experts the others do not load ~= (1 - loaded) ** overlap
    # (adaptive/experts.py; 1: uniform draws)
    overlap: float = 1.0
    # the fast tier's experts per layer (None: not offloaded or not reported), and the seconds of each miss
    # forced by a layer needing more (adaptive/transfers.py)
    capacity: int | None = None
    miss_seconds: float = 0.0

    def transfers(self, layers: np.ndarray) -> np.ndarray:  # layers (..., L) experts computed per layer
        """(...) expected slow-tier seconds of forwards computing `layers` (adaptive/transfers.py)."""
        if self.capacity is None:
            return self.transfer_seconds * layers.sum(axis=-1)
        fitting = np.minimum(layers, self.capacity).sum(axis=-1)
        forced = np.maximum(layers - self.capacity, 0.0).sum(axis=-1)
        return self.transfer_seconds * fitting + self.miss_seconds * forced


@dataclass(frozen=True, eq=False)
class Plan:
    """Every option's predicted cost and yield for the next refresh_every steps.

    Step seconds = t0 + t1 * ctx - (n0 + n1 * ctx) * short_f (short_f: the share of family f's requested
    nodes this request is not expected to draft); expected emitted tokens = 1 + sum_i w_i * P_f(i) (P_f(i):
    the chance that depths 1..i + 1 are all accepted; w_i = exp(-lambda * loss) ** (i + 1), 1 without a
    budget). A decision evaluates them for every option right after a forward pass has evicted the CPU
    caches, where each numpy call costs ~5 us: a menu without budget levels (~40 options) is evaluated in
    plain Python (a prefix sum per family), a budgeted one (100-400 options) with two matrix products
    (time_terms @ [1, ctx, short_1..F, short_1..F * ctx], emitted_weights @ [P_f(i) for all f, i; 1])."""

    time_terms: np.ndarray  # (C * J, 2 + 2F): t0 (+inf for an invalid option: never chosen), t1, -n0, -n1
    emitted_weights: np.ndarray  # (C * J, F * D + 1): each option's w_i in its family's block, then 1
    loss: tuple  # per option: predicted agreement loss
    valid: tuple  # per option: False for a budget level that removes nothing new (a duplicate)
    over_loss: tuple  # per option: -inf where the loss exceeds max_agreement_loss, else 0
    budgets: tuple  # per option: its per-layer expert budgets (L ints)
    layer_weights: list  # per-layer sensitivity as floats: observe prices a budgeted step's loss with it
    terms: tuple | None  # without budget levels: per option (family, t0, t1, n0, n1), else None
    positions: tuple | None  # ... and per option (family, depth)
    verify_const: float  # the verify fit's constant: a forward's, shared by every request of a batch
    expert_seconds: np.ndarray  # (C * J,) verify seconds of each option's predicted experts
    draft_shared: np.ndarray  # (C * J,) draft seconds a batched draft forward shares (Estimates.draft_shared)
    draft_paid: np.ndarray  # (C * J,) the share of it each pays (Estimates.draft_paid)
    overlap: float  # Estimates.overlap

    def batch_times(self, times, miss: float, requests: int) -> list | np.ndarray:
        """Each option's step seconds in a batch of `requests`: what it adds to the forward (its step
        seconds alone, `times` from step_times, less the forward's constant and the experts the other
        requests load anyway: a share `miss` of its experts is new, about (1 - x) ** overlap where the
        others load a share x of all, adaptive/experts.py; overlap 1 for uniform draws, larger for skewed
        routing, where the loaded experts are the popular ones) plus its even share of the constant, so the
        requests' times add up to the step's. The verify fit is linear: the others' tokens and context cancel.
        Why the share: priced at the bare marginal, the constant looks free and each extra token costly
        (auto ran shallow n-gram chains at batch 8, 1.35x plain where it reaches 1.57x with the share).
        Known: `times` already left out the experts of the nodes a request is not expected to draft
        (step_times' shortfall), and all of the option's experts come out here again, so an n-gram chain
        deeper than a request drafts can price at the 1 us floor; pricing only the drafted nodes' experts
        made `auto` draft shallower and run 0.81-0.91 of the best static config at batch 16-64 on the
        Qwen3-shape replay (0.90-0.94 as is), so it stays until a batch prices depth at the batch's rate
        (README, Known limits). A batched drafter's forward is priced alike: each pays the share of its constant and levels that
        requests drafting with it have paid (OnlineLatency.draft_share), at least 1 / requests. Why learned and
        starting shared by the whole batch: priced alone while few used it, none started (auto ran plain at
        batch 32 in replay, where the draft-model chain is the best static config)."""
        saved = self.verify_const * (1.0 - 1.0 / requests) + (1.0 - miss) * self.expert_seconds \
            + self.draft_shared * (1.0 - np.maximum(self.draft_paid, 1.0 / requests))
        if isinstance(times, np.ndarray):
            return np.maximum(times - saved, 1e-6)
        return [max(t - s, 1e-6) for t, s in zip(times, saved.tolist())]

    def step_times(self, short: list, context_len: int, masked: tuple = ()) -> list | np.ndarray:
        """Predicted step seconds of every option (a list without budget levels, else an array); +inf
        for the `masked` ones."""
        if self.terms is None:
            out = self.time_terms.dot([1.0, context_len, *short, *(x * context_len for x in short)])
            if masked:
                out[list(masked)] = math.inf
            return out
        out = [t0 + t1 * context_len - (n0 + n1 * context_len) * short[f] for f, t0, t1, n0, n1 in self.terms]
        for o in masked:
            out[o] = math.inf
        return out

    def emitted(self, curves: list, remaining: int) -> list | np.ndarray:
        """Expected emitted tokens of every option, at most `remaining`, for each acceptance curve (F lists
        of D): a list of lists without budget levels, else an array (curves, options)."""
        cap = float(max(remaining, 1))
        if self.terms is None:
            x = np.array([[*chain.from_iterable(accumulate(row, mul) for row in curve), 1.0] for curve in curves])
            out = x @ self.emitted_weights.T
            return out if cap > len(curves[0][0]) else np.minimum(out, cap)
        sums = [[list(accumulate(accumulate(row, mul), initial=1.0)) for row in curve] for curve in curves]
        out = [[s[f][d] for f, d in self.positions] for s in sums]
        return out if cap > len(curves[0][0]) else [[min(e, cap) for e in row] for row in out]


def at_rate(rate: float | None, mean_E, T):
    """Each option's seconds plus one constant that puts the best option's goodput at `rate` (a batch's
    measured goodput g, None: T as it is): then the highest goodput E / (T + a) is the option of the most
    E - g T, the tokens it adds less what its seconds would have earned the batch (Dinkelbach's rule for the
    batch's tokens over its seconds). Why: a request's own seconds in a batch (Plan.batch_times) leave out the
    experts it shares with the others, so its own E / T overstated what the batch earns per second, and by
    that rate a deeper tree never paid (auto drafted 3-level n-gram chains where 6 ran 10% faster at batch 8
    on the Qwen3-shape replay). mean_E, T: per option (lists, or T an array)."""
    if rate is None:
        return T
    a = max(e - rate * t for e, t in zip(mean_E, T)) / rate  # >= -min(T): every option emits >= 1 token
    return T + a if isinstance(T, np.ndarray) else [t + a for t in T]


def build_plan(menu: Menu, est: Estimates) -> Plan:
    """The plan for the menu under the current estimates (pure: the same inputs give the same plan)."""
    g, J = menu.grid, menu.levels_per_candidate
    C, F, D = len(g), len(g.families), g.max_depth
    a = allocate(est.unique, menu.levels, est.layer_weights, est.gamma, est.num_experts, est.top_k)
    inv = menu.token_index
    kept, loss, valid = a.kept[inv], a.loss[inv], a.valid[inv]
    valid[0, 1:] = False  # plain decoding has nothing to budget
    factor = np.exp(-est.acceptance_loss_rate * np.asarray(loss))
    mpow = (factor[:, :, None] ** np.arange(1, D + 1, dtype=float)) * g.depth_mask[:, None, :]  # (C, J, D)
    M = np.zeros((C, J, F, D))
    M[np.arange(C)[:, None], np.arange(J)[None, :], g.family[:, None]] = mpow
    M = np.concatenate([M.reshape(C * J, F * D), np.ones((C * J, 1))], axis=1)  # 1: the token every step emits
    valid = valid.ravel()
    layers = a.budgets[inv].astype(float)  # (C, J, L) experts computed per layer
    layers[:, 0] = est.unique[:, inv].T  # unbudgeted: the unrounded prediction, as `kept`
    expert_s = float(est.verify_theta[2]) * kept + est.transfers(layers)  # (C, J)
    X = _time_terms(menu, est, expert_s, valid)
    terms = positions = None
    if J == 1:
        fam = g.family.tolist()
        terms = tuple(zip(fam, X[:, 0].tolist(), X[:, 1].tolist(), (-X[np.arange(C), 2 + g.family]).tolist(),
                          (-X[np.arange(C), 2 + F + g.family]).tolist()))
        positions = tuple(zip(fam, g.depth.tolist()))
    loss, budgets = loss.ravel(), a.budgets[inv].reshape(C * J, -1).astype(int)
    return Plan(X, M, tuple(loss.tolist()), tuple(valid.tolist()),
                tuple(np.where(loss > est.max_agreement_loss, -np.inf, 0.0).tolist()),
                tuple(map(tuple, budgets.tolist())), est.layer_weights.tolist(), terms, positions,
                float(est.verify_theta[0]), np.maximum(expert_s.ravel(), 0.0),
                np.repeat(np.zeros(C) if est.draft_shared is None else est.draft_shared, J),
                np.repeat(np.ones(C) if est.draft_paid is None else est.draft_paid, J), est.overlap)


def _time_terms(menu: Menu, est: Estimates, expert_s: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(C * J, 2 + 2F) step-time terms: verify(tokens, experts, context) + draft + the request's overhead,
    with the context folded out, less the verify time of an option's draft nodes (what a step that drafts
    fewer saves). expert_s (C, J): the seconds of each option's experts: compute, and under offload their
    expected transfers (Estimates.transfers)."""
    g, J, th = menu.grid, menu.levels_per_candidate, est.verify_theta
    C, F = len(g), len(g.families)
    n = np.repeat(g.tokens.astype(float), J)
    # clamped: a step takes some time, and a longer context never makes it faster
    t0 = np.maximum(th[0] + th[1] * n + expert_s.ravel() + np.repeat(est.draft_seconds, J)
                    + est.overhead_seconds, 1e-6)
    t1 = np.maximum(th[3] + th[4] * n, 0.0) / 1000.0
    n0 = np.maximum(th[1] * (n - 1) + expert_s.ravel() - expert_s[0, 0], 0.0)
    n1 = np.maximum(th[4] * (n - 1), 0.0) / 1000.0
    fam = np.repeat(g.family, J)
    X = np.zeros((C * J, 2 + 2 * F))
    X[:, 0], X[:, 1] = np.where(valid, t0, np.inf), t1
    X[np.arange(C * J), 2 + fam] = -n0
    X[np.arange(C * J), 2 + F + fam] = -n1
    return X


def calibration_options(menu: Menu, plan: Plan) -> list[int]:
    """Options that make the latency fit identifiable before it has data, cheapest first: per drafter its
    shallowest chain and its widest family at half depth, which separate the draft fit's (const, depth,
    nodes), then the first drafter's deepest chain (the verify fit's widest token range) and its most
    budgeted valid level. Why cheapest first: calibration steps are paid at full cost whatever they accept,
    and a drafter that accepts nothing on a new request cost a depth-8 chain at the very first step. Why
    not every drafter's deepest chain: the deepest chain of a slow drafter (self-speculation d8 on a CPU:
    14 plain steps) cost more than the rest of the warm-up together; draft costs are linear in depth and
    nodes, and every later step refines the fit."""
    g, D, J = menu.grid, menu.grid.max_depth, menu.levels_per_candidate
    cands = [0]
    for d in g.drafters:
        fams = sorted((f for f, (name, _) in enumerate(g.families) if name == d), key=lambda f: g.families[f][1])
        cands += [g.first(fams[0]), g.first(fams[-1]) + max(D // 2 - 1, 0)]
    cands = list(dict.fromkeys(sorted(cands, key=lambda c: g.tokens[c]) + [D]))  # some coincide on small grids
    budgeted = [D * J + j for j in range(1, J) if plan.valid[D * J + j]]
    return [c * J for c in cands] + budgeted[-1:]
