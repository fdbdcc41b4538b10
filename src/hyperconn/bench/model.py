"""``hyperconn bench model``: a whole GPT training step per variant.

One step is forward, cross-entropy loss, backward and ``AdamW.step()`` on random tokens.
Every variant runs at n streams (default 4) next to the plain residual (n = 1), each
with and without ``recompute=True``; all models are built first and timed round-robin
in one process (see :func:`hyperconn.bench.time_interleaved`).

Sizes: on CUDA 12 blocks, C = 768, 12 heads, seq 1024, batch 8 under bf16 autocast
(parameters and optimizer in fp32); on CPU a small model, 4 blocks, C = 128, 4 heads,
seq 128, batch 8 in fp32. ``--quick`` shrinks both. Every size is a flag.

``× residual`` is the step time over the residual model's (no recompute), the median of
per-round ratios; ``overhead`` is that minus 1 (the mHC paper reports 6.7 % for n = 4
with fused kernels on GPU). Activation memory is what the forward (with the loss) leaves
allocated for the backward; peak covers the whole step, gradients and optimizer
temporaries included.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F

from ..models import GPT, ConnectionConfig, GPTConfig
from ..variants import VARIANTS
from .cli import UsageError, common_args, progress
from .memory import measure_memory
from .output import meta
from .render import fmt, fmt_mib
from .timing import Case, paired_ratio, summarize, time_interleaved

__all__ = ["build_parser", "run", "model_case", "sizes"]

BASELINE = "residual"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hyperconn bench model", description=__doc__.split("\n\n")[0])
    common_args(p)
    p.add_argument("--streams", type=int, default=4, help="n for every non-residual variant")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                   help=f"subset of {' '.join(VARIANTS)}")
    p.add_argument("--no-recompute", action="store_true", help="leave out the recompute=True models")
    p.add_argument("--layers", type=int, default=None, help="blocks (CUDA 12, CPU 4)")
    p.add_argument("--dim", type=int, default=None, help="C (CUDA 768, CPU 128)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (CUDA 12, CPU 4)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (CUDA 1024, CPU 128)")
    p.add_argument("--batch", type=int, default=None, help="batch size (8)")
    p.add_argument("--vocab", type=int, default=256, help="vocabulary (256, byte level)")
    p.add_argument("--autocast", choices=["none", "bf16"], default=None,
                   help="forward under torch.autocast (default bf16 on CUDA, none on CPU)")
    p.add_argument("--stream-dtype", choices=["float32", "bfloat16"], default=None,
                   help="GPTConfig.stream_dtype of every model (default: the parameters' dtype, fp32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every model (the first steps compile; warm-up covers them)")
    return p


def sizes(args, cuda: bool) -> dict:
    """Model sizes from the flags, defaulting by device and --quick."""
    if cuda:
        d = dict(layers=4, dim=512, heads=8, seq=512, batch=8) if args.quick else \
            dict(layers=12, dim=768, heads=12, seq=1024, batch=8)
    else:
        d = dict(layers=2, dim=64, heads=4, seq=64, batch=4) if args.quick else \
            dict(layers=4, dim=128, heads=4, seq=128, batch=8)
    for k in d:
        if getattr(args, k) is not None:
            d[k] = getattr(args, k)
    return d


def model_case(variant: str, streams: int, recompute: bool, size: dict, vocab: int, *,
               device: torch.device, autocast: bool, name: str | None = None,
               kernels: str | None = None, stream_dtype: str | None = None,
               compile: bool = False) -> Case:
    """A timed training step (forward, loss, backward, AdamW step) of one GPT.

    ``kernels`` sets every HyperConnection's backend (None: ``HYPERCONN_KERNELS``/auto)."""
    n = 1 if variant == "residual" else streams
    cfg = GPTConfig(vocab_size=vocab, seq_len=size["seq"], n_layer=size["layers"], n_head=size["heads"],
                    n_embd=size["dim"], connection=ConnectionConfig(variant, streams=n, recompute=recompute,
                                                               kernels=kernels),
                    stream_dtype=stream_dtype)
    model = GPT(cfg).to(device).train()
    # Fused AdamW on CPU too (torch >= 2.4): the for-loop step costs ~30 µs per parameter
    # tensor, which would charge a hyper-connected model (2.3x the tensors) for Python.
    fused = device.type in ("cuda", "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=fused)
    idx = torch.randint(0, vocab, (size["batch"], size["seq"]), device=device)
    tgt = torch.randint(0, vocab, (size["batch"], size["seq"]), device=device)

    def ctx():
        if autocast:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    run_model = torch.compile(model) if compile else model

    def forward():
        with ctx():
            logits = run_model(idx)
        return F.cross_entropy(logits.float().view(-1, vocab), tgt.view(-1))

    def backward(loss):
        loss.backward()
        opt.step()

    def reset():
        opt.zero_grad(set_to_none=True)

    return Case(name=name or (variant + ("+recompute" if recompute else "")), forward=forward, backward=backward,
                reset=reset, info={"variant": variant, "streams": n, "recompute": recompute,
                                   "kernels": kernels or "auto",
                                   "params": model.num_params(), "config": cfg.describe()})


def run(args, device: torch.device, argv: Sequence[str]) -> dict:
    """Run the model benchmark; returns the report dict."""
    cuda = device.type == "cuda"
    size = sizes(args, cuda)
    autocast = (args.autocast or ("bf16" if cuda else "none")) == "bf16"
    repeats = args.repeats or ((5 if cuda else 3) if args.quick else (20 if cuda else 9))
    warmup = args.warmup if args.warmup is not None else ((3 if cuda else 1) if args.quick else (5 if cuda else 3))
    inner = args.inner or (1 if not cuda else 2)
    variants = list(dict.fromkeys(["residual"] + list(args.variants)))  # residual is the baseline
    recomputes = [False] if args.no_recompute else [False, True]
    settings = {**{k: v for k, v in size.items()}, "vocab": args.vocab, "streams": args.streams,
                "autocast": "bf16" if autocast else "none", "stream_dtype": args.stream_dtype or "default",
                "compile": bool(args.compile), "optimizer": "AdamW (fused)" if device.type in ("cuda", "cpu") else "AdamW",
                "repeats": repeats, "warmup": warmup, "inner": inner, "memory": not args.no_memory}
    report = {"kind": "model", "meta": meta(argv, device, settings), "records": [], "tables": [], "notes": []}

    try:  # the configs validate sizes and name the field
        GPTConfig(vocab_size=args.vocab, seq_len=size["seq"], n_layer=size["layers"], n_head=size["heads"],
                  n_embd=size["dim"], connection=ConnectionConfig("mhc", streams=args.streams))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if size["batch"] < 1:
        raise UsageError(f"--batch: expected a positive integer, got {size['batch']}")
    torch.manual_seed(args.seed)
    common = dict(device=device, autocast=autocast, stream_dtype=args.stream_dtype, compile=args.compile)
    cases = [model_case(v, args.streams, rc, size, args.vocab, **common)
             for rc in recomputes for v in variants]
    if cuda and "mhc" in variants:  # what the Triton kernels save, in the same run
        cases.append(model_case("mhc", args.streams, False, size, args.vocab, name="mhc+torch",
                                kernels="torch", **common))
    progress(args, f"model: {len(cases)} cases x {repeats} rounds "
                   f"(L={size['layers']} C={size['dim']} T={size['seq']} B={size['batch']})")
    times = time_interleaved(cases, repeats=repeats, warmup=warmup, device=device, inner=inner)
    tokens = size["batch"] * size["seq"]
    recs = []
    for c in cases:
        mem = {} if args.no_memory else measure_memory(c, device)
        x_res = paired_ratio(times, c.name, BASELINE)
        recs.append({"case": c.name, **c.info, **summarize(times[c.name]), "x_residual": x_res,
                     "tokens_per_s": tokens / summarize(times[c.name])["median_s"], **mem})
    report["records"] = recs

    by = {r["case"]: r for r in recs}
    rows = []
    for r in recs:
        plain = by.get(r["variant"]) if r["recompute"] else None
        saved = (1 - r["activation_bytes"] / plain["activation_bytes"]
                 if plain and r.get("activation_bytes") is not None and plain.get("activation_bytes") else None)
        rows.append([r["case"], str(r["streams"]), fmt(r["median_s"] * 1e3, ".1f"), fmt(r["spread"] * 100, ".0f", "%"),
                     fmt(r["x_residual"], ".3f", "×"), fmt((r["x_residual"] - 1) * 100, "+.1f", "%"),
                     fmt(r["tokens_per_s"], ",.0f"), fmt_mib(r.get("activation_bytes")), fmt_mib(r.get("peak_bytes")),
                     "–" if saved is None else f"{saved * 100:.0f}%"])
    title = (f"GPT training step: L={size['layers']} C={size['dim']} heads={size['heads']} T={size['seq']} "
             f"B={size['batch']} V={args.vocab}, {'bf16 autocast' if autocast else 'fp32'}")
    report["tables"].append({
        "title": title, "rows": rows,
        "columns": ["case", "n", "ms/step", "spread (IQR)", "× residual", "overhead", "tokens/s",
                    "activation MiB", "peak MiB", "act. saved by recompute"],
        "notes": ["× residual and overhead: step time over the residual model's (no recompute), median of "
                  "per-round ratios. The mHC paper's target for n=4 mHC: overhead below 6.7 % (fused GPU kernels)."]})
    m = by.get("mhc")
    report["summary"] = {
        "mhc_overhead": None if m is None else m["x_residual"] - 1,
        "mhc_recompute_overhead": None if "mhc+recompute" not in by else by["mhc+recompute"]["x_residual"] - 1,
        "cases": {r["case"]: {"ms": r["median_s"] * 1e3, "x_residual": r["x_residual"],
                              "activation_bytes": r.get("activation_bytes"), "peak_bytes": r.get("peak_bytes")}
                  for r in recs}}
    return report
