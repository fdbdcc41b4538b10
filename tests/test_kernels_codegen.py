"""The fused coefficient kernels compiled for a real GPU (sm_90, Hopper) without one.

Triton's interpreter runs a kernel as NumPy, so it cannot see what only the compiler
does: type errors in the generated code, and registers spilling to local memory (a
kernel that spills can be many times slower, and the interpreter is none the wiser).
``triton.compile`` with an explicit ``GPUTarget`` runs the whole pipeline to a cubin on
any machine, and the ``cuobjdump`` that ships with Triton reads its resource use. The
n = 8 and fp64 cases take ~20 s each and are marked slow (``pytest -m slow``).
"""

from __future__ import annotations

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


def _compile(fn, pointers: dict, scalars: dict, constexprs: dict, tmp_path) -> dict:
    """Compile ``fn`` for sm_90 and return its resource use: {"REG": …, "LOCAL": …, …}."""
    given = {**pointers, **scalars, **{k: "constexpr" for k in constexprs}}
    names = list(fn.arg_names)  # in the kernel's parameter order
    assert set(names) == set(given), set(names) ^ set(given)
    signature = {k: given[k] for k in names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
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
    fwd_ptrs.update(u_ptr="*fp64", coef_ptr="*fp64")
    fwd = (tc._coef_fwd_kernel, fwd_ptrs, dict(M="i32", K="i32", eps="fp32", STEPS="i32"),
           dict(common, NP=NP, BM=BM, BK=BK, BMI=min(BM, BMI)))
    names = ["out_ptr", "rinv_ptr", "bias_ptr", "alpha_ptr", "gpre_ptr", "gpost_ptr", "gres_ptr", "draw_ptr",
             "gp_ptr", "rs_ptr"]
    bwd_ptrs = {k: f"*{acc}" for k in names}
    bwd_ptrs.update(hist_ptr="*fp64" if res == tc.ISO else f"*{acc}", u_ptr="*fp64", coef_ptr="*fp64")
    bwd = (tc._coef_maps_bwd_kernel, bwd_ptrs, dict(M="i32", K="i32", STEPS="i32"), dict(common, BM=BMI))
    return fwd, bwd


FAST = [(tc.SINKHORN, 4, torch.float32), (tc.ISO, 4, torch.float32), (tc.LINEAR, 4, torch.float32)]
SLOW = [(tc.SINKHORN, 8, torch.float32), (tc.SINKHORN, 8, torch.float64), (tc.ISO, 3, torch.float64),
        (tc.ISO, 5, torch.float32), (tc.ISO, 8, torch.float32), (tc.LINEAR, 8, torch.float32)]


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
