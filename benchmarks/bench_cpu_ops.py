"""Where a CPU layer step spends its time: each native stream op timed inside real layer
steps, its bytes moved, GB/s, and the share of a copy's bandwidth measured in the same run.

    python benchmarks/bench_cpu_ops.py                 # n=4, C=512, 4×256 tokens, 1 thread
    python benchmarks/bench_cpu_ops.py --dim 128 --unfused   # the model benchmark's width, A/B of the fused op
    python benchmarks/bench_cpu_ops.py --out benchmarks/results/cpu-YYYY-MM-DD/bench_cpu_ops.json

Each op of :mod:`hyperconn.ops.cpu_native` is wrapped with a timer while an ``mhc`` layer
(Linear(C, C) branch) runs forward + backward, so the data are as cold or warm as in
training, not as in a loop over one op. Bytes moved count every read and write of the op
once (a write counted once: no read-for-ownership), so GB/s is a lower bound on the
traffic. The reference is ``y.copy_(x)`` of a stream-sized tensor after a cache flush
(1 read + 1 write), timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from hyperconn import HyperConnection
from hyperconn.ops import cpu_coefficients, cpu_native


def _bytes(name: str, M: int, n: int, C: int, itemsize: int) -> int:
    stream, row = M * n * C, M * C
    per_op = {
        "pre_fwd": stream + 2 * row,              # x; u written
        "pre_bwd": 3 * stream + row,              # x, gx read and written; gu
        "merge_fwd": 2 * stream + row,            # x, y; out written
        "merge_bwd": 3 * stream + 2 * row,        # g, x, y; gx, gy written
        "proj_fwd": stream,                       # x (the (M, N) output is negligible)
        "proj_bwd": 3 * stream,                   # x; gx read and written (the layer's ∂x so far)
        "sinkhorn_fwd": 2 * M * n * n,
        "sinkhorn_bwd": 3 * M * n * n,
    }
    return per_op[name] * itemsize


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", default="mhc", choices=("mhc", "hc"))
    ap.add_argument("--unfused", action="store_true",
                    help="the coefficient path as separate ops (hyperconn.ops.cpu_coefficients off): the A/B")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    cpu_coefficients.FUSE_COEFFICIENTS = not args.unfused
    if not cpu_native.available():
        raise SystemExit(f"native kernels unavailable: {cpu_native.status()}")
    torch.set_num_threads(args.threads)
    n, C, M = args.streams, args.dim, args.tokens
    torch.manual_seed(0)
    layer = HyperConnection(C, n, torch.nn.Linear(C, C), variant=args.variant)
    x = torch.randn(M, n, C, requires_grad=True)
    g = torch.randn(M, n, C)

    times: dict[str, list[float]] = {}
    originals = {}
    for name in ("proj_fwd", "proj_bwd", "pre_fwd", "pre_bwd", "merge_fwd", "merge_bwd", "sinkhorn_fwd",
                 "sinkhorn_bwd"):
        fn = getattr(cpu_native, name)
        originals[name] = fn

        def timed(*a, _fn=fn, _name=name):
            t = time.perf_counter()
            out = _fn(*a)
            times.setdefault(_name, []).append(time.perf_counter() - t)
            return out
        setattr(cpu_native, name, timed)
    step_times = []
    try:
        for i in range(args.steps + 5):
            if i == 5:
                times.clear()
            t = time.perf_counter()
            layer(x).backward(g)
            x.grad = None
            if i >= 5:
                step_times.append(time.perf_counter() - t)
    finally:
        for name, fn in originals.items():
            setattr(cpu_native, name, fn)

    flush = torch.empty(64 * 2**20 // 4)
    src, dst = torch.randn(M, n, C), torch.empty(M, n, C)
    copies = []
    for _ in range(args.steps):
        flush.fill_(1.0)
        t = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - t)
    copy_s = statistics.median(copies)
    copy_gbs = 2 * src.numel() * 4 / copy_s / 1e9

    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        moved = _bytes(name, M, n, C, 4)
        gbs = moved / med / 1e9
        rows.append({"op": name, "ms": med * 1e3, "MB": moved / 1e6, "GB/s": gbs, "of copy": gbs / copy_gbs})
    result = {"config": {"streams": n, "dim": C, "tokens": M, "threads": args.threads, "dtype": "float32",
                         "variant": args.variant, "fused_coefficients": not args.unfused},
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "step_ms": statistics.median(step_times) * 1e3,
              "copy": {"ms": copy_s * 1e3, "GB/s": copy_gbs}, "ops": rows,
              "native_ms_per_step": sum(r["ms"] for r in rows)}
    result["other_ms_per_step"] = result["step_ms"] - result["native_ms_per_step"]
    print(f"layer step ({args.variant}{', unfused' if args.unfused else ''}, n={n}, C={C}, {M} tokens, fwd+bwd): "
          f"{result['step_ms']:.2f} ms, of which native ops {result['native_ms_per_step']:.2f} ms and the "
          f"branch, torch ops and Python {result['other_ms_per_step']:.2f} ms; copy reference {copy_gbs:.1f} GB/s")
    print(f"{'op':<14}{'ms':>8}{'MB':>8}{'GB/s':>8}{'of copy':>9}")
    for r in rows:
        print(f"{r['op']:<14}{r['ms']:>8.3f}{r['MB']:>8.1f}{r['GB/s']:>8.1f}{r['of copy']:>8.0%}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
