"""Hardware latency model: predicted step time from what a step verifies, not from which policy ran it.

Verification of T tokens that route to U_l unique experts in MoE layer l at context length C (tokens)
costs, on the features of moetune.features (shared with the controller's online fit),

    t_verify = overhead + per_token * T + per_expert * sum_l U_l + per_context * C + per_context_token * C * T

(weights of each unique expert are read once, so unique experts rather than tokens drive the MoE part at
small batch; MoESD, arXiv 2505.19645). Drafting costs `d0 + per_step * depth + per_node * nodes` per
drafter. Coefficients come from measurements (profile.py, or a recorded trace's own step timings) by
non-negative least squares, so the model stays monotone; its error on the data is stored with it.
Plain decoding is the special case T = 1, U_l = K, no draft.

Shape legend: S measured steps, L MoE layers.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moetune.errors import path_error
from moetune.features import draft_features, verify_features
from moetune.step import DRAFTER_TRAITS, DRAFTERS, ModelShape

from .derive import prepare

# coefficient names, one per moetune.features.VERIFY_FEATURES / DRAFT_FEATURES, as profile JSON lists them
VERIFY_TERMS = ("overhead", "per_token", "per_expert", "per_context", "per_context_token")
DRAFT_TERMS = ("d0", "per_step", "per_node")


@dataclass(frozen=True)
class LatencyModel:
    """Seconds per verification pass and per draft; see the module docstring for the formula."""

    verify: tuple[float, ...]  # coefficients for VERIFY_TERMS
    draft: dict[str, tuple[float, ...]] = field(default_factory=dict)  # drafter -> DRAFT_TERMS coefficients
    step_overhead: float = 0.0  # accept + commit per step (seconds)
    num_layers: int = 0  # L the model was fitted for (0: any)
    error: dict = field(default_factory=dict)  # e.g. {"mape": 0.04, "cv_mape": 0.05, "n": 48}
    source: str = ""

    def __post_init__(self):  # NaN fails every `0 <= x < inf`, so a damaged profile cannot slip through
        if len(self.verify) != len(VERIFY_TERMS) or not all(0 <= c < math.inf for c in self.verify):
            raise ValueError(f"LatencyModel.verify needs {len(VERIFY_TERMS)} finite non-negative coefficients "
                             f"{VERIFY_TERMS}, got {self.verify}")
        for name, c in self.draft.items():
            if name not in DRAFTERS or len(c) != len(DRAFT_TERMS) or not all(0 <= x < math.inf for x in c):
                raise ValueError(f"LatencyModel.draft[{name!r}] needs a drafter from {DRAFTERS} and "
                                 f"{len(DRAFT_TERMS)} finite non-negative coefficients {DRAFT_TERMS}, got {c}")
        if not 0 <= self.step_overhead < math.inf:
            raise ValueError(f"LatencyModel.step_overhead must be finite and >= 0, got {self.step_overhead}")

    # -- prediction ----------------------------------------------------------------------------------
    def verify_time(self, tokens, unique_sum, context):
        """Verification seconds; arguments are scalars or equal-length arrays (unique_sum = sum_l U_l).
        verify_features(...) @ verify, written out: replay calls it every step, on scalars."""
        c0, ct, ce, cc, cct = self.verify
        return c0 + ct * tokens + ce * unique_sum + cc * context + cct * context * tokens

    def draft_time(self, drafter: str, depth, nodes):
        """Draft seconds: draft_features(depth, nodes) @ draft[drafter], written out (as verify_time)."""
        d0, ds, dn = self.draft.get(drafter, (0.0, 0.0, 0.0))
        return d0 + ds * depth + dn * nodes

    def plain_time(self, shape: ModelShape, context):
        """One plain decoding step at context length `context` (scalar or array)."""
        return self.verify_time(1, shape.num_layers * shape.top_k, context) + self.step_overhead

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def analytic(cls, shape: ModelShape, bandwidth_gbs: float = 2000.0, overhead_s: float = 2e-3,
                 bytes_per_param: int = 2) -> "LatencyModel":
        """A bandwidth-bound default for synthetic replay: each unique expert's weights are read once."""
        if bandwidth_gbs <= 0 or overhead_s < 0:
            raise ValueError(f"analytic latency needs bandwidth_gbs > 0 and overhead_s >= 0, "
                             f"got {bandwidth_gbs}, {overhead_s}")
        h, i = shape.hidden_size or 2048, shape.expert_intermediate_size or 1024
        per_expert = 3 * h * i * bytes_per_param / (bandwidth_gbs * 1e9)
        per_token = 2 * per_expert / shape.top_k * 0.05  # compute grows slowly with tokens while memory-bound
        per_context = shape.num_layers * 2 * h * bytes_per_param / (bandwidth_gbs * 1e9)  # KV read
        draft = {"draft_model": (1e-4, 0.15 * overhead_s, 0.0), "ngram": (5e-5, 0.0, 0.0), "self": (0.0, 0.0, 0.0)}
        return cls(verify=(overhead_s, per_token, per_expert, per_context, 0.0), draft=draft,
                   step_overhead=5e-5, num_layers=shape.num_layers, source="analytic")

    @classmethod
    def fit(cls, tokens, unique_sum, context, seconds, draft: dict | None = None, step_overhead: float = 0.0,
            num_layers: int = 0, source: str = "fit", folds: int = 5, relative: bool = True,
            context_tokens=None) -> "LatencyModel":
        """Fit verification coefficients to S measurements (arrays [S]); draft terms are passed through.

        relative=True weighs every measurement by its relative error (profiles spanning fast and slow
        passes); False fits absolute seconds, so predicted totals over the data match measured totals.
        context_tokens: per measurement the attention term (verify_features; None: context x tokens).
        The stated error is the mean absolute percentage error on the data and, with enough points, in
        k-fold cross-validation (what to expect on configurations the profile did not measure).
        """
        x = verify_features(np.asarray(tokens, float), np.asarray(unique_sum, float), np.asarray(context, float),
                            context_tokens)
        y = np.asarray(seconds, float)
        if len(y) < len(VERIFY_TERMS) or not np.all(np.isfinite(y)):
            raise ValueError(f"LatencyModel.fit needs at least {len(VERIFY_TERMS)} finite measurements, got {len(y)}")
        coef = nnls(x, y, relative)
        err = dict(n=int(len(y)), mape=mape(x @ coef, y))
        if len(y) >= 2 * folds:
            fold = np.arange(len(y)) % folds
            pred = np.empty_like(y)
            for f in range(folds):
                pred[fold == f] = x[fold == f] @ nnls(x[fold != f], y[fold != f], relative)
            err["cv_mape"] = mape(pred, y)
        return cls(verify=tuple(float(c) for c in coef), draft=draft or {}, step_overhead=step_overhead,
                   num_layers=num_layers, error=err, source=source)

    # -- storage -------------------------------------------------------------------------------------
    def to_json(self, path: str | Path | None = None) -> str:
        d = asdict(self)
        d["terms"] = dict(verify=VERIFY_TERMS, draft=DRAFT_TERMS)
        text = json.dumps(d, indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "LatencyModel":
        """From a JSON string or a file path (a profile saved by `moetune profile`); anything else (a trace,
        a damaged or hand-edited profile, NaN coefficients) is a ValueError naming the file."""
        text = str(text_or_path)
        inline = text.lstrip().startswith("{")
        wrong = (f"{'the JSON given' if inline else text_or_path} is not a latency profile JSON "
                 f"(moetune profile writes one)")
        if not inline:
            try:
                text = Path(text).read_text(encoding="utf-8")
            except OSError as e:
                raise path_error(f"cannot read latency profile {text_or_path}", e,
                                 "pass the JSON file moetune profile wrote") from None
            except UnicodeDecodeError:
                raise ValueError(wrong) from None
        try:
            d = json.loads(text)
            d.pop("terms", None)
            if "model" in d:  # a full profile file: the fitted model sits under "model"
                d = d["model"]
                d.pop("terms", None)
            return cls(verify=tuple(d["verify"]), draft={k: tuple(v) for k, v in d.get("draft", {}).items()},
                       step_overhead=float(d.get("step_overhead", 0.0)), num_layers=int(d.get("num_layers", 0)),
                       error=dict(d.get("error", {})), source=d.get("source", ""))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise ValueError(f"{wrong}: {e}") from None


def nnls(x: np.ndarray, y: np.ndarray, relative: bool = True) -> np.ndarray:
    """Non-negative least squares, on relative error (rows weighted by 1/y) unless relative=False."""
    from sklearn.linear_model import LinearRegression  # imported here: a second at import, rarely needed
    w = 1.0 / np.maximum(y, 1e-12) if relative else np.ones_like(y)
    scale = np.maximum(np.abs(x).max(axis=0), 1e-12)  # conditioning: context*tokens is large
    reg = LinearRegression(fit_intercept=False, positive=True).fit(x / scale, y, sample_weight=w ** 2)
    return reg.coef_ / scale


def mape(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - y) / np.maximum(y, 1e-12)))


def fit_draft(depth, nodes, seconds) -> tuple[float, float, float]:
    """Draft coefficients (DRAFT_TERMS) from measurements [S], in absolute seconds; too few or
    collinear points fall back to the mean."""
    y = np.asarray(seconds, float)
    if len(y) == 0:
        return (0.0, 0.0, 0.0)
    x = draft_features(np.asarray(depth, float), np.asarray(nodes, float))
    if len(y) < 6 or np.linalg.matrix_rank(x) < 3:
        return (float(y.mean()), 0.0, 0.0)
    return tuple(float(c) for c in nnls(x, y, relative=False))


def fit_trace(trace, include_trees: bool = True) -> LatencyModel:
    """A latency model from a recorded trace's own timings: the live run's steps (what ran) and, with
    include_trees, every largest-tree draft and verification measured while recording.

    Why absolute least squares: then predicted totals over the live steps match measured totals, and
    replaying the live policy checks the counterfactual machinery rather than the regression.
    A batched live run's steps are shares of forwards shared with other requests: each shared forward
    is one verify sample (its rows, experts and summed context, attention summed per request), and each
    batched draft one draft sample; steps that ran alone count as their own.
    """
    rows: list[tuple] = []  # (tokens, unique experts summed over layers, context, context x tokens, seconds)
    over: list[float] = []
    draft: dict[str, list] = {}
    forwards: dict[tuple, list] = {}  # a shared forward -> (context, rows) of each request in it
    for req in trace.requests:
        live = req.live
        if live is not None and len(live.emitted):
            over += live.times[:, 2:].sum(axis=1).tolist()
            _live_samples(req.prompt_len, live, rows, draft, forwards)
        if include_trees:
            prepare(t for pos in req.positions for t in pos.trees.values())
            for p, pos in enumerate(req.positions):
                for name, t in pos.trees.items():
                    n, c = t.num_nodes + 1, req.prompt_len + p
                    rows.append((n, sum(t.unique_experts(np.arange(n))), c, c * n, t.t_verify))
                    draft.setdefault(name, []).append((int(t.depth.max(initial=0)), t.num_nodes, t.t_draft))
    for (tokens, experts, context, seconds), members in forwards.items():
        if experts >= 0:
            rows.append((tokens, experts, context, sum(m[0] * m[1] for m in members), seconds))
        _shared_drafts(members, draft)
    if len(rows) < len(VERIFY_TERMS):
        raise ValueError(f"trace {trace.path} holds too few timed steps ({len(rows)}) to fit a latency model; "
                         "pass a hardware profile (moetune profile) instead")
    tok, uni, ctx, cross, sec = zip(*rows)
    coefs = {name: fit_draft(*zip(*d)) for name, d in draft.items()}
    return LatencyModel.fit(tok, uni, ctx, sec, draft=coefs, step_overhead=float(np.mean(over)) if over else 0.0,
                            num_layers=trace.shape.num_layers, source=f"trace {trace.path}", relative=False,
                            context_tokens=cross)


def _live_samples(prompt_len: int, live, rows: list, draft: dict, forwards: dict) -> None:
    """One request's live steps: a step that ran alone is a verify (and draft) sample of its own; a step
    of a shared forward files its context, rows and draft under that forward."""
    shared = live.forward[:, 0] >= 0 if live.forward is not None else np.zeros(len(live.emitted), dtype=bool)
    for s in range(len(live.emitted)):
        n, c = int(live.tree_size[s]) + 1, prompt_len + int(live.position[s])
        cfg = live.configs[live.config_index[s]]
        if shared[s]:
            forwards.setdefault(tuple(live.forward[s].tolist()), []).append((c, n, cfg, float(live.times[s, 0])))
            continue
        rows.append((n, int(live.unique_experts[s].sum()), c, c * n, float(live.times[s, 1])))
        if cfg.speculate:
            draft.setdefault(cfg.drafter, []).append((cfg.depth, n - 1, live.times[s, 0]))


def _shared_drafts(members: list, draft: dict) -> None:
    """Draft samples of one shared forward's step: a drafter the engine batches (DRAFTER_TRAITS) drafted
    once for all its requests (the deepest tree, all their nodes; the time is the sum of their shares);
    any other drafted per request."""
    batched: dict[str, list] = {}
    for _, n, cfg, t_draft in members:
        if cfg.speculate and DRAFTER_TRAITS[cfg.drafter].batched:
            batched.setdefault(cfg.drafter, []).append((cfg.depth, n - 1, t_draft))
        elif cfg.speculate:
            draft.setdefault(cfg.drafter, []).append((cfg.depth, n - 1, t_draft))
    for name, group in batched.items():
        depth, nodes, seconds = zip(*group)
        draft.setdefault(name, []).append((max(depth), sum(nodes), sum(seconds)))
