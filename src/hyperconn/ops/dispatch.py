"""The one place that chooses a backend: ``"torch"`` (:mod:`.torch_backend`) or ``"triton"``
(:mod:`.triton_backend`). A call site resolves it once (:func:`select`) and calls the
backend's ops; the public functional ops below do the same per call.

Backend resolution, first match wins:

1. the ``backend=`` argument: ``"torch"``, ``"triton"`` or ``"auto"``;
2. the environment variable ``HYPERCONN_KERNELS`` (same values), read at each call;
3. ``"auto"``: Triton when every tensor is on CUDA and Triton imports, else torch.

``"triton"`` on purpose raises instead of silently falling back: ``RuntimeError`` when
Triton is not importable, or when the tensors are on the CPU and Triton's interpreter
(``TRITON_INTERPRET=1``, set before Triton is first imported) is not active. ``"auto"``
also keeps to torch for cases the kernels do not cover (empty tensors, Sinkhorn with
n > 8); an explicit ``"triton"`` raises ``ValueError`` for Sinkhorn with n > 8.

Every op is differentiable on both backends (``torch.autograd.Function``), and on the
torch backend the whole call traces under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

from .._dtypes import compute_dtype
from . import torch_backend

__all__ = ["stream_pre", "stream_merge", "sinkhorn_tokens", "rms_projection", "resolve_backend", "select",
           "triton_available", "BACKENDS", "ENV_VAR"]

BACKENDS = ("torch", "triton", "auto")
ENV_VAR = "HYPERCONN_KERNELS"
MAX_SINKHORN_N = 8  # kept equal to triton_kernels.MAX_SINKHORN_N without importing Triton

_triton_state: dict = {}  # "available" -> bool, "error" -> str, "ops" -> module


def _probe_triton() -> bool:
    if "available" not in _triton_state:
        try:
            importlib.import_module("triton")
            _triton_state["available"] = True
        except Exception as exc:  # ImportError, or a broken install failing at import
            _triton_state["available"] = False
            _triton_state["error"] = f"{type(exc).__name__}: {exc}"
    return _triton_state["available"]


def triton_available() -> bool:
    """Whether ``import triton`` succeeds (the result is cached)."""
    if "available" in _triton_state:
        return _triton_state["available"]
    # Outside any torch.compile trace (importing Triton there would be traced). Wrapped at
    # the first call, not with a decorator at import: the decorator imports torch._dynamo,
    # which costs ~1.5 s of `import hyperconn` on a CPU machine that never needs it.
    return torch.compiler.disable(_probe_triton)()


def _triton_ops():
    if "ops" not in _triton_state:
        _triton_state["ops"] = importlib.import_module(".triton_backend", __package__)
    return _triton_state["ops"]


def select(backend: Optional[str], *tensors: torch.Tensor):
    """The backend module for an op on ``tensors`` (rule in the module docstring): every
    backend module has ``stream_pre``, ``stream_merge``, ``rms_projection``,
    ``sinkhorn_tokens`` and ``grad_slot`` with the same signatures.

    Raises:
        ValueError, RuntimeError: as :func:`resolve_backend`.
    """
    return _triton_ops() if resolve_backend(backend, *tensors) == "triton" else torch_backend


def resolve_backend(backend: Optional[str], *tensors: torch.Tensor) -> str:
    """Return ``"torch"`` or ``"triton"`` for an op on ``tensors`` (rule in the module doc).

    Raises:
        ValueError: for a backend name (argument or ``HYPERCONN_KERNELS``) not in BACKENDS.
        RuntimeError: ``"triton"`` requested but Triton is not importable, the tensors are
            on CPU without Triton's interpreter active, or on a device Triton cannot use.
    """
    source = "backend"
    if backend is None:
        backend, source = os.environ.get(ENV_VAR, "auto"), ENV_VAR
    choice = backend.strip().lower() if isinstance(backend, str) else backend
    if choice not in BACKENDS:
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {backend!r}")
    if choice == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    if choice == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(
            "backend 'triton' requested but Triton is not importable "
            f"({_triton_state.get('error', 'unknown error')}); install it with "
            "`pip install 'hyperconn[gpu]'` or use backend='torch'")
    if not on_cuda:
        devices = sorted({t.device.type for t in tensors})
        if devices != ["cpu"]:
            raise RuntimeError(f"backend 'triton' needs all tensors on CUDA, got devices {devices}")
        if not _triton_ops().INTERPRETED:
            raise RuntimeError(
                "backend 'triton' on CPU tensors runs only in Triton's interpreter: set "
                "TRITON_INTERPRET=1 in the environment before Triton is first imported "
                "(or move the tensors to CUDA, or use backend='torch')")
    return "triton"


# ---------------------------------------------------------------------- validation
def _check_streams(x: torch.Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"x: expected shape (..., n, C), got {tuple(x.shape)}")


def _check_coeff(name: str, h: torch.Tensor, per_token: tuple, shared: tuple) -> None:
    if tuple(h.shape) not in (per_token, shared):
        raise ValueError(f"{name}: expected shape {per_token} (per token) or {shared} "
                         f"(shared), got {tuple(h.shape)}")
    if not h.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {h.dtype}")


# ---------------------------------------------------------------------- ops
def stream_pre(x: torch.Tensor, h_pre: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Branch input ``Σ_j h_pre[j] x[j]`` for every token.

    Args:
        x: streams (..., n, C), any float dtype.
        h_pre: (..., n) per token or (n,) shared; fp32 recommended (any float accepted).
        backend: "torch" | "triton" | "auto" | None (see :func:`resolve_backend`).

    Returns:
        (..., C) in ``x.dtype``; accumulated in fp32 (fp64 if an input is fp64).

    Raises:
        ValueError: on shapes other than the above; see also :func:`resolve_backend`.
    """
    _check_streams(x)
    n = x.shape[-2]
    _check_coeff("h_pre", h_pre, tuple(x.shape[:-1]), (n,))
    if x.numel() == 0:
        return torch_backend.stream_pre(x, h_pre)
    return select(backend, x, h_pre).stream_pre(x, h_pre)


def stream_merge(x: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor,
                 *, backend: Optional[str] = None) -> torch.Tensor:
    """Layer output ``h_res @ x + h_post[:, None] * y[None, :]`` for every token.

    Reads x once and writes the result once on the Triton backend.

    Args:
        x: streams (..., n, C).
        h_res: (..., n, n) per token or (n, n) shared.
        h_post: (..., n) per token or (n,) shared.
        y: branch output (..., C).
        backend: "torch" | "triton" | "auto" | None.

    Returns:
        (..., n, C) in ``x.dtype``, accumulated in fp32 (fp64 if an input is fp64).
        Gradients of shared coefficients are summed over tokens.
    """
    _check_streams(x)
    n, C = x.shape[-2:]
    lead = tuple(x.shape[:-2])
    _check_coeff("h_res", h_res, lead + (n, n), (n, n))
    _check_coeff("h_post", h_post, lead + (n,), (n,))
    if tuple(y.shape) != lead + (C,):
        raise ValueError(f"y: expected shape {lead + (C,)}, got {tuple(y.shape)}")
    if x.numel() == 0:
        return torch_backend.stream_merge(x, h_res, h_post, y)
    return select(backend, x, h_res, h_post, y).stream_merge(x, h_res, h_post, y)


def sinkhorn_tokens(logits: torch.Tensor, iters: int = 20, *,
                    backend: Optional[str] = None) -> torch.Tensor:
    """Per-token log-domain Sinkhorn-Knopp on (..., n, n): columns then rows, rows last.

    Same map and gradient as ``hyperconn.projections.sinkhorn(logits, iters,
    backward="unrolled")``. The Triton backend (n ≤ 8) keeps only the logits for
    backward and recomputes the iterations there, so its memory does not grow with
    ``iters``.

    Returns:
        (..., n, n) doubly stochastic up to convergence, in ``logits.dtype``.

    Raises:
        ValueError: for a non-square trailing shape, ``iters < 1``, or an explicit
            "triton" backend with n > 8; see also :func:`resolve_backend`.
    """
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits: expected shape (..., n, n), got {tuple(logits.shape)}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters: expected a positive integer, got {iters!r}")
    choice = resolve_backend(backend, logits)
    n = logits.shape[-1]
    if choice == "triton" and n > MAX_SINKHORN_N:
        explicit = (backend or os.environ.get(ENV_VAR, "auto")).strip().lower() == "triton"
        if explicit:
            raise ValueError(f"logits: the Triton Sinkhorn supports n ≤ {MAX_SINKHORN_N}, got n = {n}")
        choice = "torch"
    if logits.numel() == 0 or choice == "torch":
        return torch_backend.sinkhorn_tokens(logits, iters)
    return _triton_ops().sinkhorn_tokens(logits, iters)


def rms_projection(x: torch.Tensor, phi: torch.Tensor, eps: float = 1e-6, *,
                   backend: Optional[str] = None) -> torch.Tensor:
    """The dynamic-coefficient projection ``(vec(x) φ) · rsqrt(mean(x²) + ε)``.

    Args:
        x: streams (..., n, C).
        phi: (n·C, N).
        eps: ε of the RMS scaling.
        backend: "torch" | "triton" | "auto" | None.

    Returns:
        (..., N) in fp32 (fp64 for fp64 inputs).

    Raises:
        ValueError: if ``phi`` is not (n·C, N).
    """
    _check_streams(x)
    if phi.dim() != 2 or phi.shape[0] != x.shape[-2] * x.shape[-1]:
        raise ValueError(f"phi: expected shape ({x.shape[-2] * x.shape[-1]}, N), got {tuple(phi.shape)}")
    cdtype = compute_dtype(x, phi)
    return select(backend, x, phi).rms_projection(x, phi, eps, cdtype)
