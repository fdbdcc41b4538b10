"""Measure each variant's manifold errors in the layer (the numbers in docs/invariants.md).

    python scripts/measure_invariants.py            # prints the markdown tables

For every variant and n ∈ {2, 4, 8}: H_res of a HyperConnection whose static logits are
perturbed by N(0, σ²) (σ = 0 is the init, σ = 0.5 a trained-like spread) and whose dynamic
scale α is set to σ, over 512 random tokens, float32. Reports the worst token.

Second table: ``iso_project`` alone, worst ‖HᵀH − I‖_F over 256 random float32 matrices
whose 1^⊥ block has a given condition number (random bases and scale), per method and
number of steps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hyperconn import HyperConnection, iso_project
from hyperconn.projections import helmert_basis

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
    configs = [(v, {}) for v in VARIANTS] + [("mhc", {"sinkhorn_iters": 200}), ("isohc", {"iso_method": "polar"}),
                                             ("isohc", {"iso_method": "ns-cubic"})]
    print("| variant | options | n | σ | max \\|H1−1\\| | max \\|1ᵀH−1ᵀ\\| | max negativity | max ‖HᵀH−I‖_F | max ‖H‖₂ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for variant, options in configs:
        for n in (2, 4, 8):
            for sigma in (0.0, 0.5):
                m = measure(variant, n, sigma, **options)
                opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
                print(f"| {variant} | {opts} | {n} | {sigma} | {m['row']:.1e} | {m['col']:.1e} | "
                      f"{m['neg']:.1e} | {m['orth']:.1e} | {m['spec']:.3f} |")


def raw_with_condition(n: int, cond: float, batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m = n - 1
    u, _ = torch.linalg.qr(torch.randn(batch, m, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(batch, m, m, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(cond), m, dtype=torch.float64)
    s = s * torch.exp(torch.randn(batch, 1, generator=gen, dtype=torch.float64))
    h = helmert_basis(n, torch.float64)
    return (torch.full((n, n), 1.0 / n, dtype=torch.float64) + h @ ((u * s.unsqueeze(-2)) @ v.mT) @ h.mT).float()


def convergence_table() -> None:
    conds = (1, 10, 100, 1e3, 1e4, 1e5, 1e6)
    print("\n| method | steps | n | " + " | ".join(f"κ = {c:g}" for c in conds) + " |")
    print("|---|---|---|" + "---|" * len(conds))
    for method, steps_list in (("ns", (5, 9, 12, 14)), ("ns-cubic", (5, 10, 20)), ("polar", (None,))):
        for steps in steps_list:
            for n in (4, 8, 16):
                errs = []
                for cond in conds:
                    h = iso_project(raw_with_condition(n, cond, 256, seed=n), method, steps)
                    errs.append((h.mT @ h - torch.eye(n)).norm(dim=(-2, -1)).max().item())
                default = {"ns": 12, "ns-cubic": 5}.get(method)
                label = "—" if steps is None else f"{steps} (default)" if steps == default else str(steps)
                print(f"| {method} | {label} | {n} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")


if __name__ == "__main__":
    main()
    convergence_table()
