"""AdamW with explicit weight-decay groups, and the learning-rate schedule.

Weight decay (decoupled, AdamW) applies to weight *matrices* only:

* every parameter with ``dim >= 2`` outside a HyperConnection's own coefficients decays:
  attention / MLP weights and the token embedding (tied with the head), as in nanoGPT;
* norms' gains and any bias (``dim < 2``) do not decay;
* inside a :class:`~hyperconn.HyperConnection` (its own parameters, not its branch's)
  only the dynamic projection ``phi`` decays: it is an ordinary ``(n·C, n² + 2n)`` weight
  matrix, and shrinking it pulls the dynamic coefficients toward the static ones. The
  static coefficients ``b_pre``/``b_post``/``b_res``, the gates ``alpha`` and the variant's
  scalars (hybrid's ``lambda_logit``) never decay: decay would pull them toward 0,
  which for ``b_res`` is not "no mixing" but a different map (e.g. uniform averaging
  after Sinkhorn), so it would bias the connection rather than regularise it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..param_groups import decay_split

__all__ = ["decay_split", "build_optimizer", "lr_at", "set_lr"]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over two groups (``decay``: ``weight_decay``; ``no_decay``: 0).
    Groups carry a ``name`` key so a checkpoint's optimizer state maps back unambiguously."""
    params = dict(model.named_parameters())
    decay, no_decay = decay_split(model)
    groups = [
        {"name": "decay", "params": [params[n] for n in decay], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, **extra)


def lr_at(step: int, lr: float, steps: int, warmup_steps: int, schedule: str = "cosine",
          min_lr_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of a ``steps``-step run.

    Linear warmup ``lr·(step+1)/warmup_steps`` for the first ``warmup_steps`` steps, then
    ``constant`` (lr) or ``cosine`` from lr down to ``min_lr_ratio·lr`` at the last step.
    A pure function of its arguments, so resuming needs only the step.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = max(1, steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
