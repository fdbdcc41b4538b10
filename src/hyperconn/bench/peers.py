"""Adapter for the public implementation we compare against: lucidrains' ``hyper-connections``.

Pinned to ``hyper-connections==0.4.11`` (``pip install 'hyperconn[bench]'``); it needs
``einops`` and ``torch-einops-utils``, which pip pulls in. Two of its modules implement
mHC:

``mhc``   ``hyper_connections.manifold_constrained_hyper_connections.ManifoldConstrainedHyperConnections``
          (exported as ``hyper_connections.mHC``). Streams are folded into the batch:
          input and output ``(B·n, T, C)``; the branch sees ``(B, T, C)``. Sinkhorn in
          the exp domain (``F.normalize(p=1)``), 20 iterations, autograd through all of them.
``mhcv2`` ``hyper_connections.mHCv2.ManifoldConstrainedHyperConnections``: the same
          maths with the streams as their own axis, ``(B, T, n, C)`` — our layout. Its
          optional Triton Sinkhorn (``use_triton_sinkhorn=True``) is used only on CUDA,
          as a separate case ``mhcv2+triton``.

Both compute the dynamic coefficients per stream (RMSNorm over C, then C → n + 1 and
C → 1 per stream), where ours projects the whole normalised n·C vector to n² + 2n
(mHC eq. 7-8): their coefficient GEMM is n times smaller. Both run with
``layer_index=0`` (otherwise the initial pre stream is random), default
``sinkhorn_iters=20`` and the given branch.

When the package is missing, :func:`peer_status` says so and the benchmarks leave the
peer rows out with that note instead of failing.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import nn

from .timing import Case

__all__ = ["PEER_PACKAGE", "PEER_VERSION", "PEER_KINDS", "peer_status", "build_peer", "peer_input_shape", "peer_case"]

PEER_PACKAGE = "hyper-connections"
PEER_VERSION = "0.4.11"
PEER_KINDS = ("mhc", "mhcv2", "mhcv2+triton")

_MODULES = {
    "mhc": "hyper_connections.manifold_constrained_hyper_connections",
    "mhcv2": "hyper_connections.mHCv2",
    "mhcv2+triton": "hyper_connections.mHCv2",
}


def peer_status() -> tuple[bool, str]:
    """(installed, a one-line note): whether ``hyper_connections`` imports, and its version."""
    try:
        importlib.import_module("hyper_connections")
    except Exception as exc:  # ImportError, or a broken install failing at import
        return False, (f"peer rows skipped: {PEER_PACKAGE} is not importable ({type(exc).__name__}: {exc}); "
                       f"install it with `pip install '{PEER_PACKAGE}=={PEER_VERSION}'` (or 'hyperconn[bench]')")
    try:
        from importlib.metadata import version
        found = version(PEER_PACKAGE)
    except Exception:
        found = "unknown"
    note = f"peer: {PEER_PACKAGE} {found}"
    if found != PEER_VERSION:
        note += f" (benchmarks were written against {PEER_VERSION})"
    return True, note


def triton_sinkhorn_available() -> bool:
    """Whether the peer's Triton Sinkhorn can run here (Triton importable and CUDA present)."""
    if not torch.cuda.is_available():
        return False
    try:
        from hyper_connections.triton_sinkhorn import is_triton_available
        return bool(is_triton_available())
    except Exception:
        return False


def build_peer(kind: str, dim: int, streams: int, branch: Optional[nn.Module],
               layer_index: int = 0, sinkhorn_iters: int = 20) -> nn.Module:
    """The peer's mHC layer of the given kind around ``branch``.

    Raises:
        ValueError: unknown ``kind``.
        ImportError: the package is not installed.
    """
    if kind not in PEER_KINDS:
        raise ValueError(f"kind: expected one of {PEER_KINDS}, got {kind!r}")
    module = importlib.import_module(_MODULES[kind])
    cls = module.ManifoldConstrainedHyperConnections
    extra = {"use_triton_sinkhorn": True} if kind == "mhcv2+triton" else {}
    return cls(streams, dim=dim, branch=branch, layer_index=layer_index,
               sinkhorn_iters=sinkhorn_iters, **extra)


def peer_input_shape(kind: str, batch: int, seq: int, streams: int, dim: int) -> tuple[int, ...]:
    """The stream tensor's shape in the peer's layout (see the module docstring)."""
    if kind == "mhc":
        return (batch * streams, seq, dim)
    return (batch, seq, streams, dim)


def peer_case(kind: str, dim: int, streams: int, batch: int, seq: int, *, device: torch.device,
              dtype: torch.dtype = torch.float32, name: Optional[str] = None,
              branch: Optional[nn.Module] = None) -> Case:
    """A timed forward + backward of the peer layer (Linear(C, C) branch by default).

    The input is created directly in the peer's layout (no conversion inside the timed
    step) with ``requires_grad=True``, like the streams inside a model; the backward is
    ``out.backward(g)`` for a fixed random ``g``.
    """
    branch = branch if branch is not None else nn.Linear(dim, dim)
    layer = build_peer(kind, dim, streams, branch).to(device=device, dtype=dtype)
    shape = peer_input_shape(kind, batch, seq, streams, dim)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(shape, device=device, dtype=dtype)
    params = [p for p in layer.parameters()] + [x]

    def reset():
        for p in params:
            p.grad = None

    return Case(name=name or f"peer-{kind}", forward=lambda: layer(x),
                backward=lambda out: out.backward(grad), reset=reset,
                info={"impl": "peer", "kind": kind, "input_shape": list(shape)})
