"""Refuse a run whose training step cannot fit in memory, before anything is built.

The estimate is a *lower bound* of the activation memory one training step keeps for
backward (fp32), so a run is only refused when it certainly cannot fit:

    per block and token: 2 sublayers × the stored stream state (n·C; the layer input of
    every hyper-connected sublayer) + the attention inputs and output (4·C) + the SwiGLU
    hidden activations (3·hidden)
    per token: the logits and their gradient (2·V)

times ``batch_size × seq_len`` (per rank) and 4 bytes. The attention matrix is left out
(fused attention does not store it), as is everything else a real step adds, so actual
use is larger: the error message says "at least".
"""

from __future__ import annotations

import os

import torch

from .config import ConfigError, TrainConfig

__all__ = ["step_activation_bytes", "available_bytes", "check_fits"]


def step_activation_bytes(config: TrainConfig, world_size: int = 1) -> int:
    """Lower bound of the bytes one training step stores for backward (on one rank)."""
    m = config.model
    n = 1 if config.model.connection.variant == "residual" else config.model.connection.streams
    per_block_token = 2 * n * m.n_embd + 4 * m.n_embd + 3 * m.mlp_hidden_dim
    per_token = m.n_layer * per_block_token + 2 * m.vocab_size
    tokens = max(1, config.batch_size // max(1, world_size)) * m.seq_len
    return 4 * tokens * per_token


def available_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` (physical RAM for the CPU), or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(config: TrainConfig, device: torch.device, world_size: int = 1) -> None:
    """Raise :class:`ConfigError` (field ``batch_size``) if a step certainly cannot fit."""
    need, have = step_activation_bytes(config, world_size), available_bytes(device)
    if have is not None and need > have:
        gib = 2.0 ** 30
        raise ConfigError("batch_size", f"a training step needs at least {need / gib:,.1f} GiB of activations "
                                        f"(batch_size {config.batch_size} × seq_len {config.model.seq_len} "
                                        f"tokens), more than the {have / gib:,.1f} GiB of {device.type} memory; "
                                        "reduce batch_size or model.seq_len")
