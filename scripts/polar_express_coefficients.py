"""Derive the per-step Newton-Schulz coefficients of ``iso_project(method="ns")``.

    python scripts/polar_express_coefficients.py        # prints the table in iso.py

Each step applies an odd quintic ``p(X) = a X + b X XᵀX + c X (XᵀX)²``, which maps every
singular value σ of X to p(σ). Given that the singular values lie in [ℓ, 1], the step's
polynomial is the minimax approximation of 1 on [ℓ, 1] (found by the Remez exchange:
it equioscillates at ℓ, its two critical points and 1), so after the step they lie in
[1 − E, 1 + E]. This is the greedy per-step optimal choice of the "Polar Express" line of
work (Amsel et al., 2025) and of Chebyshev-accelerated Newton-Schulz (arXiv:2506.10935),
derived here from scratch. Every step but the last is divided by its maximum 1 + E, so the
next interval is [ℓ', 1] with ℓ' = (1 − E)/(1 + E), and reads its input divided by
``SAFETY`` while the interval still starts below ``SAFE_ABOVE``, so that rounding that lifts
a singular value slightly above 1 stays inside the interval the next (still expansive)
polynomial was designed for. The last step is left centred on 1.

Starting from ℓ0 = 1e-6 (the guaranteed lower end after iso.py scales A by
‖AᵀA‖_F^{1/2} covers condition numbers up to 1e6 / (n − 1)^{1/4}, i.e. ≈ 5e5 at n = 16;
a layer's per-token blocks reach ~5e4 in a few tokens per thousand at a trained-like
spread, see docs/invariants.md) the schedule ends when the last step's E is below 1e-8
(under float32 rounding): twelve steps. Each extra decade of range costs about 1.6 steps.
"""

from __future__ import annotations

import numpy as np

L0 = 1e-6
SAFETY = 1.01
TARGET = 1e-8
SAFE_ABOVE = 0.9  # no safety division once the interval starts above this


def minimax_quintic(lo: float) -> tuple[float, float, float, float]:
    """(a, b, c, E): the odd quintic closest to 1 on [lo, 1] in the max norm."""
    pts = np.array([lo, lo + 0.3 * (1 - lo), lo + 0.7 * (1 - lo), 1.0])
    signs = np.array([-1.0, 1.0, -1.0, 1.0])  # p − 1 at the alternation points, in units of E
    for _ in range(200):
        system = np.stack([pts, pts**3, pts**5, -signs], axis=1)
        a, b, c, err = np.linalg.solve(system, np.ones(4))
        # Interior extrema of p: p'(x) = a + 3b x² + 5c x⁴ = 0.
        ys = np.roots([5 * c, 3 * b, a])
        crit = sorted(float(np.sqrt(y.real)) for y in ys if abs(y.imag) < 1e-12 and y.real > 0)
        crit = [x for x in crit if lo < x < 1]
        if len(crit) != 2:
            raise RuntimeError(f"Remez exchange lost an alternation point at lo={lo}")
        new = np.array([lo, crit[0], crit[1], 1.0])
        if np.max(np.abs(new - pts)) < 1e-15:
            break
        pts = new
    return float(a), float(b), float(c), float(abs(err))


def schedule() -> list[tuple[float, float, float]]:
    """The coefficients (a, b, c) of every step, in order, as applied to X."""
    steps, lo = [], L0
    while True:
        # Near 1 the polynomials contract (p'(1) ≈ 0), so rounding is harmless there:
        # the safety division is only needed while the step is still expansive.
        safety = SAFETY if lo < SAFE_ABOVE else 1.0
        if lo > 1.0 - 1e-6:  # the minimax problem degenerates; the classical quintic finishes
            steps.append((15 / 8, -10 / 8, 3 / 8))
            return steps
        a, b, c, err = minimax_quintic(lo / safety)
        if err < TARGET:
            steps.append((a, b, c))  # last step: centred on 1, no safety division
            return steps
        hi = 1.0 + err
        # p(x / safety) / hi, expanded into X's own coefficients.
        steps.append((a / (safety * hi), b / (safety**3 * hi), c / (safety**5 * hi)))
        lo = (1.0 - err) / hi


def main() -> None:
    for a, b, c in schedule():
        print(f"    ({a!r}, {b!r}, {c!r}),")


if __name__ == "__main__":
    main()
