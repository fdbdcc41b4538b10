"""Stability diagnostics: composite gains, gradient norms, stream and manifold metrics.

- :mod:`.gain`: gains of a composite transport (Amax forward/backward, ∞/1, spectral).
- :mod:`.metrics`: pure functions (stream similarity, layer profile, manifold errors).
- :mod:`.probe`: :class:`Probe` records what each HyperConnection did in a forward;
  :class:`StabilityHook` turns one probed forward + backward into scalars and profiles.
"""

from .gain import CompositeGain, composite_gain, composite_product, gains_of
from .metrics import (GAIN_NAMES, MANIFOLD_ERROR_NAMES, energy_on_mean_zero, energy_profile, layer_profile,
                      manifold_errors, prefix_products, stream_effective_rank, stream_effective_rank_per_token,
                      stream_similarity, stream_similarity_per_token, suffix_products, token_stats,
                      transport_grad_ratio)
from .probe import HARMONIZED_KEYS, MULTI_STREAM_KEYS, SCALAR_KEYS, LayerRecord, Probe, StabilityHook

__all__ = [
    "CompositeGain", "composite_gain", "composite_product", "gains_of",
    "GAIN_NAMES", "MANIFOLD_ERROR_NAMES", "layer_profile", "manifold_errors",
    "prefix_products", "suffix_products", "stream_similarity", "stream_similarity_per_token",
    "token_stats", "energy_on_mean_zero", "energy_profile", "transport_grad_ratio",
    "stream_effective_rank", "stream_effective_rank_per_token", "Probe", "LayerRecord", "StabilityHook", "SCALAR_KEYS", "MULTI_STREAM_KEYS", "HARMONIZED_KEYS",
]
