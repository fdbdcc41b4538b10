"""The training entry point: ``train(config, hooks=None) -> summary``.

It runs a :class:`~hyperconn.train.trainer.Trainer` (the step loop, evaluation,
checkpoints and resume live there). One run writes into ``config.out_dir``::

    config.json       the resolved TrainConfig
    metrics.jsonl     one line per log step (train loss, lr, grad norm, tokens/s, every
                      controller's metrics; eval and diagnostics fields on evaluation steps)
    checkpoint.pt     model, optimizer, controllers, RNG states, step (atomic writes)
    checkpoint/       instead of checkpoint.pt under torchrun: a sharded DCP checkpoint
    summary.json      status ("finished" | "diverged" | "stopped"), final metrics, timing
    diagnostics/      per-evaluation profiles written by the stability hook

Under ``torchrun`` (``WORLD_SIZE > 1``, see :mod:`.distributed` and docs/distributed.md)
the same loop runs on every rank with DDP or FSDP2: ``batch_size`` is the global batch and
each rank trains on its rows of it; the logged loss, the gradient norm, what the
controllers measure and the held-out metrics are reduced over ranks, so every rank takes
the same decisions (divergence, clipping, controller updates) and rank 0 alone writes the
run directory and the console.
"""

from __future__ import annotations

from typing import Optional, Sequence

from .config import TrainConfig
from .distributed import resolve_device
from .metrics import MetricsWriter  # noqa: F401 - where tests intercept the metrics lines
from .trainer import Hook, Trainer, seed_everything

__all__ = ["train", "Hook", "resolve_device", "seed_everything"]


def train(config: TrainConfig, hooks: Optional[Sequence[Hook]] = None) -> dict:
    """Train ``GPT(config.model)`` on ``config.task``; returns the summary dict.

    Args:
        config: a validated :class:`TrainConfig`.
        hooks: extra callables ``hook(model, inputs, targets, loss_fn, step) -> dict``
            run at every evaluation after the built-in stability hook (when
            ``config.diagnostics``); their scalars are merged into that metrics line
            under ``diag/<name>``. A hook that raises is reported once on stderr, recorded
            in ``summary["hook_errors"]`` and disabled for the rest of the run.

    Returns normally for a diverged run (``summary["status"] == "diverged"``).

    Under torchrun every rank calls this and gets the same summary; hooks run on every
    rank (with the same full first held-out batch) and rank 0's scalars are logged.

    Raises:
        TypeError: ``config`` is not a TrainConfig.
        ConfigError: invalid config (e.g. ``device="cuda"`` without CUDA, or under
            torchrun a ``batch_size`` that is not a multiple of the world size).
        CheckpointError: ``resume=True`` and the checkpoint is unreadable or was
            written by a different model / task.
    """
    with Trainer(config, hooks) as trainer:
        return trainer.fit()
