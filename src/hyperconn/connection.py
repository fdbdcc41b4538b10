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

import math

from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch._C._functorch import is_functorch_wrapped_tensor  # torch.func's wrapped tensors: no slot
from torch.utils.checkpoint import checkpoint
from torch.utils.hooks import RemovableHandle

from . import ops
from ._checks import check_floating, is_offset
from ._dtypes import compute_dtype
from .errors import ConfigError
from .inits import DEFAULT_INIT, get_init
from .ops import StreamGradSlot
from .variants import make_variant

__all__ = ["HyperConnection", "expand_streams", "reduce_streams", "stream_offsets", "ExpandStreams", "ReduceStreams"]



def stream_offsets(streams: int, dim: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """A fixed zero-mean pattern E (n, C) to break the symmetry of streams that start as copies.

    ``E = U R / rms(U R)`` with U an orthonormal basis of the mean-zero subspace 1^⊥ (n, n−1)
    and R (n−1, C) drawn from a private generator (seed 0), so every column of E sums to 0
    over the streams, its mean square is 1, and drawing it leaves the global RNG untouched.
    All zeros for n = 1.
    """
    from .projections.iso import helmert_basis

    if streams == 1:
        return torch.zeros(1, dim, dtype=dtype, device=device)
    # Drawn on the CPU with a private generator (the same pattern on every device), then moved.
    r = torch.randn(streams - 1, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64, device="cpu")
    e = helmert_basis(streams, torch.float64, "cpu") @ r
    return (e / e.square().mean().sqrt()).to(dtype=dtype, device=device if device is not None
                                              else torch.get_default_device())


def expand_streams(x: torch.Tensor, streams: int, channel_first: bool = False, offset: float = 0.0,
                   pattern: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(..., C) → (..., n, C): every stream starts as a copy of the input.

    ``offset`` > 0 adds a fixed zero-mean per-stream pattern scaled to each token:
    ``x_j = x + offset · rms(x) · E_j`` (:func:`stream_offsets`). The streams then differ from
    the first layer on, so ``H_res`` gets a gradient (with exact copies, x = 1vᵀ, every map
    with H1 = 1 receives none), while the mean over streams is still exactly x: with a
    uniform read and a doubly stochastic ``H_res`` the model starts exactly as its
    residual twin. Channel-last only. ``pattern``: E itself (n, C), e.g. a module's buffer,
    so a compiled forward does not rebuild it (default: ``stream_offsets(n, C)``).

    ``channel_first=True`` (conv nets): (B, C, *spatial) → (B, n·C, *spatial), stream ``j``
    in channels ``j·C … (j+1)·C − 1``.

    Raises:
        TypeError: if ``x`` is not a floating-point tensor.
        ValueError: if ``streams`` is not a positive integer or ``x`` has too few dimensions.
    """
    check_floating("x", x)
    if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
        raise ValueError(f"streams: expected a positive integer, got {streams!r}")
    if not is_offset(offset):
        raise ValueError(f"offset: expected a finite number >= 0, got {offset!r}")
    if offset and channel_first:
        raise ValueError("offset: not supported with channel_first=True")
    if offset:
        if x.dim() < 1:
            raise ValueError(f"x: expected shape (..., C), got {tuple(x.shape)}")
        e = stream_offsets(streams, x.shape[-1], x.dtype, x.device) if pattern is None else pattern.to(x.dtype)
        if tuple(e.shape) != (streams, x.shape[-1]):
            raise ValueError(f"pattern: expected shape ({streams}, {x.shape[-1]}), got {tuple(e.shape)}")
        rms = x.square().mean(-1, keepdim=True).sqrt().unsqueeze(-2)          # (..., 1, 1)
        return x.unsqueeze(-2) + float(offset) * rms * e
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
    """Module form of :func:`expand_streams`, for ``nn.Sequential`` stacks.

    ``offset``: the zero-mean stream offset (0: exact copies); pass
    ``hyperconn.get_init(init).stream_offset`` (0.1 for the default init) to match the
    layers' init. Channel-last only when > 0.
    """

    def __init__(self, streams: int, channel_first: bool = False, offset: float = 0.0):
        super().__init__()
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
            raise ValueError(f"streams: expected a positive integer, got {streams!r}")
        if not is_offset(offset):
            raise ValueError(f"offset: expected a finite number >= 0, got {offset!r}")
        if offset and channel_first:
            raise ValueError("offset: not supported with channel_first=True")
        self.streams, self.channel_first, self.offset = streams, channel_first, float(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return expand_streams(x, self.streams, self.channel_first, offset=self.offset)

    def extra_repr(self) -> str:
        return (f"streams={self.streams}" + (", channel_first=True" if self.channel_first else "")
                + (f", offset={self.offset:g}" if self.offset else ""))


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
        branch: the wrapped module F, or None to split the call by hand with :meth:`pre`.
        variant: a registered variant name (``hyperconn.VARIANTS``: the built-ins and any
            ``hyperconn.Variant`` subclass defined so far).
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
            layer for its activation memory. Observers are called again during recompute.
        alpha_init: initial α scale of the dynamic part (None: the init scheme's, 0.01 for
            every shipped one); with ``dynamic=True`` the dynamic part moves H_res by
            O(α·n) from the static map at init.
        init: a named initialisation (:mod:`hyperconn.inits`): ``"hyperconn"`` (the
            default: a one-hot read, to be used with streams expanded with
            ``offset=0.1``), ``"copies"`` (the first release's), or a peer's
            (``"hc-paper"``, ``"hyper-connections"``, ``"megatron"``). It sets the static
            logits, φ and α the caller does not set explicitly (``pre_init``,
            ``res_init``, ``alpha_init`` win); the matching stream expansion is
            ``expand_streams(x, n, offset=hyperconn.get_init(init).stream_offset)``.
        kernels: ``"torch"``, ``"triton"``, ``"auto"`` or None (the default: the
            ``HYPERCONN_KERNELS`` environment variable, else ``"auto"``). Chooses the
            implementation of ``H_pre x``, the merge ``H_res x + H_postᵀ y`` and the
            per-token Sinkhorn (``sinkhorn_backward="unrolled"``) through
            :func:`hyperconn.ops.resolve_backend`: ``"auto"`` takes the fused Triton
            kernels when the streams are on CUDA and Triton imports, torch otherwise.
        single_pass: DeepSeek V4.1-style single-pass reads (see :meth:`pre`): the H_pre
            this layer computes from its input reads the *next* layer's input, in the same
            pass as this layer's merge; this layer reads with the H_pre the previous layer
            predicted, or, as the first layer (a plain tensor input), stream 0. The stream state between layers is then the pair
            ``(streams, next branch input)``. Ignored by variants without coefficients.
        channel_first: conv-net layout: streams ``(B, n·C, *spatial)`` (stream ``j`` in
            channels ``j·C … (j+1)·C − 1``, as :func:`expand_streams` with
            ``channel_first=True`` makes them) and a branch on ``(B, C, *spatial)``;
            coefficients are per pixel. Computed as the channel-last layer on the
            permuted tensor.
        **options: the variant's options (its ``Options`` dataclass; options of other
            registered variants are accepted and ignored), e.g. ``sinkhorn_iters`` (20),
            ``sinkhorn_backward`` ("unrolled"|"implicit"), ``iso_method``
            ("ns"|"ns-cubic"|"polar"|"cayley"), ``iso_steps`` (None: the method's default),
            ``hybrid_lambda`` ("learned" or a float in [0, 1]), ``harmonized_eps`` (1.0), and
            for every variant ``pre_init`` ("default" | "uniform" | "onehot": the static
            H_pre at init; see :meth:`hyperconn.Variant.static_init`).

    Shapes: ``forward(x (..., n, C), *args, **kwargs) → (..., n, C)``; extra arguments go
    to the branch. A branch that returns a tuple ``(y, *extras)`` (as Hugging Face
    modules do) makes ``forward`` return ``(streams, *extras)``. With n = 1 and the
    identity transport every variant reduces to a Pre-Norm residual ``x + F(x)``
    (exactly for residual and static hc).

    Observers (diagnostics, controllers) attach with :meth:`register_observer`.

    Raises:
        ConfigError: (a ``ValueError`` naming the field) for ``streams < 1``, a
            non-positive ``dim``, an unknown variant or option, or an invalid option value.
        ValueError: for an input whose last two dimensions are not (n, C), or a branch output
            that is not a (..., C) tensor (or a tuple starting with one).
        TypeError: for non-floating-point streams, or float64 streams into a layer that is
            not float64 (convert the layer with ``.double()``).
    """

    def __init__(self, dim: int, streams: int, branch: Optional[nn.Module] = None, *,
                 variant: str = "mhc", dynamic: bool = True, layer_index: int = 0,
                 res_init: Optional[float] = None, recompute: bool = False, alpha_init: Optional[float] = None,
                 norm_eps: float = 1e-6, kernels: Optional[str] = None, channel_first: bool = False,
                 single_pass: bool = False, init: str = DEFAULT_INIT, **options: Any):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ConfigError("dim", f"expected a positive integer, got {dim!r}")
        if not isinstance(streams, int) or streams < 1:
            raise ConfigError("streams", f"expected a positive integer, got {streams!r}")
        if kernels is not None and kernels not in ops.BACKENDS:
            raise ConfigError("kernels", f"expected None or one of {ops.BACKENDS}, got {kernels!r}")
        self.dim, self.streams, self.variant_name = dim, streams, variant
        self.channel_first = bool(channel_first)
        self.kernels = kernels
        self.branch = branch
        scheme = get_init(init)
        self.init = scheme.name
        pre_init = options.pop("pre_init", "default")
        keep_pre = pre_init != "default"
        # The variant validates its name, its options and the number of streams.
        self.mixer = make_variant(variant, streams, layer_index, res_init, kernels=kernels,
                                  pre_init=pre_init if keep_pre else scheme.pre_init, **options)
        self.dynamic = dynamic and self.mixer.has_coefficients
        # A variant without coefficients (the residual) has no read to predict: ignored,
        # so one config serves a sweep over variants.
        self.single_pass = bool(single_pass) and self.mixer.has_coefficients
        if self.single_pass and self.channel_first:
            raise ConfigError("single_pass", "is not supported with channel_first=True")
        self.recompute = bool(recompute)
        self.norm_eps = norm_eps
        n = streams
        b_pre, b_post, b_res = self.mixer.static_init()
        if self.mixer.has_coefficients:
            b_pre, b_post, b_res = scheme.static_logits(self.mixer, b_pre, b_post, b_res,
                                                        keep_pre=keep_pre, keep_res=res_init is not None)
        if tuple(b_res.shape) != tuple(self.mixer.res_logit_shape):
            raise ConfigError("variant", f"{type(self.mixer).__name__}.static_init returned b_res of shape "
                                         f"{tuple(b_res.shape)}, expected res_logit_shape "
                                         f"{tuple(self.mixer.res_logit_shape)}")
        if not self.mixer.has_coefficients:
            # No learned coefficients: keep constant buffers so shapes stay uniform.
            self.register_buffer("b_pre", b_pre, persistent=False)
            self.register_buffer("b_post", b_post, persistent=False)
            self.register_buffer("b_res", b_res, persistent=False)
        else:
            self.b_pre, self.b_post, self.b_res = nn.Parameter(b_pre), nn.Parameter(b_post), nn.Parameter(b_res)
        if self.dynamic:
            # φ ~ N(0, 1/(nC)) or 0, as the variant starts (Variant.phi_init); drawn either
            # way, so the random stream and every later parameter are initialised as before.
            res_logits = math.prod(self.mixer.res_logit_shape)  # n² for a full matrix
            phi = torch.randn(n * dim, res_logits + 2 * n) / (n * dim) ** 0.5
            if self.mixer.phi_init == "zero":
                phi.zero_()
            scheme.init_phi(phi)
            self.phi = nn.Parameter(phi)
            alpha = scheme.alpha if alpha_init is None else alpha_init
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                raise ConfigError("alpha_init", f"expected None or a finite number, got {alpha_init!r}")
            self.alpha = nn.Parameter(torch.full((3,), float(alpha)))  # pre, post, res
        self._observers: "OrderedDict[int, Callable]" = OrderedDict()
        self._prepare_kernel_constants()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._prepare_kernel_constants()  # after .to() / .cuda(): the layer's new device
        return out

    def _prepare_kernel_constants(self) -> None:
        """Make the constants this layer's Triton kernels read (Newton-Schulz schedules, the
        Helmert basis) on its device now, from module code: made lazily in the first step,
        they would be allocated inside a CUDA-graph memory pool (torch.compile's
        ``mode="reduce-overhead"`` warms up in it) and could be freed with it."""
        param = next(self.parameters(recurse=False), None)
        if param is None or param.device.type != "cuda" or param.is_meta:
            return
        try:
            if ops.resolve_backend(self.kernels, param) != "triton":
                return
        except (RuntimeError, ValueError):
            return
        with torch.no_grad():
            ops.dispatch._triton_ops().prepare_constants(self.mixer, self.streams, param.device)

    # ------------------------------------------------------------------ observers
    def register_observer(self, fn: Callable) -> RemovableHandle:
        """Call ``fn(layer, h_pre, h_post, h_res, x)`` whenever this layer computes its
        coefficients (also in a recompute); if it returns a callable, that is called with
        the layer's output stream state once the merge has run. Observers chain in
        registration order; the returned handle's ``remove()`` detaches this one only
        (as :meth:`torch.nn.Module.register_forward_hook`).

        Shapes: h_pre, h_post (..., n) or (n,), h_res (..., n, n) or (n, n), in
        :attr:`coefficient_dtype`; x and the output (..., n, C) (channel-last).
        """
        handle = RemovableHandle(self._observers)
        self._observers[handle.id] = fn
        return handle

    @property
    def observers(self) -> tuple:
        """The registered observers, in call order (read-only)."""
        return tuple(self._observers.values())

    def _observe(self, h_pre, h_post, h_res, x) -> list:
        after = []
        for fn in list(self._observers.values()):
            out = fn(self, h_pre, h_post, h_res, x)
            if out is not None:
                after.append(out)
        return after

    # ------------------------------------------------------------------ coefficients
    @property
    def coefficient_dtype(self) -> torch.dtype:
        """fp64 for a float64 layer, fp32 otherwise (also for fp16/bf16 layers)."""
        return compute_dtype(self.b_res)

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

    def raw_coefficients(self, x: torch.Tensor, grad_slot: Optional[StreamGradSlot] = None, backend=None):
        """Raw (pre (..., n), post (..., n), res (..., *R)); static: (n,), (n,), R, where R is
        the variant's ``res_logit_shape`` ((n, n) unless the variant maps fewer logits).

        In :attr:`coefficient_dtype` (fp32, or fp64 for a float64 layer).
        ``grad_slot`` (internal, CPU path): shared with the layer's pre and merge ops so
        that their stream gradients go into one buffer (see :mod:`hyperconn.ops.cpu`);
        ``backend``: an ops backend module (None: resolve it for ``x``)."""
        cdtype = self.coefficient_dtype
        b_pre, b_post, b_res = self.b_pre.to(cdtype), self.b_post.to(cdtype), self.b_res.to(cdtype)
        if not self.dynamic:
            return b_pre, b_post, b_res
        n = self.streams
        if backend is None:
            backend = ops.select(self.kernels, x)
        # rms(x)·(x φ) == (rms(x)·x) φ: one GEMM, then a per-token scalar.
        proj = backend.rms_projection(x, self.phi, self.norm_eps, cdtype, grad_slot)
        proj = self.mixer.dynamic_activation(proj)
        a_pre, a_post, a_res = self.alpha.to(cdtype).unbind()
        raw_pre = b_pre + a_pre * proj[..., :n]
        raw_post = b_post + a_post * proj[..., n:2 * n]
        raw_res = b_res + a_res * proj[..., 2 * n:].unflatten(-1, self.mixer.res_logit_shape)
        return raw_pre, raw_post, raw_res

    def _coefficients(self, x: torch.Tensor, slot, backend, state: dict, read: bool = False):
        """(H_pre, H_post, H_res, H_pre x or None) on ``backend``: one fused op where the
        backend fuses the variant's maps into the projection (``Variant.fused_maps``; the
        Triton backend for hc, mhc, isohc, hybrid), which with ``read`` also returns the
        branch input H_pre x (one ∂x for both in backward, and with ``slot`` the merge's
        too); else the projection, the variant's maps and None (the caller runs stream_pre)."""
        fused = getattr(backend, "fused_coefficients", None) if self._may_fuse() else None
        maps = self.mixer.fused_maps() if fused is not None else None
        if maps is not None:
            h = fused(x, self.phi, self.norm_eps, self.b_pre, self.b_post, self.b_res, self.alpha,
                      self.coefficient_dtype, maps, read, slot)
            if h is not None:
                return h
        return (*self.mixer(*self.raw_coefficients(x, slot, backend), state=state), None)

    def _may_fuse(self) -> bool:
        """Whether a fused op may stand in for ``raw_coefficients`` and the variant's call:
        dynamic coefficients, and no user code it would skip (a subclass's
        ``raw_coefficients``, hooks on the variant module)."""
        m, glob = self.mixer, nn.modules.module
        hooks = (m._forward_hooks, m._forward_pre_hooks, getattr(glob, "_global_forward_hooks", None),
                 getattr(glob, "_global_forward_pre_hooks", None))
        return (self.dynamic and type(self).raw_coefficients is HyperConnection.raw_coefficients
                and not any(hooks))

    def coefficients(self, x: torch.Tensor):
        """(H_pre, H_post, H_res) for input x (..., n, C): (..., n), (..., n), (..., n, n)
        with dynamic coefficients, (n,), (n,), (n, n) static; in :attr:`coefficient_dtype`."""
        self._check_input(x)
        return self.mixer(*self.raw_coefficients(x))

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

    # ------------------------------------------------------------------ apply
    def pre(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Split the layer around a branch you call yourself::

            branch_input, finish = layer.pre(x)      # H_pre x: (..., n, C) → (..., C)
            x_next = finish(F(branch_input))         # H_res x + H_postᵀ F(·): (..., n, C)

        The layer keeps no state between the two: ``finish`` holds this call's
        coefficients, so several ``pre`` calls may be in flight at once. With
        ``channel_first``: x (B, n·C, *S) → branch input (B, C, *S), and ``finish`` takes
        (B, C, *S) and returns (B, n·C, *S).

        Raises:
            TypeError: for non-floating-point streams, or float64 streams into a layer
                that is not float64.
            ValueError: if the last two dimensions of ``x`` are not (streams, dim); from
                ``finish``, for a branch output that is not (..., dim).
        """
        return self._split(x, self.mixer.snapshot())

    def _split(self, x, state: dict):
        if self.single_pass:
            # Single pass: x is the pair (streams, branch input predicted by the previous
            # layer), or the streams alone for the first layer; finish returns the pair.
            streams, carried = x if isinstance(x, tuple) else (x, None)
            return self._pre_single_pass(streams, carried, state)
        if self.channel_first:
            xl = self._to_last(x)
            u, merge = self._pre(xl, state)

            def finish(y):
                return self._to_first(merge(self._channels_last(y)))
            return u.movedim(-1, 1), finish
        return self._pre(x, state)

    def _pre(self, x: torch.Tensor, state: dict):
        """Channel-last split: (branch input (..., C), merge(y) → (..., n, C)). ``state``:
        the variant's mutable state as this forward saw it (see Variant.snapshot), so that
        a recompute in backward sees the same values."""
        self._check_input(x)
        if not self.mixer.has_coefficients and not self._observers:
            # The plain residual stays plain: x + F(x) with no coefficient ops at all, so
            # it is an honest baseline for the benchmarks (all coefficients are 1).
            def add(y):
                self._check_output(y)
                return x + y.unsqueeze(-2).to(x.dtype)
            return x.squeeze(-2), add
        backend = ops.select(self.kernels, x)  # once per call: every op below runs on it
        slot = self._grad_slot(x, backend)
        h_pre, h_post, h_res, branch_input = self._coefficients(x, slot, backend, state, read=True)
        after = self._observe(h_pre, h_post, h_res, x) if self._observers else ()

        def merge(y):
            self._check_output(y)
            out = backend.stream_merge(x, h_res, h_post, y, slot)
            for fn in after:
                fn(out)
            return out
        if branch_input is None:
            branch_input = backend.stream_pre(x, h_pre, slot)
        return branch_input, merge

    def _grad_slot(self, x: torch.Tensor, backend) -> Optional[StreamGradSlot]:
        """One ∂x buffer for this call's stream ops (see :mod:`hyperconn.ops.grad_slot`), or
        None: only with dynamic coefficients and when this call records a graph through x
        (so the op that returns the sum is always in it: a ``pre`` under ``no_grad`` with a
        ``finish`` under grad must not leave the merge's ∂x for an op that never runs), and
        never while torch.compile traces or under torch.func transforms; then the backend's
        ``grad_slot`` decides (torch: fp32 streams and coefficients; Triton: the fused
        coefficient op takes it)."""
        if (not self.dynamic or not torch.is_grad_enabled() or not x.requires_grad
                or torch.compiler.is_compiling() or is_functorch_wrapped_tensor(x)):
            return None
        return backend.grad_slot(x, self.coefficient_dtype)

    def _pre_single_pass(self, x: torch.Tensor, carried: Optional[torch.Tensor], state: dict):
        """Single-pass split: (this layer's read, finish(y) → (x_next, next layer's read))."""
        self._check_input(x)
        backend = ops.select(self.kernels, x)
        # The layer's H_pre (from x) is the *next* layer's read; its own read was carried in.
        h_next, h_post, h_res, _ = self._coefficients(x, None, backend, state)
        after = self._observe(h_next, h_post, h_res, x) if self._observers else ()
        if carried is None:  # the first layer reads a fixed stream: stream 0 (as Megatron-LM's single pass)
            carried = x[..., 0, :].contiguous()
        elif not isinstance(carried, torch.Tensor) or tuple(carried.shape) != tuple(x.shape[:-2]) + (self.dim,):
            got = tuple(carried.shape) if isinstance(carried, torch.Tensor) else type(carried).__name__
            raise ValueError(f"x: expected (streams, branch input of shape {tuple(x.shape[:-2]) + (self.dim,)}) "
                             f"in single-pass mode, got a branch input {got}")

        def finish(y):
            self._check_output(y)
            out = backend.stream_merge(x, h_res, h_post, y, None)
            for fn in after:
                fn(out)
            # The next read, from the merge's output (one pass over it with a fused kernel).
            return out, backend.stream_pre(out, h_next, None)
        return carried, finish

    def _check_output(self, y) -> None:
        if not isinstance(y, torch.Tensor) or y.shape[-1:] != (self.dim,):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y: expected the branch output as a tensor of shape (..., dim={self.dim}), got {got}")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.branch is None:
            raise RuntimeError("HyperConnection has no branch: pass one or use pre() and its finish()")
        # The variant's mutable state (the Harmonized scale) as of this forward: a
        # controller update before backward, or the recompute in backward, cannot change it.
        state = self.mixer.snapshot()
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(self._apply_layer, x, state, args, kwargs, use_reentrant=False)
        return self._apply_layer(x, state, args, kwargs)

    def _apply_layer(self, x: torch.Tensor, state, args, kwargs):
        branch_input, finish = self._split(x, state)
        out = self.branch(branch_input, *args, **kwargs)
        if isinstance(out, tuple):
            # (hidden, *extras), as Hugging Face modules return: the first element is the
            # branch output, the extras are handed back beside the new streams.
            if not out:
                raise ValueError("branch: returned an empty tuple; expected a tensor (..., dim) or (tensor, *extras)")
            return (finish(out[0]), *out[1:])
        return finish(out)

    def extra_repr(self) -> str:
        extra = (", recompute=True" if self.recompute else "") + (", channel_first=True" if self.channel_first else "") \
            + (", single_pass=True" if self.single_pass else "")
        return f"dim={self.dim}, streams={self.streams}, variant={self.variant_name!r}, dynamic={self.dynamic}{extra}"
