"""``isohc``: H_res on the mean-preserving isometries (IsoHC)."""

from ..projections import iso_project
from ..projections.iso import NS_COEFFICIENTS
from .base import Variant
from .options import IsoOptions


def describe_iso(options: IsoOptions) -> str:
    return f"iso({options.iso_method})" if options.iso_steps is None else \
        f"iso({options.iso_method}, {options.iso_steps})"


class IsoHC(Variant):
    """IsoHC: H_res on M_iso (orthogonal, mean-preserving) by Newton-Schulz or exact polar.

    ``iso_method``: "ns" (default; per-step optimal coefficients, converged for condition
    numbers up to ~5e5), "ns-cubic" (the source's cubic iteration), "polar" (SVD) or
    "cayley" (exactly orthogonal, SO(n−1) only);
    ``iso_steps``: None for the method's default (see :func:`hyperconn.iso_project`).
    """

    name = "isohc"
    Options = IsoOptions
    res_init_default = 1.0
    style = {"color": "#2ca02c", "marker": "D"}

    def map_res(self, raw_res, state):
        return iso_project(raw_res, self.options.iso_method, self.options.iso_steps, backend=self.kernels)

    def fused_maps(self):
        if self._keeps_maps_of(IsoHC) and self.options.iso_method == "ns":
            return ("iso", self.options.iso_steps or len(NS_COEFFICIENTS))
        return None

    @classmethod
    def describe_options(cls, options):
        return [describe_iso(options)]
