"""What a benchmark times and how: :class:`Case`, round-robin timing, paired ratios.

Every case compared in one table is measured in the same process, interleaved round by
round (the order alternates every round), so ratios are medians of per-round ratios and
survive a machine whose load drifts.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["Case", "tensor_bytes", "time_interleaved", "paired_ratio", "summarize"]


@dataclass
class Case:
    """One thing to time. ``forward()`` returns what ``backward(out)`` consumes.

    ``step()`` (forward then backward) is what is timed; the memory pass calls the two
    halves separately. ``out_bytes(out)`` is subtracted from the memory held after the
    forward (the output is not an activation). ``reset()`` runs before each call (e.g.
    dropping gradients so every step allocates them the same way).
    """

    name: str
    forward: Callable[[], Any]
    backward: Callable[[Any], None]
    reset: Callable[[], None] = lambda: None
    info: dict = field(default_factory=dict)

    def step(self) -> None:
        self.reset()
        self.backward(self.forward())


def tensor_bytes(obj) -> int:
    return obj.numel() * obj.element_size() if isinstance(obj, torch.Tensor) else 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(cases: Sequence[Case], *, repeats: int, warmup: int, device: torch.device,
                     inner: int = 1, on_round: Optional[Callable[[int], None]] = None) -> dict[str, list[float]]:
    """Seconds per step for every case, measured round-robin.

    Every round times each case once (``inner`` steps per sample, divided back), in an
    order that reverses every round, so slow drifts of the machine's load hit all cases
    alike. Returns ``{case.name: [seconds per step, one per round]}``.
    """
    for _ in range(warmup):
        for case in cases:
            case.step()
    _sync(device)
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    for r in range(repeats):
        order = cases if r % 2 == 0 else list(reversed(cases))
        for case in order:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                case.step()
            _sync(device)
            times[case.name].append((time.perf_counter() - t0) / inner)
        if on_round is not None:
            on_round(r)
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``times[num][r] / times[den][r]`` (nan if either is missing)."""
    a, b = times.get(num), times.get(den)
    if not a or not b:
        return float("nan")
    return statistics.median(x / y for x, y in zip(a, b))


def summarize(samples: list[float]) -> dict:
    """median, quartiles and the relative spread (IQR / median) of a list of seconds."""
    s = sorted(samples)
    if len(s) >= 4:
        q = statistics.quantiles(s, n=4)
        p25, p75 = q[0], q[2]
    else:
        p25, p75 = s[0], s[-1]
    med = statistics.median(s)
    return {"median_s": med, "p25_s": p25, "p75_s": p75, "min_s": s[0],
            "spread": (p75 - p25) / med if med > 0 else float("nan"), "samples_s": list(samples)}
