"""Policies by name, with typed parameters: make_policy("NAME[:key=value,...]") -> Policy.

Why one registry: the CLI (`moetune run --policy`, `--auto`, `--latency-target-ms`, `moetune replay`)
and Python use the same names and the same validation. Values are parsed by the type of the config
dataclass field they set (int, float, str, bool, None, tuples written a/b/c); anything unknown or
malformed raises a ValueError that lists what is valid.

Examples: plain · static:depth=4 · static:depth=4,topk=2,num_draft_tokens=8,drafter=ngram ·
moespec:budget=16,depth=6 · cascade:ks=0/1/2/4 · moesd:max_depth=6 · adaptive · auto ·
adaptive:latency_target_ms=20,profile=profile.json · adaptive:budgets=false

`auto` is the adaptive policy choosing among every drafter (draft model, n-gram, self-speculation) and
lossless unless a latency target needs expert budgets (max_agreement_loss=0): on a CPU, n-gram drafting
is often the best option for repetitive text and costs no model, and budgets measured live changed the
greedy output far more than their predicted loss (bench/results/live.md). `adaptive` keeps the draft
model only, which is what a trace recorded with one drafter can replay, and allows budgets.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from moetune.adaptive.controller import ControllerConfig
from moetune.step import DRAFTERS, StepConfig

from .adaptive import Adaptive
from .base import Policy
from .cascade import Cascade, CascadeConfig
from .moesd import MoESD, MoESDConfig
from .moespec import MoESpec, MoESpecConfig
from .static import Plain, Static

# name -> (config dataclass or None, extra non-config parameters {name: type}, builder(config, extras))
POLICIES: dict[str, tuple[type | None, dict[str, str], Callable]] = {
    "plain": (None, {}, lambda cfg, extra: Plain()),
    "static": (StepConfig, {}, lambda cfg, extra: Static(cfg)),
    "moespec": (MoESpecConfig, {}, lambda cfg, extra: MoESpec(cfg)),
    "cascade": (CascadeConfig, {}, lambda cfg, extra: Cascade(cfg)),
    "moesd": (MoESDConfig, {}, lambda cfg, extra: MoESD(cfg)),
    "adaptive": (ControllerConfig, {"profile": "str | None"},
                 lambda cfg, extra: Adaptive(cfg, profile=extra.get("profile"))),
}
# alias -> (policy name, default parameters the user may still override)
ALIASES: dict[str, tuple[str, dict]] = {"auto": ("adaptive", {"drafters": DRAFTERS, "max_agreement_loss": 0.0})}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def names() -> list[str]:
    return sorted(POLICIES) + sorted(ALIASES)


def parameters(name: str) -> dict[str, str]:
    """Parameter name -> type (as written in the config dataclass) for a policy name."""
    cls, extra, _ = POLICIES[_resolve(name)]
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)} if cls else {}
    return {**fields, **extra}


def make_policy(spec: str) -> Policy:
    """Build a fresh policy from "NAME[:key=value,...]" (see module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"policy spec must be a non-empty string like 'adaptive' or 'static:depth=4'; "
                         f"valid names: {', '.join(names())}")
    name, _, rest = spec.strip().partition(":")
    key = _resolve(name)
    cls, extra_types, build = POLICIES[key]
    types = parameters(key)
    kwargs, extra = dict(ALIASES.get(name.strip().lower(), ("", {}))[1]), {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        k, eq, v = item.partition("=")
        k = k.strip()
        if not eq:
            raise ValueError(f"policy {spec!r}: {item!r} is not key=value")
        if k not in types:
            valid = ", ".join(types) or "none"
            raise ValueError(f"policy {key!r} has no parameter {k!r}; valid parameters: {valid}")
        (extra if k in extra_types else kwargs)[k] = parse_value(key, k, v.strip(), types[k])
    config = cls(**kwargs) if cls else None
    return build(config, extra)


def _resolve(name: str) -> str:
    name = name.strip().lower()
    name = ALIASES[name][0] if name in ALIASES else name
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; valid names: {', '.join(names())}")
    return name


def parse_value(policy: str, key: str, value: str, type_: str):
    """Parse `value` by its field's type string; ValueError naming the expected form on failure."""
    base = type_.replace(" ", "")
    optional = base.endswith("|None")
    base = base.removesuffix("|None")
    if optional and value.lower() == "none":
        return None
    try:
        if base == "int":
            return int(value)
        if base == "float":
            return float(value)
        if base == "str":
            return value
        if base == "bool":
            if value.lower() in TRUE + FALSE:
                return value.lower() in TRUE
            raise ValueError(value)
        if base in ("tuple[int,...]", "tuple[str,...]", "tuple[float,...]"):
            item = {"tuple[int,...]": int, "tuple[str,...]": str, "tuple[float,...]": float}[base]
            return tuple(item(v) for v in value.split("/") if v != "")
    except ValueError:
        pass
    forms = {"int": "an integer", "float": "a number", "bool": f"one of {TRUE + FALSE}",
             "tuple[int,...]": "integers separated by '/' (e.g. 8/8/6)",
             "tuple[str,...]": "names separated by '/'", "tuple[float,...]": "numbers separated by '/'"}
    form = forms.get(base, base) + (" or 'none'" if optional else "")
    raise ValueError(f"policy {policy!r}: {key}={value!r} is invalid; expected {form}")
