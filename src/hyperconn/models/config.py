"""Configuration dataclasses for :mod:`hyperconn.models`.

``ConnectionConfig`` says how every branch of the model is hyper-connected (variant,
number of streams, coefficient options); ``GPTConfig`` says everything else about the
decoder. Both validate themselves on construction and raise :class:`hyperconn.ConfigError`
(a ``ValueError``) naming the offending field, so a bad CLI flag fails before any tensor
is allocated.

Both are plain dataclasses: ``dataclasses.asdict(cfg)`` gives a nested dict and
``GPTConfig(**d)`` takes it back (a dict is accepted for ``connection``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Union

from ..errors import ConfigError
from .._checks import is_offset
from ..inits import expansion_offset, get_init
from ..reduction import REDUCTIONS
from ..variants import get_variant, make_variant

__all__ = ["ConnectionConfig", "GPTConfig"]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


STREAM_DTYPES = ("float32", "bfloat16", "float16")


def _positive_int(name: str, value) -> None:
    if not _is_int(value) or value < 1:
        raise ConfigError(name, f"expected a positive integer, got {value!r}")


@dataclass
class ConnectionConfig:
    """How each attention / MLP branch is wrapped in a :class:`hyperconn.HyperConnection`.

    Fields:
        variant: a registered variant name (``hyperconn.VARIANTS``, including variants
            defined in user code by subclassing ``hyperconn.Variant``).
        streams: residual streams n; must be 1 for ``"residual"``.
        dynamic: add per-token coefficients (ignored by ``"residual"``).
        res_init: diagonal of the static raw H̃_res; None takes the variant's default
            (see ``HyperConnection``).
        sinkhorn_iters, sinkhorn_backward: mhc / hybrid Sinkhorn options.
        iso_method, iso_steps: isohc / hybrid projection options (``iso_steps`` None: the
            method's default number of steps, see ``hyperconn.iso_project``).
        hybrid_lambda: ``"learned"`` or a number in [0, 1] written as a string (``"0.5"``)
            so command lines stay simple; converted to float for the layer.
        harmonized_eps: ε of Harmonized HC (H_raw = I + εΘ).
        pre_init: initial static H_pre: ``"default"`` (the variant's own: one-hot for hc,
            uniform 1/n for the others), ``"uniform"`` or ``"onehot"`` (each layer reads
            stream ``layer_index % n``; breaks the symmetry of streams that start as copies).
        recompute: recompute each hyper-connected layer (branch included) in backward
            instead of storing its intermediates: stores one stream state per layer.
        single_pass: single-pass reads (DeepSeek V4.1 style): each layer reads its input
            with the H_pre predicted by the previous layer, the first layer with its static
            H_pre (see ``HyperConnection(single_pass=True)``). Ignored by ``"residual"``.
        init: a named initialisation (:mod:`hyperconn.inits`): ``"hyperconn"`` (the
            default: streams offset by 0.1, one-hot read), ``"copies"`` (the first
            release's: exact copies, the variant's own read), or a peer's
            (``"hc-paper"``, ``"hyper-connections"``, ``"megatron"``). Explicit
            ``pre_init``, ``res_init``, ``alpha_init`` and ``stream_offset`` win over it.
        stream_offset: symmetry-breaking offset of the stream expansion (see
            ``hyperconn.expand_streams``): None (default) takes the init scheme's (0.1
            for ``"hyperconn"``, 0 for the others); 0 starts the streams as exact copies;
            > 0 adds a fixed zero-mean per-stream pattern of that size relative to each
            token's RMS, which keeps the mean over streams (and so, for doubly stochastic
            maps with a uniform read, the residual equivalence at init) exact.
        alpha_init: initial α of the dynamic part (None: the scheme's, 0.01).
        kernels: backend of the layers' per-token ops (None: ``HYPERCONN_KERNELS``, else
            "auto"; see :mod:`hyperconn.ops`).

        options: options of variants without a field here (a user-defined variant's
            ``Options``), by name.

    Options that belong to another variant are accepted and ignored, so one config
    object can be swept over variants.

    Raises:
        ConfigError: naming the field, for an unknown variant, ``streams < 1``,
            ``streams != 1`` with ``"residual"``, or an invalid option value.
    """

    variant: str = "mhc"
    streams: int = 4
    dynamic: bool = True
    res_init: Optional[float] = None
    sinkhorn_iters: int = 20
    sinkhorn_backward: str = "unrolled"
    iso_method: str = "ns"
    iso_steps: Optional[int] = None
    hybrid_lambda: str = "learned"
    harmonized_eps: float = 1.0
    pre_init: str = "default"
    recompute: bool = False
    kernels: Optional[str] = None
    single_pass: bool = False
    init: str = "hyperconn"
    stream_offset: Optional[float] = None
    alpha_init: Optional[float] = None
    options: dict = field(default_factory=dict)

    # The fields above that are variant options (the rest configure the layer).
    _OPTION_FIELDS = ("sinkhorn_iters", "sinkhorn_backward", "iso_method", "iso_steps", "hybrid_lambda",
                      "harmonized_eps", "pre_init")

    def __post_init__(self):
        get_variant(self.variant)  # ConfigError("variant", ...) naming the registered ones
        get_init(self.init)  # ConfigError("init", ...) naming the schemes
        if self.stream_offset is not None and not is_offset(self.stream_offset):
            raise ConfigError("stream_offset", f"expected None or a finite number >= 0, got {self.stream_offset!r}")
        if self.alpha_init is not None and (isinstance(self.alpha_init, bool) or not isinstance(
                self.alpha_init, (int, float)) or not math.isfinite(self.alpha_init)):
            raise ConfigError("alpha_init", f"expected None or a finite number, got {self.alpha_init!r}")
        from ..ops import BACKENDS
        if self.kernels is not None and self.kernels not in BACKENDS:
            raise ConfigError("kernels", f"expected None or one of {BACKENDS}, got {self.kernels!r}")
        _positive_int("streams", self.streams)
        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            raise ConfigError("options", f"expected a dict of option names to values, got {self.options!r}")
        clash = sorted(set(self.options) & (set(self._OPTION_FIELDS) | {"kernels", "single_pass", "recompute"}))
        if clash:
            raise ConfigError(f"options.{clash[0]}", f"set it as the field {clash[0]!r}, not in options")
        self._lambda()  # raises for a bad hybrid_lambda
        # The variants own their checks (streams, options): building one (a few scalars)
        # is the single source of truth for what is valid.
        make_variant(self.variant, self.streams, 0, self.res_init, **self._options())

    @property
    def offset(self) -> float:
        """The stream expansion's offset in use: ``stream_offset``, else the init scheme's
        (0 for a variant without coefficients, whose single stream has nothing to break)."""
        if self.stream_offset is not None:
            return float(self.stream_offset)
        return expansion_offset(self.init, self.variant)

    def _lambda(self) -> Union[str, float]:
        value = self.hybrid_lambda
        if value == "learned":
            return value
        try:
            lam = float(value)
        except (TypeError, ValueError):
            lam = float("nan")
        if not 0.0 <= lam <= 1.0:  # also rejects nan
            raise ConfigError("hybrid_lambda", f"expected 'learned' or a number in [0, 1], got {value!r}")
        return lam

    def _options(self) -> dict:
        fields = {name: getattr(self, name) for name in self._OPTION_FIELDS}
        fields["hybrid_lambda"] = self._lambda()
        return {**fields, **self.options}

    def layer_kwargs(self) -> dict:
        """Keyword arguments for ``HyperConnection(dim, streams, branch, **kwargs)``:
        variant, dynamic, res_init and every variant option (``hybrid_lambda`` as a float
        unless ``"learned"``, plus ``options``), ``recompute``, ``init`` and ``alpha_init``.
        ``streams`` is not included (nor the stream offset: see :attr:`offset`)."""
        kwargs = dict(variant=self.variant, dynamic=self.dynamic, res_init=self.res_init,
                      recompute=self.recompute, init=self.init, alpha_init=self.alpha_init, **self._options())
        if self.kernels is not None:
            kwargs["kernels"] = self.kernels
        if self.single_pass:
            kwargs["single_pass"] = True
        return kwargs

    def describe(self) -> str:
        """One line, e.g. ``"mhc n=4 dynamic sinkhorn(20, unrolled)"``; the variant writes
        its own part (``Variant.describe_options``)."""
        cls = get_variant(self.variant)
        if not cls.has_coefficients:
            return f"{self.variant} n={self.streams}"
        parts = [self.variant, f"n={self.streams}", "dynamic" if self.dynamic else "static"]
        names = {f.name for f in dataclasses.fields(cls.Options)}
        parts += cls.describe_options(cls.Options(**{k: v for k, v in self._options().items() if k in names}))
        if self.res_init is not None:
            parts.append(f"res_init={self.res_init:g}")
        if self.init != "hyperconn":
            parts.append(f"init={self.init}")
        if self.pre_init != "default":
            parts.append(f"pre_init={self.pre_init}")
        if self.alpha_init is not None:
            parts.append(f"alpha={self.alpha_init:g}")
        if self.single_pass:
            parts.append("single-pass")
        if self.stream_offset is not None and self.stream_offset != get_init(self.init).stream_offset:
            parts.append(f"offset={self.stream_offset:g}")
        if self.recompute:
            parts.append("recompute")
        return " ".join(parts)


@dataclass
class GPTConfig:
    """A decoder-only GPT: RMSNorm pre-norm, RoPE attention, SwiGLU MLP, no biases.

    Fields:
        vocab_size: token vocabulary V.
        seq_len: longest sequence the model accepts (size of the RoPE tables).
        n_layer: transformer blocks; each block is two hyper-connected layers
            (attention, then MLP), so the model has ``2 * n_layer`` connections.
        n_head: attention heads; ``n_embd // n_head`` must be even (RoPE rotates pairs).
        n_embd: channel width C.
        mlp_hidden: SwiGLU hidden width; None gives :attr:`mlp_hidden_dim`, 8/3·C rounded
            up to a multiple of 32.
        tie_embeddings: share the token embedding with the output head.
        rope_base: RoPE frequency base θ.
        norm_eps: ε of every RMSNorm (branch norms, final norm, and the RMS scaling of
            the connections' dynamic coefficients).
        connection: a :class:`ConnectionConfig` (a dict is converted).
        stream_dtype: dtype of the (B, T, n, C) stream state: None (the default) keeps
            the embedding's dtype; ``"bfloat16"``/``"float16"`` halve the bytes every
            connection reads and writes (coefficients stay fp32; use with autocast);
            ``"float32"`` forces fp32.
        reduce: the final n → 1 contraction: ``"mean"`` (default; a model whose streams
            stay copies is exactly its residual twin) or ``"learned"``
            (:class:`hyperconn.LearnedReduce`: per-token sigmoid gates from the
            RMS-normalised streams, as DeepSeek V4's head; starts exactly at the mean).
        recompute_blocks: block recompute as the mHC paper does it: 0 (default) off; k ≥ 1
            keeps the (B, T, n, C) stream state only at the input of every k-th block in
            training and recomputes each segment of k blocks in backward; ``"auto"`` takes
            the paper's L_r ≈ √(nL/(n+2)) layers (L = 2·n_layer), in blocks
            (:attr:`recompute_interval`). Not with a variant that has a controller
            (harmonized: it changes the layers' scale between forward and backward); use
            ``connection.recompute`` (per layer, which freezes that state) there.

    Raises:
        ConfigError: naming the field, for non-positive sizes, ``n_embd % n_head != 0``,
            an odd head dimension, or a non-positive ``rope_base`` / ``norm_eps``.
    """

    vocab_size: int = 256
    seq_len: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_hidden: Optional[int] = None
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    connection: ConnectionConfig = field(default_factory=ConnectionConfig)
    stream_dtype: Optional[str] = None
    reduce: str = "mean"
    recompute_blocks: Union[int, str] = 0

    def __post_init__(self):
        if isinstance(self.connection, dict):
            try:
                self.connection = ConnectionConfig(**self.connection)
            except ConfigError as err:
                raise err.within("connection") from None
        if not isinstance(self.connection, ConnectionConfig):
            raise ConfigError("connection", f"expected a ConnectionConfig, got {type(self.connection).__name__}")
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "n_embd"):
            _positive_int(name, getattr(self, name))
        if self.mlp_hidden is not None:
            _positive_int("mlp_hidden", self.mlp_hidden)
        if self.n_embd % self.n_head != 0:
            raise ConfigError("n_embd", f"must be divisible by n_head={self.n_head}, got {self.n_embd}")
        if self.head_dim % 2 != 0:
            raise ConfigError("n_head", f"head dimension n_embd/n_head = {self.head_dim} must be even for RoPE")
        if self.reduce not in REDUCTIONS:
            raise ConfigError("reduce", f"expected one of {REDUCTIONS}, got {self.reduce!r}")
        if self.stream_dtype is not None and self.stream_dtype not in STREAM_DTYPES:
            raise ConfigError("stream_dtype", f"expected None or one of {STREAM_DTYPES}, got {self.stream_dtype!r}")
        rb = self.recompute_blocks
        if rb != "auto" and (not _is_int(rb) or rb < 0):
            raise ConfigError("recompute_blocks", f"expected 'auto' or an integer >= 0, got {rb!r}")
        if rb and get_variant(self.connection.variant).controller is not None:
            raise ConfigError("recompute_blocks", f"not supported with variant {self.connection.variant!r}, whose "
                                                  f"controller changes the layers between forward and backward "
                                                  f"(use connection.recompute)")
        for name in ("rope_base", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise ConfigError(name, f"expected a positive number, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def recompute_interval(self) -> int:
        """Blocks per recompute segment: ``recompute_blocks``, or for ``"auto"`` the mHC
        paper's L_r = √(nL/(n+2)) layers (L = 2·n_layer hyper-connected layers) rounded to
        whole blocks (≥ 1); 0 when off."""
        if self.recompute_blocks != "auto":
            return int(self.recompute_blocks)
        n, layers = self.connection.streams, 2 * self.n_layer
        return max(1, round(math.sqrt(n * layers / (n + 2)) / 2))

    @property
    def mlp_hidden_dim(self) -> int:
        """``mlp_hidden`` if set, else 8/3·n_embd rounded up to a multiple of 32 (LLaMA's
        rule: SwiGLU's three matrices then cost about what a 4·C GELU MLP's two do)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 32 * math.ceil(8 * self.n_embd / 3 / 32)

    def describe(self) -> str:
        """One line: sizes and the connection, e.g. for logs."""
        streams = f" streams={self.stream_dtype}" if self.stream_dtype else ""
        streams += f" reduce={self.reduce}" if self.reduce != "mean" else ""
        streams += f" recompute_blocks={self.recompute_interval}" if self.recompute_blocks else ""
        return (f"GPT L={self.n_layer} C={self.n_embd} H={self.n_head} T={self.seq_len} "
                f"V={self.vocab_size}{streams} | {self.connection.describe()}")

