"""Stability diagnostics: composite gains, gradient norms, stream and manifold metrics.

- :mod:`.gain`: gains of a composite transport (Amax forward/backward, ∞/1, spectral).
- :mod:`.metrics`: pure functions (stream similarity, layer profile, manifold errors).
- :mod:`.probe`: :class:`Probe` records what each HyperConnection did in a forward;
  :class:`StabilityHook` turns one probed forward + backward into scalars and profiles.
"""

from .gain import CompositeGain, composite_gain, composite_product, gains_of
from .metrics import (GAIN_NAMES, MANIFOLD_ERROR_NAMES, layer_profile, manifold_errors,
                      prefix_products, stream_similarity, stream_similarity_per_token,
                      suffix_products, token_stats)
from .probe import HARMONIZED_KEYS, SCALAR_KEYS, LayerRecord, Probe, StabilityHook

__all__ = [
    "CompositeGain", "composite_gain", "composite_product", "gains_of",
    "GAIN_NAMES", "MANIFOLD_ERROR_NAMES", "layer_profile", "manifold_errors",
    "prefix_products", "suffix_products", "stream_similarity", "stream_similarity_per_token",
    "token_stats", "Probe", "LayerRecord", "StabilityHook", "SCALAR_KEYS", "HARMONIZED_KEYS",
]
