"""One small module per variant: raw coefficients → (H_pre, H_post, H_res).

A variant owns its initial static logits, the activation of its dynamic part, the map
onto its manifold and any parameters or buffers of its own (the hybrid's λ, the
Harmonized scale). Shapes: ``raw_pre``/``raw_post`` (..., n), ``raw_res`` (..., n, n);
the outputs have the same shapes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import kernels as _kernels
from .projections import ISO_METHODS, SINKHORN_BACKWARDS, hybrid_mix, iso_project, sinkhorn

__all__ = ["VARIANTS", "make_variant", "Variant"]

VARIANTS = ("residual", "hc", "mhc", "isohc", "hybrid", "harmonized")

# Defaults for the diagonal of the static H̃_res (see `res_init` in HyperConnection).
DEFAULT_RES_INIT = {"hc": 1.0, "mhc": 4.0, "isohc": 1.0, "hybrid": 4.0, "harmonized": 0.0}


def _sinkhorn(raw_res: torch.Tensor, iters: int, backward: str, kernels) -> torch.Tensor:
    """Sinkhorn on (..., n, n); the unrolled map goes through the kernel dispatch (the
    Triton kernel on CUDA: same map and gradient, iterates recomputed in backward)."""
    if backward == "unrolled":
        return _kernels.sinkhorn_tokens(raw_res, iters, backend=kernels)
    return sinkhorn(raw_res, iters, backward)


class Variant(nn.Module):
    """Base: σ / 2σ gates on pre/post, identity on the dynamic part."""

    name = "base"
    uses_res = True

    # "uniform" (every stream feeds the branch equally) or "onehot" (stream
    # ``layer_index % n`` alone, as HC initialises); make_variant sets it from ``pre_init``.
    pre_init = "uniform"

    # Backend for the per-token ops ("torch" | "triton" | "auto" | None = environment,
    # see hyperconn.kernels.resolve_backend); HyperConnection sets it from ``kernels``.
    kernels = None

    def __init__(self, streams: int, layer_index: int, res_init: float):
        super().__init__()
        self.streams = streams
        self.layer_index = layer_index
        self.res_init = res_init

    # Initial dynamic projection φ: "random" (N(0, 1/(nC)), the dynamic part then moves
    # the coefficients by O(α) at init) or "zero" (the coefficients start exactly at the
    # static map, as the HC paper initialises its dynamic weights).
    phi_init = "random"

    def dynamic_activation(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def snapshot(self) -> dict:
        """The variant's mutable state as of this forward (tensors copied), handed back to
        :meth:`forward` so that state changed after the forward (a controller update before
        backward) does not reach its backward or its recompute. Empty by default."""
        return {}

    def static_init(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Initial (b_pre (n,), b_post (n,), b_res (n, n)).

        σ(b_pre) = 1/n so H_pre averages the streams (``pre_init="uniform"``), or, with
        ``pre_init="onehot"``, b_pre = +4 at ``layer_index % n`` and −4 elsewhere
        (σ = 0.982 / 0.018: HC's one-hot read, which makes the layers read different
        streams and so breaks the symmetry of streams that start as copies); 2σ(0) = 1
        so every stream receives the branch output once; b_res = res_init·I.
        """
        n = self.streams
        if self.pre_init == "onehot" and n > 1:
            b_pre = torch.full((n,), -4.0)
            b_pre[self.layer_index % n] = 4.0
        else:
            b_pre = torch.full((n,), -math.log(n - 1) if n > 1 else 20.0)
        return b_pre, torch.zeros(n), self.res_init * torch.eye(n)

    def map_pre_post(self, raw_pre, raw_post):
        return torch.sigmoid(raw_pre), 2.0 * torch.sigmoid(raw_post)

    def map_res(self, raw_res: torch.Tensor, state: dict) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, raw_pre, raw_post, raw_res, state: dict | None = None):
        """(H_pre, H_post, H_res) from raw coefficients; ``state`` from :meth:`snapshot`
        (None: take a snapshot now)."""
        if state is None:
            state = self.snapshot()
        h_pre, h_post = self.map_pre_post(raw_pre, raw_post)
        return h_pre, h_post, self.map_res(raw_res, state)

    def extra_repr(self) -> str:
        return f"streams={self.streams}, res_init={self.res_init}"


class Residual(Variant):
    """Plain Pre-Norm residual: n = 1, H_pre = H_post = H_res = 1, no coefficients."""

    name = "residual"

    def forward(self, raw_pre, raw_post, raw_res, state=None):
        one = torch.ones_like(raw_pre)
        return one, one, torch.ones_like(raw_res)


class HC(Variant):
    """Unconstrained Hyper-Connections (arXiv:2409.19606).

    No activation on the static part, tanh on the dynamic part. Init exactly Pre-Norm, as
    the HC paper (and the public ``hyper-connections`` package) start: H_res = I, H_pre
    one-hot at ``layer_index % n`` (``pre_init="uniform"``: 1/n each instead), H_post all
    ones, and the dynamic projection φ = 0, so with ``dynamic=True`` the coefficients
    start exactly at the static map (α = 0.01 only scales what φ learns).
    """

    name = "hc"
    pre_init = "onehot"
    phi_init = "zero"

    def dynamic_activation(self, raw):
        return torch.tanh(raw)

    def static_init(self):
        n = self.streams
        if self.pre_init == "uniform":
            b_pre = torch.full((n,), 1.0 / n)
        else:
            b_pre = torch.zeros(n)
            b_pre[self.layer_index % n] = 1.0
        return b_pre, torch.ones(n), self.res_init * torch.eye(n)

    def map_pre_post(self, raw_pre, raw_post):
        return raw_pre, raw_post

    def map_res(self, raw_res, state):
        return raw_res


class MHC(Variant):
    """Manifold-constrained HC: H_res = Sinkhorn-Knopp(exp(H̃_res)), doubly stochastic."""

    name = "mhc"

    def __init__(self, streams, layer_index, res_init, sinkhorn_iters=20, sinkhorn_backward="unrolled"):
        super().__init__(streams, layer_index, res_init)
        self.sinkhorn_iters = sinkhorn_iters
        self.sinkhorn_backward = sinkhorn_backward

    def map_res(self, raw_res, state):
        return _sinkhorn(raw_res, self.sinkhorn_iters, self.sinkhorn_backward, self.kernels)


class IsoHC(Variant):
    """IsoHC: H_res on M_iso (orthogonal, mean-preserving) by Newton-Schulz or exact polar.

    ``iso_method``: "ns" (default; per-step optimal coefficients, converged for condition
    numbers up to ~5e5), "ns-cubic" (the source's cubic iteration) or "polar" (SVD);
    ``iso_steps``: None for the method's default (see :func:`hyperconn.iso_project`).
    """

    name = "isohc"

    def __init__(self, streams, layer_index, res_init, iso_method="ns", iso_steps=None):
        super().__init__(streams, layer_index, res_init)
        self.iso_method = iso_method
        self.iso_steps = iso_steps

    def map_res(self, raw_res, state):
        return iso_project(raw_res, self.iso_method, self.iso_steps)


class Hybrid(Variant):
    """(1−λ)·Iso(H̃) + λ·Sinkhorn(H̃) from one raw matrix; λ = σ(learned) or fixed."""

    name = "hybrid"

    def __init__(self, streams, layer_index, res_init, sinkhorn_iters=20, sinkhorn_backward="unrolled",
                 iso_method="ns", iso_steps=None, hybrid_lambda="learned"):
        super().__init__(streams, layer_index, res_init)
        self.sinkhorn_iters, self.sinkhorn_backward = sinkhorn_iters, sinkhorn_backward
        self.iso_method, self.iso_steps = iso_method, iso_steps
        if hybrid_lambda == "learned":
            self.lambda_logit = nn.Parameter(torch.zeros(()))  # λ = 0.5 at init
            self.fixed_lambda = None
        else:
            self.lambda_logit = None
            self.fixed_lambda = float(hybrid_lambda)

    @property
    def lam(self):
        return torch.sigmoid(self.lambda_logit) if self.lambda_logit is not None else self.fixed_lambda

    def map_res(self, raw_res, state):
        h_iso = iso_project(raw_res, self.iso_method, self.iso_steps)
        h_birk = _sinkhorn(raw_res, self.sinkhorn_iters, self.sinkhorn_backward, self.kernels)
        return hybrid_mix(h_iso, h_birk, self.lam)


class Harmonized(Variant):
    """Harmonized HC: H_res = I + s·(H_raw − I), H_raw = I + ε·Θ.

    ``s`` is a buffer written by :class:`hyperconn.HarmonizedController` (one global value
    for the whole model, no gradient through it); it stays 1 without a controller. Each
    forward uses a copy of ``s`` taken when it ran (:meth:`snapshot`), so the controller
    may update before or after backward, with or without recompute.
    """

    name = "harmonized"

    def __init__(self, streams, layer_index, res_init, harmonized_eps=1.0):
        super().__init__(streams, layer_index, res_init)
        self.harmonized_eps = harmonized_eps
        self.register_buffer("scale", torch.ones(()))

    def raw_transport(self, raw_res):
        eye = torch.eye(self.streams, dtype=raw_res.dtype, device=raw_res.device)
        return eye + self.harmonized_eps * raw_res

    def snapshot(self) -> dict:
        return {"scale": self.scale.detach().clone()}

    def map_res(self, raw_res, state):
        eye = torch.eye(self.streams, dtype=raw_res.dtype, device=raw_res.device)
        return eye + state["scale"].to(raw_res.dtype) * (self.raw_transport(raw_res) - eye)


_CLASSES = {c.name: c for c in (Residual, HC, MHC, IsoHC, Hybrid, Harmonized)}

# Which options each variant accepts (everything else is rejected with a clear error).
_OPTIONS = {
    "residual": (),
    "hc": (),
    "mhc": ("sinkhorn_iters", "sinkhorn_backward"),
    "isohc": ("iso_method", "iso_steps"),
    "hybrid": ("sinkhorn_iters", "sinkhorn_backward", "iso_method", "iso_steps", "hybrid_lambda"),
    "harmonized": ("harmonized_eps",),
}
# Accepted by every variant but residual; applied by make_variant, not the constructors.
_COMMON_OPTIONS = ("pre_init",)
PRE_INITS = ("default", "uniform", "onehot")
ALL_VARIANT_OPTIONS = tuple(sorted({o for opts in _OPTIONS.values() for o in opts} | set(_COMMON_OPTIONS)))


def _check_option(name, value):
    if name == "sinkhorn_iters" and (not isinstance(value, int) or value < 1):
        raise ValueError(f"sinkhorn_iters: expected a positive integer, got {value!r}")
    if name == "iso_steps" and value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                                      or value < 1):
        raise ValueError(f"iso_steps: expected None (the method's default) or a positive integer, got {value!r}")
    if name == "sinkhorn_backward" and value not in SINKHORN_BACKWARDS:
        raise ValueError(f"sinkhorn_backward: expected one of {SINKHORN_BACKWARDS}, got {value!r}")
    if name == "iso_method" and value not in ISO_METHODS:
        raise ValueError(f"iso_method: expected one of {ISO_METHODS}, got {value!r}")
    if name == "hybrid_lambda" and value != "learned":
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"hybrid_lambda: expected 'learned' or a number in [0, 1], got {value!r}")
    if name == "pre_init" and value not in PRE_INITS:
        raise ValueError(f"pre_init: expected one of {PRE_INITS}, got {value!r}")
    if name == "harmonized_eps" and (not isinstance(value, (int, float)) or value <= 0):
        raise ValueError(f"harmonized_eps: expected a positive number, got {value!r}")


def make_variant(variant: str, streams: int, layer_index: int = 0, res_init=None, **options) -> Variant:
    """Build the variant module; options that do not apply to ``variant`` are ignored
    if they are known options of another variant (so one config serves all variants),
    and rejected if unknown."""
    if variant not in _CLASSES:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    unknown = sorted(set(options) - set(ALL_VARIANT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}: expected some of {ALL_VARIANT_OPTIONS}")
    for name, value in options.items():
        _check_option(name, value)
    kept = {k: v for k, v in options.items() if k in _OPTIONS[variant]}
    if res_init is None:
        res_init = DEFAULT_RES_INIT.get(variant, 1.0)
    module = _CLASSES[variant](streams, layer_index, float(res_init), **kept)
    pre_init = options.get("pre_init", "default")
    if pre_init != "default" and variant != "residual":
        module.pre_init = pre_init
    return module
