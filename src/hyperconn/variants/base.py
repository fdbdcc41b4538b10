"""The variant base class, its options and the registry every part of hyperconn reads.

A variant maps raw coefficients to (H_pre, H_post, H_res). Shapes: ``raw_pre``/``raw_post``
(..., n) → (..., n); ``raw_res`` (..., *res_logit_shape) — (..., n, n) unless the variant
maps fewer logits — → ``H_res`` (..., n, n). A variant owns its
initial static logits, the activation of its dynamic part, the map onto its manifold,
any parameters or buffers of its own, its options (a small dataclass), the one-line
description of a configuration, its report style and, where it has one, its controller.

Defining a subclass with a ``name`` registers it (:func:`register_variant` does the same
for a class defined without one), so a variant written in a user's own code works by
name everywhere a built-in one does: ``HyperConnection(variant=...)``, ``ConnectionConfig``,
the CLI (``hyperconn --import mymodule train --model.connection.variant ...``), the
presets and the report. See docs/design.md, "Adding a variant".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["Variant", "Options", "register_variant", "unregister_variant", "get_variant", "variant_names", "VARIANTS",
           "make_variant", "all_option_names", "PRE_INITS"]

PRE_INITS = ("default", "uniform", "onehot")

_REGISTRY: dict[str, type["Variant"]] = {}


# ---------------------------------------------------------------------- options
@dataclasses.dataclass(frozen=True)
class Options:
    """Base of every variant's options: a frozen dataclass whose fields are the options
    the variant accepts, with their defaults. ``check_<field>(value)`` methods validate a
    field (raise :class:`ConfigError` naming it); they run on construction."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check = getattr(self, f"check_{f.name}", None)
            if check is not None:
                check(getattr(self, f.name))


# ---------------------------------------------------------------------- registry
def register_variant(cls: type["Variant"], name: Optional[str] = None) -> type["Variant"]:
    """Register ``cls`` under ``name`` (default: ``cls.name``); returns ``cls`` (usable
    as a decorator). Re-registering a name replaces the earlier class (so a module can be
    reloaded); the built-in names keep their place in :data:`VARIANTS`.

    Raises:
        TypeError: if ``cls`` is not a :class:`Variant` subclass or its ``Options`` is not
            an :class:`Options` dataclass.
        ValueError: for an empty or non-string name.
    """
    if not (isinstance(cls, type) and issubclass(cls, Variant)):
        raise TypeError(f"cls: expected a subclass of hyperconn.Variant, got {cls!r}")
    name = cls.__dict__.get("name") if name is None else name
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name: expected a non-empty variant name, got {name!r}")
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, Options)
            and dataclasses.is_dataclass(cls.Options)):
        raise TypeError(f"{cls.__name__}.Options: expected a dataclass subclassing hyperconn.variants.Options")
    for old in [k for k, v in _REGISTRY.items() if v is cls and k != name]:
        del _REGISTRY[old]  # one name per class
    cls.name = name
    _REGISTRY[name] = cls
    return cls


def unregister_variant(name: str) -> type["Variant"]:
    """Remove ``name`` from the registry and return its class (for tests and plugins that
    clean up after themselves).

    Raises:
        ConfigError: (field ``variant``) for a name not registered.
    """
    cls = get_variant(name)
    del _REGISTRY[name]
    return cls


def variant_names() -> tuple[str, ...]:
    """Registered variant names, built-ins first, then in registration order."""
    return tuple(_REGISTRY)


def get_variant(name: str) -> type["Variant"]:
    """The registered class named ``name``.

    Raises:
        ConfigError: (field ``variant``) for a name not registered.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError("variant", f"expected one of {variant_names()}, got {name!r}") from None


def all_option_names() -> tuple[str, ...]:
    """Every option any registered variant accepts, plus ``pre_init`` (sorted)."""
    names = {"pre_init"}
    for cls in _REGISTRY.values():
        names.update(f.name for f in dataclasses.fields(cls.Options))
    return tuple(sorted(names))


class _Names(Sequence):
    """A live, read-only view of the registered names that behaves like a tuple."""

    def __getitem__(self, i):
        return variant_names()[i]

    def __len__(self):
        return len(_REGISTRY)

    def __contains__(self, name):
        return name in _REGISTRY

    def __eq__(self, other):
        return tuple(self) == (tuple(other) if isinstance(other, (tuple, list, _Names)) else other)

    def __hash__(self):
        return hash(tuple(self))

    def __repr__(self):
        return repr(variant_names())


VARIANTS = _Names()


# ---------------------------------------------------------------------- the base class
class Variant(nn.Module):
    """Base of every variant: σ / 2σ gates on pre/post, identity on the dynamic part.

    Class attributes a variant sets (only ``name`` and :meth:`map_res` are required):

    - ``name``: the registry name (defining it registers the class).
    - ``Options``: its options dataclass (subclass of :class:`Options`); the constructor
      takes them as keyword arguments and stores ``self.options``.
    - ``res_init_default``: default diagonal of the static H̃_res.
    - ``res_logit_shape`` (property): the shape of the raw H̃_res logits the variant maps,
      (n, n) by default; a variant with another shape also overrides :meth:`static_init`.
    - ``pre_init``: "uniform" (every stream feeds the branch equally) or "onehot" (stream
      ``layer_index % n`` alone, as HC initialises).
    - ``phi_init``: initial dynamic projection φ: "random" (N(0, 1/(nC)); the dynamic part
      moves the coefficients by O(α) at init) or "zero" (they start at the static map).
    - ``streams_error(n)`` (classmethod): an error message or None, for variants that
      support only some n (the residual: n = 1; kromhc: n = 2^a·3^b).
    - ``scheme_logits``: which static logits a named init scheme (:mod:`hyperconn.inits`)
      may replace, of ``("pre", "post", "res")`` (all by default): the schemes' values
      assume σ / 2σ gates and an (n, n) H_res logit matrix whose 0 means "no preference"
      (hc keeps all of its own: its maps are the identity; harmonized keeps its H_res).
    - ``has_coefficients``: False for a variant with no learned coefficients (residual).
    - ``controller``: a :class:`hyperconn.control.Controller` class its layers need in
      training, or None.
    - ``style``: ``{"color": …, "marker": …}`` for the report's figures (optional).

    Args:
        streams: n.
        layer_index: position of the layer in the model (one-hot reads use it).
        res_init: diagonal of the static H̃_res; None takes the class default.
        pre_init: "default" (the class's), "uniform" or "onehot".
        kernels: backend of its per-token ops (see :mod:`hyperconn.ops`), or None.
        **options: the fields of ``Options``.

    Raises:
        ConfigError: naming the option, for an option this variant does not accept or an
            invalid value; for ``streams`` this variant does not support.
    """

    name: ClassVar[str] = "base"
    Options: ClassVar[type] = Options
    res_init_default: ClassVar[float] = 1.0
    pre_init: str = "uniform"
    phi_init: ClassVar[str] = "random"
    has_coefficients: ClassVar[bool] = True
    scheme_logits: ClassVar[tuple] = ("pre", "post", "res")
    controller: ClassVar[Optional[type]] = None
    style: ClassVar[dict] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            register_variant(cls)

    def __init__(self, streams: int, layer_index: int = 0, res_init: Optional[float] = None, *,
                 pre_init: str = "default", kernels: Optional[str] = None, **options: Any):
        super().__init__()
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
            raise ConfigError("streams", f"expected a positive integer, got {streams!r}")
        message = self.streams_error(streams)
        if message is not None:
            raise ConfigError("streams", message)
        accepted = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ConfigError(unknown[0], f"not an option of variant {self.name!r} (its options: "
                                          f"{sorted(accepted) or 'none'})")
        if pre_init not in PRE_INITS:
            raise ConfigError("pre_init", f"expected one of {PRE_INITS}, got {pre_init!r}")
        if res_init is not None and not (isinstance(res_init, (int, float)) and not isinstance(res_init, bool)
                                         and math.isfinite(res_init)):
            raise ConfigError("res_init", f"expected None or a finite number, got {res_init!r}")
        self.options = self.Options(**options)
        self.streams = streams
        self.layer_index = layer_index
        self.res_init = float(self.res_init_default if res_init is None else res_init)
        self.kernels = kernels
        if pre_init != "default" and self.has_coefficients:
            self.pre_init = pre_init

    @property
    def res_logit_shape(self) -> tuple[int, ...]:
        """Shape of the raw H̃_res logits this variant maps (static ``b_res`` and, per token,
        the dynamic part): (n, n) by default; a variant parametrised by fewer numbers
        (a convex combination of K permutations, Kronecker factors) returns its own, and
        the layer sizes ``b_res`` and the dynamic projection φ to it."""
        return (self.streams, self.streams)

    @classmethod
    def streams_error(cls, streams: int) -> Optional[str]:
        """Why ``streams`` is not supported by this variant, or None (any n ≥ 1)."""
        return None

    # ------------------------------------------------------------------ init
    def static_pre_post(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial (b_pre (n,), b_post (n,)).

        σ(b_pre) = 1/n so H_pre averages the streams (``pre_init="uniform"``), or, with
        ``pre_init="onehot"``, b_pre = +4 at ``layer_index % n`` and −4 elsewhere
        (σ = 0.982 / 0.018: HC's one-hot read, which makes the layers read different
        streams and so breaks the symmetry of streams that start as copies); 2σ(0) = 1
        so every stream receives the branch output once.
        """
        n = self.streams
        if self.pre_init == "onehot" and n > 1:
            b_pre = torch.full((n,), -4.0)
            b_pre[self.layer_index % n] = 4.0
        else:
            b_pre = torch.full((n,), -math.log(n - 1) if n > 1 else 20.0)
        return b_pre, torch.zeros(n)

    def static_init(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Initial (b_pre (n,), b_post (n,), b_res): :meth:`static_pre_post` and
        b_res = res_init·I. A variant whose ``res_logit_shape`` is not (n, n) overrides this
        (typically ``*self.static_pre_post(), its own b_res``).

        Raises:
            TypeError: if ``res_logit_shape`` is not (n, n) and this was not overridden.
        """
        n = self.streams
        if tuple(self.res_logit_shape) != (n, n):
            raise TypeError(f"{type(self).__name__}: res_logit_shape {tuple(self.res_logit_shape)} is not (n, n); "
                            f"override static_init to return b_res of that shape")
        return (*self.static_pre_post(), self.res_init * torch.eye(n))

    # ------------------------------------------------------------------ maps
    def dynamic_activation(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def snapshot(self) -> dict:
        """The variant's mutable state as of this forward (tensors copied), handed back to
        :meth:`forward` so that state changed after the forward (a controller update before
        backward) does not reach its backward or its recompute. Empty by default."""
        return {}

    def map_pre_post(self, raw_pre, raw_post):
        return torch.sigmoid(raw_pre), 2.0 * torch.sigmoid(raw_post)

    def map_res(self, raw_res: torch.Tensor, state: dict) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}.map_res")

    def fused_maps(self) -> Optional[tuple]:
        """This variant's maps as a backend may fuse them into the coefficient projection's
        kernel, or None (the default): the layer then runs the projection and calls the
        variant. A variant returns a description only when its maps are exactly that
        description's (a subclass overriding one of them gets None; see
        :meth:`_keeps_maps_of`). Known descriptions, fused by the Triton backend:
        ``("sinkhorn", iters)`` (identity activation, σ / 2σ gates, the unrolled Sinkhorn:
        mhc), ``("iso", steps)`` (the same gates, ``iso_project(method="ns", steps=)``:
        isohc), ``("linear", 0)`` (tanh activation, identity maps: hc) and ``("hybrid",
        iters, steps, λ)`` (the gates, (1 − λ)·Iso-NS + λ·Sinkhorn; λ a float or a tensor
        that gets its gradient: hybrid). A spec is asked for at every forward, so it may
        carry the variant's current parameters."""
        return None

    def _keeps_maps_of(self, owner: type) -> bool:
        """Whether this variant computes its coefficients exactly as ``owner`` does: its
        class has ``owner``'s ``map_res``, ``map_pre_post``, ``dynamic_activation`` and
        ``forward`` (a user's subclass that overrides any of them must not be fused)."""
        cls = type(self)
        return all(getattr(cls, m) is getattr(owner, m)
                   for m in ("map_res", "map_pre_post", "dynamic_activation", "forward"))

    def forward(self, raw_pre, raw_post, raw_res, state: Optional[dict] = None):
        """(H_pre, H_post, H_res) from raw coefficients; ``state`` from :meth:`snapshot`
        (None: take a snapshot now)."""
        if state is None:
            state = self.snapshot()
        h_pre, h_post = self.map_pre_post(raw_pre, raw_post)
        return h_pre, h_post, self.map_res(raw_res, state)

    # ------------------------------------------------------------------ description
    @classmethod
    def describe_options(cls, options) -> list[str]:
        """Words for the one-line description of a configuration (after
        ``"<name> n=<n> dynamic|static"``), from an ``Options`` instance."""
        return []

    @classmethod
    def diagnostics(cls, records, applied: list, profile: dict) -> Optional[dict]:
        """Extra stability diagnostics for models with layers of this variant, or None.

        Called by :class:`hyperconn.diagnostics.StabilityHook` once per variant class
        present, with the probe's records (in call order), their H_res and the layer
        profile of the whole stack. Return ``{"scalars": {name: float}, **payload}``: the
        scalars join the hook's scalars, the rest is written under ``payload[cls.name]``.
        """
        return None

    def extra_repr(self) -> str:
        return f"streams={self.streams}, res_init={self.res_init}"


def make_variant(variant: str, streams: int, layer_index: int = 0, res_init=None, **options) -> Variant:
    """Build the variant module named ``variant``.

    Options that do not apply to it are ignored if another registered variant accepts
    them (so one config serves all variants), and rejected if no variant does.
    ``pre_init`` and ``kernels`` are accepted by every variant.

    Raises:
        ConfigError: naming the field, for an unknown variant or option, or an invalid value.
    """
    cls = get_variant(variant)
    known = set(all_option_names()) | {"kernels"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(unknown[0], f"unknown option(s) {unknown}: expected some of {all_option_names()}")
    own = {f.name for f in dataclasses.fields(cls.Options)} | {"pre_init", "kernels"}
    # Options of other variants are still validated, so a typo in one is caught whatever
    # variant a shared config currently selects.
    for other in _REGISTRY.values():
        fields = {f.name for f in dataclasses.fields(other.Options)}
        theirs = {k: v for k, v in options.items() if k in fields and k not in own}
        if theirs:
            _validate_options(other.Options, theirs)
    kept = {k: v for k, v in options.items() if k in own}
    return cls(streams, layer_index, res_init, **kept)


def _validate_options(options_cls, values: dict) -> None:
    probe = object.__new__(options_cls)
    for name, value in values.items():
        check = getattr(probe, f"check_{name}", None)
        if check is not None:
            check(value)
