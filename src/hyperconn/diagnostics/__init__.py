"""Stability diagnostics: composite gains, gradient norms, stream and manifold metrics."""

from .gain import CompositeGain, composite_gain, composite_product

__all__ = ["CompositeGain", "composite_gain", "composite_product"]
