"""HyperConnection: n residual streams around one branch, with learned mixing.

    x_{l+1} = H_res x_l + H_postᵀ F(H_pre x_l)        x_l: (..., n, C)

Coefficients are static (learned biases) plus, with ``dynamic=True``, a per-token part
from one fused projection of the RMS-normalised streams (mHC eq. 7-8):

    raw = α ⊙ act(rms(x) · (vec(x) φ)) + b      φ ∈ R^{nC × (n² + 2n)}

The RMS scaling is applied after the GEMM (it is a per-token scalar), so the projection
reads the streams once. The variant (see :mod:`hyperconn.variants`) maps raw coefficients
to (H_pre, H_post, H_res). Coefficients are computed in fp32 for fp16/bf16/fp32 layers
and in fp64 for a float64 layer (``.double()``), and applied in that precision: half-precision
streams are mixed with fp32 coefficients and accumulated in fp32.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import kernels as _kernels
from ._checks import check_floating
from .kernels import reference as _reference
from .kernels.torch_fused import StreamGradSlot, merge_streams, rms_projection, stream_pre
from .variants import VARIANTS, make_variant

__all__ = ["HyperConnection", "expand_streams", "reduce_streams", "ExpandStreams", "ReduceStreams"]

_RESIDUAL = object()  # marks a pending post() of the plain residual (no coefficients)
# Half-precision streams: the torch path mixes them with fp32 coefficients and fp32
# accumulation (kernels.reference, the Triton kernels' rule) instead of rounding H_res.
_HALF = (torch.float16, torch.bfloat16)


def expand_streams(x: torch.Tensor, streams: int, channel_first: bool = False) -> torch.Tensor:
    """(..., C) → (..., n, C): every stream starts as a copy of the input.

    ``channel_first=True`` (conv nets): (B, C, *spatial) → (B, n·C, *spatial), stream ``j``
    in channels ``j·C … (j+1)·C − 1``.

    Raises:
        TypeError: if ``x`` is not a floating-point tensor.
        ValueError: if ``streams`` is not a positive integer or ``x`` has too few dimensions.
    """
    check_floating("x", x)
    if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
        raise ValueError(f"streams: expected a positive integer, got {streams!r}")
    if channel_first:
        if x.dim() < 2:
            raise ValueError(f"x: expected shape (B, C, *spatial), got {tuple(x.shape)}")
        return x.unsqueeze(1).expand(x.shape[0], streams, *x.shape[1:]).flatten(1, 2).contiguous()
    if x.dim() < 1:
        raise ValueError(f"x: expected shape (..., C), got {tuple(x.shape)}")
    return x.unsqueeze(-2).expand(*x.shape[:-1], streams, x.shape[-1]).contiguous()


def reduce_streams(x: torch.Tensor, streams: Optional[int] = None, channel_first: bool = False) -> torch.Tensor:
    """(..., n, C) → (..., C): the mean over streams.

    ``channel_first=True``: (B, n·C, *spatial) → (B, C, *spatial); ``streams`` (n) is then
    required.

    The mean (rather than the HC paper's sum) keeps the scale independent of n, so a
    model whose streams stay identical copies reduces exactly to its residual twin; a
    final RMSNorm makes the two choices equivalent up to its epsilon.

    Raises:
        TypeError: if ``x`` is not a floating-point tensor.
        ValueError: if ``x`` has fewer than two dimensions.
    """
    check_floating("x", x)
    if channel_first:
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
            raise ValueError(f"streams: expected a positive integer with channel_first=True, got {streams!r}")
        if x.dim() < 2 or x.shape[1] % streams:
            raise ValueError(f"x: expected shape (B, streams·C, *spatial) with streams={streams}, "
                             f"got {tuple(x.shape)}")
        return x.unflatten(1, (streams, x.shape[1] // streams)).mean(dim=1)
    if x.dim() < 2:
        raise ValueError(f"x: expected shape (..., n, C), got {tuple(x.shape)}")
    return x.mean(dim=-2)


class ExpandStreams(nn.Module):
    """Module form of :func:`expand_streams`, for ``nn.Sequential`` stacks."""

    def __init__(self, streams: int, channel_first: bool = False):
        super().__init__()
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
            raise ValueError(f"streams: expected a positive integer, got {streams!r}")
        self.streams, self.channel_first = streams, channel_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return expand_streams(x, self.streams, self.channel_first)

    def extra_repr(self) -> str:
        return f"streams={self.streams}" + (", channel_first=True" if self.channel_first else "")


class ReduceStreams(nn.Module):
    """Module form of :func:`reduce_streams` (the mean over streams)."""

    def __init__(self, streams: Optional[int] = None, channel_first: bool = False):
        super().__init__()
        if channel_first and (isinstance(streams, bool) or not isinstance(streams, int) or streams < 1):
            raise ValueError(f"streams: expected a positive integer with channel_first=True, got {streams!r}")
        self.streams, self.channel_first = streams, channel_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_streams(x, self.streams, self.channel_first)

    def extra_repr(self) -> str:
        return "channel_first=True" if self.channel_first else ""


class HyperConnection(nn.Module):
    """A hyper-connected residual layer around ``branch`` (any C → C module).

    Args:
        dim: channel width C.
        streams: number of residual streams n ≥ 1 (``variant="residual"`` needs n = 1).
        branch: the wrapped module F, or None to use :meth:`pre` / :meth:`post` by hand.
        variant: one of ``hyperconn.VARIANTS``.
        dynamic: add per-token coefficients (ignored by ``"residual"``).
        layer_index: position in the stack (HC's one-hot pre init uses ``layer_index % n``).
        res_init: diagonal of the static raw H̃_res. Defaults: hc 1, mhc 4, isohc 1,
            hybrid 4, harmonized 0 (Θ = 0 so H_raw = I). For mhc the static map at init is
            ``(e^δ I + (11ᵀ − I)) / (e^δ + n − 1)`` with ‖H_res − I‖_F = n√(n−1)/(e^δ+n−1)
            (0.0023 at δ=8, 0.12 at δ=4, 0.65 at δ=2 for n=4). Larger δ starts closer to
            the identity but Sinkhorn's Jacobian scales like P(1−P) ≈ e^{−δ}, so the
            logits then learn slowly: δ trades identity-likeness for gradient signal.
            hc, isohc and harmonized start exactly at I (static part); hybrid at
            ½(I + mhc's map), distance half of mhc's.
        recompute: in training, store only the layer's input stream state and recompute
            the layer (coefficients, projections, mixing and the branch) in backward, via
            ``torch.utils.checkpoint`` (non-reentrant). Trades one extra forward of the
            layer for its activation memory. A probe is called again during recompute.
        alpha_init: initial α scale of the dynamic part (0.01); with ``dynamic=True`` the
            dynamic part moves H_res by O(α·n) from the static map at init.
        kernels: ``"torch"``, ``"triton"``, ``"auto"`` or None (the default: the
            ``HYPERCONN_KERNELS`` environment variable, else ``"auto"``). Chooses the
            implementation of ``H_pre x``, the merge ``H_res x + H_postᵀ y`` and the
            per-token Sinkhorn (``sinkhorn_backward="unrolled"``) through
            :func:`hyperconn.kernels.resolve_backend`: ``"auto"`` takes the fused Triton
            kernels when the streams are on CUDA and Triton imports, torch otherwise.
        channel_first: conv-net layout: streams ``(B, n·C, *spatial)`` (stream ``j`` in
            channels ``j·C … (j+1)·C − 1``, as :func:`expand_streams` with
            ``channel_first=True`` makes them) and a branch on ``(B, C, *spatial)``;
            coefficients are per pixel. Computed as the channel-last layer on the
            permuted tensor.
        **options: ``sinkhorn_iters`` (20), ``sinkhorn_backward`` ("unrolled"|"implicit"),
            ``iso_method`` ("ns"|"ns-cubic"|"polar"), ``iso_steps`` (None: the method's default), ``hybrid_lambda``
            ("learned" or a float in [0, 1]), ``harmonized_eps`` (1.0), ``pre_init``
            ("default" | "uniform" | "onehot": the static H_pre at init; see
            :meth:`hyperconn.variants.Variant.static_init`).

    Shapes: ``forward(x (..., n, C), *args, **kwargs) → (..., n, C)``; extra arguments go
    to the branch. A branch that returns a tuple ``(y, *extras)`` (as Hugging Face
    modules do) makes ``forward`` return ``(streams, *extras)``. With n = 1 and the
    identity transport every variant reduces to a Pre-Norm residual ``x + F(x)``
    (exactly for residual and static hc).

    Raises:
        ValueError: for ``streams < 1``, a non-positive ``dim``, an unknown variant or
            option, an input whose last two dimensions are not (n, C), or a branch output
            that is not a (..., C) tensor (or a tuple starting with one).
        TypeError: for non-floating-point streams, or float64 streams into a layer that is
            not float64 (convert the layer with ``.double()``).
    """

    def __init__(self, dim: int, streams: int, branch: Optional[nn.Module] = None, *,
                 variant: str = "mhc", dynamic: bool = True, layer_index: int = 0,
                 res_init: Optional[float] = None, recompute: bool = False, alpha_init: float = 0.01,
                 norm_eps: float = 1e-6, kernels: Optional[str] = None, channel_first: bool = False,
                 **options: Any):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive integer, got {dim!r}")
        if not isinstance(streams, int) or streams < 1:
            raise ValueError(f"streams: expected a positive integer, got {streams!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
        if variant == "residual" and streams != 1:
            raise ValueError(f"streams: variant 'residual' expects streams=1, got {streams}")
        if kernels is not None and kernels not in _kernels.BACKENDS:
            raise ValueError(f"kernels: expected None or one of {_kernels.BACKENDS}, got {kernels!r}")
        self.dim, self.streams, self.variant_name = dim, streams, variant
        self.channel_first = bool(channel_first)
        self.kernels = kernels
        self.branch = branch
        self.mixer = make_variant(variant, streams, layer_index, res_init, **options)
        self.mixer.kernels = kernels  # the per-token Sinkhorn dispatches on the same choice
        self.dynamic = dynamic and variant != "residual"
        self.recompute = bool(recompute)
        self.norm_eps = norm_eps
        n = streams
        b_pre, b_post, b_res = self.mixer.static_init()
        if variant == "residual":
            # No learned coefficients: keep constant buffers so shapes stay uniform.
            self.register_buffer("b_pre", b_pre, persistent=False)
            self.register_buffer("b_post", b_post, persistent=False)
            self.register_buffer("b_res", b_res, persistent=False)
        else:
            self.b_pre, self.b_post, self.b_res = nn.Parameter(b_pre), nn.Parameter(b_post), nn.Parameter(b_res)
        if self.dynamic:
            # φ ~ N(0, 1/(nC)) or 0, as the variant starts (Variant.phi_init); drawn either
            # way, so the random stream and every later parameter are initialised as before.
            phi = torch.randn(n * dim, n * n + 2 * n) / (n * dim) ** 0.5
            self.phi = nn.Parameter(phi.zero_() if self.mixer.phi_init == "zero" else phi)
            self.alpha = nn.Parameter(torch.full((3,), float(alpha_init)))  # pre, post, res
        # Set to a callable(layer, h_pre, h_post, h_res, x) to receive coefficients.
        self.probe: Optional[Callable] = None
        self._pending = None

    # ------------------------------------------------------------------ coefficients
    @property
    def coefficient_dtype(self) -> torch.dtype:
        """fp64 for a float64 layer, fp32 otherwise (also for fp16/bf16 layers)."""
        return torch.float64 if self.b_res.dtype == torch.float64 else torch.float32

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a tensor of shape (..., streams={self.streams}, dim={self.dim}), "
                            f"got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected floating-point streams (float16, bfloat16, float32 or float64), "
                            f"got {x.dtype}")
        if x.dim() < 2 or x.shape[-2] != self.streams or x.shape[-1] != self.dim:
            raise ValueError(
                f"x: expected shape (..., streams={self.streams}, dim={self.dim}), got {tuple(x.shape)}"
            )
        if x.dtype == torch.float64 and self.coefficient_dtype != torch.float64:
            raise TypeError("x: float64 streams into a float32 HyperConnection; convert the layer "
                            "with .double() or the streams with .float()")

    def raw_coefficients(self, x: torch.Tensor, grad_slot: Optional[StreamGradSlot] = None):
        """Raw (pre (..., n), post (..., n), res (..., n, n)); static: (n,), (n,), (n, n).

        In :attr:`coefficient_dtype` (fp32, or fp64 for a float64 layer).
        ``grad_slot`` (internal, CPU path): shared with the layer's pre and merge ops so
        that their stream gradients go into one buffer (see ``kernels.torch_fused``)."""
        cdtype = self.coefficient_dtype
        b_pre, b_post, b_res = self.b_pre.to(cdtype), self.b_post.to(cdtype), self.b_res.to(cdtype)
        if not self.dynamic:
            return b_pre, b_post, b_res
        n = self.streams
        # Half-precision streams go into the GEMM as they are (fp32 accumulation, no fp32
        # copy of x); anything else is computed in the coefficient dtype.
        xc = x if x.dtype in _HALF else x.to(cdtype)
        # rms(x)·(x φ) == (rms(x)·x) φ: one GEMM, then a per-token scalar.
        if x.is_cuda:
            flat = xc.reshape(*x.shape[:-2], n * self.dim)
            # Plain ops: autocast and torch.compile see them whole.
            proj = (flat @ self.phi.to(flat.dtype)).to(cdtype)
            mean_sq = torch.linalg.vector_norm(flat, dim=-1, keepdim=True, dtype=cdtype).square() / flat.shape[-1]
            proj = proj * torch.rsqrt(mean_sq + self.norm_eps)
        else:
            # CPU: hand-written backward that writes ∂x once (see kernels.torch_fused).
            proj = rms_projection(xc, self.phi.to(xc.dtype), self.norm_eps, grad_slot).to(cdtype)
        proj = self.mixer.dynamic_activation(proj)
        a_pre, a_post, a_res = self.alpha.to(cdtype).unbind()
        raw_pre = b_pre + a_pre * proj[..., :n]
        raw_post = b_post + a_post * proj[..., n:2 * n]
        raw_res = b_res + a_res * proj[..., 2 * n:].unflatten(-1, (n, n))
        return raw_pre, raw_post, raw_res

    def coefficients(self, x: torch.Tensor):
        """(H_pre, H_post, H_res) for input x (..., n, C): (..., n), (..., n), (..., n, n)
        with dynamic coefficients, (n,), (n,), (n, n) static; in :attr:`coefficient_dtype`."""
        self._check_input(x)
        return self.mixer(*self.raw_coefficients(x))

    # ------------------------------------------------------------------ apply
    def _use_triton(self, x: torch.Tensor) -> bool:
        # The one dispatch rule (hyperconn.kernels.resolve_backend); the torch path uses
        # kernels.torch_fused, whose backward suits the CPU best.
        return _kernels.resolve_backend(self.kernels, x) == "triton"

    # ------------------------------------------------------------------ channel-first
    def _to_last(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n·C, *S) → (B, *S, n, C), contiguous."""
        n, C = self.streams, self.dim
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != n * C:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (B, streams·dim={n * C}, *spatial) with channel_first=True, "
                             f"got {got}")
        return x.unflatten(1, (n, C)).movedim((1, 2), (-2, -1)).contiguous()

    @staticmethod
    def _to_first(x: torch.Tensor) -> torch.Tensor:
        """(B, *S, n, C) → (B, n·C, *S)."""
        return x.movedim((-2, -1), (1, 2)).flatten(1, 2).contiguous()

    def _channels_last(self, y):
        if not isinstance(y, torch.Tensor) or y.dim() < 2:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y: expected the branch output as a tensor (B, dim={self.dim}, *spatial), got {got}")
        return y.movedim(1, -1)

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """Branch input ``H_pre x``: (..., n, C) → (..., C). Pair with :meth:`post`.
        With ``channel_first``: (B, n·C, *S) → (B, C, *S).

        Raises:
            TypeError: for non-floating-point streams, or float64 streams into a layer
                that is not float64.
            ValueError: if the last two dimensions of ``x`` are not (streams, dim).
        """
        if self.channel_first:
            return self._pre(self._to_last(x), None).movedim(-1, 1)
        return self._pre(x, None)

    def _pre(self, x: torch.Tensor, state: Optional[dict]) -> torch.Tensor:
        # ``state``: the variant's mutable state as this forward saw it (see
        # Variant.snapshot), so that a recompute in backward sees the same values.
        self._check_input(x)
        if self.variant_name == "residual" and self.probe is None:
            # The plain residual stays plain: x + F(x) with no coefficient ops at all, so
            # it is an honest baseline for the benchmarks (all coefficients are 1).
            self._pending = _RESIDUAL
            return x.squeeze(-2)
        triton = self._use_triton(x)
        # One ∂x buffer for the layer's three fp32 stream ops (torch path, dynamic
        # coefficients, the projection being the op that returns it; not while
        # torch.compile traces).
        slot = StreamGradSlot() if (self.dynamic and not triton and x.dtype == torch.float32
                                    and self.coefficient_dtype == torch.float32
                                    and not torch.compiler.is_compiling()) else None
        h_pre, h_post, h_res = self.mixer(*self.raw_coefficients(x, slot), state=state)
        if self.probe is not None:
            self.probe(self, h_pre, h_post, h_res, x)
        self._pending = (h_post, h_res, slot)
        if triton:
            return _kernels.stream_pre(x, h_pre, backend="triton")
        if x.dtype in _HALF:
            # fp32 coefficients, fp32 accumulation, output in the stream dtype.
            return _reference.stream_pre(x, h_pre)
        # Hand-written backward (kernels.torch_fused).
        return stream_pre(x, h_pre.to(x.dtype).expand(x.shape[:-1]), slot)

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``H_res x + H_postᵀ y`` for streams x (..., n, C) and branch output y (..., C).
        With ``channel_first``: x (B, n·C, *S), y (B, C, *S) → (B, n·C, *S)."""
        if self.channel_first:
            return self._to_first(self._post(self._to_last(x), self._channels_last(y)))
        return self._post(x, y)

    def _post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._pending is None:
            raise RuntimeError("post() called without a matching pre() on this HyperConnection")
        pending, self._pending = self._pending, None
        if not isinstance(y, torch.Tensor) or y.shape[-1:] != (self.dim,):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y: expected the branch output as a tensor of shape (..., dim={self.dim}), got {got}")
        if pending is _RESIDUAL:
            return x + y.unsqueeze(-2).to(x.dtype)
        h_post, h_res, slot = pending
        if self._use_triton(x):
            # One Triton kernel: reads the streams once, writes the result once.
            return _kernels.stream_merge(x, h_res, h_post, y, backend="triton")
        if x.dtype in _HALF:
            # Mix with the fp32 H_res (rounding it to bf16 would break its row sums by
            # ~1e-3) and accumulate in fp32; the output is stored in the stream dtype.
            return _reference.stream_merge(x, h_res, h_post, y)
        n, C = x.shape[-2:]
        lead = x.shape[:-2]
        # Tokens flattened, one bmm + in-place addcmul_ forward and four bmm backward
        # (kernels.torch_fused): no (..., n, C) temporaries beyond the output and ∂x.
        return merge_streams(x, h_res.to(x.dtype).expand(*lead, n, n), h_post.to(x.dtype).expand(*lead, n),
                             y.to(x.dtype), slot)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.branch is None:
            raise RuntimeError("HyperConnection has no branch: pass one or use pre()/post()")
        # The variant's mutable state (the Harmonized scale) as of this forward: a
        # controller update before backward, or the recompute in backward, cannot change it.
        state = self.mixer.snapshot()
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(self._apply_layer, x, state, args, kwargs, use_reentrant=False)
        return self._apply_layer(x, state, args, kwargs)

    def _apply_layer(self, x: torch.Tensor, state, args, kwargs):
        if self.channel_first:
            xl = self._to_last(x)
            out = self.branch(self._pre(xl, state).movedim(-1, 1), *args, **kwargs)

            def finish(y):
                return self._to_first(self._post(xl, self._channels_last(y)))
        else:
            out = self.branch(self._pre(x, state), *args, **kwargs)

            def finish(y):
                return self._post(x, y)
        if isinstance(out, tuple):
            # (hidden, *extras), as Hugging Face modules return: the first element is the
            # branch output, the extras are handed back beside the new streams.
            if not out:
                raise ValueError("branch: returned an empty tuple; expected a tensor (..., dim) or (tensor, *extras)")
            return (finish(out[0]), *out[1:])
        return finish(out)

    def extra_repr(self) -> str:
        extra = (", recompute=True" if self.recompute else "") + (", channel_first=True" if self.channel_first else "")
        return f"dim={self.dim}, streams={self.streams}, variant={self.variant_name!r}, dynamic={self.dynamic}{extra}"
