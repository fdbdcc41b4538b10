"""Cost per call of the manifold projections, as ratios to a baseline in the same run.

    python benchmarks/bench_projections.py                    # CPU, 1024 matrices, n = 4
    python benchmarks/bench_projections.py --n 8 --batch 4096 --device cuda

Times forward and forward + backward of ``iso_project`` (``ns``, ``ns-cubic``, ``polar``)
and ``sinkhorn`` (20 iterations, ``unrolled`` and ``implicit``) on a (batch, n, n) float32
tensor near the identity, in interleaved rounds; reports medians and every case's ratio
to ``iso ns-cubic`` (the IsoHC source's iteration) of the same round. Nothing asserts on
speed. Prints a markdown table; ``--json PATH`` also writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from hyperconn import iso_project, sinkhorn

CASES = {
    "iso ns-cubic": lambda t: iso_project(t, "ns-cubic"),
    "iso ns": lambda t: iso_project(t, "ns"),
    "iso polar": lambda t: iso_project(t, "polar"),
    "sinkhorn unrolled": lambda t: sinkhorn(t, 20, "unrolled"),
    "sinkhorn implicit": lambda t: sinkhorn(t, 20, "implicit"),
}
BASELINE = "iso ns-cubic"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, reps):
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    raw = (torch.eye(args.n) + 0.3 * torch.randn(args.batch, args.n, args.n, generator=gen)).to(device)
    leaf = raw.clone().requires_grad_()
    grad = torch.randn_like(raw)

    def fwd(fn):
        with torch.no_grad():
            return lambda: fn(raw)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(leaf), leaf, grad)

    times = {(name, kind): [] for name in CASES for kind in ("fwd", "fwd+bwd")}
    for name, fn in CASES.items():  # warm-up
        fwd(fn)()
        fwd_bwd(fn)()
    for _ in range(args.rounds):
        for name, fn in CASES.items():
            times[(name, "fwd")].append(_time(fwd(fn), device, args.reps))
            times[(name, "fwd+bwd")].append(_time(fwd_bwd(fn), device, args.reps))
    rows = []
    for name in CASES:
        row = {"case": name}
        for kind in ("fwd", "fwd+bwd"):
            t = times[(name, kind)]
            ratios = [a / b for a, b in zip(t, times[(BASELINE, kind)])]
            row[kind + " ms"] = statistics.median(t)
            row[kind + " ratio"] = statistics.median(ratios)
        rows.append(row)
    print(f"{args.batch} matrices, n = {args.n}, float32, {device}, {args.threads} thread(s), "
          f"median of {args.rounds} rounds × {args.reps} calls; ratio to '{BASELINE}' of the same round\n")
    print("| case | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['fwd ms']:.3f} | {r['fwd ratio']:.2f} | "
              f"{r['fwd+bwd ms']:.3f} | {r['fwd+bwd ratio']:.2f} |")
    if args.json:
        meta = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
