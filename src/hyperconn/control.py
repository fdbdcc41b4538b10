"""HarmonizedController: feedback control of the composite gain (Harmonized HC).

After each training forward, under ``no_grad``::

    G = forward Amax gain of the applied composite transport (token mean)
    e ← β e + (1 − β) G                         (e starts at 1)
    s ← clip(s · (target / max(1e-6, e))^k, min_scale, 1)

``s`` is one global scale written into every harmonized layer of the model, so every
layer (and, under data parallelism, every rank that sees the same G) holds the same value.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .connection import HyperConnection
from .diagnostics.gain import composite_product, gains_of

__all__ = ["HarmonizedController"]


class HarmonizedController:
    """Drive the shared scale ``s`` of all ``harmonized`` layers in ``model``.

    Args:
        model: any module containing ``HyperConnection(variant="harmonized")`` layers, in
            forward order (``model.modules()`` order is taken as layer order).
        target_gain: gain the controller holds the composite near (published: 12 for
            96 layers, n = 16).
        beta: EMA factor of the measured gain (0.95).
        exponent: controller exponent k (0.5).
        min_scale: lower clip of s (0.02); hitting it is counted in ``floor_hits``.

    Call :meth:`update` after each training forward (before or after backward).

    Raises:
        ValueError: if the model has no harmonized layer or an argument is out of range.
    """

    def __init__(self, model: nn.Module, target_gain: float = 12.0, beta: float = 0.95,
                 exponent: float = 0.5, min_scale: float = 0.02):
        self.layers = [m for m in model.modules()
                       if isinstance(m, HyperConnection) and m.variant_name == "harmonized"]
        if not self.layers:
            raise ValueError("model: expected at least one HyperConnection with variant='harmonized'")
        if target_gain <= 0:
            raise ValueError(f"target_gain: expected a positive number, got {target_gain}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta: expected a value in [0, 1), got {beta}")
        if exponent <= 0:
            raise ValueError(f"exponent: expected a positive number, got {exponent}")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale: expected a value in (0, 1], got {min_scale}")
        self.target_gain, self.beta, self.exponent, self.min_scale = target_gain, beta, exponent, min_scale
        self.ema = 1.0
        self.scale = 1.0
        self.floor_hits = 0
        self.steps = 0
        self.last_gain = float("nan")
        self._captured = {}
        for layer in self.layers:
            layer.probe = self._capture  # one probe slot per layer; see diagnostics.Probe

    def _capture(self, layer, h_pre, h_post, h_res, x):
        self._captured[id(layer)] = h_res.detach()

    @torch.no_grad()
    def measured_gain(self) -> float:
        """Token-mean forward Amax gain of the applied transport in the last forward."""
        mats = [self._captured[id(m)] for m in self.layers if id(m) in self._captured]
        if len(mats) != len(self.layers):
            raise RuntimeError("HarmonizedController.update() called before a forward pass of the model")
        return float(gains_of(composite_product(mats)).forward_amax.float().mean())

    @torch.no_grad()
    def update(self, gain: Optional[float] = None) -> float:
        """One control step after a training forward; returns the new scale s.

        ``gain``: the gain to feed back instead of :meth:`measured_gain` of this process,
        e.g. its mean over data-parallel ranks (each saw a different slice of the batch),
        so every rank applies the same update and holds the same scale.
        """
        if gain is None:
            gain = self.measured_gain()
        gain = float(gain)
        self._captured.clear()
        self.last_gain = gain
        self.ema = self.beta * self.ema + (1.0 - self.beta) * gain
        new = self.scale * (self.target_gain / max(1e-6, self.ema)) ** self.exponent
        if new <= self.min_scale:
            self.floor_hits += 1
        self.scale = float(min(max(new, self.min_scale), 1.0))
        self.steps += 1
        self._write_scale()
        return self.scale

    def _write_scale(self):
        for layer in self.layers:
            layer.mixer.scale.fill_(self.scale)

    def state_dict(self) -> dict:
        return {"ema": self.ema, "scale": self.scale, "floor_hits": self.floor_hits,
                "steps": self.steps, "last_gain": self.last_gain}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.scale = float(state["ema"]), float(state["scale"])
        self.floor_hits, self.steps = int(state["floor_hits"]), int(state["steps"])
        self.last_gain = float(state.get("last_gain", float("nan")))
        self._write_scale()
