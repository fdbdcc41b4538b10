"""Fused Triton kernels for the per-token hyper-connection ops (forward and backward).

Plain launch functions (forward and backward of each op); :mod:`.triton_backend` registers
them as custom ops. Importing this module imports Triton; :mod:`hyperconn.ops` does so
lazily, only when the Triton backend is selected. Whether the kernels run compiled (CUDA) or in
Triton's CPU interpreter is fixed when this module is first imported: ``TRITON_INTERPRET=1``
must be in the environment before that (``INTERPRETED`` records which one happened).

Layout: inputs are flattened to tokens, streams ``(M, n, C)``, coefficients ``(M, n)`` /
``(M, n, n)`` or shared ``(n,)`` / ``(n, n)`` (passed with token stride 0). ``n`` is a
compile-time constant, padded to a power of two ``NP`` with masks. Arithmetic is fp32
(fp64 when an input is fp64, selected by the ``F64`` constexpr); stores cast to the
destination dtype.

Work split:
  * forward stream ops: grid (tokens, C-blocks); each program reads its x tile once and
    writes its output tile once.
  * backward stream ops: one program per token looping over C, so the coefficient
    gradients (reductions over C) stay in registers; they are written per token in the
    compute dtype and summed over tokens on the host when the coefficients are shared.
  * RMS projection: ``BM`` tokens per program, the (BM, n·C) rows streamed in ``BK``
    chunks through one ``tl.dot`` with φ and one sum of squares (one read of the streams);
    backward: one program per (K-chunk, token group) writes ∂x for its chunk and keeps
    its part of ∂φ in registers (one more read of the streams; partials summed on the host).
  * Odd-polynomial (Newton-Schulz) iterations of Iso-NS: ``BM`` tokens per program,
    (BM, MP, MP) tiles, zero padding (which the polynomial keeps at zero); products as
    broadcast-and-sum in registers. Backward recomputes the iterates into a scratch
    buffer (S·m² values per token), then runs the reverse sweep.
  * Cayley map: the same tiles, Gauss-Jordan without pivoting on [I + K | I − K];
    backward in closed form from Q (torch ops, :mod:`.triton_backend`).
  * Sinkhorn: ``BM`` tokens per program, (BM, NP, NP) tiles, -inf padding. Backward
    stores nothing from the forward: it recomputes the iterations keeping only the
    per-iteration log-scalings (2·iters·n values per token, in a scratch buffer) and then runs
    the reverse sweep of the unrolled map.
"""

from __future__ import annotations

import torch
import triton

from .._dtypes import compute_dtype
import triton.language as tl

try:  # the interpreter's function type tells which mode the @triton.jit below chose
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ImportError:  # pragma: no cover - very old or very new Triton
    _Interpreted = ()

__all__ = ["stream_pre_forward", "stream_pre_backward", "stream_merge_forward", "stream_merge_backward",
           "rms_projection_forward", "rms_projection_backward", "rms_projection_operands_backward", "odd_polynomial_forward",
           "odd_polynomial_backward", "cayley_forward", "MAX_POLY_M",
           "basis_mixture_forward", "basis_mixture_backward", "MAX_MIXTURE_K",
           "sinkhorn_forward", "sinkhorn_backward", "INTERPRETED", "MAX_SINKHORN_N"]

MAX_SINKHORN_N = 8
MAX_POLY_M = 8
MAX_MIXTURE_K = 128  # mHC-lite's 5! = 120 permutations at n = 5
MAX_MIXTURE_TILE = 4096  # K·E padded to powers of two: one token's (K, E) tile in registers
#                          (5! × 5² → 128 × 32 compiles without spilling on sm_90)


def _np2(v: int) -> int:
    """Next power of two, at least 2 (keeps every tl.arange non-trivial)."""
    return max(2, triton.next_power_of_2(int(v)))


# ====================================================================== jit helpers
@triton.jit
def _acc(v, F64: tl.constexpr):
    if F64:
        r = v.to(tl.float64)
    else:
        r = v.to(tl.float32)
    return r


@triton.jit
def _lse(z, AXIS: tl.constexpr):
    """log-sum-exp over AXIS (reduced away). All -inf (padding) slices give 0, so
    subtracting it leaves padding at -inf and no NaN is ever formed."""
    m = tl.max(z, axis=AXIS)
    m = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.exp(z - tl.expand_dims(m, AXIS)), axis=AXIS)
    return m + tl.log(tl.where(s == 0.0, 1.0, s))


# ====================================================================== stream_pre
@triton.jit
def _pre_fwd_kernel(x_ptr, h_ptr, out_ptr, C, h_stride,
                    N: tl.constexpr, NP: tl.constexpr, BLOCK_C: tl.constexpr, F64: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, NP)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask, cmask = rows < N, cols < C
    h = _acc(tl.load(h_ptr + m * h_stride + rows, mask=rmask, other=0.0), F64)
    x = tl.load(x_ptr + m * N * C + rows[:, None] * C + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0)
    out = tl.sum(h[:, None] * _acc(x, F64), axis=0)
    tl.store(out_ptr + m * C + cols, out.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _pre_bwd_kernel(x_ptr, h_ptr, g_ptr, dx_ptr, dh_ptr, C, h_stride,
                    N: tl.constexpr, NP: tl.constexpr, BLOCK_C: tl.constexpr, F64: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, NP)
    rmask = rows < N
    h = _acc(tl.load(h_ptr + m * h_stride + rows, mask=rmask, other=0.0), F64)
    dh = _acc(tl.zeros((NP,), tl.float32), F64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask2 = rmask[:, None] & cmask[None, :]
        offs = m * N * C + rows[:, None] * C + cols[None, :]
        g = _acc(tl.load(g_ptr + m * C + cols, mask=cmask, other=0.0), F64)
        x = _acc(tl.load(x_ptr + offs, mask=mask2, other=0.0), F64)
        tl.store(dx_ptr + offs, (h[:, None] * g[None, :]).to(dx_ptr.dtype.element_ty), mask=mask2)
        dh += tl.sum(x * g[None, :], axis=1)
    tl.store(dh_ptr + m * N + rows, dh, mask=rmask)


# ====================================================================== stream_merge
@triton.jit
def _merge_fwd_kernel(x_ptr, hr_ptr, hp_ptr, y_ptr, out_ptr, C, hr_stride, hp_stride,
                      N: tl.constexpr, NP: tl.constexpr, BLOCK_C: tl.constexpr, F64: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, NP)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask, cmask = rows < N, cols < C
    hp = _acc(tl.load(hp_ptr + m * hp_stride + rows, mask=rmask, other=0.0), F64)
    y = _acc(tl.load(y_ptr + m * C + cols, mask=cmask, other=0.0), F64)
    out = hp[:, None] * y[None, :]
    x_base = x_ptr + m * N * C
    for j in tl.static_range(N):  # each stream row of x is read exactly once
        h_col = _acc(tl.load(hr_ptr + m * hr_stride + rows * N + j, mask=rmask, other=0.0), F64)
        xj = _acc(tl.load(x_base + j * C + cols, mask=cmask, other=0.0), F64)
        out += h_col[:, None] * xj[None, :]
    tl.store(out_ptr + m * N * C + rows[:, None] * C + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _merge_bwd_kernel(x_ptr, hr_ptr, hp_ptr, y_ptr, g_ptr,
                      dx_ptr, dhr_ptr, dhp_ptr, dy_ptr, C, hr_stride, hp_stride,
                      N: tl.constexpr, NP: tl.constexpr, BLOCK_C: tl.constexpr, F64: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, NP)
    rmask = rows < N
    jcols = tl.arange(0, NP)[None, :]
    hp = _acc(tl.load(hp_ptr + m * hp_stride + rows, mask=rmask, other=0.0), F64)
    dhp = _acc(tl.zeros((NP,), tl.float32), F64)
    dhr = _acc(tl.zeros((NP, NP), tl.float32), F64)
    x_base = x_ptr + m * N * C
    dx_base = dx_ptr + m * N * C
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        g = _acc(tl.load(g_ptr + m * N * C + rows[:, None] * C + cols[None, :],
                         mask=rmask[:, None] & cmask[None, :], other=0.0), F64)
        y = _acc(tl.load(y_ptr + m * C + cols, mask=cmask, other=0.0), F64)
        dy = tl.sum(hp[:, None] * g, axis=0)
        tl.store(dy_ptr + m * C + cols, dy.to(dy_ptr.dtype.element_ty), mask=cmask)
        dhp += tl.sum(g * y[None, :], axis=1)
        for j in tl.static_range(N):
            h_col = _acc(tl.load(hr_ptr + m * hr_stride + rows * N + j, mask=rmask, other=0.0), F64)
            xj = _acc(tl.load(x_base + j * C + cols, mask=cmask, other=0.0), F64)
            dxj = tl.sum(h_col[:, None] * g, axis=0)  # Σ_i h_res[i, j] g[i]
            tl.store(dx_base + j * C + cols, dxj.to(dx_ptr.dtype.element_ty), mask=cmask)
            part = tl.sum(g * xj[None, :], axis=1)    # ⟨g[i], x[j]⟩ over this block
            dhr += tl.where(jcols == j, part[:, None], 0.0)
    tl.store(dhp_ptr + m * N + rows, dhp, mask=rmask)
    tl.store(dhr_ptr + m * N * N + rows[:, None] * N + jcols, dhr,
             mask=rmask[:, None] & (jcols < N))


# ====================================================================== rms projection
@triton.jit
def _dot(a, b):
    """a @ b of fp32 (or fp64) tiles, IEEE products (no TF32 rounding). This GEMM has only
    N = n² + 2n columns: it is bound by reading the streams, not by the multiply, so
    tensor-core precision would buy nothing here."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _rms_proj_fwd_kernel(x_ptr, phi_ptr, out_ptr, rinv_ptr, M, K, eps,
                         N: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                         F64: tl.constexpr):
    tok = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    cols = tl.arange(0, NP)
    tmask, nmask = tok < M, cols < N
    acc = _acc(tl.zeros((BM, NP), tl.float32), F64)
    ss = _acc(tl.zeros((BM,), tl.float32), F64)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        x = _acc(tl.load(x_ptr + tok[:, None] * K + ks[None, :], mask=tmask[:, None] & kmask[None, :],
                         other=0.0), F64)
        phi = _acc(tl.load(phi_ptr + ks[:, None] * N + cols[None, :], mask=kmask[:, None] & nmask[None, :],
                           other=0.0), F64)
        acc += _dot(x, phi)
        ss += tl.sum(x * x, axis=1)
    rinv = 1.0 / tl.sqrt(ss / K + eps)
    tl.store(out_ptr + tok[:, None] * N + cols[None, :], acc * rinv[:, None], mask=tmask[:, None] & nmask[None, :])
    tl.store(rinv_ptr + tok, rinv, mask=tmask)


@triton.jit
def _rms_proj_bwd_kernel(x_ptr, phi_ptr, gp_ptr, rs_ptr, dx_ptr, dphi_ptr, h_ptr, gu_ptr, pending_ptr, M, K, C,
                         GROUPS, N: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                         S: tl.constexpr, PRE: tl.constexpr, ACC: tl.constexpr, F64: tl.constexpr):
    # dx = gp φᵀ + x·rs (per token), dφ = xᵀ gp; gp = ∂out · r (M, N), rs the RMS term (M,).
    # PRE: also the ∂x of u = H_pre x in the same store, dx[j, c] += h[j]·gu[c] (h (M, S),
    # gu (M, C)), so a layer that reads H_pre x from the streams writes one ∂x, not two.
    # ACC: and the layer's ∂x so far (the merge's, (M, K) in x's dtype), so autograd does
    # not add the two in another pass over the streams.
    kb, grp = tl.program_id(0), tl.program_id(1)
    ks = kb * BK + tl.arange(0, BK)
    cols = tl.arange(0, NP)
    kmask, nmask = ks < K, cols < N
    phi = _acc(tl.load(phi_ptr + ks[:, None] * N + cols[None, :], mask=kmask[:, None] & nmask[None, :],
                       other=0.0), F64)
    dphi = _acc(tl.zeros((BK, NP), tl.float32), F64)
    for tb in range(grp, tl.cdiv(M, BM), GROUPS):
        tok = (tb * BM + tl.arange(0, BM)).to(tl.int64)
        tmask = tok < M
        xmask = tmask[:, None] & kmask[None, :]
        x = _acc(tl.load(x_ptr + tok[:, None] * K + ks[None, :], mask=xmask, other=0.0), F64)
        gp = _acc(tl.load(gp_ptr + tok[:, None] * N + cols[None, :], mask=tmask[:, None] & nmask[None, :],
                          other=0.0), F64)
        rs = _acc(tl.load(rs_ptr + tok, mask=tmask, other=0.0), F64)
        dx = _dot(gp, tl.trans(phi)) + x * rs[:, None]
        if PRE:
            j = ks // C
            hj = _acc(tl.load(h_ptr + tok[:, None] * S + j[None, :], mask=xmask, other=0.0), F64)
            gu = _acc(tl.load(gu_ptr + tok[:, None] * C + (ks - j * C)[None, :], mask=xmask, other=0.0), F64)
            dx += hj * gu
        if ACC:
            dx += _acc(tl.load(pending_ptr + tok[:, None] * K + ks[None, :], mask=xmask, other=0.0), F64)
        tl.store(dx_ptr + tok[:, None] * K + ks[None, :], dx.to(dx_ptr.dtype.element_ty), mask=xmask)
        dphi += _dot(tl.trans(x), gp)
    tl.store(dphi_ptr + grp.to(tl.int64) * K * N + ks[:, None] * N + cols[None, :], dphi,
             mask=kmask[:, None] & nmask[None, :])


# ====================================================================== odd polynomial (Iso-NS)
@triton.jit
def _bmm(a, b):
    """Per-token products of (BM, P, P) tiles: out[t] = a[t] @ b[t]."""
    return tl.sum(tl.expand_dims(a, 3) * tl.expand_dims(b, 1), axis=2)


@triton.jit
def _bmm_tn(a, b):
    """out[t] = a[t]ᵀ @ b[t]."""
    return tl.sum(tl.expand_dims(a, 3) * tl.expand_dims(b, 2), axis=1)


@triton.jit
def _poly_tile(M, MM: tl.constexpr, MP: tl.constexpr, BM: tl.constexpr):
    tok = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    i = tl.arange(0, MP)[None, :, None]
    j = tl.arange(0, MP)[None, None, :]
    valid = (tok[:, None, None] < M) & (i < MM) & (j < MM)
    return tok, tok[:, None, None] * (MM * MM) + i * MM + j, valid, i * MP + j


@triton.jit
def _poly_step(x, a, b, c):
    gram = _bmm_tn(x, x)
    m = b * gram + c * _bmm(gram, gram)
    return a * x + _bmm(x, m)


@triton.jit
def _poly_fwd_kernel(x_ptr, coef_ptr, y_ptr, M, S,
                     MM: tl.constexpr, MP: tl.constexpr, BM: tl.constexpr, F64: tl.constexpr):
    tok, offs, valid, _ = _poly_tile(M, MM, MP, BM)
    x = _acc(tl.load(x_ptr + offs, mask=valid, other=0.0), F64)
    for s in range(S):
        a = _acc(tl.load(coef_ptr + 3 * s), F64)
        b = _acc(tl.load(coef_ptr + 3 * s + 1), F64)
        c = _acc(tl.load(coef_ptr + 3 * s + 2), F64)
        x = _poly_step(x, a, b, c)
    tl.store(y_ptr + offs, x.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _poly_bwd_kernel(x_ptr, coef_ptr, g_ptr, dx_ptr, hist_ptr, M, S,
                     MM: tl.constexpr, MP: tl.constexpr, BM: tl.constexpr, F64: tl.constexpr):
    # With A = XᵀX, Mx = aI + bA + cA², W = XᵀG, Z = bW + c(WA + AW):
    # ∂X = G Mx + X (Z + Zᵀ), step by step from the last iterate back to X0.
    tok, offs, valid, tile = _poly_tile(M, MM, MP, BM)
    h_base = tok[:, None, None] * (S * MP * MP) + tile
    h_mask = (tok < M)[:, None, None] & (tile >= 0)
    x = _acc(tl.load(x_ptr + offs, mask=valid, other=0.0), F64)
    for s in range(S):  # recompute the iterates X_0 … X_{S-1} into the scratch buffer
        tl.store(hist_ptr + h_base + s * (MP * MP), x, mask=h_mask)
        a = _acc(tl.load(coef_ptr + 3 * s), F64)
        b = _acc(tl.load(coef_ptr + 3 * s + 1), F64)
        c = _acc(tl.load(coef_ptr + 3 * s + 2), F64)
        x = _poly_step(x, a, b, c)
    tl.debug_barrier()  # the reverse sweep reads what this block wrote
    g = _acc(tl.load(g_ptr + offs, mask=valid, other=0.0), F64)
    for r in range(S):
        s = S - 1 - r
        x = tl.load(hist_ptr + h_base + s * (MP * MP), mask=h_mask, other=0.0)
        a = _acc(tl.load(coef_ptr + 3 * s), F64)
        b = _acc(tl.load(coef_ptr + 3 * s + 1), F64)
        c = _acc(tl.load(coef_ptr + 3 * s + 2), F64)
        gram = _bmm_tn(x, x)
        w = _bmm_tn(x, g)
        mx = b * gram + c * _bmm(gram, gram)
        z = b * w + c * (_bmm(w, gram) + _bmm(gram, w))
        g = a * g + _bmm(g, mx) + _bmm(x, z + tl.permute(z, 0, 2, 1))
    tl.store(dx_ptr + offs, g.to(dx_ptr.dtype.element_ty), mask=valid)


# ====================================================================== Cayley
@triton.jit
def _cayley_fwd_kernel(a_ptr, q_ptr, M, MM: tl.constexpr, MP: tl.constexpr, BM: tl.constexpr,
                       F64: tl.constexpr):
    # Q = (I + K)⁻¹ (I − K), K = (A − Aᵀ)/2, by Gauss-Jordan on [I + K | I − K] in registers.
    # No pivoting: I + K has symmetric part I, so every pivot is ≥ 1 (positive definite
    # leading blocks). Padding rows/columns are the identity on the left, zero on the right.
    tok, offs, valid, _ = _poly_tile(M, MM, MP, BM)
    i = tl.arange(0, MP)[None, :, None]
    j = tl.arange(0, MP)[None, None, :]
    tok_t = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)[:, None, None]
    offs_t = tok_t * (MM * MM) + j * MM + i
    a = _acc(tl.load(a_ptr + offs, mask=valid, other=0.0), F64)
    at = _acc(tl.load(a_ptr + offs_t, mask=valid, other=0.0), F64)
    k_skew = 0.5 * (a - at)
    eye = tl.where(i == j, 1.0, 0.0)
    left = eye + k_skew
    right = tl.where((i < MM) & (j < MM), eye - k_skew, 0.0)
    for k in tl.static_range(MM):
        row_l = tl.sum(tl.where(i == k, left, 0.0), axis=1)        # (BM, MP): row k
        row_r = tl.sum(tl.where(i == k, right, 0.0), axis=1)
        piv = tl.sum(tl.where(tl.arange(0, MP)[None, :] == k, row_l, 0.0), axis=1)   # (BM,)
        piv = tl.where(piv == 0.0, 1.0, piv)                        # masked (padding) tokens
        row_l = row_l / piv[:, None]
        row_r = row_r / piv[:, None]
        col = tl.sum(tl.where(j == k, left, 0.0), axis=2)           # (BM, MP): column k
        left = tl.where(i == k, row_l[:, None, :], left - col[:, :, None] * row_l[:, None, :])
        right = tl.where(i == k, row_r[:, None, :], right - col[:, :, None] * row_r[:, None, :])
    tl.store(q_ptr + offs, right.to(q_ptr.dtype.element_ty), mask=valid)


# ====================================================================== basis mixture
@triton.jit
def _mixture_tile(M, K: tl.constexpr, E: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr,
                  BM: tl.constexpr):
    tok = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)[:, None]     # (BM, 1)
    k = tl.arange(0, KP)[None, :]                                               # (1, KP)
    e = tl.arange(0, EP)[None, :]                                               # (1, EP)
    return tok, k, e


@triton.jit
def _mixture_weights(z_ptr, tok, k, M, K: tl.constexpr, F64: tl.constexpr):
    # softmax over the K logits of each token; padding logits are −inf (weight 0), masked
    # tokens read zeros (finite, never stored).
    z = _acc(tl.load(z_ptr + tok * K + k, mask=(tok < M) & (k < K), other=0.0), F64)
    z = tl.where(k < K, z, float("-inf"))
    p = tl.exp(z - tl.max(z, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _mixture_basis(b_ptr, K: tl.constexpr, E: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr,
                   F64: tl.constexpr):
    kb = tl.arange(0, KP)[:, None]
    eb = tl.arange(0, EP)[None, :]
    return _acc(tl.load(b_ptr + kb * E + eb, mask=(kb < K) & (eb < E), other=0.0), F64)   # (KP, EP)


@triton.jit
def _mixture_fwd_kernel(z_ptr, b_ptr, h_ptr, M, K: tl.constexpr, E: tl.constexpr, KP: tl.constexpr,
                        EP: tl.constexpr, BM: tl.constexpr, F64: tl.constexpr):
    # H[t] = softmax(z[t]) B: the weights never leave registers.
    tok, k, e = _mixture_tile(M, K, E, KP, EP, BM)
    w = _mixture_weights(z_ptr, tok, k, M, K, F64)                               # (BM, KP)
    basis = _mixture_basis(b_ptr, K, E, KP, EP, F64)
    h = tl.sum(w[:, :, None] * basis[None, :, :], axis=1)                        # (BM, EP)
    tl.store(h_ptr + tok * E + e, h.to(h_ptr.dtype.element_ty), mask=(tok < M) & (e < E))


@triton.jit
def _mixture_bwd_kernel(z_ptr, b_ptr, g_ptr, dz_ptr, M, K: tl.constexpr, E: tl.constexpr,
                        KP: tl.constexpr, EP: tl.constexpr, BM: tl.constexpr, F64: tl.constexpr):
    # ∂w = G Bᵀ, ∂z = w ⊙ (∂w − ⟨w, ∂w⟩): the softmax's Jacobian-vector product, with w
    # recomputed from the logits (only they are kept).
    tok, k, e = _mixture_tile(M, K, E, KP, EP, BM)
    w = _mixture_weights(z_ptr, tok, k, M, K, F64)
    basis = _mixture_basis(b_ptr, K, E, KP, EP, F64)
    g = _acc(tl.load(g_ptr + tok * E + e, mask=(tok < M) & (e < E), other=0.0), F64)   # (BM, EP)
    dw = tl.sum(basis[None, :, :] * g[:, None, :], axis=2)                       # (BM, KP)
    dz = w * (dw - tl.sum(w * dw, axis=1)[:, None])
    tl.store(dz_ptr + tok * K + k, dz.to(dz_ptr.dtype.element_ty), mask=(tok < M) & (k < K))


# ====================================================================== sinkhorn
@triton.jit
def _sinkhorn_iterate(z, ITERS: tl.constexpr):
    """ITERS log-domain Sinkhorn steps on a (BM, NP, NP) tile (−inf padding): columns, then
    rows (last: row sums exact). Returns log P."""
    for _ in range(ITERS):
        z = z - tl.expand_dims(_lse(z, 1), 1)  # columns
        z = z - tl.expand_dims(_lse(z, 2), 2)  # rows
    return z


@triton.jit
def _sinkhorn_vjp(z, g, hist_ptr, h_offs, h_mask, k, ITERS: tl.constexpr, N: tl.constexpr, NP: tl.constexpr):
    """∂logits of the unrolled Sinkhorn at logits z (BM, NP, NP; −inf padding) for ∂P = g.

    Stores nothing from a forward: recomputes the iterations keeping only the
    per-iteration log-scalings, column c_t[j] and row r_t[i], in a scratch buffer
    (``hist_ptr + h_offs``: ITERS·2·NP values per token; O(ITERS) work, where an
    in-register history indexed by t would cost O(ITERS²) selects), then runs the
    reverse sweep."""
    # Recompute the forward: u_t = z_{t-1} - c_t, z_t = u_t - r_t.
    for t in range(ITERS):
        c = _lse(z, 1)
        z = z - c[:, None, :]
        r = _lse(z, 2)
        z = z - r[:, :, None]
        tl.store(hist_ptr + h_offs + (2 * t) * NP, tl.where(k[None, :] < N, c, 0.0), mask=h_mask)
        tl.store(hist_ptr + h_offs + (2 * t + 1) * NP, tl.where(k[None, :] < N, r, 0.0), mask=h_mask)
    tl.debug_barrier()  # the reverse sweep reads what this program wrote
    # Reverse sweep. P = exp(z_T); dL/dz_T = G ⊙ P. Row step z = u - LSE_row(u):
    # ū = z̄ - exp(z) ⊙ rowsum(z̄). Column step u = z' - LSE_col(z'): z̄' = ū - exp(u) ⊙ colsum(ū).
    gz = g * tl.exp(z)
    for s in range(ITERS):
        t = ITERS - 1 - s
        c = tl.load(hist_ptr + h_offs + (2 * t) * NP, mask=h_mask, other=0.0)
        r = tl.load(hist_ptr + h_offs + (2 * t + 1) * NP, mask=h_mask, other=0.0)
        gu = gz - tl.exp(z) * tl.expand_dims(tl.sum(gz, axis=2), 2)
        u = z + r[:, :, None]
        gz = gu - tl.exp(u) * tl.expand_dims(tl.sum(gu, axis=1), 1)
        z = u + c[:, None, :]
    return gz


@triton.jit
def _sinkhorn_tile(M, N: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr):
    tok = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    i = tl.arange(0, NP)[None, :, None]
    j = tl.arange(0, NP)[None, None, :]
    valid = (tok[:, None, None] < M) & (i < N) & (j < N)
    offs = tok[:, None, None] * (N * N) + i * N + j
    return offs, valid


@triton.jit
def _sinkhorn_fwd_kernel(z_ptr, p_ptr, M, ITERS: tl.constexpr,
                         N: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr, F64: tl.constexpr):
    offs, valid = _sinkhorn_tile(M, N, NP, BM)
    z = _sinkhorn_iterate(_acc(tl.load(z_ptr + offs, mask=valid, other=float("-inf")), F64), ITERS)
    tl.store(p_ptr + offs, tl.exp(z).to(p_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _sinkhorn_bwd_kernel(z_ptr, g_ptr, dz_ptr, hist_ptr, M, ITERS: tl.constexpr,
                         N: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr, F64: tl.constexpr):
    offs, valid = _sinkhorn_tile(M, N, NP, BM)
    z = _acc(tl.load(z_ptr + offs, mask=valid, other=float("-inf")), F64)
    g = _acc(tl.load(g_ptr + offs, mask=valid, other=0.0), F64)
    tok = tl.program_id(0) * BM + tl.arange(0, BM)
    k = tl.arange(0, NP)
    h_offs = tok.to(tl.int64)[:, None] * (ITERS * 2 * NP) + k[None, :]
    h_mask = (tok < M)[:, None] & (k < NP)[None, :]
    gz = _sinkhorn_vjp(z, g, hist_ptr, h_offs, h_mask, k, ITERS, N, NP)
    tl.store(dz_ptr + offs, gz.to(dz_ptr.dtype.element_ty), mask=valid)


# ====================================================================== launchers
def _block_c(C: int, NP: int, block_c) -> int:
    if block_c is not None:
        return _np2(block_c)
    return min(_np2(C), max(16, 4096 // NP))


def _is_f64(*tensors) -> bool:
    return any(t.dtype == torch.float64 for t in tensors)


_acc_dtype = compute_dtype


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if grad.shape != like.shape:
        grad = grad.sum(0)
    return grad.to(like.dtype)


def stream_pre_forward(x, h, block_c=None):
    """``Σ_j h[j] x[j]``: x (..., n, C), h (..., n) | (n,) → (..., C) in ``x.dtype``."""
    n, C = x.shape[-2:]
    lead = x.shape[:-2]
    x3 = x.contiguous().view(-1, n, C)
    hc = h.contiguous()
    h_stride = 0 if h.dim() == 1 and len(lead) != 0 else n
    M = x3.shape[0]
    out = torch.empty((M, C), dtype=x.dtype, device=x.device)
    NP, BC = _np2(n), _block_c(C, _np2(n), block_c)
    _pre_fwd_kernel[(M, triton.cdiv(C, BC))](
        x3, hc, out, C, h_stride, N=n, NP=NP, BLOCK_C=BC, F64=_is_f64(x, h))
    return out.view(*lead, C)


def stream_pre_backward(x, h, grad_out, block_c=None):
    """(∂x, ∂h) of :func:`stream_pre_forward`; ∂h summed over tokens when h is shared."""
    n, C = x.shape[-2:]
    lead = x.shape[:-2]
    x3 = x.contiguous().view(-1, n, C)
    hc = h.contiguous()
    h_stride = 0 if h.dim() == 1 and len(lead) != 0 else n
    M = x3.shape[0]
    BC = _block_c(C, _np2(n), block_c)
    g = grad_out.contiguous().view(M, C)
    dx = torch.empty_like(x3)
    dh = torch.empty((M, n), dtype=_acc_dtype(x3, hc, g), device=x3.device)
    _pre_bwd_kernel[(M,)](x3, hc, g, dx, dh, C, h_stride,
                          N=n, NP=_np2(n), BLOCK_C=BC, F64=_is_f64(x3, hc, g))
    dh = dh.view(*lead, n) if h_stride else dh
    return dx.view(*lead, n, C), _sum_to(dh, h)


def _merge_layout(x, h_res, h_post, y):
    n, C = x.shape[-2:]
    lead = x.shape[:-2]
    x3 = x.contiguous().view(-1, n, C)
    M = x3.shape[0]
    hr_stride = 0 if h_res.dim() == 2 and len(lead) != 0 else n * n
    hp_stride = 0 if h_post.dim() == 1 and len(lead) != 0 else n
    return lead, n, C, M, x3, h_res.contiguous(), h_post.contiguous(), y.contiguous().view(M, C), \
        hr_stride, hp_stride


def stream_merge_forward(x, h_res, h_post, y, block_c=None):
    """``h_res @ x + h_post ⊗ y`` per token: (..., n, C) in ``x.dtype``."""
    lead, n, C, M, x3, hr, hp, y2, hr_stride, hp_stride = _merge_layout(x, h_res, h_post, y)
    out = torch.empty_like(x3)
    NP = _np2(n)
    BC = _block_c(C, NP, block_c)
    _merge_fwd_kernel[(M, triton.cdiv(C, BC))](
        x3, hr, hp, y2, out, C, hr_stride, hp_stride,
        N=n, NP=NP, BLOCK_C=BC, F64=_is_f64(x, h_res, h_post, y))
    return out.view(*lead, n, C)


def stream_merge_backward(x, h_res, h_post, y, grad_out, block_c=None):
    """(∂x, ∂h_res, ∂h_post, ∂y) of :func:`stream_merge_forward`."""
    lead, n, C, M, x3, hr, hp, y2, hr_stride, hp_stride = _merge_layout(x, h_res, h_post, y)
    BC = _block_c(C, _np2(n), block_c)
    g = grad_out.contiguous().view(M, n, C)
    acc = _acc_dtype(x3, hr, hp, y2, g)
    dx, dy = torch.empty_like(x3), torch.empty_like(y2)
    dhr = torch.empty((M, n, n), dtype=acc, device=x3.device)
    dhp = torch.empty((M, n), dtype=acc, device=x3.device)
    _merge_bwd_kernel[(M,)](x3, hr, hp, y2, g, dx, dhr, dhp, dy, C, hr_stride, hp_stride,
                            N=n, NP=_np2(n), BLOCK_C=BC, F64=_is_f64(x3, hr, hp, y2, g))
    dhr = dhr.view(*lead, n, n) if hr_stride else dhr
    dhp = dhp.view(*lead, n) if hp_stride else dhp
    return dx.view(*lead, n, C), _sum_to(dhr, h_res), _sum_to(dhp, h_post), dy.view(*lead, C)


def _rms_tiles(K: int, N: int, dtype: torch.dtype):
    NP = max(16, triton.next_power_of_2(N))            # tl.dot needs every tile side >= 16
    BK = 32 if dtype == torch.float64 else 64
    return NP, 32, min(BK, max(16, triton.next_power_of_2(K)))


def _rms_bwd_tiles(K: int, N: int):
    """(NP, BM, BK, num_warps) of the projection backward, which holds a φ tile, its ∂φ
    accumulator and two products at once: at the forward's 32 × 64 tiles it spilled
    kilobytes of registers per thread on sm_90 (3 KB at n = 4, 11 KB at n = 8); these
    compile without spilling for n = 2 … 8, fp32 and fp64 (tests/test_kernels_codegen.py)."""
    NP = max(16, triton.next_power_of_2(N))
    if NP <= 32:  # n ≤ 4
        return NP, 16, min(32, max(16, triton.next_power_of_2(K))), 4
    return NP, 16, 16, 8


def rms_projection_forward(x, phi, eps):
    """``(vec(x) φ) · rsqrt(mean(x²) + ε)`` and the per-token ``rsqrt`` factor: x (..., n, C),
    φ (n·C, N) → (out (..., N), r (M,)) in the compute dtype (fp32, fp64 for fp64 input).
    Every dtype of streams is read as it is stored and multiplied in the compute dtype
    (IEEE products): no fp32 copy of half-precision streams is made."""
    K, N = phi.shape
    lead = x.shape[:-2]
    x2 = x.contiguous().view(-1, K)
    M = x2.shape[0]
    acc = _acc_dtype(x, phi)
    out = torch.empty((M, N), dtype=acc, device=x.device)
    rinv = torch.empty((M,), dtype=acc, device=x.device)
    NP, BM, BK = _rms_tiles(K, N, acc)
    _rms_proj_fwd_kernel[(triton.cdiv(M, BM),)](
        x2, phi.contiguous(), out, rinv, M, K, float(eps), N=N, NP=NP, BM=BM, BK=BK,
        F64=acc == torch.float64)
    return out.view(*lead, N), rinv


def rms_projection_backward(x, phi, out, rinv, grad_out, groups=None):
    """(∂x, ∂φ) of :func:`rms_projection_forward` from its outputs (nothing recomputed
    but the two GEMM-shaped passes). ∂x in ``x.dtype``, ∂φ in ``phi.dtype``."""
    K, N = phi.shape
    x2 = x.contiguous().view(-1, K)
    M = x2.shape[0]
    acc = _acc_dtype(x, phi)
    g = grad_out.reshape(M, N).to(acc)
    o = out.reshape(M, N)
    # out = p·r with p = vec(x) φ, r = (mean(x²) + ε)^(-1/2): ∂p = g·r, and the RMS part
    # of ∂x is x · (−r³/K · ⟨g, p⟩) = x · (−r²/K · ⟨g, out⟩): (M, N)-sized work, in torch.
    gp = (g * rinv[:, None]).contiguous()
    rs = ((g * o).sum(-1) * rinv.square() * (-1.0 / K)).contiguous()
    dx, dphi = rms_projection_operands_backward(x2, phi, gp, rs, groups)
    return dx.view(x.shape), dphi


def rms_projection_operands_backward(x2, phi, gp, rs, groups=None, pre=None, pending=None):
    """The projection backward's two passes given its per-token operands: ∂x = gp φᵀ + x·rs
    and ∂φ = xᵀ gp, for x2 (M, K) contiguous, gp = ∂out·r (M, N) and the RMS term rs (M,)
    in the compute dtype. ∂x in ``x2.dtype``, ∂φ in ``phi.dtype``; ``groups`` token groups
    keep partial ∂φ (summed here). ``pre``: (h (M, n), gu (M, C)) of a read u = Σ_j h[j] x[j]
    whose ∂x (h[j]·gu) is added in the same store (K = n·C); ``pending``: a ∂x so far
    (M·K values in ``x2.dtype``, contiguous), added in the same store too.

    Raises:
        ValueError: if ``pending`` is not M·K contiguous values of ``x2.dtype`` on its device.
    """
    (M, K), N = x2.shape, phi.shape[1]
    acc = _acc_dtype(x2, phi)
    if pending is not None and (pending.numel() != M * K or pending.dtype != x2.dtype
                                or pending.device != x2.device or not pending.is_contiguous()):
        raise ValueError(f"pending: expected {M * K} contiguous {x2.dtype} values on {x2.device}, "
                         f"got {tuple(pending.shape)} {pending.dtype} on {pending.device}")
    NP, BM, BK, warps = _rms_bwd_tiles(K, N)
    groups = max(1, min(triton.cdiv(M, BM), groups or 16))
    dx = torch.empty_like(x2)
    dphi = torch.empty((groups, K, N), dtype=acc, device=x2.device)
    h, gu = (rs, rs) if pre is None else (pre[0].contiguous(), pre[1].contiguous())
    S = 1 if pre is None else h.shape[-1]
    _rms_proj_bwd_kernel[(triton.cdiv(K, BK), groups)](
        x2, phi.contiguous(), gp, rs, dx, dphi, h, gu, rs if pending is None else pending, M, K, K // S, groups,
        N=N, NP=NP, BM=BM, BK=BK, S=S, PRE=pre is not None, ACC=pending is not None, F64=acc == torch.float64,
        num_warps=warps)
    return dx, dphi.sum(0).to(phi.dtype)


def _small_square_tiles(x, name: str):
    """(m, x as (M, m, m), MP, BM) for the per-token m×m kernels (Newton-Schulz, Cayley)."""
    m = x.shape[-1]
    if m > MAX_POLY_M or x.shape[-2] != m:
        raise ValueError(f"{name}: expected (..., m, m) with m ≤ {MAX_POLY_M}, got {tuple(x.shape)}")
    MP = _np2(m)
    BM = max(1, min(32, 256 // (MP * MP)))  # a (BM, MP, MP, MP) product tile of ≤ 2048 values
    return m, x.contiguous().view(-1, m, m), MP, BM


_DEVICE_CONSTANTS: dict = {}


def device_constant(key: tuple, make, device) -> torch.Tensor:
    """``make()`` (a CPU tensor) on ``device``, made once per (key, device) and then reused:
    a host-to-device copy cannot run inside a CUDA graph capture, so the constants a kernel
    needs (schedules, bases) must already be on the device when a captured step calls it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" means the current device now
        device = torch.device("cuda", torch.cuda.current_device())
    full_key = (*key, str(device))
    if full_key not in _DEVICE_CONSTANTS:
        with torch.inference_mode(False), torch.no_grad():  # a plain tensor, whatever mode the first call is in
            _DEVICE_CONSTANTS[full_key] = make().to(device)
    return _DEVICE_CONSTANTS[full_key]


def _poly_layout(x, schedule):
    m, x3, MP, BM = _small_square_tiles(x, "x0")
    dtype = _acc_dtype(x)
    flat = tuple(float(v) for step in schedule for v in (step if isinstance(step, (list, tuple)) else (step,)))
    coef = device_constant(("poly", flat, dtype), lambda: torch.tensor(flat, dtype=dtype).reshape(-1, 3), x.device)
    return m, x3, MP, BM, coef


def odd_polynomial_forward(x0, schedule):
    """The Newton-Schulz steps ``X ← aX + bX(XᵀX) + cX(XᵀX)²`` of ``schedule`` ((a, b, c)
    per step) on (..., m, m), m ≤ MAX_POLY_M; in ``x0.dtype`` (fp32 or fp64 arithmetic)."""
    m, x3, MP, BM, coef = _poly_layout(x0, schedule)
    M = x3.shape[0]
    y = torch.empty_like(x3)
    _poly_fwd_kernel[(triton.cdiv(M, BM),)](x3, coef, y, M, coef.shape[0], MM=m, MP=MP, BM=BM,
                                            F64=_is_f64(x0))
    return y.view(x0.shape)


def odd_polynomial_backward(x0, schedule, grad):
    """∂x0 of :func:`odd_polynomial_forward`: recomputes the iterates (only x0 is kept)."""
    m, x3, MP, BM, coef = _poly_layout(x0, schedule)
    M = x3.shape[0]
    g = grad.contiguous().view(M, m, m)
    dx = torch.empty_like(x3)
    hist = torch.empty(M, max(1, coef.shape[0]), MP, MP, dtype=_acc_dtype(x0, grad), device=x0.device)
    _poly_bwd_kernel[(triton.cdiv(M, BM),)](x3, coef, g, dx, hist, M, coef.shape[0], MM=m, MP=MP, BM=BM,
                                            F64=_is_f64(x0, grad))
    return dx.view(x0.shape)


def cayley_forward(a):
    """``(I − K)(I + K)⁻¹`` with ``K = (A − Aᵀ)/2`` per token: a (..., m, m), m ≤ MAX_POLY_M,
    fp32 or fp64 (computed in the input's precision), orthogonal with det +1."""
    m, a3, MP, BM = _small_square_tiles(a, "a")
    M = a3.shape[0]
    q = torch.empty_like(a3)
    _cayley_fwd_kernel[(triton.cdiv(M, BM),)](a3, q, M, MM=m, MP=MP, BM=BM, F64=_is_f64(a))
    return q.view(a.shape)


def _sinkhorn_bm(NP: int) -> int:
    # Tokens per program: a (BM, NP, NP) tile of about 512 values in registers.
    return max(1, min(64, 512 // (NP * NP)))


def sinkhorn_forward(logits, iters):
    """Per-token Sinkhorn of contiguous fp32/fp64 logits (..., n, n), n ≤ MAX_SINKHORN_N."""
    n = logits.shape[-1]
    z = logits.contiguous().view(-1, n, n)
    M = z.shape[0]
    NP = _np2(n)
    BM = _sinkhorn_bm(NP)
    p = torch.empty_like(z)
    _sinkhorn_fwd_kernel[(triton.cdiv(M, BM),)](z, p, M, ITERS=iters, N=n, NP=NP, BM=BM, F64=_is_f64(z))
    return p.view(logits.shape)


def sinkhorn_backward(logits, grad_p, iters):
    """∂logits of :func:`sinkhorn_forward`: recomputes the iterations (nothing stored)."""
    n = logits.shape[-1]
    z = logits.contiguous().view(-1, n, n)
    M = z.shape[0]
    NP = _np2(n)
    BM = _sinkhorn_bm(NP)
    g = grad_p.contiguous().view(M, n, n)
    dz = torch.empty_like(z)
    acc = _acc_dtype(z, g)
    hist = torch.empty(M, iters, 2, NP, device=z.device, dtype=acc)  # scratch
    _sinkhorn_bwd_kernel[(triton.cdiv(M, BM),)](
        z, g, dz, hist, M, ITERS=iters, N=n, NP=NP, BM=BM, F64=_is_f64(z, g))
    return dz.view(grad_p.shape)


INTERPRETED = bool(_Interpreted) and isinstance(_pre_fwd_kernel, _Interpreted)


def _mixture_layout(logits, basis):
    K, E = basis.shape[0], basis[0].numel()
    if logits.shape[-1] != K:
        raise ValueError(f"logits: expected (..., {K}) for a basis of {K} matrices, got {tuple(logits.shape)}")
    if K > MAX_MIXTURE_K:
        raise ValueError(f"basis: expected at most {MAX_MIXTURE_K} matrices, got {K}")
    KP, EP = _np2(K), _np2(E)
    if KP * EP > MAX_MIXTURE_TILE:
        raise ValueError(f"basis: expected K·E ≤ {MAX_MIXTURE_TILE} after padding to powers of two, got "
                         f"{K} matrices of {E} values ({KP}·{EP})")
    BM = max(1, min(64, 4096 // (KP * EP)))  # a (BM, KP, EP) product tile of ≤ 4096 values
    z = logits.contiguous().view(-1, K)
    return z, basis.contiguous().view(K, E).to(z.dtype), K, E, KP, EP, BM


def basis_mixture_forward(logits, basis):
    """``softmax(logits) · B`` per token: logits (..., K), B (K, *S) → (..., *S), K ≤
    MAX_MIXTURE_K, in the logits' dtype (fp32 or fp64 arithmetic)."""
    z, b, K, E, KP, EP, BM = _mixture_layout(logits, basis)
    M = z.shape[0]
    h = torch.empty(M, E, dtype=z.dtype, device=z.device)
    _mixture_fwd_kernel[(triton.cdiv(M, BM),)](z, b, h, M, K=K, E=E, KP=KP, EP=EP, BM=BM, F64=_is_f64(z))
    return h.view(*logits.shape[:-1], *basis.shape[1:])


def basis_mixture_backward(logits, basis, grad):
    """∂logits of :func:`basis_mixture_forward` given ∂H ``grad`` (..., *S); the basis is
    constant (no gradient)."""
    z, b, K, E, KP, EP, BM = _mixture_layout(logits, basis)
    M = z.shape[0]
    g = grad.to(z.dtype).contiguous().view(M, E)
    dz = torch.empty_like(z)
    _mixture_bwd_kernel[(triton.cdiv(M, BM),)](z, b, g, dz, M, K=K, E=E, KP=KP, EP=EP, BM=BM, F64=_is_f64(z))
    return dz.view(logits.shape)
