"""Trace schema: what a counterfactual trace holds, as plain numpy (no torch).

With greedy lossless decoding the output does not depend on the speculation config, so a trace keeps,
for every output position p, the *largest* draft tree each drafter proposes there, the target's verdict
on every node, and every node's per-layer routing. Any policy's step at p verifies a subtree of that tree
(see replay.outcome), so its accepted length and expert traffic follow without a model.

Shape legend: N draft nodes (the root, i.e. the last committed token, is row 0 of per-token arrays, so
those have N+1 rows), L MoE layers, K routed experts per token, M >= K router entries kept per token
(M = E keeps the full router distribution), E experts, G budgets in the recorded grid.

Conventions: position p means p output tokens are already committed; the target's argmax at the root is
output[p]; a node at depth j on the accepted path predicts output[p + j - 1].
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from moetune.ngram import MAX_N, MIN_N, check_orders
from moetune.step import DRAFTERS, SELECTIONS, SUBSTITUTIONS, ModelShape, StepConfig

from .derive import Derived, prepare, routed_bits

SCHEMA_VERSION = 1

# Bounds checked on read before anything is sized from a trace (today's largest MoE models have ~100 MoE
# layers, 384 experts and top-8 routing; recorded trees have ~100 nodes, parents are stored as int16).
MAX_LAYERS = 1024
MAX_EXPERTS = 4096
MAX_TREE_DEPTH = 256
MAX_TREE_TOPK = 64
MAX_NGRAM_ORDER = 64  # the n-gram drafter's max_n
MAX_BATCH = 4096  # requests a live run decoded together
MAX_NODES = 2**15 - 1
MAX_MODEL_DIM = 2**20  # hidden_size, expert_intermediate_size
MAX_SECONDS = 1e6  # one recorded timing
INT32_MAX = 2**31 - 1


class TraceError(ValueError):
    """A trace file or trace object is unusable; the message names the file, record and problem."""


@dataclass(frozen=True)
class TreeLimits:
    """The largest tree a drafter was asked for when recording: EAGLE-2 growth to `depth` with `topk`
    children per expanded node and a frontier of `topk` nodes per level, keeping every node created."""

    depth: int
    topk: int

    def __post_init__(self):
        if not (1 <= self.depth <= MAX_TREE_DEPTH and 1 <= self.topk <= MAX_TREE_TOPK):
            raise ValueError(f"recorded trees need 1 <= depth <= {MAX_TREE_DEPTH} and 1 <= topk <= {MAX_TREE_TOPK} "
                             f"(the largest a trace holds), got depth={self.depth}, topk={self.topk}; lower "
                             f"--depth or --topk")


@dataclass(frozen=True)
class TraceMeta:
    """Header of a trace: everything needed to interpret (and reproduce) the records that follow."""

    shape: ModelShape
    drafters: dict[str, TreeLimits]  # drafter name -> the largest tree recorded for it
    router_top: int  # M: router entries kept per token and layer (>= top_k)
    budget_grid: tuple[int, ...] = ()  # uniform per-layer budgets whose outcomes were recorded
    selection: str = "prob_sum"  # expert ranking used for the recorded budget outcomes
    substitution: str = "reselect"
    target: str = ""
    draft: str = ""
    hardware: dict = field(default_factory=dict)
    moetune_version: str = ""
    seed: int = 0
    synthetic: str = ""  # non-empty for generated traces: what was made up and how
    # the n-gram drafter's orders when recording (moetune.ngram.NgramIndex), so replay's lookahead matches
    # what the live drafter looked up; traces written before they were recorded read as the defaults
    ngram_max_n: int = MAX_N
    ngram_min_n: int = MIN_N
    # requests the live run decoded together (engine/batch.py); replay_batch at this size is its self-check
    live_batch_size: int = 1
    version: int = SCHEMA_VERSION

    def __post_init__(self):
        if self.version != SCHEMA_VERSION:
            raise ValueError(f"trace schema version {self.version} is not supported (this moetune reads "
                             f"version {SCHEMA_VERSION}); re-record the trace")
        if not self.drafters or any(d not in DRAFTERS for d in self.drafters):
            raise ValueError(f"TraceMeta.drafters must name drafters from {DRAFTERS}, got {list(self.drafters)}")
        if not self.shape.top_k <= self.router_top <= self.shape.num_experts:
            raise ValueError(f"TraceMeta.router_top must be in [top_k={self.shape.top_k}, "
                             f"num_experts={self.shape.num_experts}], got {self.router_top}")
        if any(not 1 <= b <= self.shape.num_experts for b in self.budget_grid):
            raise ValueError(f"TraceMeta.budget_grid entries must be in [1, {self.shape.num_experts}], "
                             f"got {self.budget_grid}")
        if list(self.budget_grid) != sorted(set(self.budget_grid)):
            raise ValueError(f"TraceMeta.budget_grid must be strictly increasing, got {self.budget_grid}")
        if self.selection not in SELECTIONS or self.substitution not in SUBSTITUTIONS:
            raise ValueError(f"TraceMeta.selection/substitution must be in {SELECTIONS}/{SUBSTITUTIONS}, "
                             f"got {self.selection!r}/{self.substitution!r}")
        check_orders(self.ngram_max_n, self.ngram_min_n)
        if self.live_batch_size < 1:
            raise ValueError(f"TraceMeta.live_batch_size must be >= 1 (requests decoded together), got "
                             f"{self.live_batch_size}")


@dataclass(eq=False)
class TreeRecord:
    """The largest tree one drafter proposes at one position, with the target's verdicts and routing.

    Nodes are stored parents-first (parent[i] < i). Derived arrays used by replay are computed once
    (traces.derive, batched over a trace), so replaying many policies over one trace pays for them once.
    """

    parents: np.ndarray  # [N] int16, -1 = child of the root
    tokens: np.ndarray  # [N] int32
    probs: np.ndarray  # [N] float16, draft probability of the node given its parent
    argmax: np.ndarray  # [N+1] int32, target argmax at each node (row 0: the root, i.e. output[p])
    experts: np.ndarray  # [N+1, L, M] uint8/int16, router entries by descending probability; first K routed
    router_probs: np.ndarray  # [N+1, L, M] float16, softmax router probability of those entries
    budget_argmax: np.ndarray  # [G, N+1] int32, target argmax at each node when verifying under grid budget g
    t_draft: float = 0.0  # seconds to draft this tree when recording
    t_verify: float = 0.0  # seconds to verify this tree (unbudgeted) when recording
    # Not stored per tree: the reader fills these from the header.
    top_k: int = 1  # K: the first K router entries are the routed experts
    grid: tuple[int, ...] = ()  # the trace's budget grid (rows of budget_argmax)
    limits: TreeLimits | None = None  # the largest tree the drafter was asked for
    router_full: bool = False  # M == E: the whole router distribution is kept (budget rankings are exact)
    subtrees: dict = field(default_factory=dict)  # replay's cache: config shape -> Subtree
    batch: tuple | None = field(default=None, repr=False)  # (traces.derive.Batch, index), not stored
    derived_arrays: Derived | None = field(default=None, repr=False)  # this tree's part of the batch

    @property
    def num_nodes(self) -> int:
        return int(self.parents.shape[0])

    @property
    def weights(self) -> np.ndarray:  # [N+1, L, K] routing weights up to a per-token scale
        # Families differ only in renormalising the top-k probabilities per token; replay uses weight
        # ratios within a token (routing mass kept), so the stored probabilities serve for all of them.
        return self.router_probs[:, :, :self.top_k]

    @property
    def derived(self) -> Derived:
        """Depths, path probabilities, verdicts and children order (traces.derive). Replay derives every
        tree of a trace in one batch; a lone tree is derived on first use."""
        if self.derived_arrays is None:
            if self.batch is None:
                prepare([self])
            batch, i = self.batch
            self.derived_arrays = batch.tree(i, self.experts)
        return self.derived_arrays

    @property
    def match(self) -> np.ndarray:  # [N] bool
        return self.derived.match

    @property
    def depth(self) -> np.ndarray:  # [N] int64
        return self.derived.depth

    @property
    def cum_prob(self) -> np.ndarray:  # [N] float64
        return self.derived.cum_prob

    @property
    def on_path(self) -> np.ndarray:  # [N] bool
        return self.derived.on_path

    def unique_experts(self, rows: np.ndarray) -> tuple[int, ...]:
        """[L] unique routed experts over token rows `rows` (0 = the root, i + 1 = node i)."""
        bits = routed_bits(self.experts[rows], self.top_k, self.derived.bit_table)  # [L, W]
        return tuple(np.bitwise_count(bits).sum(axis=1).tolist())


@dataclass(eq=False)
class Position:
    """One output position: the token plain greedy decoding emits there, and each drafter's largest tree."""

    token: int
    trees: dict[str, TreeRecord]


@dataclass(eq=False)
class LiveRun:
    """What actually ran while recording (one policy, live), for the replay self-check.

    Shape legend: S live steps.
    """

    policy: str
    configs: list  # [C] StepConfig, distinct configs used
    config_index: np.ndarray  # [S] int32, into configs
    position: np.ndarray  # [S] int32, output position the step started at
    accepted: np.ndarray  # [S] int32
    emitted: np.ndarray  # [S] int32
    tree_size: np.ndarray  # [S] int32
    unique_experts: np.ndarray  # [S, L] int16
    times: np.ndarray  # [S, 5] float64 seconds: draft, verify, accept, commit, control
    # a batched run (meta.live_batch_size > 1): each step's shared forward, StepStats.batch_* (FORWARD_COLUMNS);
    # -1 where a step ran alone (or, in the experts column, routing was not captured). None: not batched
    forward: np.ndarray | None = None  # [S, 4] float64

    @property
    def goodput(self) -> float:
        """Measured emitted tokens per second of step time."""
        total = float(self.times.sum())
        return float(self.emitted.sum()) / total if total > 0 else 0.0


@dataclass(eq=False)
class RequestTrace:
    """One request: its prompt and, per output position, the plain-greedy token and the recorded trees."""

    request_id: int
    prompt_len: int
    kind: str = ""
    prompt: str = ""
    positions: list[Position] = field(default_factory=list)
    live: LiveRun | None = None
    max_new_tokens: int = 0  # the recording's limit (0: unknown; replay then takes the recorded length)
    complete: bool = False  # the writer closed this request (False: the run stopped inside it)
    prompt_ids: np.ndarray | None = None  # [prompt_len] int32 when recorded (replay's model-free lookups)

    @property
    def output(self) -> np.ndarray:  # [P] int32, the greedy output (as far as recorded)
        return np.array([pos.token for pos in self.positions], dtype=np.int32)


@dataclass(eq=False)
class Trace:
    """A whole trace file in memory. `truncated` says where a killed run's file stopped, if it did."""

    meta: TraceMeta
    requests: list[RequestTrace]
    path: str = ""
    truncated: str = ""

    @property
    def shape(self) -> ModelShape:
        return self.meta.shape

    @property
    def num_tokens(self) -> int:
        return sum(len(r.positions) for r in self.requests)


# On-disk layout (writer.py writes it, reader.py checks it). A file is MAGIC, then records, each
# FRAME (payload length, crc32 of kind + payload, kind) followed by a zlib-compressed payload: a u32
# JSON length, the JSON, then the raw bytes of the arrays the JSON lists (name, dtype, shape), in order.
MAGIC = b"MOETUNE-TRACE\x00"
FRAME = "<IIc"
KIND_HEADER, KIND_REQUEST, KIND_POSITION, KIND_END = b"H", b"R", b"P", b"E"
ARRAY_DTYPES = ("bool", "uint8", "int16", "int32", "int64", "float16", "float32", "float64")
LIVE_TIMES = ("t_draft", "t_verify", "t_accept", "t_commit", "t_control")
FORWARD_COLUMNS = ("batch_tokens", "batch_experts", "batch_context", "batch_t_verify")


def meta_to_dict(meta: TraceMeta) -> dict:
    """JSON-ready header (StepConfig-free, so old readers can at least print it)."""
    s = meta.shape
    return dict(version=meta.version, shape=dict(num_layers=s.num_layers, num_experts=s.num_experts,
                                                  top_k=s.top_k, hidden_size=s.hidden_size,
                                                  expert_intermediate_size=s.expert_intermediate_size,
                                                  shared_expert=s.shared_expert),
                drafters={k: dict(depth=v.depth, topk=v.topk) for k, v in meta.drafters.items()},
                router_top=meta.router_top, budget_grid=list(meta.budget_grid), selection=meta.selection,
                substitution=meta.substitution, target=meta.target, draft=meta.draft, hardware=meta.hardware,
                moetune_version=meta.moetune_version, seed=meta.seed, synthetic=meta.synthetic,
                ngram=dict(max_n=meta.ngram_max_n, min_n=meta.ngram_min_n), live_batch_size=meta.live_batch_size)


def meta_from_dict(d: dict) -> TraceMeta:
    """Inverse of meta_to_dict, checking every field's type and range before anything is sized from it;
    raises ValueError naming the field."""
    f = Fields(d, "meta")
    check_version(f.get("version"))
    s = f.obj("shape")
    e = s.integer("num_experts", 1, MAX_EXPERTS)
    shape = ModelShape(num_layers=s.integer("num_layers", 1, MAX_LAYERS), num_experts=e,
                       top_k=s.integer("top_k", 1, e), hidden_size=s.integer("hidden_size", 0, MAX_MODEL_DIM, 0),
                       expert_intermediate_size=s.integer("expert_intermediate_size", 0, MAX_MODEL_DIM, 0),
                       shared_expert=s.flag("shared_expert", False))
    drafters = f.obj("drafters")
    if not drafters.d or any(k not in DRAFTERS for k in drafters.d):
        raise ValueError(f"meta.drafters: expected drafters from {DRAFTERS}, got {show(list(drafters.d))}")
    limits = {k: TreeLimits(depth=drafters.obj(k).integer("depth", 1, MAX_TREE_DEPTH),
                            topk=drafters.obj(k).integer("topk", 1, MAX_TREE_TOPK)) for k in drafters.d}
    grid = tuple(check_int(b, "meta.budget_grid", 1, e) for b in f.items("budget_grid", []))
    hardware = f.obj("hardware", {})
    for k, v in hardware.d.items():
        if not isinstance(v, (str, int, float, bool, type(None))):
            raise ValueError(f"{hardware.name(k)}: expected a plain value, got {show(v)}")
    ngram = f.obj("ngram", {})  # absent in traces recorded before the orders were: the defaults
    max_n = ngram.integer("max_n", 1, MAX_NGRAM_ORDER, MAX_N)
    return TraceMeta(shape=shape, drafters=limits, router_top=f.integer("router_top", shape.top_k, e),
                     budget_grid=grid, selection=f.text("selection"), substitution=f.text("substitution"),
                     target=f.text("target", ""), draft=f.text("draft", ""), hardware=dict(hardware.d),
                     moetune_version=f.text("moetune_version", ""), seed=f.integer("seed", -2**63, 2**64 - 1, 0),
                     synthetic=f.text("synthetic", ""), ngram_max_n=max_n,
                     ngram_min_n=ngram.integer("min_n", 1, max_n, MIN_N),
                     live_batch_size=f.integer("live_batch_size", 1, MAX_BATCH, 1))


def check_version(v) -> None:
    """A trace's schema version must be this reader's; a newer one (including a minor version such as
    "1.1", which int() would read as 1) needs a newer moetune."""
    text = str(v) if type(v) in (int, float, str) else ""
    if not re.fullmatch(r"-?\d+(\.\d+)*", text):
        raise ValueError(f"meta.version: expected a version number, got {show(v)}")
    parts = tuple(int(x) for x in text.split("."))
    while len(parts) > 1 and parts[-1] == 0:
        parts = parts[:-1]
    if parts > (SCHEMA_VERSION,):
        raise ValueError(f"meta.version: trace schema version {text} is newer than this moetune reads "
                         f"(version {SCHEMA_VERSION}); upgrade moetune")
    if parts != (SCHEMA_VERSION,):
        raise ValueError(f"meta.version: trace schema version {text} is not supported (this moetune reads "
                         f"version {SCHEMA_VERSION}); re-record the trace")


def config_to_dict(config: StepConfig) -> dict:
    """A StepConfig as JSON (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}


def config_from_dict(d: dict, where: str = "config", shape: ModelShape | None = None) -> StepConfig:
    """Inverse of config_to_dict, checking each field's type and range (ValueError naming the field);
    `shape` bounds budgets by the model's expert count."""
    f = Fields(d, where)
    known = {fl.name for fl in fields(StepConfig)}
    if set(f.d) - known:
        raise ValueError(f"{where}: unknown fields {show(sorted(set(f.d) - known))}")
    e = shape.num_experts if shape else MAX_EXPERTS
    kw = {k: f.flag(k) for k in ("speculate", "eval_agreement") if k in f.d}
    kw.update({k: f.text(k) for k in ("drafter", "selection", "substitution") if k in f.d})
    kw.update({k: f.integer(k, 1, hi) for k, hi in (("depth", MAX_TREE_DEPTH), ("topk", MAX_TREE_TOPK)) if k in f.d})
    if f.get("num_draft_tokens", None) is not None:
        kw["num_draft_tokens"] = f.integer("num_draft_tokens", 1, MAX_NODES)
    for k, lo, hi in (("tree", -1, MAX_NODES), ("budgets", 1, e)):
        if f.get(k, None) is not None:
            if len(f.items(k)) > MAX_NODES:
                raise ValueError(f"{f.name(k)}: {len(f.items(k))} entries, more than {MAX_NODES}")
            kw[k] = tuple(check_int(v, f.name(k), lo, hi) for v in f.items(k))
    try:
        return StepConfig(**kw)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def show(v) -> str:
    """A short one-line repr of a bad value for an error message."""
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def check_int(v, name: str, lo: int = 0, hi: int = INT32_MAX) -> int:
    """v as an int in [lo, hi]; bools, floats (1.0 included) and strings are rejected."""
    if type(v) is not int:
        raise ValueError(f"{name}: expected an integer, got {show(v)}")
    if not lo <= v <= hi:
        raise ValueError(f"{name}: {v} is out of range [{lo}, {hi}]")
    return v


def check_real(v, name: str, lo: float = 0.0, hi: float = MAX_SECONDS) -> float:
    """v as a finite float in [lo, hi] (ints accepted, bools, NaN and infinities not)."""
    if type(v) not in (int, float) or not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {show(v)}")
    if not lo <= v <= hi:
        raise ValueError(f"{name}: {v} is out of range [{lo}, {hi}]")
    return float(v)


_REQUIRED = object()


class Fields:
    """Typed, range-checked access to one JSON object of a record; every error names the field's path."""

    def __init__(self, d, where: str):
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {show(d)}")
        self.d, self.where = d, where

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, default=_REQUIRED):
        if key in self.d:
            return self.d[key]
        if default is _REQUIRED:
            raise ValueError(f"{self.name(key)}: missing")
        return default

    def integer(self, key: str, lo: int = 0, hi: int = INT32_MAX, default=_REQUIRED) -> int:
        return check_int(self.get(key, default), self.name(key), lo, hi)

    def real(self, key: str, lo: float = 0.0, hi: float = MAX_SECONDS) -> float:
        return check_real(self.get(key), self.name(key), lo, hi)

    def text(self, key: str, default=_REQUIRED) -> str:
        v = self.get(key, default)
        if not isinstance(v, str):
            raise ValueError(f"{self.name(key)}: expected a string, got {show(v)}")
        return v

    def flag(self, key: str, default=_REQUIRED) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise ValueError(f"{self.name(key)}: expected true or false, got {show(v)}")
        return v

    def obj(self, key: str, default=_REQUIRED) -> "Fields":
        return Fields(self.get(key, default), self.name(key))

    def items(self, key: str, default=_REQUIRED) -> list:
        v = self.get(key, default)
        if not isinstance(v, list):
            raise ValueError(f"{self.name(key)}: expected a list, got {show(v)}")
        return v
