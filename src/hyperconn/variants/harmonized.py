"""``harmonized``: Harmonized HC, H_res = I + s·(H_raw − I) with s from a feedback
controller of the composite gain. Everything Harmonized-specific lives here: the map,
its controller (:class:`HarmonizedController`) and its extra diagnostics."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from ..control import Controller, Reduce
from ..errors import ConfigError
from .base import Options, Variant

__all__ = ["Harmonized", "HarmonizedController", "HarmonizedOptions", "HARMONIZED_KEYS"]

# Extra scalars the stability diagnostics report for models with harmonized layers.
GAINS = ("forward", "max")  # what HarmonizedController feeds back
HARMONIZED_KEYS = ("harm_scale", "harm_gain_applied_mean", "harm_gain_applied_max",
                   "harm_gain_raw_mean", "harm_gain_raw_max")


@dataclasses.dataclass(frozen=True)
class HarmonizedOptions(Options):
    """``harmonized_eps``: ε of H_raw = I + εΘ (1.0)."""

    harmonized_eps: float = 1.0

    def check_harmonized_eps(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError("harmonized_eps", f"expected a positive number, got {value!r}")


class HarmonizedController(Controller):
    """Drive the shared scale ``s`` of all ``harmonized`` layers in ``model``.

    After each training forward, under ``no_grad``::

        G = Amax gain of the applied composite transport (token mean): its forward gain
            (max row sum, ``gain="forward"``, the default) or, as the Harmonized HC source
            runs it, the larger of the forward and backward gains (max row and column sum,
            ``gain="max"``)
        e ← β e + (1 − β) G                         (e starts at 1)
        s ← clip(s · (target / max(1e-6, e))^k, min_scale, 1)

    ``s`` is one global scale written into every harmonized layer of the model, so every
    layer (and, under data parallelism, every rank that sees the same G) holds the same
    value. The controller observes the layers through observer handles
    (:meth:`hyperconn.HyperConnection.register_observer`), so it chains with a probe.

    Args:
        model: any module containing ``HyperConnection(variant="harmonized")`` layers, in
            forward order (``model.modules()`` order is taken as layer order).
        target_gain: gain the controller holds the composite near (published: 12 for
            96 layers, n = 16).
        beta: EMA factor of the measured gain (0.95).
        exponent: controller exponent k (0.5).
        min_scale: lower clip of s (0.02); hitting it is counted in ``floor_hits``.
        gain: ``"forward"`` or ``"max"`` (see above).

    Call :meth:`update` (or :meth:`step`) after each training forward (before or after backward).

    Raises:
        ValueError: if the model has no harmonized layer or an argument is out of range.
    """

    name = "harmonized"

    def __init__(self, model: nn.Module, target_gain: float = 12.0, beta: float = 0.95,
                 exponent: float = 0.5, min_scale: float = 0.02, gain: str = "forward"):
        from ..connection import HyperConnection  # the layer imports the variants

        self.layers = [m for m in model.modules()
                       if isinstance(m, HyperConnection) and isinstance(m.mixer, Harmonized)]
        if not self.layers:
            raise ValueError("model: expected at least one HyperConnection with variant='harmonized'")
        if target_gain <= 0:
            raise ConfigError("target_gain", f"expected a positive number, got {target_gain}")
        if not 0.0 <= beta < 1.0:
            raise ConfigError("beta", f"expected a value in [0, 1), got {beta}")
        if exponent <= 0:
            raise ConfigError("exponent", f"expected a positive number, got {exponent}")
        if not 0.0 < min_scale <= 1.0:
            raise ConfigError("min_scale", f"expected a value in (0, 1], got {min_scale}")
        if gain not in GAINS:
            raise ConfigError("gain", f"expected one of {GAINS}, got {gain!r}")
        self.gain = gain
        self.target_gain, self.beta, self.exponent, self.min_scale = target_gain, beta, exponent, min_scale
        self.ema = 1.0
        self.scale = 1.0
        self.floor_hits = 0
        self.steps = 0
        self.last_gain = float("nan")
        self._captured = {}
        self._handles = [layer.register_observer(self._capture) for layer in self.layers]

    def _capture(self, layer, h_pre, h_post, h_res, x):
        self._captured[id(layer)] = h_res.detach()

    @torch.no_grad()
    def measured_gain(self) -> float:
        """Token-mean Amax gain of the applied transport in the last forward: forward, or
        the larger of forward and backward per token (``gain="max"``)."""
        from ..diagnostics.gain import composite_product, gains_of

        mats = [self._captured[id(m)] for m in self.layers if id(m) in self._captured]
        if len(mats) != len(self.layers):
            raise RuntimeError("HarmonizedController.update() called before a forward pass of the model")
        g = gains_of(composite_product(mats))
        per_token = g.forward_amax if self.gain == "forward" else torch.maximum(g.forward_amax, g.backward_amax)
        return float(per_token.float().mean())

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

    def step(self, reduce: Optional[Reduce] = None) -> None:
        gain = self.measured_gain()
        self.update(reduce([gain])[0] if reduce is not None else gain)

    def metrics(self) -> dict:
        return {"harmonized_scale": self.scale, "harmonized_floor_hits": self.floor_hits,
                "harmonized_gain": self.last_gain}

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

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class Harmonized(Variant):
    """Harmonized HC: H_res = I + s·(H_raw − I), H_raw = I + ε·Θ.

    ``s`` is a buffer written by :class:`HarmonizedController` (one global value for the
    whole model, no gradient through it); it stays 1 without a controller. Each forward
    uses a copy of ``s`` taken when it ran (:meth:`snapshot`), so the controller may
    update before or after backward, with or without recompute.
    """

    name = "harmonized"
    Options = HarmonizedOptions
    res_init_default = 0.0
    scheme_logits = ("pre", "post")  # its raw map is I + εΘ: no H_res logits
    controller = HarmonizedController
    style = {"color": "#ff7f0e", "marker": "P"}

    def __init__(self, streams, layer_index=0, res_init=None, **kwargs):
        super().__init__(streams, layer_index, res_init, **kwargs)
        self.register_buffer("scale", torch.ones(()))

    @property
    def harmonized_eps(self) -> float:
        return self.options.harmonized_eps

    def raw_transport(self, raw_res):
        eye = torch.eye(self.streams, dtype=raw_res.dtype, device=raw_res.device)
        return eye + self.options.harmonized_eps * raw_res

    def snapshot(self) -> dict:
        return {"scale": self.scale.detach().clone()}

    def map_res(self, raw_res, state):
        eye = torch.eye(self.streams, dtype=raw_res.dtype, device=raw_res.device)
        return eye + state["scale"].to(raw_res.dtype) * (self.raw_transport(raw_res) - eye)

    @classmethod
    def describe_options(cls, options):
        return [f"eps={options.harmonized_eps:g}"]

    @classmethod
    def diagnostics(cls, records, applied: list, profile: dict) -> Optional[dict]:
        """Extra stability diagnostics (see :class:`hyperconn.diagnostics.StabilityHook`):
        the controller scale and the gain of the raw transports H_raw (without the
        controller) next to the applied one. ``records``: the probe's LayerRecords in call
        order; ``applied``: their H_res; ``profile``: the layer profile of ``applied``."""
        from ..diagnostics.metrics import layer_profile

        harm = [r for r in records if isinstance(r.layer.mixer, cls)]
        if not harm:
            return None
        raw = []
        for r, h in zip(records, applied):
            if not isinstance(r.layer.mixer, cls):
                raw.append(h)  # non-harmonized layers count as applied
                continue
            raw_res = r.layer.raw_coefficients(r.x.detach())[2]
            raw.append(r.layer.mixer.raw_transport(raw_res).expand_as(h))
        raw_profile = layer_profile(raw)
        app_mean, app_max = (profile["forward"]["forward_amax"][k][-1] for k in ("mean", "max"))
        raw_mean, raw_max = (raw_profile["forward"]["forward_amax"][k][-1] for k in ("mean", "max"))
        scale = float(harm[0].layer.mixer.scale)
        return {
            "scalars": {"harm_scale": scale, "harm_gain_applied_mean": app_mean,
                        "harm_gain_applied_max": app_max, "harm_gain_raw_mean": raw_mean,
                        "harm_gain_raw_max": raw_max},
            "scale": scale,
            "raw_profile": {"forward": {"forward_amax": raw_profile["forward"]["forward_amax"]},
                            "backward": {"backward_amax": raw_profile["backward"]["backward_amax"]}},
        }
