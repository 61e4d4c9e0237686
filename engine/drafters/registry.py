"""The one place a drafter is built from its name (moetune.step.DRAFTERS): live decoding builds the ones
a step asks for on first use, `moetune record` builds those it records."""
from __future__ import annotations

from moetune.ngram import MAX_N, MIN_N
from moetune.step import DRAFTERS

from .base import Proposer
from .draft_model import DraftModelDrafter
from .ngram import NgramDrafter
from .self_spec import SelfDrafter


def make_drafter(name: str, target, draft=None, max_n: int = MAX_N, min_n: int = MIN_N) -> Proposer:
    """Drafter `name` for `target`. draft: the draft model, which "draft_model" needs; max_n, min_n: the
    n-gram orders of "ngram" (a trace records them, so replay looks up what the live drafter did)."""
    if name not in DRAFTERS:
        raise ValueError(f"unknown drafter {name!r}; use one of {DRAFTERS}")
    if name == "ngram":
        return NgramDrafter(max_n, min_n, device=target.device)
    if name == "self":
        return SelfDrafter(target)
    if draft is None:
        raise ValueError(f"the step asks for drafter {name!r} but none was given; pass a draft model "
                         f"or a dict of drafters to generate")
    return DraftModelDrafter(draft)
