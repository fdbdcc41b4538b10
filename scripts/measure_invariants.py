"""Measure each variant's manifold errors in the layer (the numbers in docs/invariants.md).

    python scripts/measure_invariants.py            # prints a markdown table

For every variant and n ∈ {2, 4, 8}: H_res of a HyperConnection whose static logits are
perturbed by N(0, σ²) (σ = 0 is the init, σ = 0.5 a trained-like spread) and whose dynamic
scale α is set to σ, over 512 random tokens, float32. Reports the worst token.
"""

from __future__ import annotations

import torch
from torch import nn

from hyperconn import HyperConnection

VARIANTS = ("hc", "mhc", "isohc", "hybrid", "harmonized")


def measure(variant: str, n: int, sigma: float, **options) -> dict:
    torch.manual_seed(0)
    hc = HyperConnection(32, n, nn.Identity(), variant=variant, **options)
    with torch.no_grad():
        hc.b_res.add_(sigma * torch.randn(n, n))
        if sigma > 0:
            hc.alpha.fill_(sigma)
        h = hc.coefficients(torch.randn(512, n, 32))[2]
    eye = torch.eye(n)
    return {
        "row": (h.sum(-1) - 1).abs().max().item(),
        "col": (h.sum(-2) - 1).abs().max().item(),
        "neg": (-h).clamp_min(0).max().item(),
        "orth": (h.mT @ h - eye).norm(dim=(-2, -1)).max().item(),
        "spec": torch.linalg.matrix_norm(h, ord=2).max().item(),
    }


def main() -> None:
    configs = [(v, {}) for v in VARIANTS] + [("mhc", {"sinkhorn_iters": 200}), ("isohc", {"iso_method": "polar"})]
    print("| variant | options | n | σ | max \\|H1−1\\| | max \\|1ᵀH−1ᵀ\\| | max negativity | max ‖HᵀH−I‖_F | max ‖H‖₂ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for variant, options in configs:
        for n in (2, 4, 8):
            for sigma in (0.0, 0.5):
                m = measure(variant, n, sigma, **options)
                opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
                print(f"| {variant} | {opts} | {n} | {sigma} | {m['row']:.1e} | {m['col']:.1e} | "
                      f"{m['neg']:.1e} | {m['orth']:.1e} | {m['spec']:.3f} |")


if __name__ == "__main__":
    main()
