"""Native CPU kernels for the per-token stream ops, built once per machine and loaded with ctypes.

The kernels (``cpu_native.cpp``, plain C ABI, no torch headers) do in one pass over a
token's rows what the torch path does with one ``torch.bmm`` per contraction:

    pre_fwd(x, h)                        → u                  (H_pre x)
    pre_bwd(x, h, gu, gx, accumulate)    → gx (+)=, gh        (its backward, into ∂x in place)
    merge_fwd(x, h_res, h_post, y)       → out                (H_res x + H_postᵀ y)
    merge_bwd(g, x, h_res, h_post, y)    → gx, ∂h_res, ∂h_post, ∂y   (one pass, not four)
    sinkhorn_fwd(z, iters)               → P                  (per-token Sinkhorn, unrolled map)
    sinkhorn_bwd(z, g, iters)            → ∂z                 (recomputes the iterates)
    poly_fwd(x0, schedule)               → X_S                (Iso-NS's Newton-Schulz steps)
    poly_bwd(x0, schedule, g)            → ∂x0                (recomputes the iterates)
    proj_fwd(x, φ, eps)                  → out, r             ((x φ)·r, r = rsqrt(mean x² + ε))
    proj_bwd(x, φ, g, out, r, gx, acc)   → gx (+)=, ∂φ        (one read of x: ∂x, RMS term, ∂φ)
    gates_fwd(out, α, b, n, kind)        → act, h_pre, h_post, z   (hc/mhc: b + α·act, the gates)
    gates_bwd(g_pre, g_post, d_res, …)   → ∂out, ∂b, ∂α       (its backward, sums over tokens)

Shapes: x, g, gx, out (M, n, C); y, u, gu (M, C); h, h_post (M, n); h_res, z, P (M, n, n);
for the projection x, gx (M, K) with K = n·C, φ (K, N), out (M, N), r (M,);
float32 or float64, contiguous, on the CPU (the wrappers check and raise ``ValueError``).

Backend decision, made once per process at first use (:func:`library`): the library is
compiled with the C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++`` on ``PATH``)
with ``-O3 -march=native -fopenmp`` into a per-user cache (``$HYPERCONN_CACHE``, else
``~/.cache/hyperconn``), keyed by the source, the flags, the compiler and the CPU, and
reused by later processes. Without a compiler, or if the build fails, the ops in
:mod:`.cpu` keep to their torch path and a single warning says why
(:func:`status`). The environment variable ``HYPERCONN_CPU_NATIVE=0`` turns the kernels
off; :func:`force` is the override for tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = ["library", "available", "status", "force", "pre_fwd", "pre_bwd", "merge_fwd", "merge_bwd",
           "sinkhorn_fwd", "sinkhorn_bwd", "poly_fwd", "poly_bwd", "proj_fwd", "proj_bwd", "gates_fwd",
           "gates_bwd", "ENV_VAR"]

ENV_VAR = "HYPERCONN_CPU_NATIVE"
_SOURCE = Path(__file__).with_name("cpu_native.cpp")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
_ABI = 6

_state: dict = {}   # "lib": CDLL | None, "why": str
_forced: list = []  # stack of force() overrides (True / False)


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and flags (Linux), else the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("HYPERCONN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hyperconn")
    return Path(root) / "native"


def _build(cxx: str) -> Path:
    """Compile (or find) the library for this machine; returns its path. Raises on failure.

    With OpenMP first; a compiler without it (Apple's clang) gets a second try without
    ``-fopenmp``: the ``omp`` pragmas are then ignored and the kernels run on one thread."""
    source = _SOURCE.read_bytes()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    errors = []
    for flags in (_FLAGS, tuple(f for f in _FLAGS if f != "-fopenmp")):
        key = hashlib.sha256(source + repr(flags).encode() + version.encode() + _cpu_id().encode()).hexdigest()[:16]
        target = _cache_dir() / f"stream_ops-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build into a private temporary file, then rename: concurrent processes (compare
        # workers, pytest-xdist) never load a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cxx, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                os.replace(tmp, target)
                return target
            errors.append(f"{Path(cxx).name} {' '.join(flags)} failed: {proc.stderr.strip()[-600:]}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("; ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for s in ("f32", "f64"):
        getattr(lib, f"hc_pre_fwd_{s}").argtypes = [p, p, p, i64, i64, i64, i32]
        getattr(lib, f"hc_pre_bwd_{s}").argtypes = [p, p, p, p, i32, p, i64, i64, i64, i32]
        getattr(lib, f"hc_merge_fwd_{s}").argtypes = [p, p, p, p, p, i64, i64, i64, i32]
        getattr(lib, f"hc_merge_bwd_{s}").argtypes = [p, p, p, p, p, p, p, p, p, i64, i64, i64, i32]
        getattr(lib, f"hc_sinkhorn_fwd_{s}").argtypes = [p, p, i64, i64, i32, i32]
        getattr(lib, f"hc_sinkhorn_bwd_{s}").argtypes = [p, p, p, i64, i64, i32, i32]
        getattr(lib, f"hc_poly_fwd_{s}").argtypes = [p, p, i32, p, i64, i64, i32]
        getattr(lib, f"hc_poly_bwd_{s}").argtypes = [p, p, i32, p, p, i64, i64, i32]
        getattr(lib, f"hc_proj_fwd_{s}").argtypes = [p, p, p, p, i64, i64, i64, ctypes.c_double, i32]
        getattr(lib, f"hc_proj_bwd_{s}").argtypes = [p, p, p, p, p, p, i32, p, i64, i64, i64, i32]
        getattr(lib, f"hc_gates_fwd_{s}").argtypes = [p, p, p, p, p, p, p, i64, i64, i32]
        getattr(lib, f"hc_gates_bwd_{s}").argtypes = [p, p, p, p, p, p, p, p, p, p, i64, i64, i32]
        for name in ("pre_fwd", "pre_bwd", "merge_fwd", "merge_bwd", "sinkhorn_fwd", "sinkhorn_bwd",
                     "poly_fwd", "poly_bwd", "proj_fwd", "proj_bwd", "gates_fwd", "gates_bwd"):
            getattr(lib, f"hc_{name}_{s}").restype = None


def _load() -> None:
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "off", "no"):
        _state.update(lib=None, why=f"turned off by {ENV_VAR}")
        return
    cxx = _compiler()
    if cxx is None:
        _state.update(lib=None, why="no C++ compiler found (set CXX or install g++)")
    else:
        try:
            lib = ctypes.CDLL(str(_build(cxx)))
            if lib.hc_abi_version() != _ABI:
                raise RuntimeError(f"stale library (ABI {lib.hc_abi_version()}, expected {_ABI})")
            _declare(lib)
            _state.update(lib=lib, why=f"built with {Path(cxx).name} into {_cache_dir()}")
            return
        except Exception as exc:  # compiler error, timeout, unloadable library
            _state.update(lib=None, why=f"build failed: {type(exc).__name__}: {exc}")
    warnings.warn(f"hyperconn: native CPU stream kernels unavailable ({_state['why']}); "
                  "using the slower torch ops", RuntimeWarning, stacklevel=3)


def library() -> Optional[ctypes.CDLL]:
    """The loaded library, or None when the torch path is to be used (decided once)."""
    if _forced:
        if not _forced[-1]:
            return None
    if "lib" not in _state:
        _load()
    if _forced and _forced[-1] and _state["lib"] is None:
        raise RuntimeError(f"native CPU kernels forced on but unavailable: {_state['why']}")
    return _state["lib"]


def available() -> bool:
    """Whether the ops of :mod:`.cpu` run the native kernels in this process."""
    return library() is not None


def status() -> str:
    """One line: whether the native kernels are in use, and why (or why not)."""
    library()
    return ("native CPU kernels: on, " if _state.get("lib") is not None else "native CPU kernels: off, ") \
        + _state.get("why", "")


@contextlib.contextmanager
def force(enabled: bool):
    """Tests: run the ops of :mod:`.cpu` with the native kernels (``True``; raises
    ``RuntimeError`` at first use if they cannot be built) or with torch (``False``)."""
    _forced.append(bool(enabled))
    try:
        yield
    finally:
        _forced.pop()


# ---------------------------------------------------------------------- wrappers
def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _suffix(x: torch.Tensor, *others: Optional[torch.Tensor]) -> str:
    # Called on every kernel call (several per layer): `is_cpu` and one dict lookup, not
    # `device.type` (5x slower), keep it to ~1 µs.
    dtype = x.dtype
    suffix = _SUFFIX.get(dtype)
    if suffix is None or not x.is_cpu:
        raise ValueError(f"x: expected a float32 or float64 CPU tensor, got {x.dtype} on {x.device}")
    for t in (x, *others):
        if t is not None and (t.dtype != dtype or not t.is_contiguous() or not t.is_cpu):
            raise ValueError(f"expected contiguous {x.dtype} CPU tensors, got {t.dtype}, "
                             f"contiguous={t.is_contiguous()}, {t.device}")
    return suffix


def _threads(work: int = 1 << 30) -> int:
    """OpenMP threads for a kernel touching ``work`` values: torch's thread count, but one
    thread per ≥ 2^16 values at most (a parallel region costs more than small kernels do,
    and on a loaded machine an idle-spinning team stalls the whole call)."""
    return max(1, min(torch.get_num_threads(), work >> 16))


def pre_fwd(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x (M, n, C), h (M, n) → u (M, C) = Σ_j h[:, j] x[:, j]."""
    M, n, C = x.shape
    u = torch.empty(M, C, dtype=x.dtype)
    getattr(library(), f"hc_pre_fwd_{_suffix(x, h, u)}")(_ptr(x), _ptr(h), _ptr(u), M, n, C, _threads(M * n * C))
    return u


def pre_bwd(x: torch.Tensor, h: torch.Tensor, gu: torch.Tensor, gx: Optional[torch.Tensor],
            accumulate: bool, need_gh: bool) -> Optional[torch.Tensor]:
    """Writes (or, with ``accumulate``, adds) h ⊗ gu into ``gx`` (M, n, C) when given;
    returns ∂h (M, n) when ``need_gh``, else None."""
    M, n, C = x.shape
    gh = torch.empty(M, n, dtype=x.dtype) if need_gh else None
    getattr(library(), f"hc_pre_bwd_{_suffix(x, h, gu, gx, gh)}")(
        _ptr(x), _ptr(h), _ptr(gu), _ptr(gx), int(accumulate), _ptr(gh), M, n, C, _threads(M * n * C))
    return gh


def merge_fwd(x: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (M, n, C), h_res (M, n, n), h_post (M, n), y (M, C) → H_res x + h_post ⊗ y (M, n, C)."""
    M, n, C = x.shape
    out = torch.empty_like(x)
    getattr(library(), f"hc_merge_fwd_{_suffix(x, h_res, h_post, y, out)}")(
        _ptr(x), _ptr(h_res), _ptr(h_post), _ptr(y), _ptr(out), M, n, C, _threads(M * n * C))
    return out


def merge_bwd(g: torch.Tensor, x: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor,
              gx: Optional[torch.Tensor], need: tuple[bool, bool, bool]):
    """One pass: writes ∂x into ``gx`` (M, n, C) when given; returns (∂h_res (M, n, n),
    ∂h_post (M, n), ∂y (M, C)), each None where ``need`` says so."""
    M, n, C = x.shape
    ghr = torch.empty(M, n, n, dtype=x.dtype) if need[0] else None
    ghp = torch.empty(M, n, dtype=x.dtype) if need[1] else None
    gy = torch.empty(M, C, dtype=x.dtype) if need[2] else None
    getattr(library(), f"hc_merge_bwd_{_suffix(x, g, h_res, h_post, y, gx, ghr, ghp, gy)}")(
        _ptr(g), _ptr(x), _ptr(h_res), _ptr(h_post), _ptr(y), _ptr(gx), _ptr(ghr), _ptr(ghp), _ptr(gy),
        M, n, C, _threads(M * n * C))
    return ghr, ghp, gy


def sinkhorn_fwd(z: torch.Tensor, iters: int) -> torch.Tensor:
    """Per-token Sinkhorn of logits z (M, n, n), columns then rows, ``iters`` rounds → P;
    a matrix with a non-finite logit gives NaN."""
    M, n, _ = z.shape
    p = torch.empty_like(z)
    getattr(library(), f"hc_sinkhorn_fwd_{_suffix(z, p)}")(_ptr(z), _ptr(p), M, n, int(iters),
                                                             _threads(M * n * n * int(iters)))
    return p


def sinkhorn_bwd(z: torch.Tensor, g: torch.Tensor, iters: int) -> torch.Tensor:
    """∂z of :func:`sinkhorn_fwd` (the truncated map's exact gradient) given ∂P ``g``."""
    M, n, _ = z.shape
    dz = torch.empty_like(z)
    getattr(library(), f"hc_sinkhorn_bwd_{_suffix(z, g, dz)}")(_ptr(z), _ptr(g), _ptr(dz), M, n, int(iters),
                                                               _threads(M * n * n * int(iters)))
    return dz


def _schedule(schedule, dtype) -> torch.Tensor:
    return torch.tensor([float(v) for step in schedule for v in step], dtype=dtype)


def poly_fwd(x0: torch.Tensor, schedule) -> torch.Tensor:
    """The Newton-Schulz steps of ``schedule`` ((a, b, c) per step) on x0 (M, m, m)."""
    M, m, _ = x0.shape
    coef = _schedule(schedule, x0.dtype)
    out = torch.empty_like(x0)
    getattr(library(), f"hc_poly_fwd_{_suffix(x0, coef, out)}")(
        _ptr(x0), _ptr(coef), coef.numel() // 3, _ptr(out), M, m, _threads(M * m * m * coef.numel()))
    return out


def poly_bwd(x0: torch.Tensor, schedule, g: torch.Tensor) -> torch.Tensor:
    """∂x0 of :func:`poly_fwd` given ∂X_S ``g`` (M, m, m)."""
    M, m, _ = x0.shape
    coef = _schedule(schedule, x0.dtype)
    dx = torch.empty_like(x0)
    getattr(library(), f"hc_poly_bwd_{_suffix(x0, coef, g, dx)}")(
        _ptr(x0), _ptr(coef), coef.numel() // 3, _ptr(g), _ptr(dx), M, m, _threads(M * m * m * coef.numel()))
    return dx


def proj_fwd(x: torch.Tensor, phi: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K), φ (K, N) → (out (M, N), r (M,)) with r = rsqrt(mean(x², over K) + eps) and
    out = (x φ) · r: the GEMM and the sum of squares from one read of x."""
    M, K = x.shape
    if phi.dim() != 2 or phi.shape[0] != K:
        raise ValueError(f"phi: expected shape ({K}, N), got {tuple(phi.shape)}")
    N = phi.shape[1]
    out = torch.empty(M, N, dtype=x.dtype)
    inv = torch.empty(M, dtype=x.dtype)
    getattr(library(), f"hc_proj_fwd_{_suffix(x, phi, out, inv)}")(
        _ptr(x), _ptr(phi), _ptr(out), _ptr(inv), M, K, N, float(eps), _threads(M * K))
    return out, inv


def proj_bwd(x: torch.Tensor, phi: torch.Tensor, grad: torch.Tensor, out: torch.Tensor, inv: torch.Tensor,
             gx: Optional[torch.Tensor], accumulate: bool, need_gphi: bool) -> Optional[torch.Tensor]:
    """Backward of :func:`proj_fwd` given ∂out ``grad`` (M, N) and its outputs ``out``, ``inv``:
    writes (with ``accumulate``, adds) ∂x into ``gx`` (M, K) when given, the RMS term
    included; returns ∂φ (K, N) when ``need_gphi``, else None. One read of x."""
    M, K = x.shape
    N = phi.shape[1] if phi.dim() == 2 else -1
    for name, t, want in (("phi", phi, (K, N)), ("grad", grad, (M, N)), ("out", out, (M, N)), ("inv", inv, (M,)),
                          ("gx", gx, (M, K))):
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    gphi = torch.empty(K, N, dtype=x.dtype) if need_gphi else None
    getattr(library(), f"hc_proj_bwd_{_suffix(x, phi, grad, out, inv, gx, gphi)}")(
        _ptr(x), _ptr(phi), _ptr(grad), _ptr(out), _ptr(inv), _ptr(gx), int(accumulate), _ptr(gphi),
        M, K, N, _threads(M * K))
    return gphi


GATE_KINDS = {"sinkhorn": 0, "linear": 1}


def gates_fwd(out: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, n: int, kind: str):
    """hc's / mhc's gates from the scaled projection ``out`` (M, n² + 2n), α (3,) and the
    static logits ``bias`` (n² + 2n,): (act (M, N) or None for mhc, whose act is ``out``;
    h_pre (M, n); h_post (M, n); z (M, n, n): mhc's Sinkhorn logits, hc's H_res)."""
    M, N = out.shape
    if N != n * n + 2 * n or tuple(alpha.shape) != (3,) or tuple(bias.shape) != (N,) or kind not in GATE_KINDS:
        raise ValueError(f"gates_fwd: expected out (M, {n * n + 2 * n}), alpha (3,), bias ({N},) and kind in "
                         f"{sorted(GATE_KINDS)}; got {tuple(out.shape)}, {tuple(alpha.shape)}, {tuple(bias.shape)}, "
                         f"{kind!r}")
    act = torch.empty_like(out) if kind == "linear" else None
    h_pre, h_post, z = (torch.empty(M, n, dtype=out.dtype), torch.empty(M, n, dtype=out.dtype),
                        torch.empty(M, n, n, dtype=out.dtype))
    getattr(library(), f"hc_gates_fwd_{_suffix(out, alpha, bias, act, h_pre, h_post, z)}")(
        _ptr(out), _ptr(alpha), _ptr(bias), _ptr(act), _ptr(h_pre), _ptr(h_post), _ptr(z), M, n, GATE_KINDS[kind])
    return act, h_pre, h_post, z


def gates_bwd(g_pre: torch.Tensor, g_post: torch.Tensor, d_res: torch.Tensor, h_pre: torch.Tensor,
              h_post: torch.Tensor, act: torch.Tensor, alpha: torch.Tensor, kind: str):
    """Backward of :func:`gates_fwd` given ∂h_pre, ∂h_post (M, n) and ∂raw_res (M, n, n)
    (mhc: the Sinkhorn backward's output; hc: ∂H_res), its outputs h_pre, h_post and
    ``act`` (mhc: ``out``): (∂out (M, N), ∂bias (N,), ∂α (3,))."""
    M, n = h_pre.shape
    N = n * n + 2 * n
    for name, t, want in (("g_pre", g_pre, (M, n)), ("g_post", g_post, (M, n)), ("d_res", d_res, (M, n, n)),
                          ("h_post", h_post, (M, n)), ("act", act, (M, N)), ("alpha", alpha, (3,))):
        if tuple(t.shape) != want:
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    grad_out = torch.empty(M, N, dtype=act.dtype)
    gb, galpha = torch.empty(N, dtype=act.dtype), torch.empty(3, dtype=act.dtype)
    getattr(library(), f"hc_gates_bwd_{_suffix(act, g_pre, g_post, d_res, h_pre, h_post, alpha, grad_out, gb, galpha)}")(
        _ptr(g_pre), _ptr(g_post), _ptr(d_res), _ptr(h_pre), _ptr(h_post), _ptr(act), _ptr(alpha), _ptr(grad_out),
        _ptr(gb), _ptr(galpha), M, n, GATE_KINDS[kind])
    return grad_out, gb, galpha
