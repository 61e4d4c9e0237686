"""Per-phase step timing and GPU snapshots that cost no needless host syncs.

On CUDA, the phases that queue device work (draft, verify) are bracketed by CUDA events and read once per
step, after acceptance's host transfer (engine/host.py) has drained the stream, so reading them waits for
nothing; phases that end in or after that transfer (accept, commit) are timed on the host clock. On CPU,
wall-clock perf_counter is exact because the work is synchronous. pynvml snapshots are
taken only when a GPU and NVML are present; otherwise they are skipped without error.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StepTimer:
    """Times named phases of one decode step; `read()` returns seconds per phase and starts afresh."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._marks: dict[str, tuple] = {}

    @contextmanager
    def phase(self, name: str, on_host: bool = False):
        """Time the block as phase `name`; on_host: by the host clock even on CUDA."""
        if self.cuda and not on_host:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self._marks[name] = (start, end)

    def read(self) -> dict[str, float]:
        marks, self._marks = self._marks, {}
        if not self.cuda:
            return {k: e - s for k, (s, e) in marks.items()}
        events = [e for _, e in marks.values() if isinstance(e, torch.cuda.Event)]
        if events:
            events[-1].synchronize()  # complete once acceptance's transfer returned: no wait
        return {k: s.elapsed_time(e) / 1e3 if isinstance(e, torch.cuda.Event) else e - s
                for k, (s, e) in marks.items()}


_nvml_handles: dict[int, object] = {}
_last: dict[int, tuple[float, dict | None]] = {}
SNAPSHOT_EVERY_S = 0.5


def gpu_snapshot(device: torch.device) -> dict | None:
    """Memory, power and clocks of `device` via NVML; None without a GPU or NVML.

    NVML queries cost far more than a decode step's bookkeeping, so a snapshot is refreshed at most
    every SNAPSHOT_EVERY_S seconds and steps in between carry the latest one.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    now = time.monotonic()
    if index in _last and now - _last[index][0] < SNAPSHOT_EVERY_S:
        return _last[index][1]
    snap = _query(device, index)
    _last[index] = (now, snap)
    return snap


def _query(device: torch.device, index: int) -> dict | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        if index not in _nvml_handles:
            pynvml.nvmlInit()
            _nvml_handles[index] = pynvml.nvmlDeviceGetHandleByIndex(index)
        h = _nvml_handles[index]
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        return {"memory_used_mb": mem.used / 2**20, "memory_total_mb": mem.total / 2**20,
                "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1e3,
                "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
                "torch_allocated_mb": torch.cuda.memory_allocated(device) / 2**20}
    except pynvml.NVMLError:
        return None
