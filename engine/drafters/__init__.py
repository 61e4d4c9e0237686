"""Drafters (proposers): what proposes the token tree a step verifies."""
from .base import Proposer
from .batched import BatchedDraftModel
from .draft_model import DraftModelDrafter
from .ngram import NgramDrafter
from .registry import make_drafter
from .self_spec import SelfDrafter

__all__ = ["Proposer", "BatchedDraftModel", "DraftModelDrafter", "NgramDrafter", "SelfDrafter", "make_drafter"]
