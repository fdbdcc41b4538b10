"""One reading of a ``device`` setting (``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...)."""

from __future__ import annotations

import torch

from .errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """The torch device named by ``name``; ``"auto"`` is CUDA when available, else the CPU.

    Raises:
        ConfigError: field ``"device"``, if ``name`` is not a device torch knows, or names
            a CUDA device while ``torch.cuda.is_available()`` is False (for ``"cuda"`` the
            message is ``"cuda was requested but torch.cuda.is_available() is False"``).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError("device", f"expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name} was requested but torch.cuda.is_available() is False")
    return dev
