"""``mhc``: manifold-constrained HC, H_res = Sinkhorn-Knopp(exp(H̃_res)) (arXiv:2512.24880)."""


from .. import ops
from ..projections import sinkhorn
from .base import Variant
from .options import SinkhornOptions


def sinkhorn_map(raw_res, options: SinkhornOptions, kernels):
    """Sinkhorn on (..., n, n) with ``options``; the unrolled map goes through the ops
    dispatch (the Triton kernel on CUDA: same map and gradient, iterates recomputed in
    backward), the implicit one through :func:`hyperconn.sinkhorn`."""
    if options.sinkhorn_backward == "unrolled":
        return ops.sinkhorn_tokens(raw_res, options.sinkhorn_iters, backend=kernels)
    return sinkhorn(raw_res, options.sinkhorn_iters, options.sinkhorn_backward)


def describe_sinkhorn(options: SinkhornOptions) -> str:
    return f"sinkhorn({options.sinkhorn_iters}, {options.sinkhorn_backward})"


class MHC(Variant):
    """Manifold-constrained HC: H_res = Sinkhorn-Knopp(exp(H̃_res)), doubly stochastic."""

    name = "mhc"
    Options = SinkhornOptions
    res_init_default = 4.0
    style = {"color": "#1f77b4", "marker": "^"}

    def map_res(self, raw_res, state):
        return sinkhorn_map(raw_res, self.options, self.kernels)

    def fused_maps(self):
        if self._keeps_maps_of(MHC) and self.options.sinkhorn_backward == "unrolled":
            return ("sinkhorn", self.options.sinkhorn_iters)
        return None

    @classmethod
    def describe_options(cls, options):
        return [describe_sinkhorn(options)]


__all__ = ["MHC", "sinkhorn_map", "describe_sinkhorn"]
