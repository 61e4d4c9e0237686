"""The features step latency is modelled on, defined once for the hardware profile (traces/profile.py), the
trace-fitted latency model (traces/latency.py) and the controller's online fit (adaptive/latency.py).

Why these: a verification pass reads every unique expert it computes (bandwidth, the MoE cost of
speculation), processes every verified token (compute) and attends over the context (KV reads grow with
context, per token verified); drafting costs a fixed part, a part per draft step and a part per node.

Unit: context is in tokens everywhere, so coefficients fitted on these features are per token. Torch-free.
"""
from __future__ import annotations

import numpy as np

VERIFY_FEATURES = ("const", "tokens", "experts", "context", "tokens_x_context")
DRAFT_FEATURES = ("const", "depth", "nodes")


def verify_features(tokens, experts, context, context_tokens=None) -> np.ndarray:
    """[..., 5] VERIFY_FEATURES of verification passes: tokens verified, unique experts computed summed over
    layers, context length in tokens (scalars or broadcastable arrays). context_tokens: the attention term
    when the pass is a batch's (sum over requests of context x rows; default context x tokens, one request)."""
    tokens = np.asarray(tokens, dtype=float)
    context = np.asarray(context, dtype=float)
    cross = context * tokens if context_tokens is None else np.asarray(context_tokens, dtype=float)
    return np.stack(np.broadcast_arrays(np.ones_like(tokens), tokens, np.asarray(experts, dtype=float),
                                        context, cross), axis=-1)


def draft_features(depth, nodes) -> np.ndarray:
    """[..., 3] DRAFT_FEATURES of drafts: draft steps (depth) and drafted nodes."""
    depth = np.asarray(depth, dtype=float)
    return np.stack(np.broadcast_arrays(np.ones_like(depth), depth, np.asarray(nodes, dtype=float)), axis=-1)
