"""Speed and memory benchmarks: ``hyperconn bench layer`` and ``hyperconn bench model``.

    hyperconn bench layer [--quick] [--streams 2 4 8] [--dims 256 1024] [--out FILE.md|.json]
    hyperconn bench model [--quick] [--streams 4] [--out FILE.md|.json]

``layer`` times one hyper-connected layer (forward + backward, Linear(C, C) branch) for
every variant, ``recompute=True`` and the public implementation (lucidrains'
``hyper-connections``, see :mod:`.peers`); ``model`` times a whole GPT training step
(forward, loss, backward, AdamW). Everything compared in one table is measured in the
same process, interleaved round by round (the order alternates every round), so ratios
are medians of per-round ratios and survive a machine whose load drifts. Results go to
the terminal as rich tables and, with ``--out``, to markdown or JSON (written
atomically). Benchmarks never assert timings; ``tests/test_bench.py`` only smoke-tests
the code paths.

Memory, per case, in a separate untimed pass:

* **activation**: bytes allocated during the forward and still held when it ends, minus
  the output itself — what the layer keeps for its backward.
* **peak**: the largest amount allocated at any moment of forward + backward, relative
  to the start (includes the output, the gradients and the backward's temporaries).

On CUDA these come from ``torch.cuda.memory_allocated`` / ``max_memory_allocated``; on
CPU from the allocation events of ``torch.profiler`` (``profile_memory=True``), replayed
in time order.

Modules, one job each: :mod:`.timing` (cases, round-robin timing, ratios), :mod:`.memory`
(the untimed memory pass), :mod:`.machine` (what it ran on), :mod:`.render` (markdown and
rich tables), :mod:`.output` (report header and file), :mod:`.cli` (options and entry
point); :mod:`.layer` and :mod:`.model` build the cases. This package only re-exports.
"""

from __future__ import annotations

from .._device import resolve_device
from .cli import USAGE, UsageError, common_args, finish, main, progress
from .machine import machine_info
from .memory import measure_memory
from .output import command_line, meta, write_report
from .render import MiB, fmt, fmt_mib, print_report, render_markdown
from .timing import Case, paired_ratio, summarize, tensor_bytes, time_interleaved

__all__ = ["main", "Case", "UsageError", "time_interleaved", "measure_memory", "machine_info",
           "paired_ratio", "render_markdown", "write_report"]
