"""One host sync per decode step: numbers a step reports are staged, and read after acceptance's transfer.

Why: on a GPU every read of a device tensor (`.tolist()`, `.item()`, `int(t)`) stalls the host until the
stream drains, and a step that reads acceptance, routing counts, a budget's per-layer report and the rows
an eviction kept one after another pays that stall several times. Acceptance must reach the host (it
decides what to commit); everything else the step reports is copied to pinned host memory with
`non_blocking=True` as soon as it is computed (`stage`), in stream order before acceptance's kernels, so
by the time acceptance's one transfer returns those copies have landed and reading them costs no sync
(vLLM's async output copy does the same). On CPU staging is the identity and costs nothing.

The step's order, then (engine/generate.py): verify (forward, then `stage` what it reports) -> accept
(the one transfer) -> commit -> stats (reads only staged tensors).
"""
from __future__ import annotations

import torch


def stage(tensor: torch.Tensor) -> torch.Tensor:
    """A host tensor that will hold `tensor`'s values once the stream reaches this point (read it only
    after a later sync, e.g. acceptance's transfer). On CPU: `tensor` itself."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)
