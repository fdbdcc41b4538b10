"""Optimizer parameter groups that keep weight decay off a connection's coefficients.

A generic ``AdamW(model.parameters(), weight_decay=...)`` (or Hugging Face's ``Trainer``)
decays every parameter, so it pulls each HyperConnection's static coefficients
``b_pre``/``b_post``/``b_res``, its gates ``alpha`` and its variant's scalars toward 0 —
which for ``b_res`` is not "less mixing" but a different map (uniform averaging after
Sinkhorn). Use::

    opt = torch.optim.AdamW(hyperconn.param_groups(model, weight_decay=0.1), lr=3e-4)

Rule (the lab's training loop uses the same one): parameters with ≥ 2 dimensions decay
(weight matrices, embeddings, and a connection's dynamic projection ``phi``), except a
HyperConnection's own coefficients and gates; 1-D parameters (norm gains, biases) don't.
A connection's *branch* parameters follow the general rule.
"""

from __future__ import annotations

from torch import nn

from .connection import HyperConnection

__all__ = ["decay_split", "param_groups"]


def decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters that get weight decay, and those that don't."""
    connection_own: dict[str, bool] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, HyperConnection):
            for pname, _ in mod.named_parameters():
                if pname.startswith("branch."):
                    continue
                full = f"{mod_name}.{pname}" if mod_name else pname
                connection_own[full] = pname == "phi"
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = connection_own[name] if name in connection_own else p.dim() >= 2
        (decay if wd else no_decay).append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups for any ``torch.optim`` optimizer: ``decay`` (``weight_decay``) and
    ``no_decay`` (0), by :func:`decay_split`; each group has a ``name`` key.

    Raises:
        ValueError: if ``weight_decay`` is negative or not a number.
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay: expected a number ≥ 0, got {weight_decay!r}")
    params = dict(model.named_parameters())
    decay, no_decay = decay_split(model)
    return [{"name": "decay", "params": [params[n] for n in decay], "weight_decay": float(weight_decay)},
            {"name": "no_decay", "params": [params[n] for n in no_decay], "weight_decay": 0.0}]
