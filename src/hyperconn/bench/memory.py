"""Memory of one forward + backward of a :class:`~hyperconn.bench.timing.Case`, in an untimed pass.

* **activation**: bytes allocated during the forward and still held when it ends, minus
  the output itself — what the layer keeps for its backward.
* **peak**: the largest amount allocated at any moment of forward + backward, relative
  to the start (includes the output, the gradients and the backward's temporaries).

On CUDA these come from ``torch.cuda.memory_allocated`` / ``max_memory_allocated``; on
CPU from the allocation events of ``torch.profiler`` (``profile_memory=True``), replayed
in time order.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Optional

import torch

from .timing import Case, _sync, tensor_bytes

__all__ = ["measure_memory"]

_FWD_MARK = "hyperconn.bench.forward"


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2 for a moment: the CPU profiler (kineto) prints two
    lines per session straight from C++, which no setting turns off."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_memory_timeline(prof) -> Optional[tuple[list[tuple[int, int]], Optional[int]]]:
    """(sorted (start_ns, ±bytes) CPU allocation events, end_ns of the forward marker)."""
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # a torch whose profiler results look different
        return None
    allocs, fwd_end = [], None
    for e in events:
        name = e.name()
        if name == "[memory]" and str(e.device_type()).endswith("CPU"):
            allocs.append((e.start_ns(), e.nbytes()))
        elif name == _FWD_MARK:
            fwd_end = e.end_ns()
    return sorted(allocs), fwd_end


def measure_memory(case: Case, device: torch.device) -> dict:
    """``{"activation_bytes", "peak_bytes"}`` of one forward + backward of ``case``
    (definitions in the module docstring); values are None where they cannot be measured."""
    case.reset()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = case.forward()
        _sync(device)
        held = torch.cuda.memory_allocated(device) - base - tensor_bytes(out)
        case.backward(out)
        del out
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return {"activation_bytes": held, "peak_bytes": peak}
    from torch.profiler import ProfilerActivity, profile, record_function
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_native_stderr():
        prof.start()
    try:
        with record_function(_FWD_MARK):
            out = case.forward()
        out_bytes = tensor_bytes(out)
        case.backward(out)
        del out
    finally:
        with _quiet_native_stderr():
            prof.stop()
    timeline = _cpu_memory_timeline(prof)
    if timeline is None:
        return {"activation_bytes": None, "peak_bytes": None}
    allocs, fwd_end = timeline
    cur = peak = 0
    held_after_fwd = None
    for t, nbytes in allocs:
        if fwd_end is not None and held_after_fwd is None and t > fwd_end:
            held_after_fwd = cur
        cur += nbytes
        peak = max(peak, cur)
    if fwd_end is not None and held_after_fwd is None:
        held_after_fwd = cur
    act = None if held_after_fwd is None else held_after_fwd - out_bytes
    return {"activation_bytes": act, "peak_bytes": peak}
