"""Where a GPT training step's time goes on CUDA: wall time vs GPU-busy time, top kernels.

    python benchmarks/gpu/profile_step.py --configs residual mhc mhc:bf16 mhc:bf16:compile

A config is ``VARIANT[:STREAM_DTYPE][:compile|:graphs][:unfused|:nofold]`` (STREAM_DTYPE ``fp32``
or ``bf16``; ``graphs``: ``torch.compile(mode="reduce-overhead")``, forward and backward
replayed as CUDA graphs, which takes the host's launch cost out of the wall time;
``unfused`` turns off the fused Triton coefficient kernels (``hyperconn::sinkhorn_coefficients``
and the others), so the variant runs the RMS projection, the activations and the res map as
separate ops: the A/B of those kernels; ``nofold`` keeps them but lets autograd add the
merge's ∂x to theirs instead of the projection backward's store: the A/B of that fold). Every
model is the ``hyperconn bench model`` CUDA default (12 blocks, C = 768, 12 heads, seq
1024, batch 8, bf16 autocast, fused AdamW); n = 4 except residual. For each config:
median wall time per step (synchronised), GPU-busy time per step (sum of kernel times
from torch.profiler over the profiled steps), kernels launched per step, and the kernels
that take the most GPU time. Wall ≫ GPU-busy means the step is bound by the host
(Python and kernel launches), not by the device.

``:compile`` / ``:graphs`` compile each block on its own (``--compile-scope block``, as
torchtitan does): the blocks share one compiled graph, so compiling costs about one block
instead of twelve, which is what lets the GPU script's ``compiled`` step fit its time limit;
``--compile-scope model`` compiles the whole model as one graph.

``--device cpu`` is a dry run of this script's plumbing (tiny sizes, e.g. in CI with
``TRITON_INTERPRET=1 HYPERCONN_KERNELS=triton`` so the Triton configs run in the
interpreter): "busy" is then the sum of the profiled ops' own CPU times, not a GPU number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from typing import Optional

import torch
import torch.nn.functional as F

from hyperconn.models import GPT, ConnectionConfig, GPTConfig
from hyperconn.ops import triton_backend

DTYPES = {"fp32": None, "bf16": "bfloat16"}


def build(config: str, args):
    parts = config.split(":")
    variant, dtype, compiled, fused, fold = parts[0], "fp32", None, True, True
    for p in parts[1:]:
        if p == "compile":
            compiled = "default"
        elif p == "graphs":
            compiled = "reduce-overhead"
        elif p == "unfused":
            fused = False
        elif p == "nofold":
            fold = False
        elif p in DTYPES:
            dtype = p
        else:
            raise SystemExit(f"--configs: unknown part {p!r} in {config!r}")
    n = 1 if variant == "residual" else args.streams
    # Read by the layer at every call (and by torch.compile when it traces), so setting it
    # here, before this config's steps, applies to this config only.
    triton_backend.FUSE_COEFFICIENTS, triton_backend.FOLD_MERGE_GRAD = fused, fold
    cfg = GPTConfig(vocab_size=256, seq_len=args.seq, n_layer=args.layers, n_head=args.heads, n_embd=args.dim,
                    connection=ConnectionConfig(variant, streams=n), stream_dtype=DTYPES[dtype])
    model = GPT(cfg).to(args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device == "cuda")
    fwd = model
    if compiled and args.compile_scope == "model":
        fwd = torch.compile(model, mode=compiled)
    elif compiled:
        for block in model.blocks:  # in place; the identical blocks reuse one compiled graph
            block.compile(mode=compiled)
    idx = torch.randint(0, 256, (args.batch, args.seq), device=args.device)
    tgt = torch.randint(0, 256, (args.batch, args.seq), device=args.device)

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16):
            logits = fwd(idx)
        loss = F.cross_entropy(logits.float().view(-1, 256), tgt.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def baseline_of(config: str, configs) -> Optional[str]:
    """The residual config among ``configs`` that ``config`` is compared with: same dtype
    and compile mode, in any order (``unfused``, ``nofold`` change nothing for the residual model);
    None if there is none."""
    want = {p for p in config.split(":")[1:] if p not in ("unfused", "nofold", "fp32")}
    for c in configs:
        parts = c.split(":")
        if parts[0] == "residual" and {p for p in parts[1:] if p != "fp32"} == want:
            return c
    return None


def measure(step, args) -> dict:
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    walls = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        walls.append(time.perf_counter() - t0)
    prof_steps = 2
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(prof_steps):
            step()
        sync()
    per_kernel = defaultdict(lambda: [0.0, 0])
    busy, count = 0.0, 0
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    for ev in prof.events():
        if ev.device_type == kind:
            # On CPU the ops nest (an op's total includes its callees): count own time only.
            us = (ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total) \
                if cuda else ev.self_cpu_time_total
            per_kernel[ev.name][0] += us
            per_kernel[ev.name][1] += 1
            busy += us
            count += 1
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:args.top]
    return {"wall_ms": statistics.median(walls) * 1e3, "wall_spread": (max(walls) - min(walls)) / statistics.median(walls),
            "gpu_busy_ms": busy / 1e3 / prof_steps, "kernels_per_step": count / prof_steps,
            "top": [{"name": k[:90], "ms_per_step": v[0] / 1e3 / prof_steps, "calls_per_step": v[1] / prof_steps}
                    for k, v in top]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["residual", "mhc", "residual:bf16", "mhc:bf16"])
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default=None, help="JSON file for the full results")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a dry run of the plumbing (see the module doc), not a measurement")
    p.add_argument("--compile-scope", choices=("block", "model"), default="block",
                   help="what :compile / :graphs compile: each block (default) or the whole model")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("profile_step.py: --device cuda: no CUDA device (torch.cuda.is_available() is False)")
    results, failed = {}, []

    def save():  # after every config, so a run cut short by its time limit keeps what it measured
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "torch": torch.__version__,
                           "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (dry run)",
                           "results": results}, f, indent=1)
    for config in args.configs:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        try:
            r = measure(build(config, args), args)
        except Exception as exc:  # keep going: one config failing (e.g. compile) loses only itself
            print(f"\n## {config}: FAILED {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
            failed.append(config)
            continue
        results[config] = r
        save()
        print(f"\n## {config}: wall {r['wall_ms']:.1f} ms/step (range {r['wall_spread'] * 100:.0f}%), "
              f"GPU busy {r['gpu_busy_ms']:.1f} ms/step, {r['kernels_per_step']:.0f} kernels/step "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        for k in r["top"]:
            print(f"  {k['ms_per_step']:8.2f} ms {k['calls_per_step']:6.0f}x  {k['name']}")
    print("\n| config | wall ms | GPU busy ms | kernels/step | wall vs residual | busy vs residual "
          "| wall overhead / busy overhead |")
    print("|---|---|---|---|---|---|---|")
    for c, r in results.items():
        ref = results.get(baseline_of(c, results))
        rw = f"{r['wall_ms'] / ref['wall_ms']:.3f}" if ref else "-"
        rb = f"{r['gpu_busy_ms'] / ref['gpu_busy_ms']:.3f}" if ref else "-"
        extra_busy = r["gpu_busy_ms"] - ref["gpu_busy_ms"] if ref else 0.0
        ro = f"{(r['wall_ms'] - ref['wall_ms']) / extra_busy:.2f}" if ref and extra_busy > 0 else "-"
        print(f"| {c} | {r['wall_ms']:.1f} | {r['gpu_busy_ms']:.1f} | {r['kernels_per_step']:.0f} | {rw} | {rb} | {ro} |")
    save()
    if failed:
        raise SystemExit(f"profile_step.py: {len(failed)} config(s) failed: {' '.join(failed)}")


if __name__ == "__main__":
    main()
