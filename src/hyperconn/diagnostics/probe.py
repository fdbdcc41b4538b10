"""Record what every HyperConnection of a model did in one forward, and measure it.

:class:`Probe` registers an observer on each :class:`~hyperconn.HyperConnection` while
attached, so one forward (and a backward
through the recorded stream states) yields, per layer in call order, the applied
``H_pre``, ``H_post``, ``H_res`` (per token; static coefficients broadcast as views) and
the stream state ``x_l`` entering the layer, plus the final state ``x_L``. Detached, it
leaves nothing behind: its observer handles are removed, other observers stay.

:class:`StabilityHook` runs one probed forward + ``torch.autograd.grad`` on a batch and
returns the scalar stability metrics of docs/design.md §2, writing the per-layer profiles to
``run_dir/diagnostics/step_XXXXXXX.json``. It never touches parameters' ``.grad``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .._io import atomic_write_text, nan_to_none
from ..connection import HyperConnection
from ..variants.harmonized import HARMONIZED_KEYS
from .gain import composite_product
from .metrics import (MANIFOLD_ERROR_NAMES, energy_profile, layer_profile, manifold_errors,
                      stream_effective_rank, stream_similarity, transport_grad_ratio)

__all__ = ["LayerRecord", "Probe", "StabilityHook", "SCALAR_KEYS", "MULTI_STREAM_KEYS", "HARMONIZED_KEYS"]

# Scalars StabilityHook returns for every model (``stream_similarity*`` need n ≥ 2).
SCALAR_KEYS = (
    "gain_fwd_mean", "gain_fwd_max", "gain_bwd_mean", "gain_bwd_max",
    "norm_inf_mean", "norm_one_mean", "spectral_mean",
    "grad_norm_first", "grad_norm_last", "grad_ratio",
    "stream_similarity", "stream_similarity_last",
) + MANIFOLD_ERROR_NAMES + (
    "transport_grad_ratio",
    "energy_retention", "energy_retention_min", "stream_rank", "stream_rank_last", "coef_grad_ratio",
)
# The scalars that need n ≥ 2 streams (absent for n = 1).
MULTI_STREAM_KEYS = ("stream_similarity", "stream_similarity_last", "energy_retention", "energy_retention_min",
                     "stream_rank", "stream_rank_last", "coef_grad_ratio")


@dataclass
class LayerRecord:
    """One call of one HyperConnection.

    h_pre, h_post: ``(*tokens, n)``; h_res: ``(*tokens, n, n)`` (fp32, static ones are
    broadcast views); x: the stream state entering the layer ``(*tokens, n, C)``;
    out: the state it produced (``None`` until ``post`` ran). Tensors keep their autograd
    graph unless the probe was built with ``detach=True``.
    """

    layer: HyperConnection
    name: str
    h_pre: torch.Tensor
    h_post: torch.Tensor
    h_res: torch.Tensor
    x: torch.Tensor
    out: Optional[torch.Tensor] = None


class Probe:
    """Record coefficients and stream states of every HyperConnection in ``model``.

    Use as a context manager (or :meth:`attach` / :meth:`detach`)::

        with Probe(model) as probe:
            logits = model(idx)
        probe.h_res           # [H_res of layer 0, 1, …], each (B, T, n, n)
        probe.stream_states   # [x_0, …, x_{L−1}, x_L], each (B, T, n, C)

    The probe is one observer per layer (:meth:`hyperconn.HyperConnection.register_observer`),
    so it chains with others (a :class:`~hyperconn.HarmonizedController`) and removes only
    itself on detach.
    Records accumulate across forwards until :meth:`clear`; layers appear in call order.

    Args:
        model: any module containing HyperConnection layers.
        detach: store detached tensors (no autograd graph kept alive; no stream grads).

    Raises:
        ValueError: if ``model`` has no HyperConnection.
    """

    def __init__(self, model: nn.Module, detach: bool = False):
        self.model = model
        self.detach_tensors = detach
        self.names = {id(m): name for name, m in model.named_modules() if isinstance(m, HyperConnection)}
        self.layers = [m for m in model.modules() if isinstance(m, HyperConnection)]
        if not self.layers:
            raise ValueError("model: expected at least one HyperConnection, found none")
        self.records: list[LayerRecord] = []
        self._handles: list = []

    # ------------------------------------------------------------------ attach / detach
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "Probe":
        if self.attached:
            raise RuntimeError("Probe is already attached")
        self._handles = [layer.register_observer(self._observe) for layer in self.layers]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "Probe":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def clear(self) -> None:
        """Forget every record (the probe stays attached)."""
        self.records.clear()

    def _observe(self, layer, h_pre, h_post, h_res, x):
        rec = self._record(layer, h_pre, h_post, h_res, x)

        def output(out):
            rec.out = out.detach() if self.detach_tensors else out
        return output

    def _record(self, layer, h_pre, h_post, h_res, x) -> None:
        tokens, n = x.shape[:-2], x.shape[-2]
        h_pre, h_post = h_pre.expand(*tokens, n), h_post.expand(*tokens, n)
        h_res = h_res.expand(*tokens, n, n)
        if self.detach_tensors:
            h_pre, h_post, h_res, x = h_pre.detach(), h_post.detach(), h_res.detach(), x.detach()
        rec = LayerRecord(layer, self.names.get(id(layer), ""), h_pre, h_post, h_res, x)
        self.records.append(rec)
        return rec

    # ------------------------------------------------------------------ views
    @property
    def h_res(self) -> list[torch.Tensor]:
        return [r.h_res for r in self.records]

    @property
    def final_state(self) -> Optional[torch.Tensor]:
        """x_L: the output of the last recorded layer (None if its post has not run)."""
        return self.records[-1].out if self.records else None

    @property
    def stream_states(self) -> list[torch.Tensor]:
        """[x_0, …, x_{L−1}] entering each layer, then x_L if the last layer finished."""
        states = [r.x for r in self.records]
        if self.final_state is not None:
            states.append(self.final_state)
        return states


class StabilityHook:
    """Stability metrics of a model on one batch (docs/design.md §2).

    ``hook(model, inputs, targets, loss_fn, step)`` runs ``logits = model(inputs)`` under
    a :class:`Probe`, ``loss = loss_fn(logits, targets)`` and ``torch.autograd.grad`` of
    the loss w.r.t. every stream state (parameters' ``.grad`` are left alone), then returns
    the scalars named in :data:`SCALAR_KEYS` (+ :data:`HARMONIZED_KEYS` when the model has
    harmonized layers):

    - ``gain_{fwd,bwd}_{mean,max}``: forward / backward Amax gain of the whole composite
      ``H_{L−1} ⋯ H_0``, token mean and token max;
    - ``norm_inf_mean``, ``norm_one_mean``, ``spectral_mean``: its induced ∞/1 norms and
      spectral norm, token mean;
    - ``grad_norm_first`` = ‖∂L/∂x_0‖_F, ``grad_norm_last`` = ‖∂L/∂x_L‖_F,
      ``grad_ratio`` = their ratio;
    - ``stream_similarity``: mean over x_1 … x_L of the stream similarity;
      ``stream_similarity_last``: of x_L (both absent when n = 1);
    - ``row_sum_err``, ``col_sum_err``, ``orth_err``, ``mean_err``: worst layer and token;
      ``min_entry``: smallest entry of any H_res (see :func:`manifold_errors`);
    - ``transport_grad_ratio``: ‖Pᵀ g‖/‖g‖ for the top stream gradient g = ∂L/∂x_L and the
      whole-stack transport P (1 for isometries, IsoHC's theorem);
    - ``energy_retention`` / ``energy_retention_min``: mean squared / smallest singular value
      of P on the mean-zero subspace 1^⊥ (1 for isometries, 0 for uniform averaging);
    - ``stream_rank`` / ``stream_rank_last``: effective rank of the (n, C) streams, mean over
      x_1 … x_L and of x_L;
    - ``coef_grad_ratio``: ‖∂L/∂b_res‖ / ‖∂L/∂b_post‖ over all layers (static logits): does
      H_res learn at all? (≈ 0 when the streams are copies and H_res is constrained; the
      n ≥ 2 scalars are :data:`MULTI_STREAM_KEYS`);
    - harmonized: ``harm_scale`` (controller scale s), ``harm_gain_applied_{mean,max}``
      (forward Amax gain of the applied composite) and ``harm_gain_raw_{mean,max}``
      (of the composite of ``H_raw = I + εΘ``, i.e. without the controller).

    With ``run_dir`` set, also writes ``run_dir/diagnostics/step_{step:07d}.json``
    (atomically) holding the scalars and the per-layer profiles: ``profile`` (gains of
    the forward composites ``H_l ⋯ H_0`` and backward composites ``H_{L−1} ⋯ H_l``, token
    mean and max), ``grad_norms`` (L + 1 values, x_0 … x_L), ``similarity`` (L + 1),
    ``stream_rank`` (L + 1), ``energy`` (``{"mean", "min"}`` per forward composite depth),
    ``manifold`` (each error per layer) and, for harmonized models, ``harmonized``.
    Non-finite numbers are written as ``null``.

    The model's mode (train/eval) is not changed and the forward result is the one the
    model computes without the probe. Call it outside a training step's
    forward → ``HarmonizedController.update()`` pair: the controller sees this forward too.
    """

    def __init__(self, run_dir: Optional[Path] = None):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.last: Optional[dict] = None  # the full payload of the last call

    def __call__(self, model: nn.Module, inputs, targets, loss_fn: Callable, step: int) -> dict[str, float]:
        with torch.enable_grad(), Probe(model) as probe:
            out = model(inputs)
            logits = out[0] if isinstance(out, (tuple, list)) else out
            loss = loss_fn(logits, targets)
        records = probe.records
        if not records:
            raise RuntimeError("StabilityHook: no HyperConnection ran in model(inputs)")
        states = probe.stream_states
        layers = list(dict.fromkeys(r.layer for r in records))
        coefs = [(l.b_res, l.b_post) for l in layers
                 if isinstance(l.b_res, nn.Parameter) and l.b_res.requires_grad and l.b_post.requires_grad]
        grad_norms, top_grad, coef_norms = self._stream_grad_norms(loss, states, coefs)
        payload = self._measure(records, states, grad_norms, top_grad)
        if coef_norms is not None and records[0].x.shape[-2] > 1:
            res, post = coef_norms
            payload["scalars"]["coef_grad_ratio"] = res / post if post > 0 else math.nan
        payload = {"step": int(step), "loss": float(loss.detach()), **payload}
        self.last = payload
        if self.run_dir is not None:
            # indent=1 and no trailing newline: the profile files' format since the first version
            atomic_write_text(self.run_dir / "diagnostics" / f"step_{int(step):07d}.json",
                              json.dumps(nan_to_none(payload), indent=1, allow_nan=False))
        return dict(payload["scalars"])

    @staticmethod
    def _stream_grad_norms(loss: torch.Tensor, states: list[torch.Tensor], coefs=()):
        """(‖∂L/∂x_l‖ for every state, ∂L/∂x_L or None, (‖∂L/∂b_res‖, ‖∂L/∂b_post‖) over
        ``coefs`` or None), from one ``autograd.grad`` (parameters' ``.grad`` untouched)."""
        wanted = [i for i, s in enumerate(states) if s.requires_grad]
        norms = [math.nan] * len(states)
        top, coef_norms = None, None
        params = [p for pair in coefs for p in pair]
        if (wanted or params) and loss.requires_grad:
            grads = torch.autograd.grad(loss, [states[i] for i in wanted] + params, allow_unused=True)
            for i, g in zip(wanted, grads):
                norms[i] = 0.0 if g is None else float(g.detach().double().norm())
                if i == len(states) - 1:
                    top = g
            if params:
                sq = [0.0 if g is None else float(g.detach().double().square().sum()) for g in grads[len(wanted):]]
                coef_norms = (math.sqrt(sum(sq[0::2])), math.sqrt(sum(sq[1::2])))
        return norms, top, coef_norms

    @torch.no_grad()
    def _measure(self, records: list[LayerRecord], states, grad_norms, top_grad=None) -> dict:
        mats = [r.h_res.detach() for r in records]
        # The last forward composite H_{L−1}⋯H_0 is the whole stack: its gains are the
        # headline scalars (computed once, in float64, inside the profile).
        profile = layer_profile(mats)
        whole = {name: (g["mean"][-1], g["max"][-1]) for name, g in profile["forward"].items()}
        scalars: dict[str, float] = {}
        for key, field in (("fwd", "forward_amax"), ("bwd", "backward_amax")):
            scalars[f"gain_{key}_mean"], scalars[f"gain_{key}_max"] = whole[field]
        scalars["norm_inf_mean"] = whole["inf_norm"][0]
        scalars["norm_one_mean"] = whole["one_norm"][0]
        scalars["spectral_mean"] = whole["spectral"][0]

        g0, gl = grad_norms[0], grad_norms[-1]
        scalars["grad_norm_first"], scalars["grad_norm_last"] = g0, gl
        scalars["grad_ratio"] = g0 / gl if gl > 0 else (math.nan if g0 == 0 or math.isnan(g0) else math.inf)

        similarity = [stream_similarity(s) for s in states]
        if not math.isnan(similarity[-1]):
            later = [v for v in similarity[1:] if not math.isnan(v)] or similarity
            scalars["stream_similarity"] = sum(later) / len(later)
            scalars["stream_similarity_last"] = similarity[-1]

        # The mechanism the claims are about (docs/design.md §2): what the transport alone
        # does to the top gradient, what the whole composite keeps of a mean-zero signal,
        # and how many independent directions the streams span.
        whole_product = composite_product([m.double() for m in mats])
        scalars["transport_grad_ratio"] = (transport_grad_ratio(whole_product, top_grad)
                                           if top_grad is not None else math.nan)
        n = int(records[0].x.shape[-2])
        energy = energy_profile(mats) if n > 1 else None
        rank = [stream_effective_rank(s) for s in states]
        if n > 1:
            scalars["energy_retention"], scalars["energy_retention_min"] = energy["mean"][-1], energy["min"][-1]
            later = [v for v in rank[1:] if not math.isnan(v)] or rank
            scalars["stream_rank"] = sum(later) / len(later)
            scalars["stream_rank_last"] = rank[-1]

        per_layer = [manifold_errors(m) for m in mats]
        manifold = {k: [e[k] for e in per_layer] for k in MANIFOLD_ERROR_NAMES}
        for k, values in manifold.items():
            scalars[k] = min(values) if k == "min_entry" else max(values)

        payload = {
            "num_layers": len(records),
            "streams": int(records[0].x.shape[-2]),
            "layers": [{"name": r.name, "variant": r.layer.variant_name} for r in records],
            "scalars": scalars,
            "profile": profile,
            "grad_norms": grad_norms,
            "similarity": similarity,
            "stream_rank": rank,
            "energy": energy,
            "manifold": manifold,
        }
        # Extra diagnostics supplied by the variants themselves (Variant.diagnostics).
        for cls in dict.fromkeys(type(r.layer.mixer) for r in records):
            extra = cls.diagnostics(records, mats, profile)
            if extra is not None:
                scalars.update(extra.pop("scalars", {}))
                payload[cls.name] = extra
        return payload
