"""Activation memory and step time of a GPT training step: no recompute, per-layer recompute
(``connection.recompute``) and block recompute (``recompute_blocks``, the mHC paper's L_r),
as ratios to no recompute measured in the same run.

    python benchmarks/bench_recompute.py                         # CPU: 12 blocks, C=128, n=4, mhc
    python benchmarks/bench_recompute.py --device cuda --dim 768 --seq 1024 --batch 8

Saved activations: bytes of every tensor autograd saves during the forward (counted with
``torch.autograd.graph.saved_tensors_hooks``, so the same on every device); on CUDA also
the peak allocated memory of forward + backward. Step time: forward + backward + AdamW,
median of interleaved rounds. Nothing asserts on speed. Prints a markdown table;
``--json PATH`` also writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from hyperconn.models import GPT, GPTConfig


def build(args, per_layer: bool, blocks: int) -> GPT:
    conn = {"variant": args.variant, "streams": args.streams, "recompute": per_layer}
    cfg = GPTConfig(vocab_size=256, seq_len=args.seq, n_layer=args.layers, n_head=max(2, args.dim // 64),
                    n_embd=args.dim, connection=conn, recompute_blocks=blocks)
    torch.manual_seed(0)
    return GPT(cfg).to(args.device).train()


def saved_bytes(model, idx) -> tuple[int, float]:
    total = {"bytes": 0}

    def pack(t):
        total["bytes"] += t.numel() * t.element_size()
        return t

    if idx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if idx.device.type == "cuda" else float("nan")
    return total["bytes"], peak


def step_fn(model, idx):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", default="mhc")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    auto = GPTConfig(n_layer=a.layers, n_embd=a.dim, connection={"streams": a.streams},
                     recompute_blocks="auto").recompute_interval
    settings = {"none": (False, 0), "per-layer": (True, 0), f"block {auto}": (False, auto), "block 1": (False, 1)}
    modes = list(settings)  # "block auto" and "block 1" are one entry when auto == 1
    models = {m: build(a, *settings[m]) for m in modes}
    idx = torch.randint(0, 256, (a.batch, a.seq), device=a.device)
    memory = {m: saved_bytes(models[m], idx) for m in modes}
    steps = {m: step_fn(models[m], idx) for m in modes}
    times = {m: [] for m in modes}
    for m in modes:  # warm-up
        steps[m]()
    for _ in range(a.rounds):
        for m in modes:
            if a.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            steps[m]()
            if a.device == "cuda":
                torch.cuda.synchronize()
            times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"GPT {a.layers} blocks, C={a.dim}, T={a.seq}, B={a.batch}, {a.variant} n={a.streams}; "
          f"{a.device}, {a.threads} thread(s), {platform.processor() or platform.machine()}, torch {torch.__version__}; "
          f"auto interval: {auto} blocks")
    print("\n| recompute | saved activations (MiB) | × none | peak fwd+bwd (MiB) | step ms (median) | × none |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in modes:
        b, peak = memory[m]
        print(f"| {m} | {b / 2**20:.1f} | {b / memory['none'][0]:.2f} | {peak:.0f} | {1e3 * med[m]:.1f} | "
              f"{med[m] / med['none']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "saved_bytes": {m: memory[m][0] for m in modes},
                       "peak_mib": {m: memory[m][1] for m in modes}, "step_s": times}, f, indent=1)


if __name__ == "__main__":
    main()
