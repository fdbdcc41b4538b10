"""A dynamic layer's whole coefficient path in Triton kernels: the projection, the
activations and the variant's maps (mhc, isohc, hc, hybrid), with the branch input.

Unfused, a dynamic mhc layer computes its coefficients in about ten launches (the RMS
projection, a slice, a bias and an α scale per group, σ and 2σ, the Sinkhorn kernel)
plus ``stream_pre``, and as many again backward; isohc about thirty. Here:

forward (one kernel, ``BM`` tokens per program for the GEMM, the maps in sub-blocks):
    out = (vec(x) φ) · r,  r = (mean(x²) + ε)^(-1/2)          one read of the streams
    raw = bias + α_g · act(out)    (groups g: pre | post | res; layout [n | n | n·n])
    H_pre, H_post, H_res = the map ``RES`` of raw (below)
    read = Σ_j H_pre[j] x[j]       (optional: the tile's rows again, from L2)

The GEMM tile holds a token's N = n² + 2n outputs in one row, which Triton cannot reshape
into the (n, n) tile of a map in registers; so the epilogue stores ``out`` (which the
backward needs anyway), synchronises the program and reads it back as (BM, n) and
(BM, n, n) tiles from L1/L2 — M·N values, against the M·n·C of the streams.

The maps (``RES``):
    SINKHORN (mhc): act = id, H_pre = σ, H_post = 2σ, H_res = the unrolled log-domain
        Sinkhorn (columns then rows, ``iters`` times);
    ISO (isohc, n ≥ 3): the same gates, H_res = ``iso_project(method="ns")``: A = Uᵀ Z U
        on the complement of 1 (U the Helmert basis), a zero block replaced by I,
        X0 = A / ‖AᵀA‖_F^{1/2}, the Newton-Schulz schedule, H = 11ᵀ/n + U Q Uᵀ, in fp64
        (the torch path runs its steps in fp64 too);
    LINEAR (hc): act = tanh, no maps (H = raw);
    HYBRID (hybrid, n ≥ 3): the gates, H_res = (1 − λ)·ISO + λ·SINKHORN, λ = alpha[3].

backward (a ⟨x, ∂read⟩ kernel when the read was asked for, the maps kernel, then the
projection's backward kernel of :mod:`.triton_kernels`):
    ∂raw: σ′ for the gates, the reverse sweeps of the Sinkhorn / Newton-Schulz steps
    (iterates recomputed into scratch buffers), through the Iso-NS scale
    ∂A = ∂X0/s − ⟨∂X0, A⟩ A(AᵀA)/s⁵ (s = ‖AᵀA‖_F^{1/2}), ∂λ = Σ ⟨∂H, H_sk − H_iso⟩;
    ∂out = α_g ∂raw · act′, and from it, in the same kernel, the projection backward's
    per-token operands ∂out·r and −r²/K ⟨∂out, out⟩; the projection backward writes
    ∂x = (∂out·r) φᵀ + x·(RMS term) + H_pre[j]·∂read (+ the merge's ∂x, when the layer
    left it in a :class:`~.grad_slot.StreamGradSlot`) in one store, and ∂φ;
    ∂bias = Σ_tokens ∂raw and ∂α_g = Σ ∂raw ⊙ act over the group (torch reductions).

Same maps and gradients as the layer's unfused ops. Arithmetic in fp32 (fp64 for fp64
inputs); half-precision streams are read as stored and the read is stored in their dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dtypes import compute_dtype
from . import triton_kernels as tk
from .triton_kernels import _acc, _bmm, _bmm_tn, _dot, _poly_step, _sinkhorn_iterate, _sinkhorn_vjp

__all__ = ["sinkhorn_coefficients_forward", "sinkhorn_coefficients_backward", "iso_coefficients_forward",
           "iso_coefficients_backward", "linear_coefficients_forward", "linear_coefficients_backward",
           "hybrid_coefficients_forward", "hybrid_coefficients_backward", "streams_of", "SINKHORN", "ISO", "LINEAR",
           "HYBRID"]

SINKHORN, ISO, LINEAR, HYBRID = 0, 1, 2, 3  # the kernels' RES map (LINEAR: hc's tanh, identity maps;
#                                            HYBRID: (1 − λ) Iso-NS + λ Sinkhorn, λ = alpha[3])


@triton.jit
def _group_tiles(tok, tmask, S: tl.constexpr, SP: tl.constexpr, N: tl.constexpr):
    """Offsets and masks of a token's gate logits (BM, SP) and res logits (BM, SP, SP)
    within its row of N = S² + 2S values."""
    s = tl.arange(0, SP)
    gate = tok[:, None] * N + s[None, :]
    gmask = tmask[:, None] & (s < S)[None, :]
    i = s[None, :, None]
    j = s[None, None, :]
    res = tok[:, None, None] * N + 2 * S + i * S + j
    rmask = tmask[:, None, None] & (i < S) & (j < S)
    return s, gate, gmask, i * S + j, res, rmask


@triton.jit
def _tanh(v, F64: tl.constexpr):
    """tanh from exp, accurate near 0 too: (1 − e)/(1 + e) with e = exp(−2|v|) loses
    digits to cancellation as |v| → 0, where the Taylor series takes over (its first
    dropped term is below the dtype's rounding at the switch)."""
    a = tl.abs(v)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    v2 = v * v
    small = a * (1.0 + v2 * (-1.0 / 3.0 + v2 * (2.0 / 15.0 + v2 * (-17.0 / 315.0))))
    if F64:
        t = tl.where(a < 1e-3, small, big)
    else:
        t = tl.where(a < 0.125, small, big)
    return tl.where(v < 0, -t, t)


@triton.jit
def _helmert_tile(u_ptr, BM: tl.constexpr, SP: tl.constexpr, MP: tl.constexpr):
    """The zero-padded (SP, MP) fp64 Helmert basis at ``u_ptr``, broadcast to (BM, SP, MP)."""
    u = tl.load(u_ptr + tl.arange(0, SP)[:, None] * MP + tl.arange(0, MP)[None, :])
    return tl.broadcast_to(tl.expand_dims(u, 0), (BM, SP, MP))


@triton.jit
def _bmm_nt(a, b):
    """Per-token a[t] @ b[t]ᵀ of (BM, P, Q) and (BM, R, Q) tiles → (BM, P, R)."""
    return tl.sum(tl.expand_dims(a, 2) * tl.expand_dims(b, 1), axis=3)


@triton.jit
def _iso_start(z, u, S: tl.constexpr, MP: tl.constexpr):
    """From res logits z (BM, SP, SP) and the Helmert basis u (BM, SP, MP), both fp64 and
    zero-padded: A = Uᵀ Z U (a zero block replaced by I), its Gram matrix AᵀA, the scale
    s = ‖AᵀA‖_F^{1/2} (floored as the torch path floors it), the zero-block mask
    (BM, 1, 1) and I (1, MP, MP) on the m = S − 1 valid rows."""
    a = _bmm_tn(u, _bmm(z, u))
    i = tl.arange(0, MP)[None, :, None]
    j = tl.arange(0, MP)[None, None, :]
    eye = tl.where((i == j) & (i < S - 1), 1.0, 0.0).to(tl.float64)
    fro_a = tl.sqrt(tl.sum(tl.sum(a * a, axis=2), axis=1))
    fro_z = tl.sqrt(tl.sum(tl.sum(z * z, axis=2), axis=1))
    zero = (fro_a <= 1e-6 * (1.0 + fro_z))[:, None, None]
    a = tl.where(zero, eye, a)
    gram = _bmm_tn(a, a)
    s = tl.sqrt(tl.maximum(tl.sqrt(tl.sum(tl.sum(gram * gram, axis=2), axis=1)), 1e-30))
    s = tl.maximum(s, 1e-12)
    return a, gram, s, zero, eye


@triton.jit
def _iso_forward(z, u, coef_ptr, STEPS, S: tl.constexpr, MP: tl.constexpr):
    """H = 11ᵀ/n + U Q Uᵀ with Q the Newton-Schulz polar factor of A (see _iso_start)."""
    a, gram, s, zero, eye = _iso_start(z, u, S, MP)
    x = a / s[:, None, None]
    for st in range(STEPS):
        x = _poly_step(x, tl.load(coef_ptr + 3 * st), tl.load(coef_ptr + 3 * st + 1), tl.load(coef_ptr + 3 * st + 2))
    q = tl.where(zero, eye, x)
    inv_n = (tl.zeros((1, 1, 1), tl.float64) + 1.0) / S  # 1/n computed in fp64 (a literal may be fp32)
    return _bmm_nt(_bmm(u, q), u) + inv_n


@triton.jit
def _iso_vjp(z, g, u, coef_ptr, hist_ptr, h_base, h_mask, STEPS, S: tl.constexpr, MP: tl.constexpr):
    """(∂z of _iso_forward for output gradient g (BM, SP, SP), and its output H), fp64,
    zero-padded; the iterates go through the scratch rows ``h_base`` (BM, MP, MP) +
    step·MP² of ``hist_ptr``."""
    a, gram, s, zero, eye = _iso_start(z, u, S, MP)
    x = a / s[:, None, None]
    for st in range(STEPS):  # recompute X_0 … X_{STEPS−1}
        tl.store(hist_ptr + h_base + st * (MP * MP), x, mask=h_mask)
        x = _poly_step(x, tl.load(coef_ptr + 3 * st), tl.load(coef_ptr + 3 * st + 1), tl.load(coef_ptr + 3 * st + 2))
    h = _bmm_nt(_bmm(u, tl.where(zero, eye, x)), u) + (tl.zeros((1, 1, 1), tl.float64) + 1.0) / S
    tl.debug_barrier()  # the reverse sweep reads what this program wrote
    gx = tl.where(zero, 0.0, _bmm_tn(u, _bmm(g, u)))  # ∂Q = Uᵀ G U; nothing flows into a zero block
    for r in range(STEPS):
        st = STEPS - 1 - r
        x = tl.load(hist_ptr + h_base + st * (MP * MP), mask=h_mask, other=0.0)
        ca = tl.load(coef_ptr + 3 * st)
        cb = tl.load(coef_ptr + 3 * st + 1)
        cc = tl.load(coef_ptr + 3 * st + 2)
        gr = _bmm_tn(x, x)
        w = _bmm_tn(x, gx)
        mx = cb * gr + cc * _bmm(gr, gr)
        zz = cb * w + cc * (_bmm(w, gr) + _bmm(gr, w))
        gx = ca * gx + _bmm(gx, mx) + _bmm(x, zz + tl.permute(zz, 0, 2, 1))
    # X0 = A/s, s = ‖AᵀA‖_F^{1/2}: ∂s/∂A = A(AᵀA)/s³.
    inner = tl.sum(tl.sum(gx * a, axis=2), axis=1)
    s5 = s * s * s * s * s
    ga = gx / s[:, None, None] - (inner / s5)[:, None, None] * _bmm(a, gram)
    ga = tl.where(zero, 0.0, ga)
    return _bmm_nt(_bmm(u, ga), u), h


@triton.jit
def _coef_fwd_kernel(x_ptr, phi_ptr, bias_ptr, alpha_ptr, out_ptr, rinv_ptr, pre_ptr, post_ptr, res_ptr,
                     read_ptr, u_ptr, coef_ptr, M, K, C, eps, STEPS, RES: tl.constexpr, ITERS: tl.constexpr,
                     S: tl.constexpr, SP: tl.constexpr, MP: tl.constexpr, N: tl.constexpr,
                     NP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BMI: tl.constexpr,
                     READ: tl.constexpr, BC: tl.constexpr, F64: tl.constexpr):
    tok = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    tmask = tok < M
    # The RMS-scaled projection: as _rms_proj_fwd_kernel.
    cols = tl.arange(0, NP)
    nmask = cols < N
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
    tl.debug_barrier()  # the maps below read back the rows this program just wrote
    # The maps, BMI tokens at a time (the Iso-NS products are (BMI, SP, SP, MP) tiles: at
    # BM = 32 they would spill registers; the GEMM above needs BM ≥ 16).
    for sb in tl.static_range(BM // BMI):
        sub = (tl.program_id(0) * BM + sb * BMI + tl.arange(0, BMI)).to(tl.int64)
        h_pre = _coef_maps_fwd(sub, sub < M, bias_ptr, alpha_ptr, out_ptr, pre_ptr, post_ptr, res_ptr, u_ptr,
                               coef_ptr, STEPS, RES, ITERS, S, SP, MP, N, BMI, F64)
        if READ:  # the branch input H_pre x, from the rows this program read above (in L2 now)
            _stream_read(x_ptr, read_ptr, h_pre, sub, sub < M, K, C, S, SP, BMI, BC, F64)


@triton.jit
def _stream_read(x_ptr, read_ptr, h_pre, tok, tmask, K, C, S: tl.constexpr, SP: tl.constexpr, BM: tl.constexpr,
                 BC: tl.constexpr, F64: tl.constexpr):
    """read[t] = Σ_j h_pre[t, j] x[t, j, :] for tokens ``tok`` (BM,), h_pre (BM, SP)."""
    s = tl.arange(0, SP)[None, :]
    for c0 in range(0, C, BC):
        cs = c0 + tl.arange(0, BC)
        mask = tmask[:, None] & (cs < C)[None, :]
        u = _acc(tl.zeros((BM, BC), tl.float32), F64)
        for j in tl.static_range(S):
            hj = tl.sum(tl.where(s == j, h_pre, 0.0), axis=1)
            xj = _acc(tl.load(x_ptr + tok[:, None] * K + j * C + cs[None, :], mask=mask, other=0.0), F64)
            u += hj[:, None] * xj
        tl.store(read_ptr + tok[:, None] * C + cs[None, :], u.to(read_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stream_read_dots_kernel(x_ptr, g_ptr, dh_ptr, C, S: tl.constexpr, SP: tl.constexpr, BC: tl.constexpr,
                             F64: tl.constexpr):
    """dh[t, j] = ⟨x[t, j, :], g[t, :]⟩: the gradient of H_pre from the read's (one token
    per program, its rows read once)."""
    t = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, SP)
    rmask = rows < S
    dh = _acc(tl.zeros((SP,), tl.float32), F64)
    for c0 in range(0, C, BC):
        cs = c0 + tl.arange(0, BC)
        cmask = cs < C
        g = _acc(tl.load(g_ptr + t * C + cs, mask=cmask, other=0.0), F64)
        x = _acc(tl.load(x_ptr + t * S * C + rows[:, None] * C + cs[None, :], mask=rmask[:, None] & cmask[None, :],
                         other=0.0), F64)
        dh += tl.sum(x * g[None, :], axis=1)
    tl.store(dh_ptr + t * S + rows, dh, mask=rmask)


@triton.jit
def _coef_maps_fwd(tok, tmask, bias_ptr, alpha_ptr, out_ptr, pre_ptr, post_ptr, res_ptr, u_ptr, coef_ptr, STEPS,
                   RES: tl.constexpr, ITERS: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, MP: tl.constexpr,
                   N: tl.constexpr, BM: tl.constexpr, F64: tl.constexpr):
    """H_pre, H_post, H_res of tokens ``tok`` (BM,) from their stored projection ``out``;
    returns H_pre (BM, SP)."""
    s, gate, gmask, rel, res, rmask = _group_tiles(tok, tmask, S, SP, N)
    a_pre = tl.load(alpha_ptr + 0)
    a_post = tl.load(alpha_ptr + 1)
    a_res = tl.load(alpha_ptr + 2)
    smask = s < S
    o_pre = tl.load(out_ptr + gate, mask=gmask, other=0.0)
    o_post = tl.load(out_ptr + gate + S, mask=gmask, other=0.0)
    o_res = tl.load(out_ptr + res, mask=rmask, other=0.0)
    if RES == 2:  # hc: the activation, no maps
        o_pre, o_post, o_res = _tanh(o_pre, F64), _tanh(o_post, F64), _tanh(o_res, F64)
    raw_pre = tl.load(bias_ptr + s, mask=smask, other=0.0)[None, :] + a_pre * o_pre
    raw_post = tl.load(bias_ptr + S + s, mask=smask, other=0.0)[None, :] + a_post * o_post
    z = tl.load(bias_ptr + 2 * S + rel, mask=rmask, other=0.0) + a_res * o_res
    if RES == 2:
        h_pre, h_post, h = raw_pre, raw_post, z
    else:
        h_pre, h_post = tl.sigmoid(raw_pre), 2.0 * tl.sigmoid(raw_post)
        if RES == 0:
            h = tl.exp(_sinkhorn_iterate(tl.where(rmask, z, float("-inf")), ITERS))
        elif RES == 1:
            h = _iso_forward(tl.where(rmask, z, 0.0).to(tl.float64), _helmert_tile(u_ptr, BM, SP, MP), coef_ptr,
                             STEPS, S, MP)
        else:  # hybrid: (1 − λ) Iso + λ Sinkhorn, λ = alpha[3]
            lam = tl.load(alpha_ptr + 3).to(tl.float64)
            h_sk = tl.exp(_sinkhorn_iterate(tl.where(rmask, z, float("-inf")), ITERS)).to(tl.float64)
            h_iso = _iso_forward(tl.where(rmask, z, 0.0).to(tl.float64), _helmert_tile(u_ptr, BM, SP, MP), coef_ptr,
                                 STEPS, S, MP)
            h = (1.0 - lam) * h_iso + lam * h_sk
    tl.store(pre_ptr + tok[:, None] * S + s[None, :], h_pre, mask=gmask)
    tl.store(post_ptr + tok[:, None] * S + s[None, :], h_post, mask=gmask)
    tl.store(res_ptr + tok[:, None, None] * (S * S) + rel, h.to(res_ptr.dtype.element_ty), mask=rmask)
    return h_pre


@triton.jit
def _coef_maps_bwd_kernel(out_ptr, rinv_ptr, bias_ptr, alpha_ptr, gpre_ptr, gpost_ptr, gres_ptr,
                          draw_ptr, gp_ptr, rs_ptr, hist_ptr, hist2_ptr, dlam_ptr, u_ptr, coef_ptr, M, K, STEPS,
                          RES: tl.constexpr, ITERS: tl.constexpr, S: tl.constexpr, SP: tl.constexpr,
                          MP: tl.constexpr, N: tl.constexpr, BM: tl.constexpr, F64: tl.constexpr):
    tok = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    tmask = tok < M
    s, gate, gmask, rel, res, rmask = _group_tiles(tok, tmask, S, SP, N)
    smask = s < S
    a_pre = _acc(tl.load(alpha_ptr + 0), F64)
    a_post = _acc(tl.load(alpha_ptr + 1), F64)
    a_res = _acc(tl.load(alpha_ptr + 2), F64)
    rinv = _acc(tl.load(rinv_ptr + tok, mask=tmask, other=0.0), F64)
    h_off = tok[:, None] * S + s[None, :]
    o_pre = _acc(tl.load(out_ptr + gate, mask=gmask, other=0.0), F64)
    o_post = _acc(tl.load(out_ptr + gate + S, mask=gmask, other=0.0), F64)
    o_res = _acc(tl.load(out_ptr + res, mask=rmask, other=0.0), F64)
    g_pre = _acc(tl.load(gpre_ptr + h_off, mask=gmask, other=0.0), F64)
    g_post = _acc(tl.load(gpost_ptr + h_off, mask=gmask, other=0.0), F64)
    g = _acc(tl.load(gres_ptr + tok[:, None, None] * (S * S) + rel, mask=rmask, other=0.0), F64)
    if RES == 2:  # hc: H = raw = bias + α tanh(out): ∂raw = ∂H, ∂out = α ∂raw (1 − tanh²)
        t_pre, t_post, t_res = _tanh(o_pre, F64), _tanh(o_post, F64), _tanh(o_res, F64)
        d_pre, d_post, d_res = g_pre, g_post, g
        f_pre, f_post, f_res = 1.0 - t_pre * t_pre, 1.0 - t_post * t_post, 1.0 - t_res * t_res
    else:
        # Gates: H = c·σ(raw), ∂raw = ∂H · c·σ(1 − σ).
        sg = tl.sigmoid(_acc(tl.load(bias_ptr + s, mask=smask, other=0.0), F64)[None, :] + a_pre * o_pre)
        d_pre = g_pre * sg * (1.0 - sg)
        sg = tl.sigmoid(_acc(tl.load(bias_ptr + S + s, mask=smask, other=0.0), F64)[None, :] + a_post * o_post)
        d_post = g_post * 2.0 * sg * (1.0 - sg)
        f_pre, f_post, f_res = 1.0, 1.0, 1.0
        # The res map: recompute and reverse-sweep its iterations.
        z = _acc(tl.load(bias_ptr + 2 * S + rel, mask=rmask, other=0.0), F64) + a_res * o_res
        if RES == 3:  # hybrid: both maps' gradients, and ∂λ = Σ ⟨g, H_sk − H_iso⟩ per token
            lam = _acc(tl.load(alpha_ptr + 3), F64)
            d_sk, h_sk = _res_map_vjp(z, g, rmask, tok, tmask, hist_ptr, u_ptr, coef_ptr, STEPS, 0, ITERS, S, SP,
                                      MP, BM, F64)
            d_iso, h_iso = _res_map_vjp(z, g, rmask, tok, tmask, hist2_ptr, u_ptr, coef_ptr, STEPS, 1, ITERS, S, SP,
                                        MP, BM, F64)
            d_res = (1.0 - lam) * d_iso + lam * d_sk
            diff = tl.where(rmask, g * (h_sk - h_iso), 0.0)
            tl.store(dlam_ptr + tok, tl.sum(tl.sum(diff, axis=2), axis=1), mask=tmask)
        else:
            d_res, _ = _res_map_vjp(z, g, rmask, tok, tmask, hist_ptr, u_ptr, coef_ptr, STEPS, RES, ITERS, S, SP, MP,
                                    BM, F64)
    d_res = tl.where(rmask, d_res, 0.0)
    tl.store(draw_ptr + gate, d_pre, mask=gmask)
    tl.store(draw_ptr + gate + S, d_post, mask=gmask)
    tl.store(draw_ptr + res, d_res, mask=rmask)
    # The projection backward's operands: ∂out·r and −r²/K ⟨∂out, out⟩.
    g_pre, g_post, g_res = a_pre * d_pre * f_pre, a_post * d_post * f_post, a_res * d_res * f_res
    tl.store(gp_ptr + gate, g_pre * rinv[:, None], mask=gmask)
    tl.store(gp_ptr + gate + S, g_post * rinv[:, None], mask=gmask)
    tl.store(gp_ptr + res, g_res * rinv[:, None, None], mask=rmask)
    dot = tl.sum(g_pre * o_pre, axis=1) + tl.sum(g_post * o_post, axis=1) + tl.sum(tl.sum(g_res * o_res, axis=2), axis=1)
    # −(…)/K, not ·(−1/K): a float literal over an int is an fp32 division, even in fp64.
    tl.store(rs_ptr + tok, -(dot * rinv * rinv) / K, mask=tmask)


@triton.jit
def _res_map_vjp(z, g, rmask, tok, tmask, hist_ptr, u_ptr, coef_ptr, STEPS, RES: tl.constexpr,
                 ITERS: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, MP: tl.constexpr, BM: tl.constexpr,
                 F64: tl.constexpr):
    """(∂z, H) of the Sinkhorn (RES = 0) or Iso-NS (RES = 1) res map for gradient g
    (BM, SP, SP), in the compute dtype; H is the map's output, recomputed."""
    if RES == 0:
        k = tl.arange(0, SP)
        h_offs = tok[:, None] * (ITERS * 2 * SP) + k[None, :]
        h_mask = tmask[:, None] & (k < SP)[None, :]
        zs = tl.where(rmask, z, float("-inf"))
        d_res = _sinkhorn_vjp(zs, g, hist_ptr, h_offs, h_mask, k, ITERS, S, SP)
        h = tl.exp(_sinkhorn_iterate(zs, ITERS))
    else:
        t = tl.arange(0, MP)
        tile = t[None, :, None] * MP + t[None, None, :]
        h_base = tok[:, None, None] * (STEPS * MP * MP) + tile
        d64, h64 = _iso_vjp(tl.where(rmask, z, 0.0).to(tl.float64), g.to(tl.float64),
                            _helmert_tile(u_ptr, BM, SP, MP), coef_ptr, hist_ptr, h_base,
                            tmask[:, None, None] & (tile >= 0), STEPS, S, MP)
        d_res, h = _acc(d64, F64), _acc(h64, F64)
    return d_res, h


# ====================================================================== launchers
def streams_of(bias: torch.Tensor) -> int:
    """n from the length N = n² + 2n of the concatenated biases [pre | post | res].

    Raises:
        ValueError: if N is not n² + 2n for a positive n ≤ MAX_SINKHORN_N.
    """
    N = bias.shape[-1]
    n = int(round((N + 1) ** 0.5)) - 1
    if bias.dim() != 1 or n < 1 or n * n + 2 * n != N or n > tk.MAX_SINKHORN_N:
        raise ValueError(f"bias: expected the concatenated logits [pre | post | res] of length n² + 2n with "
                         f"1 ≤ n ≤ {tk.MAX_SINKHORN_N}, got shape {tuple(bias.shape)}")
    return n


def _layout(x, phi, bias, alpha, res=SINKHORN):
    n = streams_of(bias)
    K, N = phi.shape
    if x.dim() < 2 or x.shape[-2] * x.shape[-1] != K or x.shape[-2] != n:
        raise ValueError(f"x: expected (..., n={n}, C) with n·C = {K} rows of phi, got {tuple(x.shape)}")
    if N != bias.shape[0]:
        raise ValueError(f"phi: expected (n·C, {bias.shape[0]}) columns to match the biases, got {tuple(phi.shape)}")
    if res == HYBRID and tuple(alpha.shape) != (4,):
        raise ValueError(f"alpha: expected the three scales (pre, post, res) and λ, shape (4,), got "
                         f"{tuple(alpha.shape)}")
    if res != HYBRID and tuple(alpha.shape) != (3,):
        raise ValueError(f"alpha: expected the three scales (pre, post, res) of shape (3,), got {tuple(alpha.shape)}")
    if res in (ISO, HYBRID) and n < 3:
        raise ValueError(f"bias: the fused Iso-NS coefficients need n ≥ 3 streams, got n = {n}")
    acc = compute_dtype(x, phi)
    x2 = x.contiguous().view(-1, K)
    NP, BM, BK = tk._rms_tiles(K, N, acc)
    return n, K, N, x2, x2.shape[0], acc, NP, BM, BK


def _iso_constants(n: int, steps: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The zero-padded (SP, MP) fp64 Helmert basis and the (steps, 3) fp64 schedule of
    ``iso_project(method="ns", steps=steps)``, made once per device
    (:func:`.triton_kernels.device_constant`)."""
    from ..projections.iso import _schedule, helmert_basis

    def basis():
        u = torch.zeros(tk._np2(n), tk._np2(n - 1), dtype=torch.float64)
        u[:n, :n - 1] = helmert_basis(n, torch.float64)
        return u
    return (tk.device_constant(("helmert", n), basis, device),
            tk.device_constant(("ns", steps), lambda: torch.tensor(_schedule("ns", steps), dtype=torch.float64), device))


def _map_tokens(res: int, SP: int, MP: int, acc: torch.dtype) -> int:
    """Tokens per program for the maps: the Iso-NS products are (tokens, SP, SP, MP) tiles,
    kept at ≤ 2048 values (at 32 tokens they spilled registers from n = 4 on, tens of KB
    per thread at n = 8, compiled for sm_90); fp64 Sinkhorn at n > 4 a little over 255
    registers at 32 (80 B of stack; none at 16)."""
    if res in (ISO, HYBRID):
        return max(1, min(16, 2048 // (SP * SP * MP)))
    return 16 if acc == torch.float64 and SP > 4 else 32


def read_block(C: int, SP: int) -> int:
    """C-chunk of the forward's H_pre x: 32 (16 at n > 4) keeps the kernel spill-free on
    sm_90 (64 spilled 72 B at n = 4, 848 B at n = 8)."""
    return min(tk._np2(C), 32 if SP <= 4 else 16)


def _forward(x, phi, bias, alpha, eps, res, iters, steps, read=False):
    """(H_pre, H_post, H_res, out, r, read) of the map ``res``; ``read`` (M, C) in x.dtype,
    H_pre x, computed in the same kernel when asked for, else None."""
    n, K, N, x2, M, acc, NP, BM, BK = _layout(x, phi, bias, alpha, res)
    SP, MP = tk._np2(n), tk._np2(max(n - 1, 1))
    out = torch.empty((M, N), dtype=acc, device=x.device)
    rinv = torch.empty((M,), dtype=acc, device=x.device)
    h_pre = torch.empty((M, n), dtype=acc, device=x.device)
    h_post = torch.empty((M, n), dtype=acc, device=x.device)
    h_res = torch.empty((M, n, n), dtype=acc, device=x.device)
    u, coef = _iso_constants(n, steps, x.device) if res in (ISO, HYBRID) else (rinv, rinv)  # else unused
    C = K // n
    stream_read = torch.empty((M, C), dtype=x.dtype, device=x.device) if read else None
    _coef_fwd_kernel[(triton.cdiv(M, BM),)](
        x2, phi.to(acc).contiguous(), bias.to(acc).contiguous(), alpha.to(acc).contiguous(), out, rinv,
        h_pre, h_post, h_res, rinv if stream_read is None else stream_read, u, coef, M, K, C, float(eps), int(steps),
        RES=res, ITERS=int(iters), S=n, SP=SP, MP=MP, N=N, NP=NP, BM=BM, BK=BK,
        BMI=min(BM, _map_tokens(res, SP, MP, acc)), READ=read, BC=read_block(C, SP), F64=acc == torch.float64)
    return h_pre, h_post, h_res, out, rinv, stream_read


def _backward(x, phi, bias, alpha, out, rinv, g_pre, g_post, g_res, res, iters, steps, groups, h_pre=None,
              g_read=None, pending=None):
    """(∂x, ∂φ, ∂bias, ∂alpha) of :func:`_forward`; with ``g_read`` (M, C), the gradient of
    its read, and the forward's ``h_pre``, ∂x includes the read's; with ``pending`` (x's
    shape and dtype, contiguous: the merge's ∂x of the same streams) ∂x includes it too."""
    n, K, N, x2, M, acc, NP, BM, BK = _layout(x, phi, bias, alpha, res)
    SP, MP = tk._np2(n), tk._np2(max(n - 1, 1))
    draw = torch.empty((M, N), dtype=acc, device=x.device)
    gp = torch.empty((M, N), dtype=acc, device=x.device)
    rs = torch.empty((M,), dtype=acc, device=x.device)
    # Scratch for the recomputed iterates (Sinkhorn's log-scalings, Iso-NS's X_t), and ∂λ
    # per token (hybrid); what a map does not use is a placeholder.
    u = coef = hist = hist2 = dlam = rs
    if res in (SINKHORN, HYBRID):
        hist = torch.empty((M, int(iters), 2, SP), dtype=acc, device=x.device)
    if res in (ISO, HYBRID):
        u, coef = _iso_constants(n, steps, x.device)
        hist2 = torch.empty((M, int(steps), MP, MP), dtype=torch.float64, device=x.device)
    if res == ISO:
        hist = hist2
    if res == HYBRID:
        dlam = torch.empty((M,), dtype=acc, device=x.device)
    pre = None
    if g_read is not None:  # ∂H_pre from the read: ⟨x[j], ∂read⟩ per token (one more read of x)
        g_read = g_read.reshape(M, K // n).contiguous()
        dh = torch.empty((M, n), dtype=acc, device=x.device)
        _stream_read_dots_kernel[(M,)](x2, g_read, dh, K // n, S=n, SP=SP, BC=min(128, tk._np2(K // n)),
                                       F64=acc == torch.float64)
        g_pre = dh + g_pre.to(acc)
        pre = (h_pre.to(acc), g_read)
    grads = [g.to(acc).contiguous() for g in (g_pre, g_post, g_res)]
    BMI = _map_tokens(res, SP, MP, acc)  # no GEMM here: the maps' own tile
    _coef_maps_bwd_kernel[(triton.cdiv(M, BMI),)](
        out, rinv, bias.to(acc).contiguous(), alpha.to(acc).contiguous(), *grads, draw, gp, rs, hist, hist2, dlam,
        u, coef, M, K, int(steps), RES=res, ITERS=int(iters), S=n, SP=SP, MP=MP, N=N, BM=BMI,
        F64=acc == torch.float64)
    dx, dphi = tk.rms_projection_operands_backward(x2, phi, gp, rs, groups, pre, pending)
    per_col = (draw * (torch.tanh(out) if res == LINEAR else out)).sum(0)  # ∂α_g = Σ ∂raw ⊙ activation
    dalpha = [per_col[:n].sum(), per_col[n:2 * n].sum(), per_col[2 * n:].sum()]
    if res == HYBRID:
        dalpha.append(dlam.sum())
    return dx.view(x.shape), dphi, draw.sum(0).to(bias.dtype), torch.stack(dalpha).to(alpha.dtype)


def sinkhorn_coefficients_forward(x, phi, bias, alpha, eps, iters):
    """(H_pre (M, n), H_post (M, n), H_res (M, n, n), out (M, N), r (M,)) for x (..., n, C),
    φ (n·C, N), bias (N,) = [b_pre | b_post | vec(b_res)], alpha (3,); all in the compute
    dtype (fp32, fp64 for fp64 inputs). ``out`` is the RMS-scaled projection and ``r`` its
    per-token scale, which the backward takes. H_res: the unrolled Sinkhorn, ``iters``
    rounds (mhc).

    Raises:
        ValueError: for shapes that do not fit together (see :func:`streams_of`).
    """
    return _forward(x, phi, bias, alpha, eps, SINKHORN, iters, 0)[:5]


def sinkhorn_coefficients_backward(x, phi, bias, alpha, out, rinv, g_pre, g_post, g_res, iters, groups=None):
    """(∂x in x.dtype, ∂φ, ∂bias, ∂alpha) of :func:`sinkhorn_coefficients_forward` from its
    saved ``out`` and ``r`` and the gradients of its three coefficient outputs."""
    return _backward(x, phi, bias, alpha, out, rinv, g_pre, g_post, g_res, SINKHORN, iters, 0, groups)


def linear_coefficients_forward(x, phi, bias, alpha, eps, _unused=0):
    """As :func:`sinkhorn_coefficients_forward` for hc: H_pre, H_post, H_res = bias +
    α_g·tanh(out), no maps (the last argument is ignored: the op signature is shared)."""
    return _forward(x, phi, bias, alpha, eps, LINEAR, 1, 0)[:5]


def linear_coefficients_backward(x, phi, bias, alpha, out, rinv, g_pre, g_post, g_res, _unused=0, groups=None):
    """(∂x, ∂φ, ∂bias, ∂alpha) of :func:`linear_coefficients_forward`."""
    return _backward(x, phi, bias, alpha, out, rinv, g_pre, g_post, g_res, LINEAR, 1, 0, groups)


def iso_coefficients_forward(x, phi, bias, alpha, eps, steps):
    """As :func:`sinkhorn_coefficients_forward`, with H_res = ``iso_project(raw_res, "ns",
    steps)`` (isohc; Newton-Schulz in fp64, H_res returned in the compute dtype).

    Raises:
        ValueError: for shapes that do not fit together, or n < 3 (the 1×1 and empty blocks
            of n ≤ 2 are special cases of ``iso_project``, left to it).
    """
    return _forward(x, phi, bias, alpha, eps, ISO, 1, steps)[:5]


def iso_coefficients_backward(x, phi, bias, alpha, out, rinv, g_pre, g_post, g_res, steps, groups=None):
    """(∂x, ∂φ, ∂bias, ∂alpha) of :func:`iso_coefficients_forward`."""
    return _backward(x, phi, bias, alpha, out, rinv, g_pre, g_post, g_res, ISO, 1, steps, groups)


def hybrid_coefficients_forward(x, phi, bias, alpha, eps, iters, steps):
    """As :func:`sinkhorn_coefficients_forward` for hybrid: H_res = (1 − λ)·Iso-NS(raw_res,
    ``steps``) + λ·Sinkhorn(raw_res, ``iters``), with alpha (4,) = (α_pre, α_post, α_res, λ).

    Raises:
        ValueError: for shapes that do not fit together, alpha not (4,), or n < 3.
    """
    return _forward(x, phi, bias, alpha, eps, HYBRID, iters, steps)[:5]


def hybrid_coefficients_backward(x, phi, bias, alpha, out, rinv, g_pre, g_post, g_res, iters, steps, groups=None):
    """(∂x, ∂φ, ∂bias, ∂alpha (4,), the last ∂λ) of :func:`hybrid_coefficients_forward`."""
    return _backward(x, phi, bias, alpha, out, rinv, g_pre, g_post, g_res, HYBRID, iters, steps, groups)
