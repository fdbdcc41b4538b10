"""The Triton kernels compiled for a real GPU (sm_90, Hopper) without one: the fused
coefficient kernels and every kernel of :mod:`hyperconn.ops.triton_kernels`.

Triton's interpreter runs a kernel as NumPy, so it cannot see what only the compiler
does: type errors in the generated code, and registers spilling to local memory (a
kernel that spills can be many times slower, and the interpreter is none the wiser).
``triton.compile`` with an explicit ``GPUTarget`` runs the whole pipeline to a cubin on
any machine, and the ``cuobjdump`` that ships with Triton reads its resource use. The
n = 8 and fp64 cases take up to ~20 s each and are marked slow (``pytest -m slow``).
"""

from __future__ import annotations

import math
import os
import re
import subprocess

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes"):
    pytest.skip("compiles real kernels: run without TRITON_INTERPRET", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hyperconn.ops import triton_coefficients as tc  # noqa: E402
from hyperconn.ops import triton_kernels as tk  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
needs_cuobjdump = pytest.mark.skipif(not os.access(CUOBJDUMP, os.X_OK), reason="Triton without its CUDA tools")


def _compile(fn, pointers: dict, scalars: dict, constexprs: dict, tmp_path, num_warps: int = 4) -> dict:
    """Compile ``fn`` for sm_90 and return its resource use: {"REG": …, "LOCAL": …, …}.
    Pointers are 16-byte aligned, as Triton specialises a launch on torch's allocations."""
    given = {**pointers, **scalars, **{k: "constexpr" for k in constexprs}}
    names = list(fn.arg_names)  # in the kernel's parameter order
    assert set(names) == set(given), set(names) ^ set(given)
    signature = {k: given[k] for k in names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs={(names.index(k),): [["tt.divisibility", 16]] for k in pointers})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    report = subprocess.run([CUOBJDUMP, "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                            check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|LOCAL|STACK|SHARED):(\d+)", report)}


def _coefficient_kernels(res: int, n: int, dtype: torch.dtype):
    """(forward, maps backward) as (fn, pointers, scalars, constexprs), with the tiles the
    launchers choose (tc._forward / tc._backward)."""
    acc = "fp64" if dtype == torch.float64 else "fp32"
    SP, MP = tk._np2(n), tk._np2(max(n - 1, 1))
    N = n * n + 2 * n
    NP, BM, BK = tk._rms_tiles(64 * n, N, dtype)
    BMI = tc._map_tokens(res, SP, MP, dtype)
    common = dict(RES=res, ITERS=20, S=n, SP=SP, MP=MP, N=N, F64=dtype == torch.float64)
    names = ["x_ptr", "phi_ptr", "bias_ptr", "alpha_ptr", "out_ptr", "rinv_ptr", "pre_ptr", "post_ptr", "res_ptr"]
    fwd_ptrs = {k: f"*{acc}" for k in names}
    fwd_ptrs["x_ptr"] = "*bf16" if acc == "fp32" else "*fp64"  # bf16 streams: the common case
    fwd_ptrs.update(read_ptr=fwd_ptrs["x_ptr"], u_ptr="*fp64", coef_ptr="*fp64")
    fwd = (tc._coef_fwd_kernel, fwd_ptrs, dict(M="i32", K="i32", C="i32", eps="fp32", STEPS="i32"),
           dict(common, NP=NP, BM=BM, BK=BK, BMI=min(BM, BMI), READ=True, BC=tc.read_block(768, SP)))  # with H_pre x
    names = ["out_ptr", "rinv_ptr", "bias_ptr", "alpha_ptr", "gpre_ptr", "gpost_ptr", "gres_ptr", "draw_ptr",
             "gp_ptr", "rs_ptr"]
    bwd_ptrs = {k: f"*{acc}" for k in names}
    bwd_ptrs.update(hist_ptr="*fp64" if res == tc.ISO else f"*{acc}", hist2_ptr="*fp64", dlam_ptr=f"*{acc}",
                    u_ptr="*fp64", coef_ptr="*fp64")
    bwd = (tc._coef_maps_bwd_kernel, bwd_ptrs, dict(M="i32", K="i32", STEPS="i32"), dict(common, BM=BMI))
    return fwd, bwd


FAST = [(tc.SINKHORN, 4, torch.float32), (tc.ISO, 4, torch.float32), (tc.LINEAR, 4, torch.float32),
        (tc.HYBRID, 4, torch.float32)]
SLOW = [(tc.SINKHORN, 8, torch.float32), (tc.SINKHORN, 8, torch.float64), (tc.ISO, 3, torch.float64),
        (tc.ISO, 5, torch.float32), (tc.ISO, 8, torch.float32), (tc.LINEAR, 8, torch.float32),
        (tc.HYBRID, 8, torch.float32)]


@needs_cuobjdump
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")  # Triton 3.9's notice of a coming default
@pytest.mark.parametrize("res,n,dtype", FAST + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW])
@pytest.mark.parametrize("which", ["forward", "backward"])
def test_coefficient_kernels_compile_for_sm90_without_spilling(res, n, dtype, which, tmp_path):
    """Every map of the fused coefficient kernels compiles for Hopper with no register
    spills at the tile sizes the launchers pick (at 32 tokens per program the Iso-NS
    maps spilled from n = 4 on, tens of KB per thread at n = 8)."""
    fwd, bwd = _coefficient_kernels(res, n, dtype)
    use = _compile(*(fwd if which == "forward" else bwd), tmp_path)
    # Spills show as stack or local memory; a word or two of stack (fp32 Sinkhorn at n = 8:
    # 8 bytes) costs nothing, the hundreds of bytes of a too-large tile do.
    assert use["LOCAL"] == 0 and use["STACK"] <= 32, use
    assert use["REG"] <= 255, use


def _args(fn, constexprs: dict, acc: str, **ptrs) -> tuple:
    """``fn``'s (fn, pointers, scalars, constexprs) for :func:`_compile`: the pointer
    ``<name>_ptr`` to ``ptrs[name]`` (``acc`` where not given), every other runtime argument
    an int32, but ``eps`` an fp32."""
    runtime = [a for a in fn.arg_names if a not in constexprs]
    pointers = {a: "*" + ptrs.get(a[:-len("_ptr")], acc) for a in runtime if a.endswith("_ptr")}
    scalars = {a: "fp32" if a == "eps" else "i32" for a in runtime if not a.endswith("_ptr")}
    return fn, pointers, scalars, constexprs


DTYPES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _op_kernels(op: str, n: int, dtype: torch.dtype) -> dict:
    """{"forward": …, "backward": …} (Cayley: forward only) of ``op`` at n streams as
    (fn, pointers, scalars, constexprs), with the tiles its launcher in triton_kernels picks.
    ``dtype``: for the stream ops and the projection that of the streams (x, y and their
    gradients), with coefficients and φ in the compute dtype; for the others that of every
    input. Iso-NS and Cayley act on (n−1)×(n−1) blocks (the Helmert basis), the mixture on
    mHC-lite's n! permutation matrices."""
    dt, f64 = DTYPES[dtype], dtype == torch.float64
    acc = "fp64" if f64 else "fp32"
    C = 4096  # a width at which the C-block is the largest the launchers pick
    if op in ("stream_pre", "stream_merge"):
        NP = tk._np2(n)
        tiles = dict(N=n, NP=NP, BLOCK_C=tk._block_c(C, NP, None), F64=f64)
        if op == "stream_pre":
            return {"forward": _args(tk._pre_fwd_kernel, tiles, acc, x=dt, out=dt),
                    "backward": _args(tk._pre_bwd_kernel, tiles, acc, x=dt, g=dt, dx=dt)}
        return {"forward": _args(tk._merge_fwd_kernel, tiles, acc, x=dt, y=dt, out=dt),
                "backward": _args(tk._merge_bwd_kernel, tiles, acc, x=dt, y=dt, g=dt, dx=dt, dy=dt)}
    if op == "rms_projection":  # backward: rms_projection_operands_backward's kernel
        N = n * n + 2 * n
        NP, BM, BK = tk._rms_tiles(n * C, N, torch.float64 if f64 else torch.float32)
        NPb, BMb, BKb, warps = tk._rms_bwd_tiles(n * C, N)
        # backward with PRE and ACC: the fused layer's case, which adds the ∂x of H_pre x (bf16
        # ∂read) and the merge's pending ∂x in the same store
        bwd = dict(N=N, NP=NPb, BM=BMb, BK=BKb, S=n, PRE=True, ACC=True, F64=f64)
        return {"forward": _args(tk._rms_proj_fwd_kernel, dict(N=N, NP=NP, BM=BM, BK=BK, F64=f64), acc, x=dt),
                "backward": _args(tk._rms_proj_bwd_kernel, bwd, acc, x=dt, dx=dt, gu=dt, pending=dt) + (warps,)}
    if op in ("odd_polynomial", "cayley"):
        m, _, MP, BM = tk._small_square_tiles(torch.empty(1, n - 1, n - 1), op)
        tiles = dict(MM=m, MP=MP, BM=BM, F64=f64)
        if op == "cayley":
            return {"forward": _args(tk._cayley_fwd_kernel, tiles, acc)}
        return {"forward": _args(tk._poly_fwd_kernel, tiles, acc),
                "backward": _args(tk._poly_bwd_kernel, tiles, acc)}
    if op == "sinkhorn":
        NP = tk._np2(n)
        tiles = dict(ITERS=20, N=n, NP=NP, BM=tk._sinkhorn_bm(NP), F64=f64)
        return {"forward": _args(tk._sinkhorn_fwd_kernel, tiles, acc),
                "backward": _args(tk._sinkhorn_bwd_kernel, tiles, acc)}
    assert op == "basis_mixture", op
    K = math.factorial(n)
    *_, K, E, KP, EP, BM = tk._mixture_layout(torch.empty(1, K), torch.empty(K, n, n))
    tiles = dict(K=K, E=E, KP=KP, EP=EP, BM=BM, F64=f64)
    return {"forward": _args(tk._mixture_fwd_kernel, tiles, acc),
            "backward": _args(tk._mixture_bwd_kernel, tiles, acc)}


# The launchers' common case by default: n = 4, bf16 streams, fp32 elsewhere (Cayley's
# caller, projections.cayley, always passes fp64).
OPS_FAST = [("stream_pre", 4, torch.bfloat16), ("stream_merge", 4, torch.bfloat16),
            ("rms_projection", 4, torch.bfloat16), ("odd_polynomial", 4, torch.float32),
            ("cayley", 4, torch.float64), ("sinkhorn", 4, torch.float32), ("basis_mixture", 4, torch.float32)]
OPS_SLOW = [("stream_pre", 8, torch.bfloat16), ("stream_pre", 8, torch.float64),
            ("stream_merge", 8, torch.bfloat16), ("stream_merge", 8, torch.float64),
            ("rms_projection", 8, torch.bfloat16), ("rms_projection", 8, torch.float64),
            ("odd_polynomial", 8, torch.float32), ("odd_polynomial", 8, torch.float64), ("cayley", 8, torch.float64),
            ("sinkhorn", 8, torch.float32), ("sinkhorn", 8, torch.float64),
            ("basis_mixture", 5, torch.float32), ("basis_mixture", 5, torch.float64)]


def _op_params():
    """One pytest.param per (op, forward|backward, n, dtype)."""
    for cases, marks in ((OPS_FAST, []), (OPS_SLOW, [pytest.mark.slow])):
        for op, n, dtype in cases:
            for which in _op_kernels(op, n, dtype):
                yield pytest.param(op, which, n, dtype, marks=marks, id=f"{op}-{which}-{n}-{DTYPES[dtype]}")


@needs_cuobjdump
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("op,which,n,dtype", list(_op_params()))
def test_op_kernels_compile_for_sm90_without_spilling(op, which, n, dtype, tmp_path):
    """Every kernel of triton_kernels (stream ops, projection, Iso-NS, Cayley, Sinkhorn,
    basis mixture) compiles for Hopper with no register spills at the tiles its launcher
    picks; the same bounds as for the coefficient kernels. (The projection backward at
    the forward's 32 × 64 tiles spilled 3 KB per thread at n = 4, 11 KB at n = 8.)"""
    fn, pointers, scalars, constexprs, *warps = _op_kernels(op, n, dtype)[which]
    use = _compile(fn, pointers, scalars, constexprs, tmp_path, *warps)
    assert use["LOCAL"] == 0 and use["STACK"] <= 32, use
    assert use["REG"] <= 255, use
