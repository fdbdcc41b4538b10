"""Per-token hyper-connection ops with one dispatch point (torch reference or Triton).

    stream_pre(x, h_pre)               (..., n, C), (..., n)|(n,)          → (..., C)
    stream_merge(x, h_res, h_post, y)  (..., n, C), (..., n, n)|(n, n),
                                       (..., n)|(n,), (..., C)             → (..., n, C)
    sinkhorn_tokens(logits, iters)     (..., n, n)                         → (..., n, n)

Each takes ``backend=None|"torch"|"triton"|"auto"``; see :mod:`hyperconn.kernels.dispatch`
for the rule and ``docs/kernels.md`` for numerics and tolerances. Triton is optional
(``pip install 'hyperconn[gpu]'``) and only imported when selected.
"""

from . import reference
from .dispatch import (BACKENDS, ENV_VAR, resolve_backend, sinkhorn_tokens, stream_merge,
                       stream_pre, triton_available)

__all__ = ["stream_pre", "stream_merge", "sinkhorn_tokens", "resolve_backend",
           "triton_available", "reference", "BACKENDS", "ENV_VAR"]
