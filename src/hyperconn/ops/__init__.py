"""The ops layer: the per-token hyper-connection ops, one module per backend.

    stream_pre(x, h_pre)               (..., n, C), (..., n)|(n,)          → (..., C)
    stream_merge(x, h_res, h_post, y)  (..., n, C), (..., n, n)|(n, n),
                                       (..., n)|(n,), (..., C)             → (..., n, C)
    rms_projection(x, phi, eps)        (..., n, C), (n·C, N)               → (..., N)
    sinkhorn_tokens(logits, iters)     (..., n, n)                         → (..., n, n)
    odd_polynomial_iteration(x0, schedule)  (..., m, m)                    → (..., m, m)
        (the Newton-Schulz steps of Iso-NS; torch only, see :mod:`.newton_schulz`)

Backends (see :mod:`.dispatch` for the rule; ``backend=`` / ``HYPERCONN_KERNELS``
override it):

- :mod:`.torch_backend` (``"torch"``): the hand-written CPU ops of :mod:`.cpu` for fp32/fp64
  streams (one ∂x buffer per layer), the :mod:`.reference` arithmetic for half streams;
- :mod:`.triton_backend` (``"triton"``): the kernels of :mod:`.triton_kernels`, registered
  as ``torch.library`` custom ops (``hyperconn::stream_pre`` …);
- :mod:`.reference`: plain torch, what the others are tested against.

A call site resolves the backend once with :func:`select` and calls the module's ops
(the layer does so once per forward). Adding an op or a backend touches this package
only; see docs/design.md. Triton is optional (``pip install 'hyperconn[gpu]'``) and
only imported when selected.
"""

from . import reference, torch_backend
from .grad_slot import StreamGradSlot
from .newton_schulz import odd_polynomial_iteration
from .dispatch import (BACKENDS, ENV_VAR, resolve_backend, rms_projection, select, sinkhorn_tokens,
                       stream_merge, stream_pre, triton_available)

__all__ = ["stream_pre", "stream_merge", "rms_projection", "sinkhorn_tokens", "odd_polynomial_iteration", "resolve_backend", "select",
           "triton_available", "reference", "torch_backend", "StreamGradSlot", "BACKENDS", "ENV_VAR"]
