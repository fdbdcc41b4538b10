"""Manifold error of every variant far from init, and the layer cost of the exact maps.

    python scripts/measure_exact_maps.py [--tokens 4096] [--repeats 15]

Far from init: static logits N(0, 3²), φ scaled ×5, α = 2, inputs N(0, 4²); fp32, CPU.
Reports per variant and n the worst row/column-sum error and most negative entry (every
doubly stochastic map) or ‖HᵀH − I‖_max and |H1 − 1| (isometries), and the median
fwd+bwd time of one layer (n = 4, C = 512, 4×256 tokens, Linear branch, 1 thread) relative
to mhc and to the residual measured in the same interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import hyperconn

CASES = [("mhc", {}), ("mhc-lite", {}), ("kromhc", {}), ("circulant", {}), ("orthostochastic", {}),
         ("orthostochastic", {"ortho_method": "polar"}), ("isohc", {}), ("isohc", {"iso_method": "cayley"}),
         ("hybrid", {"iso_method": "cayley"})]


def label(variant, kw):
    return variant + "".join(f" {k}={v}" for k, v in kw.items())


def far_layer(variant, n, C=16, seed=0, **kw):
    torch.manual_seed(seed)
    layer = HyperConnection(C, n, nn.Linear(C, C), variant=variant, alpha_init=2.0, **kw)
    with torch.no_grad():
        layer.b_res.copy_(3 * torch.randn_like(layer.b_res))
        layer.phi.mul_(5)
    return layer


HyperConnection = hyperconn.HyperConnection


def manifold_errors(args):
    print("| variant | n | row-sum err | col-sum err | min entry | ‖HᵀH − I‖_max |")
    print("|---|---|---|---|---|---|")
    for variant, kw in CASES:
        for n in (2, 4, 8):
            if hyperconn.get_variant(variant).streams_error(n):
                continue
            worst = [0.0, 0.0, 1.0, 0.0]
            for seed in range(3):
                h = far_layer(variant, n, seed=seed, **kw).coefficients(torch.randn(args.tokens, n, 16) * 4)[2]
                h = h.detach()
                worst[0] = max(worst[0], float((h.sum(-1) - 1).abs().max()))
                worst[1] = max(worst[1], float((h.sum(-2) - 1).abs().max()))
                worst[2] = min(worst[2], float(h.min()))
                worst[3] = max(worst[3], float((h.mT @ h - torch.eye(n)).abs().max()))
            print(f"| {label(variant, kw)} | {n} | {worst[0]:.1e} | {worst[1]:.1e} | {worst[2]:.2g} | {worst[3]:.2g} |")


def layer_costs(args):
    torch.set_num_threads(1)
    C, n = 512, 4
    cases = [("residual", {})] + CASES
    runs = {}
    for variant, kw in cases:
        torch.manual_seed(0)
        m = 1 if variant == "residual" else n
        layer = HyperConnection(C, m, nn.Linear(C, C), variant=variant, **kw)
        x = torch.randn(4, 256, m, C, requires_grad=True)
        g = torch.randn_like(x)
        runs[label(variant, kw)] = (layer, x, g)
    times = {k: [] for k in runs}
    for r in range(args.repeats + 2):
        for k, (layer, x, g) in runs.items():
            t = time.perf_counter()
            layer(x).backward(g)
            dt = time.perf_counter() - t
            if r >= 2:
                times[k].append(dt)
            x.grad = None
            layer.zero_grad(set_to_none=True)
    res, mhc = statistics.median(times["residual"]), statistics.median(times["mhc"])
    print("\n| variant | ms (median) | × mhc | × residual |")
    print("|---|---|---|---|")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"| {k} | {1e3 * med:.1f} | {med / mhc:.2f} | {med / res:.2f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args()
    manifold_errors(a)
    layer_costs(a)
