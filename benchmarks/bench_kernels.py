"""Benchmark the per-token hyper-connection ops.

CPU: the torch reference ops against a naive einsum implementation (what a plain module
would write: coefficients cast to the stream dtype, autograd through einsum).
CUDA: additionally the Triton kernels, with achieved memory bandwidth (GB/s) from the
bytes each op must move at minimum.

    python benchmarks/bench_kernels.py --quick           # seconds, CPU
    python benchmarks/bench_kernels.py --device cuda --dtype bf16 --tokens 65536 --dim 4096

Timings are medians over ``--reps`` runs after warm-up; forward ("fwd") and forward plus
backward ("fwd+bwd"). Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

from hyperconn.ops import reference, triton_available

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------- naive baselines
def naive_pre(x, h_pre):
    return torch.einsum("...n,...nc->...c", h_pre.to(x.dtype), x)


def naive_merge(x, h_res, h_post, y):
    return (torch.einsum("...ij,...jc->...ic", h_res.to(x.dtype), x)
            + h_post.to(x.dtype).unsqueeze(-1) * y.unsqueeze(-2))


# ---------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fwd_bwd(op, inputs):
    leaves = [t.detach().requires_grad_() for t in inputs]
    grad = None

    def run():
        nonlocal grad
        out = op(*leaves)
        if grad is None:
            grad = torch.randn_like(out)
        torch.autograd.grad(out, leaves, grad)
    return run


def _fwd(op, inputs):
    def run():
        with torch.no_grad():
            op(*inputs)
    return run


# ---------------------------------------------------------------------- bytes moved
def merge_bytes(M, n, C, elt, backward=False):
    """Minimum HBM traffic of stream_merge (per-token coefficients in fp32)."""
    coeffs = M * (n * n + n) * 4
    if not backward:
        return (2 * M * n * C + M * C) * elt + coeffs               # read x, y; write out
    return (3 * M * n * C + 2 * M * C) * elt + 2 * coeffs          # read g, x, y; write dx, dy


def pre_bytes(M, n, C, elt, backward=False):
    coeffs = M * n * 4
    if not backward:
        return (M * n * C + M * C) * elt + coeffs                   # read x; write out
    return (2 * M * n * C + M * C) * elt + 2 * coeffs              # read x, g; write dx


# ---------------------------------------------------------------------- benchmark
def run(tokens: int, dim: int, streams: int, dtype: torch.dtype, device: torch.device,
        reps: int, warmup: int, iters: int) -> List[Dict]:
    M, n, C = tokens, streams, dim
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dt=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dt)

    x, y = rand(M, n, C, dt=dtype), rand(M, C, dt=dtype)
    h_pre, h_post, h_res = rand(M, n), rand(M, n), rand(M, n, n)
    logits = rand(M, n, n)
    elt = x.element_size()

    impls = {
        "stream_pre": {"einsum": naive_pre, "torch": reference.stream_pre},
        "stream_merge": {"einsum": naive_merge, "torch": reference.stream_merge},
        "sinkhorn_tokens": {"torch": lambda z: reference.sinkhorn_tokens(z, iters)},
    }
    if device.type == "cuda" and triton_available():
        from hyperconn.ops import triton_backend as triton_ops
        impls["stream_pre"]["triton"] = triton_ops.stream_pre
        impls["stream_merge"]["triton"] = triton_ops.stream_merge
        impls["sinkhorn_tokens"]["triton"] = lambda z: triton_ops.sinkhorn_tokens(z, iters)
    args = {"stream_pre": [x, h_pre], "stream_merge": [x, h_res, h_post, y],
            "sinkhorn_tokens": [logits]}
    nbytes = {"stream_pre": pre_bytes, "stream_merge": merge_bytes}

    rows = []
    if device.type == "cuda":  # the ceiling, measured: a device-to-device copy of the streams
        dst = torch.empty_like(x)
        sec = time_fn(lambda: dst.copy_(x), device, reps, warmup)
        rows.append({"op": "copy (ceiling)", "impl": "torch", "mode": "fwd", "ms": sec * 1e3,
                     "GB/s": 2 * x.numel() * elt / sec / 1e9})
    for op_name, variants in impls.items():
        for impl, op in variants.items():
            for mode, make in (("fwd", _fwd), ("fwd+bwd", _fwd_bwd)):
                sec = time_fn(make(op, args[op_name]), device, reps, warmup)
                row = {"op": op_name, "impl": impl, "mode": mode, "ms": sec * 1e3}
                if op_name in nbytes:
                    moved = nbytes[op_name](M, n, C, elt)
                    if mode == "fwd+bwd":
                        moved += nbytes[op_name](M, n, C, elt, backward=True)
                    row["GB/s"] = moved / sec / 1e9
                rows.append(row)
    return rows


def print_rows(rows: List[Dict], header: str) -> None:
    print(header)
    print(f"{'op':<16} {'impl':<7} {'mode':<8} {'ms':>10} {'GB/s':>9}")
    for r in rows:
        bw = f"{r['GB/s']:9.1f}" if "GB/s" in r else f"{'-':>9}"
        print(f"{r['op']:<16} {r['impl']:<7} {r['mode']:<8} {r['ms']:10.3f} {bw}")


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, few reps (CPU smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="stream dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--tokens", type=int, default=None, help="M = batch × sequence")
    p.add_argument("--dim", type=int, default=None, help="C")
    p.add_argument("--streams", type=int, default=4, help="n")
    p.add_argument("--iters", type=int, default=20, help="Sinkhorn iterations")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 with --quick, which keeps "
                        "timings sane on a shared machine)")
    a = p.parse_args(argv)
    if a.threads or a.quick:
        torch.set_num_threads(a.threads or 1)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[a.dtype or ("bf16" if cuda else "fp32")]
    if a.quick:
        tokens, dim, reps, warmup = a.tokens or 256, a.dim or 128, a.reps or 3, 1
    else:
        tokens = a.tokens or (16384 if cuda else 2048)
        dim, reps, warmup = a.dim or (4096 if cuda else 512), a.reps or 20, 3
    rows = run(tokens, dim, a.streams, dtype, device, reps, warmup, a.iters)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print_rows(rows, f"# {name}  M={tokens} n={a.streams} C={dim} {str(dtype)[6:]}  "
                     f"threads={torch.get_num_threads()}  "
                     f"triton={'yes' if cuda and triton_available() else 'no'}")
    return rows


if __name__ == "__main__":
    main()
