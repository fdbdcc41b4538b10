"""Named initialisations of a hyper-connected stack: ours and the peers', by name.

A scheme fixes what the variant's own :meth:`~hyperconn.Variant.static_init` leaves open
or sets differently in other code bases: the stream expansion (exact copies or a
zero-mean offset), the static H_pre / H_post / H_res logits, the dynamic projection φ
and its scale α. Select one with ``HyperConnection(init=...)`` or
``ConnectionConfig(init=...)``; explicit ``pre_init``, ``res_init``, ``alpha_init`` and
``stream_offset`` still win over the scheme.

==================  ==================================================================
name                what it sets (n streams, layer l)
==================  ==================================================================
hyperconn           the default: streams expanded with a zero-mean offset of 0.1·rms
                    (:func:`hyperconn.expand_streams`) and a one-hot read (layer l reads
                    stream l mod n, σ = 0.982); everything else the variant's own.
                    Chosen because it is the only init measured that gives every
                    constrained H_res a gradient (docs/results/init.md).
copies              hyperconn's first release: exact copies, the variant's own read
                    (uniform for every constrained map, one-hot for hc).
hc-paper            the HC paper's: copies, one-hot read, write 1, H_res = I for hc,
                    zero dynamic weights (φ = 0), α = 0.01.
hyper-connections   the public ``hyper-connections`` package (mHCv2): copies, H_pre
                    logits 1 at l mod n and 0 elsewhere (σ: 0.73 / 0.5), H_post
                    logits 1 (2σ(1) = 1.46), H_res logits I, φ = 0, α = 0.01.
megatron            Megatron-LM's hyper_connection.py: copies, every static logit 0
                    (reads σ(0) = 0.5, writes 1, H_res logits 0: uniform for a
                    doubly stochastic map), φ xavier-uniform, α = 0.01.
==================  ==================================================================

The logits assume σ / 2σ gates and an (n, n) H_res logit matrix whose 0 means "no
preference": ``hc`` (identity maps) keeps its own logits under every scheme,
``harmonized`` (raw map I + εΘ) its own H_res, and the exact maps parametrised by other
shapes (mhc-lite, kromhc, circulant) their own H_res (``Variant.scheme_logits``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .errors import ConfigError

__all__ = ["InitScheme", "INITS", "DEFAULT_INIT", "get_init", "init_names", "expansion_offset"]


@dataclass(frozen=True)
class InitScheme:
    """One named initialisation (see the module docstring for the shipped ones).

    Fields:
        name: the registry name.
        summary: one line for docs and ``describe()``.
        stream_offset: offset of the stream expansion (0: exact copies).
        pre_init: the variant's ``pre_init`` when the caller leaves it at ``"default"``.
        pre_logits: None (keep), ``"onehot-1"`` (1 at ``layer_index % n``, else 0) or ``"zero"``.
        post_logit: value of every static H_post logit, or None (keep).
        res_logits: None (keep), ``"identity"`` (b_res = I) or ``"zero"``; only for (n, n) logits.
        phi: None (the variant's), ``"zero"`` or ``"xavier"`` (xavier-uniform).
        alpha: initial α of the dynamic part.
    """

    name: str
    summary: str
    stream_offset: float = 0.0
    pre_init: str = "default"
    pre_logits: Optional[str] = None
    post_logit: Optional[float] = None
    res_logits: Optional[str] = None
    phi: Optional[str] = None
    alpha: float = 0.01

    def static_logits(self, mixer, b_pre: torch.Tensor, b_post: torch.Tensor, b_res: torch.Tensor,
                      keep_pre: bool, keep_res: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The static logits after this scheme; ``keep_pre`` / ``keep_res``: the caller set
        ``pre_init`` / ``res_init`` explicitly, so those stay as the variant made them."""
        n = mixer.streams
        allowed = getattr(mixer, "scheme_logits", ("pre", "post", "res"))
        if not keep_pre and self.pre_logits is not None and n > 1 and "pre" in allowed:
            b_pre = torch.zeros(n)
            if self.pre_logits == "onehot-1":
                b_pre[mixer.layer_index % n] = 1.0
        if self.post_logit is not None and "post" in allowed:
            b_post = torch.full((n,), float(self.post_logit))
        square = tuple(b_res.shape) == (n, n) and "res" in allowed
        if not keep_res and self.res_logits is not None and square:
            b_res = torch.eye(n) if self.res_logits == "identity" else torch.zeros(n, n)
        return b_pre, b_post, b_res

    def init_phi(self, phi: torch.Tensor) -> None:
        """Initialise the dynamic projection φ (nC, m) in place, if this scheme sets it."""
        if self.phi == "zero":
            phi.zero_()
        elif self.phi == "xavier":
            torch.nn.init.xavier_uniform_(phi)


INITS: dict[str, InitScheme] = {s.name: s for s in (
    InitScheme("hyperconn", "zero-mean stream offset 0.1 and a one-hot read (the default)",
               stream_offset=0.1, pre_init="onehot"),
    InitScheme("copies", "exact copies, the variant's own read (hyperconn 0.1)"),
    InitScheme("hc-paper", "HC paper: copies, one-hot read, phi = 0", pre_init="onehot", phi="zero"),
    InitScheme("hyper-connections", "hyper-connections mHCv2: copies, pre logits e_l, post logits 1, "
               "res logits I, phi = 0", pre_logits="onehot-1", post_logit=1.0, res_logits="identity",
               phi="zero"),
    InitScheme("megatron", "Megatron-LM: copies, every static logit 0, phi xavier-uniform",
               pre_logits="zero", post_logit=0.0, res_logits="zero", phi="xavier"),
)}
DEFAULT_INIT = "hyperconn"


def init_names() -> tuple[str, ...]:
    return tuple(INITS)


def expansion_offset(init: str, variant: str) -> float:
    """The stream offset a model of ``variant`` under ``init`` expands with: the scheme's,
    or 0 for a variant without coefficients (its single stream has nothing to break).

    Raises:
        ConfigError: (field ``init`` or ``variant``) for an unknown name.
    """
    from .variants import get_variant  # the variants import the layer's modules, not this one

    return get_init(init).stream_offset if get_variant(variant).has_coefficients else 0.0


def get_init(name: str) -> InitScheme:
    """The scheme called ``name``.

    Raises:
        ConfigError: (field ``init``) naming the known schemes otherwise.
    """
    if not isinstance(name, str) or name not in INITS:
        raise ConfigError("init", f"expected one of {init_names()}, got {name!r}")
    return INITS[name]
