"""``hyperconn bench layer``: one hyper-connected layer, forward + backward.

For every stream count n and width C of the grid, one group of cases is built and timed
round-robin (see :func:`hyperconn.bench.time_interleaved`):

    residual            HyperConnection(C, 1, Linear(C, C), variant="residual"), (B, T, 1, C)
    hc mhc isohc hybrid harmonized
                        HyperConnection(C, n, Linear(C, C), variant=v) (dynamic), (B, T, n, C)
    mhc+recompute       the same mhc layer with recompute=True
    mhc+torch           the mhc layer on the torch ops (kernels="torch"): on CUDA, what the
                        Triton kernels save (any variant may take +recompute and/or +torch)
    peer-mhc peer-mhcv2 hyper-connections 0.4.11 (see :mod:`.peers`); peer-mhcv2+triton on CUDA

Each step is ``layer(x).backward(g)`` with ``x.requires_grad`` (a layer inside a model
must return the stream gradient). Ratios are medians of per-round ratios: ``× residual``
is time / residual time (n-stream cost over a plain residual), ``vs mHCv2`` is
peer-mHCv2 time / time (above 1: faster than the public implementation).

The target configuration (n = 4, C = 512, 4×256 tokens) is always measured; the goal is
ours ``mhc`` at least 3.5× faster than ``peer-mhcv2``.
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Optional, Sequence

import torch
from torch import nn

from .. import HyperConnection
from ..variants import VARIANTS
from .cli import UsageError, common_args, progress
from .memory import measure_memory
from .output import meta
from .render import fmt, fmt_mib
from .timing import Case, paired_ratio, summarize, time_interleaved
from .peers import peer_case, peer_status, triton_sinkhorn_available

__all__ = ["build_parser", "run", "layer_case", "TARGET", "DEFAULT_CASES"]

TARGET = {"streams": 4, "dim": 512, "speedup": 3.5}  # ours mhc vs peer mHCv2 (issue 18; stretch 4x)
OURS = tuple(v for v in VARIANTS if v != "residual")
DEFAULT_CASES = ("residual",) + OURS + ("mhc+recompute", "peer-mhc", "peer-mhcv2", "peer-mhcv2+triton")
CUDA_CASES = ("mhc+torch",)  # added to the defaults on CUDA
SUFFIXES = ("recompute", "torch")
PEERS = ("peer-mhc", "peer-mhcv2", "peer-mhcv2+triton")
BASELINE, PEER_REF = "residual", "peer-mhcv2"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hyperconn bench layer", description=__doc__.split("\n\n")[0])
    common_args(p)
    p.add_argument("--streams", type=int, nargs="+", default=None, help="n values (default 2 4 8; --quick: 4)")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="C values (default 256 1024; --quick: 256 512)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--cases", nargs="+", default=None, metavar="CASE",
                   help=f"subset of {' '.join(DEFAULT_CASES + CUDA_CASES)} (any variant may take "
                        "+recompute and/or +torch)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="stream and parameter dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--no-target", action="store_true", help="do not add the target configuration n=4, C=512")
    return p


def layer_case(variant: str, dim: int, streams: int, batch: int, seq: int, *, device: torch.device,
               dtype: torch.dtype = torch.float32, recompute: bool = False, name: Optional[str] = None,
               branch: Optional[nn.Module] = None, kernels: Optional[str] = None, **options) -> Case:
    """A timed forward + backward of our ``HyperConnection`` (Linear(C, C) branch by default).

    ``variant="residual"`` uses one stream whatever ``streams`` says.
    """
    n = 1 if variant == "residual" else streams
    branch = branch if branch is not None else nn.Linear(dim, dim)
    layer = HyperConnection(dim, n, branch, variant=variant, recompute=recompute, kernels=kernels, **options)
    layer = layer.to(device=device, dtype=dtype).train()
    x = torch.randn(batch, seq, n, dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(batch, seq, n, dim, device=device, dtype=dtype)
    params = list(layer.parameters()) + [x]

    def reset():
        for p in params:
            p.grad = None

    return Case(name=name or (variant + ("+recompute" if recompute else "")), forward=lambda: layer(x),
                backward=lambda out: out.backward(grad), reset=reset,
                info={"impl": "hyperconn", "variant": variant, "recompute": recompute,
                      "kernels": kernels or "auto", "input_shape": [batch, seq, n, dim]})


def parse_case(name: str) -> tuple[str, set]:
    """``"mhc+recompute+torch"`` → ``("mhc", {"recompute", "torch"})``; raises UsageError."""
    base, *suffixes = name.split("+")
    if base not in VARIANTS or not set(suffixes) <= set(SUFFIXES) or len(set(suffixes)) != len(suffixes):
        raise UsageError(f"--cases: unknown case {name!r}; expected some of "
                         f"{' '.join(DEFAULT_CASES + CUDA_CASES)} (a variant may take "
                         f"+{' and/or +'.join(SUFFIXES)})")
    return base, set(suffixes)


def _check_cases(names: Sequence[str]) -> None:
    for name in names:
        if name not in PEERS:
            parse_case(name)


def _build_group(names, n, C, args, device, dtype, peers_ok) -> list[Case]:
    cases = []
    for name in names:
        if name.startswith("peer-"):
            kind = name[len("peer-"):]
            if not peers_ok:
                continue
            if kind == "mhcv2+triton" and not (device.type == "cuda" and triton_sinkhorn_available()):
                continue
            cases.append(peer_case(kind, C, n, args.batch, args.seq, device=device, dtype=dtype, name=name))
        else:
            variant, suffixes = parse_case(name)
            cases.append(layer_case(variant, C, n, args.batch, args.seq, device=device, dtype=dtype,
                                    recompute="recompute" in suffixes, name=name,
                                    kernels="torch" if "torch" in suffixes else None))
    return cases


def run(args, device: torch.device, argv: Sequence[str]) -> dict:
    """Run the layer benchmark; returns the report dict (see :func:`hyperconn.bench.render_markdown`)."""
    cuda = device.type == "cuda"
    streams = args.streams or ([4] if args.quick else [2, 4, 8])
    dims = args.dims or ([256, 512] if args.quick else [256, 1024])
    repeats = args.repeats or ((5 if cuda else 3) if args.quick else (20 if cuda else 7))
    warmup = args.warmup if args.warmup is not None else ((5 if cuda else 1) if args.quick else (5 if cuda else 3))
    inner = args.inner or (10 if cuda else 1)
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    names = list(args.cases or (DEFAULT_CASES + (CUDA_CASES if cuda else ())))
    _check_cases(names)
    for flag, values in (("--streams", streams), ("--dims", dims), ("--batch", [args.batch]), ("--seq", [args.seq])):
        if any(v < 1 for v in values):
            raise UsageError(f"{flag}: expected positive integers, got {' '.join(map(str, values))}")
    grid = [(n, C) for n in streams for C in dims]
    target = (TARGET["streams"], TARGET["dim"])
    if not args.no_target and target not in grid:
        grid.append(target)
    peers_ok, peer_note = peer_status()
    notes = [peer_note]
    if cuda and "peer-mhcv2+triton" in names and not triton_sinkhorn_available():
        notes.append("peer-mhcv2+triton skipped: the peer's Triton Sinkhorn is not available here")
    settings = {"tokens": f"{args.batch}x{args.seq}", "branch": "Linear(C, C)", "dtype": str(dtype).replace("torch.", ""),
                "repeats": repeats, "warmup": warmup, "inner": inner, "grid": " ".join(f"n={n},C={C}" for n, C in grid),
                "step": "layer(x).backward(g), x.requires_grad", "memory": not args.no_memory}
    report = {"kind": "layer", "meta": meta(argv, device, settings), "records": [], "tables": [], "notes": notes}

    groups = []
    for gi, (n, C) in enumerate(grid):
        torch.manual_seed(args.seed)
        cases = _build_group(names, n, C, args, device, dtype, peers_ok)
        progress(args, f"[{gi + 1}/{len(grid)}] n={n} C={C}: {len(cases)} cases x {repeats} rounds")
        times = time_interleaved(cases, repeats=repeats, warmup=warmup, device=device, inner=inner)
        memory = {c.name: ({} if args.no_memory else measure_memory(c, device)) for c in cases}
        recs = []
        for c in cases:
            rec = {"streams": n, "dim": C, "case": c.name, **c.info, **summarize(times[c.name]),
                   "x_residual": paired_ratio(times, c.name, BASELINE) if BASELINE in times else float("nan"),
                   "speedup_vs_mhcv2": paired_ratio(times, PEER_REF, c.name) if PEER_REF in times else float("nan"),
                   **memory[c.name]}
            recs.append(rec)
        report["records"].extend(recs)
        groups.append((n, C, recs))
        del cases

    for n, C, recs in groups:
        report["tables"].append(_group_table(n, C, recs, args))
    report["tables"].insert(0, _summary_table(groups))
    target_table = _target_table(groups, peers_ok)
    if target_table is not None:
        report["tables"].insert(0, target_table)
    report["summary"] = _summary_dict(groups)
    return report


def _group_table(n, C, recs, args) -> dict:
    rows = []
    for r in recs:
        rows.append([r["case"], fmt(r["median_s"] * 1e3), fmt(r["spread"] * 100, ".0f", "%"),
                     fmt(r["x_residual"], ".2f", "×"), fmt(r["speedup_vs_mhcv2"], ".2f", "×"),
                     fmt_mib(r.get("activation_bytes")), fmt_mib(r.get("peak_bytes"))])
    return {"title": f"n={n}, C={C}, tokens {args.batch}×{args.seq}: forward + backward",
            "columns": ["case", "ms (median)", "spread (IQR)", "× residual", "vs peer mHCv2", "activation MiB", "peak MiB"],
            "rows": rows,
            "notes": ["× residual: time / residual's time; vs peer mHCv2: peer mHCv2's time / time (> 1: faster). "
                      "Both are medians of per-round ratios."]}


def _by(recs, name):
    return next((r for r in recs if r["case"] == name), None)


def _saved(rec, rc):
    if rec is None or rc is None or not rec.get("activation_bytes") or rc.get("activation_bytes") is None:
        return float("nan")
    return 1.0 - rc["activation_bytes"] / rec["activation_bytes"]


def _summary_table(groups) -> dict:
    rows = []
    for n, C, recs in groups:
        m, rc = _by(recs, "mhc"), _by(recs, "mhc+recompute")
        if m is None:
            continue
        rows.append([f"n={n}, C={C}", fmt(m["median_s"] * 1e3), fmt(m["x_residual"], ".2f", "×"),
                     fmt(m["speedup_vs_mhcv2"], ".2f", "×"),
                     fmt(paired_speedup(recs, "peer-mhc", "mhc"), ".2f", "×"),
                     fmt(rc["x_residual"], ".2f", "×") if rc else "–",
                     fmt(_saved(m, rc) * 100, ".0f", "%")])
    return {"title": "Summary: ours mhc", "rows": rows,
            "columns": ["config", "mhc ms", "× residual", "vs peer mHCv2", "vs peer mHC",
                        "mhc+recompute × residual", "activation saved by recompute"]}


def paired_speedup(recs, ref: str, case: str) -> float:
    """Median per-round ratio ref time / case time, from two records of one group."""
    a, b = _by(recs, ref), _by(recs, case)
    if a is None or b is None:
        return float("nan")
    return statistics.median(x / y for x, y in zip(a["samples_s"], b["samples_s"]))


def _target_table(groups, peers_ok) -> Optional[dict]:
    for n, C, recs in groups:
        if (n, C) != (TARGET["streams"], TARGET["dim"]):
            continue
        m, v2, rc = _by(recs, "mhc"), _by(recs, "peer-mhcv2"), _by(recs, "mhc+recompute")
        if m is None:
            return None
        speed = m["speedup_vs_mhcv2"]
        met = "–" if not math.isfinite(speed) else ("met" if speed >= TARGET["speedup"] else "NOT met")
        rows = [["ours mhc", fmt(m["median_s"] * 1e3), fmt(speed, ".2f", "×"), f"≥ {TARGET['speedup']:g}×", met,
                 fmt_mib(m.get("activation_bytes"))]]
        if rc is not None:
            rows.append(["ours mhc+recompute", fmt(rc["median_s"] * 1e3), fmt(rc["speedup_vs_mhcv2"], ".2f", "×"), "", "",
                         fmt_mib(rc.get("activation_bytes"))])
        if v2 is not None:
            rows.append(["peer mHCv2", fmt(v2["median_s"] * 1e3), "1.00×", "", "", fmt_mib(v2.get("activation_bytes"))])
        notes = [] if peers_ok else ["peer not installed: no comparison"]
        return {"title": f"Target: n={n}, C={C}, ours mhc vs peer mHCv2 (goal ≥ {TARGET['speedup']:g}× faster)",
                "columns": ["case", "ms (median)", "speedup vs mHCv2", "goal", "status", "activation MiB"],
                "rows": rows, "notes": notes}
    return None


def _summary_dict(groups) -> dict:
    out = {}
    for n, C, recs in groups:
        m, rc = _by(recs, "mhc"), _by(recs, "mhc+recompute")
        if m is None:
            continue
        out[f"n={n},C={C}"] = {"mhc_ms": m["median_s"] * 1e3, "mhc_x_residual": m["x_residual"],
                               "mhc_speedup_vs_mhcv2": m["speedup_vs_mhcv2"],
                               "mhc_speedup_vs_mhc_peer": paired_speedup(recs, "peer-mhc", "mhc"),
                               "recompute_activation_saved": _saved(m, rc)}
    t = out.get(f"n={TARGET['streams']},C={TARGET['dim']}")
    if t is not None:
        out["target"] = {"speedup_vs_mhcv2": t["mhc_speedup_vs_mhcv2"], "goal": TARGET["speedup"],
                         "met": bool(math.isfinite(t["mhc_speedup_vs_mhcv2"]) and t["mhc_speedup_vs_mhcv2"] >= TARGET["speedup"])}
    return out
