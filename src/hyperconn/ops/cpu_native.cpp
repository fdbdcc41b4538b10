// Per-token stream ops of the CPU path, one pass over the (M, n, C) stream tensor each.
//
// Built at first use by hyperconn/ops/cpu_native.py (plain C ABI, no torch headers, so
// it compiles in about a second) and called through ctypes from the autograd Functions
// of hyperconn/ops/cpu.py; the torch ops there are the fallback and the reference.
//
// Also the per-token Sinkhorn of mhc/hybrid (sinkhorn_fwd / sinkhorn_bwd; z, p, g, dz are
// (M, n, n)) and Iso-NS's Newton-Schulz steps (poly_fwd / poly_bwd on (M, m, m) blocks):
// the torch path runs ~8-10 tiny ops per step over all tokens; here 16 tokens at a time
// iterate in L1 with the token index innermost, so every step is a vectorised loop.
//
// Layout: every array is contiguous; a token's n streams are adjacent rows of C values.
//   x, g, gx, out : (M, n, C)      y, u, gu, gy : (M, C)
//   h_pre, h_post : (M, n)         h_res        : (M, n, n), h_res[m, i, j] row i
// Any output pointer may be null (that gradient is not needed). Tokens are split over
// `threads` OpenMP threads; the inner loops over C are vectorised (`omp simd`).
//
// Why not torch: the same contractions as torch.bmm on (M, n, n) x (M, n, C) ran at
// ~3 GB/s on one core (per-batch overhead of a tiny GEMM), and the merge backward took
// four of them; here one pass over a token's rows, which sit in L1, does all four.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

// Explicit vectors (GCC/clang vector extensions): 8 fp32 or 4 fp64 lanes, lowered to
// whatever the compiler targets (AVX-512/AVX2 halves, NEON pairs).
template <typename T> struct Lanes;
template <> struct Lanes<float> {
  typedef float V __attribute__((vector_size(32)));
  static constexpr int W = 8;
};
template <> struct Lanes<double> {
  typedef double V __attribute__((vector_size(32)));
  static constexpr int W = 4;
};
// Two lane-vectors in one: with AVX-512 one 64-byte register (16 fp32 / 8 fp64 lanes), so
// the projection's GEMM tiles issue half the FMAs (Intel server cores have two 512-bit FMA
// units; Zen 4 runs one as two 256-bit halves, no slower). Elsewhere the projection keeps
// pairs of W-lane vectors, as every other kernel does: the tiles below keep both branches
// because GCC lowers a 64-byte vector on AVX2 through memory (the wide code built with
// -march=haswell ran at 14 GFLOP/s against 78 for the W-lane code, 2026-12-03).
#ifdef __AVX512F__
constexpr bool kWide = true;
#else
constexpr bool kWide = false;
#endif
template <typename T> struct Wide;
template <> struct Wide<float> { typedef float V __attribute__((vector_size(64))); };
template <> struct Wide<double> { typedef double V __attribute__((vector_size(64))); };
// A scalar in every lane, and the low W lanes of a wide vector (free: the ymm half of the
// zmm register). One register broadcast feeding both FMAs of a tile row: written as
// `scalar * vector`, GCC folds a broadcast load into each FMA, which makes the tile
// bound by load ports instead of FMA units.
template <typename VW, typename T>
inline VW broadcast(T s) { return s - VW{}; }
template <typename V, typename VW>
inline V low_half(const VW& v) {
  V r;
  std::memcpy(&r, &v, sizeof(V));
  return r;
}

// memcpy, not a pointer cast: unaligned and free of aliasing questions; compiles to one move.
template <typename V, typename T>
inline V vload(const T* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <typename V, typename T>
inline void vstore(T* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }

// <a, b> over C values with four independent vector accumulators: `omp simd reduction`
// keeps one, so a dot product is a chain of dependent FMAs (~4 cycles per 8 values);
// the merge backward's n² + n of them per token made it latency-bound (~40 % of copy
// bandwidth at n = 4, C = 512).
template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t C) {
  using V = typename Lanes<T>::V;
  constexpr int64_t W = Lanes<T>::W;
  V s0 = V{}, s1 = V{}, s2 = V{}, s3 = V{};
  int64_t c = 0;
  for (; c + 4 * W <= C; c += 4 * W) {
    s0 += vload<V>(a + c) * vload<V>(b + c);
    s1 += vload<V>(a + c + W) * vload<V>(b + c + W);
    s2 += vload<V>(a + c + 2 * W) * vload<V>(b + c + 2 * W);
    s3 += vload<V>(a + c + 3 * W) * vload<V>(b + c + 3 * W);
  }
  for (; c + W <= C; c += W) s0 += vload<V>(a + c) * vload<V>(b + c);
  const V v = (s0 + s1) + (s2 + s3);
  T s = 0;
  for (int64_t l = 0; l < W; ++l) s += v[l];
  for (; c < C; ++c) s += a[c] * b[c];
  return s;
}


template <typename T>
void pre_fwd(const T* __restrict x, const T* __restrict h, T* __restrict u,
             int64_t M, int64_t n, int64_t C, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const T* xm = x + m * n * C;
    const T* hm = h + m * n;
    T* um = u + m * C;
    const T h0 = hm[0];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) um[c] = h0 * xm[c];
    for (int64_t j = 1; j < n; ++j) {
      const T hj = hm[j];
      const T* xj = xm + j * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) um[c] += hj * xj[c];
    }
  }
}

// gx[m, j, :] (+)= h[m, j] * gu[m, :];  gh[m, j] = <x[m, j, :], gu[m, :]>
template <typename T>
void pre_bwd(const T* __restrict x, const T* __restrict h, const T* __restrict gu,
             T* __restrict gx, int accumulate, T* __restrict gh,
             int64_t M, int64_t n, int64_t C, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const T* xm = x + m * n * C;
    const T* gum = gu + m * C;
    for (int64_t j = 0; j < n; ++j) {
      const T* xj = xm + j * C;
      if (gx) {
        T* gxj = gx + (m * n + j) * C;
        const T hj = h[m * n + j];
        if (accumulate) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) gxj[c] += hj * gum[c];
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) gxj[c] = hj * gum[c];
        }
      }
      if (gh) gh[m * n + j] = dot(xj, gum, C);
    }
  }
}

// out[m, i, :] = sum_j h_res[m, i, j] x[m, j, :] + h_post[m, i] y[m, :]
template <typename T>
void merge_fwd(const T* __restrict x, const T* __restrict hr, const T* __restrict hp,
               const T* __restrict y, T* __restrict out,
               int64_t M, int64_t n, int64_t C, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const T* xm = x + m * n * C;
    const T* hrm = hr + m * n * n;
    const T* ym = y + m * C;
    for (int64_t i = 0; i < n; ++i) {
      T* oi = out + (m * n + i) * C;
      const T p = hp[m * n + i];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) oi[c] = p * ym[c];
      for (int64_t j = 0; j < n; ++j) {
        const T r = hrm[i * n + j];
        const T* xj = xm + j * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) oi[c] += r * xj[c];
      }
    }
  }
}

// A W-lane vector stored past the caches (a non-temporal store) where the ISA has one for
// it (x86 with AVX: 8 fp32 or 4 fp64 lanes, 32-byte aligned), else an ordinary store.
// Used for the merge backward's ∂x when it is larger than the caches: an ordinary store
// first reads the line it writes (read-for-ownership), a third more traffic on a pass
// that reads two stream tensors and writes one.
template <typename V, typename T>
inline void vstream(T* p, const V& v) {
#if defined(__AVX__)
  if constexpr (sizeof(T) == 4 && sizeof(V) == 32) {
    _mm256_stream_ps(reinterpret_cast<float*>(p), reinterpret_cast<const __m256&>(v));
    return;
  } else if constexpr (sizeof(T) == 8 && sizeof(V) == 32) {
    _mm256_stream_pd(reinterpret_cast<double*>(p), reinterpret_cast<const __m256d&>(v));
    return;
  }
#endif
  vstore(p, v);
}

inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();  // non-temporal stores are weakly ordered: drain them before returning
#endif
}

// Outputs at least this large bypass the caches (see vstream): a tensor of several MiB
// would not stay cached for its next reader anyway; below it, it may (the model step's
// 2 MiB ∂x is read again by the projection backward while still in L2/L3).
constexpr int64_t kStreamBytes = int64_t(6) << 20;

// The merge backward for n = N ≤ 8 with every output wanted: per token, the n² + n dot
// products first (reading g's and x's rows in order, so the hardware prefetcher follows),
// then ∂x and ∂y per W-lane chunk with g's n rows of the chunk in registers (from L1),
// each output vector stored once instead of accumulated n times in memory.
template <typename T, int N>
void merge_bwd_small(const T* __restrict g, const T* __restrict x, const T* __restrict hr,
                     const T* __restrict hp, const T* __restrict y,
                     T* __restrict gx, T* __restrict ghr, T* __restrict ghp, T* __restrict gy,
                     int64_t M, int64_t C, bool stream, int threads) {
  using V = typename Lanes<T>::V;
  constexpr int64_t W = Lanes<T>::W;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      const T* gm = g + m * N * C;
      const T* xm = x + m * N * C;
      const T* hrm = hr + m * N * N;
      const T* hpm = hp + m * N;
      const T* ym = y + m * C;
      for (int i = 0; i < N; ++i) {
        const T* gi = gm + i * C;
        for (int j = 0; j < N; ++j) ghr[(m * N + i) * N + j] = dot(gi, xm + j * C, C);
        ghp[m * N + i] = dot(gi, ym, C);
      }
      T* gxm = gx + m * N * C;
      T* gym = gy + m * C;
      int64_t c = 0;
      for (; c + W <= C; c += W) {
        V gv[N];
        for (int i = 0; i < N; ++i) gv[i] = vload<V>(gm + i * C + c);
        for (int j = 0; j < N; ++j) {
          V acc = hrm[j] * gv[0];
          for (int i = 1; i < N; ++i) acc += hrm[i * N + j] * gv[i];
          if (stream) vstream(gxm + j * C + c, acc); else vstore(gxm + j * C + c, acc);
        }
        V a = hpm[0] * gv[0];
        for (int i = 1; i < N; ++i) a += hpm[i] * gv[i];
        vstore(gym + c, a);
      }
      for (; c < C; ++c) {  // tail (never with stream: C is then a multiple of W)
        for (int j = 0; j < N; ++j) {
          T acc = hrm[j] * gm[c];
          for (int i = 1; i < N; ++i) acc += hrm[i * N + j] * gm[i * C + c];
          gxm[j * C + c] = acc;
        }
        T a = hpm[0] * gm[c];
        for (int i = 1; i < N; ++i) a += hpm[i] * gm[i * C + c];
        gym[c] = a;
      }
    }
    if (stream) stream_fence();
  }
}

template <typename T>
bool merge_bwd_dispatch(const T* g, const T* x, const T* hr, const T* hp, const T* y, T* gx, T* ghr,
                        T* ghp, T* gy, int64_t M, int64_t n, int64_t C, int threads) {
  if (!(gx && ghr && ghp && gy)) return false;
  constexpr int64_t W = Lanes<T>::W;
  const bool stream = M * n * C * int64_t(sizeof(T)) >= kStreamBytes && C % W == 0 &&
                      reinterpret_cast<uintptr_t>(gx) % 32 == 0;
  switch (n) {
#define HC_MERGE_BWD_N(K) \
    case K: merge_bwd_small<T, K>(g, x, hr, hp, y, gx, ghr, ghp, gy, M, C, stream, threads); return true;
    HC_MERGE_BWD_N(1) HC_MERGE_BWD_N(2) HC_MERGE_BWD_N(3) HC_MERGE_BWD_N(4)
    HC_MERGE_BWD_N(5) HC_MERGE_BWD_N(6) HC_MERGE_BWD_N(7) HC_MERGE_BWD_N(8)
#undef HC_MERGE_BWD_N
    default: return false;
  }
}

// For out = h_res x + h_post ⊗ y and its gradient g:
//   gx[m, j, :]   = sum_i h_res[m, i, j] g[m, i, :]
//   ghr[m, i, j]  = <g[m, i, :], x[m, j, :]>
//   ghp[m, i]     = <g[m, i, :], y[m, :]>
//   gy[m, :]      = sum_i h_post[m, i] g[m, i, :]
template <typename T>
void merge_bwd(const T* __restrict g, const T* __restrict x, const T* __restrict hr,
               const T* __restrict hp, const T* __restrict y,
               T* __restrict gx, T* __restrict ghr, T* __restrict ghp, T* __restrict gy,
               int64_t M, int64_t n, int64_t C, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const T* gm = g + m * n * C;
    const T* xm = x + m * n * C;
    const T* hrm = hr + m * n * n;
    const T* hpm = hp + m * n;
    const T* ym = y + m * C;
    if (gx) {
      for (int64_t j = 0; j < n; ++j) {
        T* gxj = gx + (m * n + j) * C;
        const T h0 = hrm[j];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) gxj[c] = h0 * gm[c];
        for (int64_t i = 1; i < n; ++i) {
          const T r = hrm[i * n + j];
          const T* gi = gm + i * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) gxj[c] += r * gi[c];
        }
      }
    }
    if (gy) {
      T* gym = gy + m * C;
      const T p0 = hpm[0];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) gym[c] = p0 * gm[c];
      for (int64_t i = 1; i < n; ++i) {
        const T p = hpm[i];
        const T* gi = gm + i * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) gym[c] += p * gi[c];
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      const T* gi = gm + i * C;
      if (ghr)
        for (int64_t j = 0; j < n; ++j) ghr[(m * n + i) * n + j] = dot(gi, xm + j * C, C);
      if (ghp) ghp[m * n + i] = dot(gi, ym, C);
    }
  }
}


// ---------------------------------------------------------------------------- Sinkhorn
// Whether the exp-domain iteration is safe for this matrix (finite logits, range within
// 30 in fp32 / 300 in fp64, as projections/sinkhorn.py); *shift gets the max logit.
template <typename T>
bool exp_domain_ok(const T* z, int64_t nn, T* shift) {
  T lo = z[0], hi = z[0];
  for (int64_t k = 0; k < nn; ++k) {
    if (!std::isfinite(z[k])) return false;
    lo = z[k] < lo ? z[k] : lo;
    hi = z[k] > hi ? z[k] : hi;
  }
  *shift = hi;
  return hi - lo <= (sizeof(T) == 4 ? T(30) : T(300));
}

// Iterates of the truncated map, columns then rows, `iters` times, into trace
// (2·iters matrices of n×n: trace[2t] after the t-th column step, trace[2t+1] after the
// row step). Exp domain (P ← P / Σ_d P after a max shift) when the logit range allows it
// without underflow (same rule as projections/sinkhorn.py), log domain otherwise.
// Returns false for a matrix with a non-finite logit (the caller writes NaN).
template <typename T>
bool sinkhorn_trace(const T* z, T* trace, int64_t n, int iters) {
  const int64_t nn = n * n;
  for (int64_t k = 0; k < nn; ++k)
    if (!std::isfinite(z[k])) return false;
  T hi;
  if (exp_domain_ok(z, nn, &hi)) {
    T* p = trace;
    for (int64_t k = 0; k < nn; ++k) p[k] = std::exp(z[k] - hi);
    const T* prev = p;
    for (int t = 0; t < iters; ++t) {
      T* col = trace + (2 * t) * nn;
      T* row = col + nn;
      for (int64_t j = 0; j < n; ++j) {
        T s = 0;
        for (int64_t i = 0; i < n; ++i) s += prev[i * n + j];
        const T inv = T(1) / s;
        for (int64_t i = 0; i < n; ++i) col[i * n + j] = prev[i * n + j] * inv;
      }
      for (int64_t i = 0; i < n; ++i) {
        T s = 0;
        for (int64_t j = 0; j < n; ++j) s += col[i * n + j];
        const T inv = T(1) / s;
        for (int64_t j = 0; j < n; ++j) row[i * n + j] = col[i * n + j] * inv;
      }
      prev = row;
    }
    return true;
  }
  // Log domain: y = z − LSE_d(z) per half-step, exp(y) into the trace.
  std::vector<T> cur(z, z + nn);
  for (int t = 0; t < iters; ++t) {
    for (int half = 0; half < 2; ++half) {
      T* out = trace + (2 * t + half) * nn;
      for (int64_t a = 0; a < n; ++a) {  // a: the column (half 0) or the row (half 1)
        T m = -std::numeric_limits<T>::infinity();
        for (int64_t b = 0; b < n; ++b) {
          const T v = half ? cur[a * n + b] : cur[b * n + a];
          m = v > m ? v : m;
        }
        T s = 0;
        for (int64_t b = 0; b < n; ++b) s += std::exp((half ? cur[a * n + b] : cur[b * n + a]) - m);
        const T lse = m + std::log(s);
        for (int64_t b = 0; b < n; ++b) {
          T& v = half ? cur[a * n + b] : cur[b * n + a];
          v -= lse;
          (half ? out[a * n + b] : out[b * n + a]) = std::exp(v);
        }
      }
    }
  }
  return true;
}

// Block path: BT tokens at once, the token index innermost (lanes), so every step of the
// iteration is a vectorised loop over BT tokens instead of scalar work on one 4×4 matrix
// (the scalar loop above ran at ~2 µs per token). Tokens that need the log domain, or
// have a non-finite logit, take the scalar path.
constexpr int64_t BT = 16;


// Iterates of BT tokens into tr (2·iters, nn, BT); lanes past `count` hold copies of a
// harmless matrix (all ones) and are never written back. With keep = false (the forward:
// only the last iterate is wanted) the steps alternate between tr's first two matrices,
// so the block's working set stays in L1 instead of writing 2·iters of them.
// Returns the last iterate.
template <typename T>
const T* block_trace(const T* z, const T* shift, int64_t count, T* tr, T* p0, int64_t n, int iters,
                     bool keep = true) {
  const int64_t nn = n * n;
  for (int64_t k = 0; k < nn; ++k)
    for (int64_t b = 0; b < BT; ++b) p0[k * BT + b] = b < count ? std::exp(z[b * nn + k] - shift[b]) : T(1);
  const T* prev = p0;
  for (int t = 0; t < iters; ++t) {
    T* col = tr + (keep ? 2 * t : 0) * nn * BT;
    T* row = col + nn * BT;
    for (int64_t j = 0; j < n; ++j) {
      T s[BT] = {};
      for (int64_t i = 0; i < n; ++i) {
        const T* v = prev + (i * n + j) * BT;
#pragma omp simd
        for (int64_t b = 0; b < BT; ++b) s[b] += v[b];
      }
      // One reciprocal per column and n products: n divisions per column were most of
      // the block's time (a vector division costs ~5-10 multiplications).
#pragma omp simd
      for (int64_t b = 0; b < BT; ++b) s[b] = T(1) / s[b];
      for (int64_t i = 0; i < n; ++i) {
        const T* v = prev + (i * n + j) * BT;
        T* o = col + (i * n + j) * BT;
#pragma omp simd
        for (int64_t b = 0; b < BT; ++b) o[b] = v[b] * s[b];
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      T s[BT] = {};
      for (int64_t j = 0; j < n; ++j) {
        const T* v = col + (i * n + j) * BT;
#pragma omp simd
        for (int64_t b = 0; b < BT; ++b) s[b] += v[b];
      }
#pragma omp simd
      for (int64_t b = 0; b < BT; ++b) s[b] = T(1) / s[b];
      for (int64_t j = 0; j < n; ++j) {
        const T* v = col + (i * n + j) * BT;
        T* o = row + (i * n + j) * BT;
#pragma omp simd
        for (int64_t b = 0; b < BT; ++b) o[b] = v[b] * s[b];
      }
    }
    prev = row;
  }
  return prev;
}

// One block of tokens [m0, m0 + count): fills the flags, returns whether all take the block path.
template <typename T>
bool block_ok(const T* z, int64_t m0, int64_t count, int64_t nn, T* shift) {
  bool ok = true;
  for (int64_t b = 0; b < count; ++b) ok &= exp_domain_ok(z + (m0 + b) * nn, nn, shift + b);
  return ok;
}

template <typename T>
void sinkhorn_fwd(const T* z, T* p, int64_t M, int64_t n, int iters, int threads) {
  const int64_t nn = n * n;
  const int64_t blocks = (M + BT - 1) / BT;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<T> trace(2 * iters * nn * BT), p0(nn * BT);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t m0 = blk * BT, count = M - m0 < BT ? M - m0 : BT;
      T shift[BT];
      if (block_ok(z, m0, count, nn, shift)) {
        const T* last = block_trace(z + m0 * nn, shift, count, trace.data(), p0.data(), n, iters, false);
        for (int64_t b = 0; b < count; ++b)
          for (int64_t k = 0; k < nn; ++k) p[(m0 + b) * nn + k] = last[k * BT + b];
        continue;
      }
      for (int64_t m = m0; m < m0 + count; ++m) {
        T* pm = p + m * nn;
        if (sinkhorn_trace(z + m * nn, trace.data(), n, iters)) {
          std::memcpy(pm, trace.data() + (2 * iters - 1) * nn, nn * sizeof(T));
        } else {
          for (int64_t k = 0; k < nn; ++k) pm[k] = std::numeric_limits<T>::quiet_NaN();
        }
      }
    }
  }
}

// The unrolled map's exact gradient: g ← G ⊙ P_T, then for every half-step in reverse
// g ← g − P_t ⊙ Σ_d g (d the dimension that step normalised).
template <typename T>
void reverse_sweep_one(const T* trace, const T* g, T* d, int64_t n, int iters) {
  const int64_t nn = n * n;
  const T* last = trace + (2 * iters - 1) * nn;
  for (int64_t k = 0; k < nn; ++k) d[k] = g[k] * last[k];
  for (int step = 2 * iters - 1; step >= 0; --step) {
    const T* pt = trace + step * nn;
    if (step % 2) {  // a row step: sums over j
      for (int64_t i = 0; i < n; ++i) {
        T s = 0;
        for (int64_t j = 0; j < n; ++j) s += d[i * n + j];
        for (int64_t j = 0; j < n; ++j) d[i * n + j] -= pt[i * n + j] * s;
      }
    } else {          // a column step: sums over i
      for (int64_t j = 0; j < n; ++j) {
        T s = 0;
        for (int64_t i = 0; i < n; ++i) s += d[i * n + j];
        for (int64_t i = 0; i < n; ++i) d[i * n + j] -= pt[i * n + j] * s;
      }
    }
  }
}

template <typename T>
void sinkhorn_bwd(const T* z, const T* g, T* dz, int64_t M, int64_t n, int iters, int threads) {
  const int64_t nn = n * n;
  const int64_t blocks = (M + BT - 1) / BT;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<T> trace(2 * iters * nn * BT), p0(nn * BT), d(nn * BT);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t m0 = blk * BT, count = M - m0 < BT ? M - m0 : BT;
      T shift[BT];
      if (block_ok(z, m0, count, nn, shift)) {
        T* tr = trace.data();
        const T* last = block_trace(z + m0 * nn, shift, count, tr, p0.data(), n, iters);
        for (int64_t k = 0; k < nn; ++k)
          for (int64_t b = 0; b < BT; ++b) d[k * BT + b] = (b < count ? g[(m0 + b) * nn + k] : T(0)) * last[k * BT + b];
        for (int step = 2 * iters - 1; step >= 0; --step) {
          const T* pt = tr + step * nn * BT;
          const bool rows = step % 2;
          for (int64_t a = 0; a < n; ++a) {
            T s[BT] = {};
            for (int64_t c = 0; c < n; ++c) {
              const int64_t k = rows ? a * n + c : c * n + a;
              const T* v = d.data() + k * BT;
#pragma omp simd
              for (int64_t b = 0; b < BT; ++b) s[b] += v[b];
            }
            for (int64_t c = 0; c < n; ++c) {
              const int64_t k = rows ? a * n + c : c * n + a;
              T* v = d.data() + k * BT;
              const T* q = pt + k * BT;
#pragma omp simd
              for (int64_t b = 0; b < BT; ++b) v[b] -= q[b] * s[b];
            }
          }
        }
        for (int64_t b = 0; b < count; ++b)
          for (int64_t k = 0; k < nn; ++k) dz[(m0 + b) * nn + k] = d[k * BT + b];
        continue;
      }
      for (int64_t m = m0; m < m0 + count; ++m) {
        T* dm = dz + m * nn;
        if (!sinkhorn_trace(z + m * nn, trace.data(), n, iters)) {
          for (int64_t k = 0; k < nn; ++k) dm[k] = std::numeric_limits<T>::quiet_NaN();
          continue;
        }
        reverse_sweep_one(trace.data(), g + m * nn, dm, n, iters);
      }
    }
  }
}

// ---------------------------------------------------------------------------- Newton-Schulz
// Iso-NS's odd-polynomial steps X ← aX + bX(XᵀX) + cX(XᵀX)² on (M, m, m) blocks (m ≤ 8 in
// practice), BT tokens at a time with the token index innermost, as the Sinkhorn above:
// on a CPU the torch path is ~10 small ops per step over all tokens.
// Lane arrays: A[(i·m + j)·BT + b] is entry (i, j) of token b's matrix.

// C = op(A) B per lane, op(A) = A or Aᵀ.
template <typename T>
void lane_mm(const T* A, const T* B, T* C, int64_t m, bool trans_a) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) {
      T* c = C + (i * m + j) * BT;
#pragma omp simd
      for (int64_t b = 0; b < BT; ++b) c[b] = 0;
      for (int64_t k = 0; k < m; ++k) {
        const T* a = A + (trans_a ? (k * m + i) : (i * m + k)) * BT;
        const T* bb = B + (k * m + j) * BT;
#pragma omp simd
        for (int64_t b = 0; b < BT; ++b) c[b] += a[b] * bb[b];
      }
    }
}

// out = alpha·P + beta·Q (lane arrays of mm entries); out may alias P or Q.
template <typename T>
void lane_axpby(T alpha, const T* P, T beta, const T* Q, T* out, int64_t mm) {
#pragma omp simd
  for (int64_t k = 0; k < mm * BT; ++k) out[k] = alpha * P[k] + beta * Q[k];
}

// One step: x ← a x + x (b A + c A²), A = xᵀx. Scratch: 3 lane arrays.
template <typename T>
void lane_poly_step(T* x, const T* coef, int64_t m, T* gram, T* poly, T* tmp) {
  const T a = coef[0], b = coef[1], c = coef[2];
  const int64_t mm = m * m;
  lane_mm(x, x, gram, m, true);
  if (c != 0) {
    lane_mm(gram, gram, poly, m, false);
    lane_axpby(b, gram, c, poly, poly, mm);
  } else {
    lane_axpby(b, gram, T(0), gram, poly, mm);
  }
  lane_mm(x, poly, tmp, m, false);
  lane_axpby(a, x, T(1), tmp, x, mm);
}

template <typename T>
void lane_load(const T* src, int64_t m0, int64_t cnt, int64_t mm, T* dst) {
  for (int64_t k = 0; k < mm; ++k)
    for (int64_t b = 0; b < BT; ++b) dst[k * BT + b] = b < cnt ? src[(m0 + b) * mm + k] : T(0);
}

template <typename T>
void lane_store(const T* src, int64_t m0, int64_t cnt, int64_t mm, T* dst) {
  for (int64_t b = 0; b < cnt; ++b)
    for (int64_t k = 0; k < mm; ++k) dst[(m0 + b) * mm + k] = src[k * BT + b];
}

template <typename T>
void poly_fwd(const T* x0, const T* coef, int S, T* out, int64_t M, int64_t m, int threads) {
  const int64_t mm = m * m, blocks = (M + BT - 1) / BT;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<T> buf(4 * mm * BT);
    T *x = buf.data(), *gram = x + mm * BT, *poly = gram + mm * BT, *tmp = poly + mm * BT;
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t m0 = blk * BT, cnt = M - m0 < BT ? M - m0 : BT;
      lane_load(x0, m0, cnt, mm, x);
      for (int s = 0; s < S; ++s) lane_poly_step(x, coef + 3 * s, m, gram, poly, tmp);
      lane_store(x, m0, cnt, mm, out);
    }
  }
}

// ∂X0 given ∂X_S = g: with A = XᵀX, Mx = aI + bA + cA², W = XᵀG, Z = bW + c(WA + AW),
// ∂X = G Mx + X (Z + Zᵀ), from the last step back (iterates recomputed, S+1 kept).
template <typename T>
void poly_bwd(const T* x0, const T* coef, int S, const T* g, T* dx, int64_t M, int64_t m, int threads) {
  const int64_t mm = m * m, blocks = (M + BT - 1) / BT;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<T> trace((S + 1) * mm * BT), buf(8 * mm * BT);
    T *gram = buf.data(), *poly = gram + mm * BT, *tmp = poly + mm * BT, *w = tmp + mm * BT;
    T *z = w + mm * BT, *gv = z + mm * BT, *acc = gv + mm * BT, *tmp2 = acc + mm * BT;
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t m0 = blk * BT, cnt = M - m0 < BT ? M - m0 : BT;
      lane_load(x0, m0, cnt, mm, trace.data());
      for (int s = 0; s < S; ++s) {
        T* next = trace.data() + (s + 1) * mm * BT;
        std::memcpy(next, next - mm * BT, sizeof(T) * mm * BT);
        lane_poly_step(next, coef + 3 * s, m, gram, poly, tmp);
      }
      lane_load(g, m0, cnt, mm, gv);
      for (int s = S - 1; s >= 0; --s) {
        const T* x = trace.data() + s * mm * BT;
        const T a = coef[3 * s], b = coef[3 * s + 1], c = coef[3 * s + 2];
        lane_mm(x, x, gram, m, true);                   // A
        lane_mm(x, gv, w, m, true);                     // W = XᵀG
        if (c != 0) {
          lane_mm(gram, gram, poly, m, false);          // A²
          lane_axpby(b, gram, c, poly, poly, mm);       // bA + cA²
          lane_mm(w, gram, tmp, m, false);              // WA
          lane_mm(gram, w, tmp2, m, false);             // AW
          lane_axpby(T(1), tmp, T(1), tmp2, tmp, mm);
          lane_axpby(b, w, c, tmp, z, mm);              // Z = bW + c(WA + AW)
        } else {
          lane_axpby(b, gram, T(0), gram, poly, mm);
          lane_axpby(b, w, T(0), w, z, mm);
        }
        for (int64_t i = 0; i < m; ++i)                 // tmp2 = Z + Zᵀ
          for (int64_t j = 0; j < m; ++j) {
            const T* zij = z + (i * m + j) * BT;
            const T* zji = z + (j * m + i) * BT;
            T* o = tmp2 + (i * m + j) * BT;
#pragma omp simd
            for (int64_t q = 0; q < BT; ++q) o[q] = zij[q] + zji[q];
          }
        lane_mm(gv, poly, tmp, m, false);               // G (bA + cA²)
        lane_mm(x, tmp2, acc, m, false);                // X (Z + Zᵀ)
        lane_axpby(T(1), tmp, T(1), acc, acc, mm);
        lane_axpby(a, gv, T(1), acc, gv, mm);           // G ← aG + G(bA + cA²) + X(Z + Zᵀ)
      }
      lane_store(gv, m0, cnt, mm, dx);
    }
  }
}

// ------------------------------------------------------------------ RMS projection
// out[m, :] = (x[m] φ) · r[m], r[m] = (mean_k x[m, k]² + eps)^(-1/2), x (M, K), φ (K, N)
// with K = n·C (a token's streams flattened) and N = n² + 2n coefficients (24 at n = 4):
// a tall-skinny GEMM that MKL runs at ~40 % of this core's FMA rate (2.2-2.4 ms for
// 1024 × 2048 × 24 here) and whose backward torch makes in three passes over x (∂x GEMM,
// the RMS term, the ∂φ GEMM). Here, register-blocked tiles with GCC/clang vector
// extensions (8 fp32 / 4 fp64 lanes; any ISA the compiler targets):
//   forward : TB tokens × 3 lane-vectors of φ's columns per tile, Σx² from the same
//             rows while they are in L1;
//   backward: per chunk of 32 tokens, ∂x tiles (TB tokens × 3 lane-vectors of k) with
//             the RMS term and any earlier ∂x added in the same store, then ∂φ for the
//             chunk while its rows are still in L2 (accumulators for TB values of k
//             across the chunk's tokens): x is read from memory once.
// ∂φ is summed per thread (one (K, N) partial each) and reduced at the end.

constexpr int PV = 3;  // lane-vectors per tile row (3 × 8 = 24 fp32 values: N at n = 4)
#ifdef __AVX512F__
constexpr int PT = 8;  // tokens per tile: 8 × 3 accumulators + 3 operands in 32 registers
#else
constexpr int PT = 4;  // 16 registers (AVX2, NEON pairs)
#endif
constexpr int64_t PCHUNK = 32;  // tokens per backward chunk (32 rows of 8 KiB stay in L2)

// φ (K, N) → pk (nch, K, L), L = PV·W columns per chunk, zero-padded past N.
template <typename T>
void pack_columns(const T* phi, T* pk, int64_t K, int64_t N) {
  constexpr int64_t L = PV * Lanes<T>::W;
  const int64_t nch = (N + L - 1) / L;
  for (int64_t c = 0; c < nch; ++c)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t l = 0; l < L; ++l) {
        const int64_t j = c * L + l;
        pk[(c * K + k) * L + l] = j < N ? phi[k * N + j] : T(0);
      }
}

// φ (K, N) → pt (nkb, N, KL), KL = KB·W values of k per block: per block the N rows of
// φᵀ are one sequential stream (24 interleaved rows of φᵀ ran ~30 % slower).
template <typename T, int KB>
void pack_rows(const T* phi, T* pt, int64_t K, int64_t N) {
  constexpr int64_t KL = KB * Lanes<T>::W;
  const int64_t nkb = (K + KL - 1) / KL;
  for (int64_t kb = 0; kb < nkb; ++kb)
    for (int64_t j = 0; j < N; ++j)
      for (int64_t l = 0; l < KL; ++l) {
        const int64_t k = kb * KL + l;
        pt[(kb * N + j) * KL + l] = k < K ? phi[k * N + j] : T(0);
      }
}

// out[b, :] = x[b] φ for B tokens (no scale yet).
template <typename T, int B>
inline void proj_fwd_tile(const T* __restrict x, const T* __restrict pk, T* __restrict out,
                          int64_t K, int64_t N, int64_t nch) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  constexpr int64_t L = PV * W;
  using VW = typename Wide<T>::V;
  static_assert(PV == 3, "the wide tiles below split a row of L = 3W values as 2W + W");
  for (int64_t c = 0; c < nch; ++c) {
    const T* p = pk + c * K * L;
    const int64_t lim = std::min<int64_t>(L, N - c * L);
    T tmp[L];
    if constexpr (kWide) {  // the row as one 2W-lane and one W-lane vector
      VW a01[B];
      V a2[B];
      for (int b = 0; b < B; ++b) a01[b] = VW{}, a2[b] = V{};
      for (int64_t k = 0; k < K; ++k, p += L) {
        const VW p01 = vload<VW>(p);
        const V p2 = vload<V>(p + 2 * W);
        for (int b = 0; b < B; ++b) {
          const VW xs = broadcast<VW>(x[b * K + k]);
          a01[b] += xs * p01;
          a2[b] += low_half<V>(xs) * p2;
        }
      }
      for (int b = 0; b < B; ++b) {
        vstore(tmp, a01[b]);
        vstore(tmp + 2 * W, a2[b]);
        for (int64_t l = 0; l < lim; ++l) out[b * N + c * L + l] = tmp[l];
      }
    } else {
      V acc[B][PV];
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < PV; ++h) acc[b][h] = V{};
      for (int64_t k = 0; k < K; ++k, p += L) {
        const V p0 = vload<V>(p), p1 = vload<V>(p + W), p2 = vload<V>(p + 2 * W);
        for (int b = 0; b < B; ++b) {
          const T xs = x[b * K + k];
          acc[b][0] += xs * p0;
          acc[b][1] += xs * p1;
          acc[b][2] += xs * p2;
        }
      }
      for (int b = 0; b < B; ++b) {
        for (int h = 0; h < PV; ++h) vstore(tmp + h * W, acc[b][h]);
        for (int64_t l = 0; l < lim; ++l) out[b * N + c * L + l] = tmp[l];
      }
    }
  }
}

template <typename T>
void proj_fwd(const T* x, const T* phi, T* out, T* inv, int64_t M, int64_t K, int64_t N, T eps,
              int threads) {
  constexpr int64_t L = PV * Lanes<T>::W;
  const int64_t nch = (N + L - 1) / L;
  std::vector<T> pk(nch * K * L);
  pack_columns(phi, pk.data(), K, N);
  const int64_t ntile = (M + PT - 1) / PT;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t ti = 0; ti < ntile; ++ti) {
    const int64_t m0 = ti * PT, cnt = std::min<int64_t>(PT, M - m0);
    if (cnt == PT) {
      proj_fwd_tile<T, PT>(x + m0 * K, pk.data(), out + m0 * N, K, N, nch);
    } else {
      for (int64_t b = 0; b < cnt; ++b)
        proj_fwd_tile<T, 1>(x + (m0 + b) * K, pk.data(), out + (m0 + b) * N, K, N, nch);
    }
    for (int64_t b = 0; b < cnt; ++b) {  // Σx² while the tile's rows are in L1/L2
      const T* xr = x + (m0 + b) * K;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += xr[k] * xr[k];
      const T r = T(1) / std::sqrt(s / T(K) + eps);
      inv[m0 + b] = r;
      for (int64_t j = 0; j < N; ++j) out[(m0 + b) * N + j] *= r;
    }
  }
}

// dx[b, k] (+)= Σ_j gp[b, j] φ[k, j] + rs[b] x[b, k] for B tokens.
template <typename T, int B, int KB>
inline void proj_dx_tile(const T* __restrict x, const T* __restrict pt, const T* __restrict gp,
                         const T* __restrict rs, T* __restrict dx, int accumulate, int64_t K,
                         int64_t N) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  constexpr int64_t KL = KB * W;
  const int64_t nkb = (K + KL - 1) / KL;
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t k0 = kb * KL;
    V acc[B][KB];
    const T* pr = pt + kb * N * KL;
    if constexpr (kWide && KB % 2 == 0) {  // KB/2 vectors of 2W lanes (see Wide)
      using VW = typename Wide<T>::V;
      constexpr int H = KB / 2;
      VW aw[B][H];
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h) aw[b][h] = VW{};
      for (int64_t j = 0; j < N; ++j, pr += KL) {
        VW p[H];
        for (int h = 0; h < H; ++h) p[h] = vload<VW>(pr + 2 * h * W);
        for (int b = 0; b < B; ++b) {
          const VW g = broadcast<VW>(gp[b * N + j]);
          for (int h = 0; h < H; ++h) aw[b][h] += g * p[h];
        }
      }
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h) std::memcpy(&acc[b][2 * h], &aw[b][h], sizeof(VW));
    } else {
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < KB; ++h) acc[b][h] = V{};
      for (int64_t j = 0; j < N; ++j, pr += KL) {
        V p[KB];
        for (int h = 0; h < KB; ++h) p[h] = vload<V>(pr + h * W);
        for (int b = 0; b < B; ++b) {
          const T g = gp[b * N + j];
          for (int h = 0; h < KB; ++h) acc[b][h] += g * p[h];
        }
      }
    }
    if (k0 + KL <= K) {
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < KB; ++h) {
          T* d = dx + b * K + k0 + h * W;
          V v = acc[b][h] + rs[b] * vload<V>(x + b * K + k0 + h * W);
          if (accumulate) v += vload<V>(d);
          vstore(d, v);
        }
    } else {  // the last, partial block of k
      for (int b = 0; b < B; ++b) {
        T tmp[KL];
        for (int h = 0; h < KB; ++h) vstore(tmp + h * W, acc[b][h]);
        for (int64_t k = k0; k < K; ++k) {
          const T v = tmp[k - k0] + rs[b] * x[b * K + k];
          dx[b * K + k] = accumulate ? dx[b * K + k] + v : v;
        }
      }
    }
  }
}

// dpk (nch, K, L) += Σ_t x[t, k] gq[t, c·L + l] over the cnt tokens of a chunk; gq (cnt, nch·L)
// is gp zero-padded per chunk of columns.
template <typename T>
inline void proj_dphi_chunk(const T* __restrict x, const T* __restrict gq, int64_t cnt,
                            T* __restrict dpk, int64_t K, int64_t nch) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  constexpr int64_t L = PV * W;
  constexpr int KK = PT;  // values of k per register block
  for (int64_t c = 0; c < nch; ++c) {
    T* d = dpk + c * K * L;
    int64_t k0 = 0;
    for (; k0 + KK <= K; k0 += KK) {
      if constexpr (kWide) {  // as proj_fwd_tile: a row of L values as 2W + W lanes
        using VW = typename Wide<T>::V;
        VW a01[KK];
        V a2[KK];
        for (int a = 0; a < KK; ++a) a01[a] = VW{}, a2[a] = V{};
        for (int64_t t = 0; t < cnt; ++t) {
          const T* g = gq + (t * nch + c) * L;
          const VW g01 = vload<VW>(g);
          const V g2 = vload<V>(g + 2 * W);
          const T* xr = x + t * K + k0;
          for (int a = 0; a < KK; ++a) {
            const VW xs = broadcast<VW>(xr[a]);
            a01[a] += xs * g01;
            a2[a] += low_half<V>(xs) * g2;
          }
        }
        for (int a = 0; a < KK; ++a) {
          T* dd = d + (k0 + a) * L;
          vstore(dd, vload<VW>(dd) + a01[a]);
          vstore(dd + 2 * W, vload<V>(dd + 2 * W) + a2[a]);
        }
        continue;
      }
      V acc[KK][PV];
      for (int a = 0; a < KK; ++a)
        for (int h = 0; h < PV; ++h) acc[a][h] = V{};
      for (int64_t t = 0; t < cnt; ++t) {
        const T* g = gq + (t * nch + c) * L;
        const V g0 = vload<V>(g), g1 = vload<V>(g + W), g2 = vload<V>(g + 2 * W);
        const T* xr = x + t * K + k0;
        for (int a = 0; a < KK; ++a) {
          const T xs = xr[a];
          acc[a][0] += xs * g0;
          acc[a][1] += xs * g1;
          acc[a][2] += xs * g2;
        }
      }
      for (int a = 0; a < KK; ++a)
        for (int h = 0; h < PV; ++h) {
          T* dd = d + (k0 + a) * L + h * W;
          vstore(dd, vload<V>(dd) + acc[a][h]);
        }
    }
    for (; k0 < K; ++k0) {
      V a0 = V{}, a1 = V{}, a2 = V{};
      for (int64_t t = 0; t < cnt; ++t) {
        const T* g = gq + (t * nch + c) * L;
        const T xs = x[t * K + k0];
        a0 += xs * vload<V>(g);
        a1 += xs * vload<V>(g + W);
        a2 += xs * vload<V>(g + 2 * W);
      }
      T* dd = d + k0 * L;
      vstore(dd, vload<V>(dd) + a0);
      vstore(dd + W, vload<V>(dd + W) + a1);
      vstore(dd + 2 * W, vload<V>(dd + 2 * W) + a2);
    }
  }
}

// Backward of proj_fwd from its output and scale: with gp = grad · r and
// rs = −(grad · out) r² / K (the RMS term; out = proj · r),
//   dx[m, :] (+)= gp[m] φᵀ + rs[m] x[m, :]     dphi = Σ_m x[m]ᵀ gp[m]
// Either output may be null.
template <typename T, int KB>
void proj_bwd_kb(const T* x, const T* phi, const T* grad, const T* out, const T* inv, T* dx,
                 int accumulate, T* dphi, int64_t M, int64_t K, int64_t N, int threads) {
  constexpr int64_t L = PV * Lanes<T>::W, KL = KB * Lanes<T>::W;
  const int64_t nch = (N + L - 1) / L, nkb = (K + KL - 1) / KL;
  std::vector<T> pt(dx ? nkb * N * KL : 0);
  if (dx) pack_rows<T, KB>(phi, pt.data(), K, N);
  const int nt = std::max(1, threads);
  const size_t part = static_cast<size_t>(nch * K * L);
  std::vector<T> dpk(dphi ? nt * part : 0, T(0));
  const int64_t nchunk = (M + PCHUNK - 1) / PCHUNK;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    T* mine = dphi ? dpk.data() + tid * part : nullptr;
    std::vector<T> gp(PCHUNK * N), gq(PCHUNK * nch * L, T(0));
    T rs[PCHUNK];
#pragma omp for schedule(static)
    for (int64_t ci = 0; ci < nchunk; ++ci) {
      const int64_t m0 = ci * PCHUNK, cnt = std::min<int64_t>(PCHUNK, M - m0);
      for (int64_t b = 0; b < cnt; ++b) {
        const T r = inv[m0 + b];
        T s = 0;
        for (int64_t j = 0; j < N; ++j) {
          const T gj = grad[(m0 + b) * N + j];
          s += gj * out[(m0 + b) * N + j];
          gp[b * N + j] = gq[b * nch * L + j] = gj * r;
        }
        rs[b] = -s * r * r / T(K);
      }
      if (dx) {
        int64_t b = 0;
        for (; b + PT <= cnt; b += PT)
          proj_dx_tile<T, PT, KB>(x + (m0 + b) * K, pt.data(), gp.data() + b * N, rs + b,
                                  dx + (m0 + b) * K, accumulate, K, N);
        for (; b < cnt; ++b)
          proj_dx_tile<T, 1, KB>(x + (m0 + b) * K, pt.data(), gp.data() + b * N, rs + b,
                                 dx + (m0 + b) * K, accumulate, K, N);
      }
      if (mine) proj_dphi_chunk<T>(x + m0 * K, gq.data(), cnt, mine, K, nch);
    }
  }
  if (dphi) {
    for (int t = 1; t < nt; ++t)
      for (size_t i = 0; i < part; ++i) dpk[i] += dpk[t * part + i];
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < N; ++j) dphi[k * N + j] = dpk[((j / L) * K + k) * L + j % L];
  }
}

// Three lane-vectors of k per ∂x tile, or two when K splits evenly into those and not
// into three (K = 512: 21⅓ blocks of 24 would leave a scalar tail per token).
template <typename T>
void proj_bwd(const T* x, const T* phi, const T* grad, const T* out, const T* inv, T* dx,
              int accumulate, T* dphi, int64_t M, int64_t K, int64_t N, int threads) {
  constexpr int64_t W = Lanes<T>::W;
  if (kWide && K % (4 * W) == 0)  // 2 × 2W lanes of k per token: 16 accumulators at PT = 8
    proj_bwd_kb<T, 4>(x, phi, grad, out, inv, dx, accumulate, dphi, M, K, N, threads);
  else if (K % (3 * W) != 0 && K % (2 * W) == 0)
    proj_bwd_kb<T, 2>(x, phi, grad, out, inv, dx, accumulate, dphi, M, K, N, threads);
  else
    proj_bwd_kb<T, 3>(x, phi, grad, out, inv, dx, accumulate, dphi, M, K, N, threads);
}

// ---------------------------------------------------------------------------- gates
// The elementwise part of hc's and mhc's coefficient path (ops/cpu_coefficients.py), per
// token: out (M, N = n² + 2n) is the scaled projection, raw = act·α_col + b with
// act = out (kind 0, mhc) or tanh(out) (kind 1, hc, written to `act`); then
//   kind 0: h_pre = σ(raw_pre), h_post = 2σ(raw_post), z = raw_res (the Sinkhorn logits)
//   kind 1: h_pre = raw_pre, h_post = raw_post, z = raw_res (= H_res)
// alpha (3,) scales the pre, post and res columns; bias (N,). One call instead of about a
// dozen torch ops on (M, N) tensors, whose dispatch cost more than their arithmetic.
template <typename T>
void gates_fwd(const T* out, const T* alpha, const T* bias, T* act, T* h_pre, T* h_post, T* z,
               int64_t M, int64_t n, int kind) {
  const int64_t N = n * n + 2 * n;
  for (int64_t m = 0; m < M; ++m) {
    const T* o = out + m * N;
    T* a = kind ? act + m * N : nullptr;
    for (int64_t c = 0; c < N; ++c) {
      T v = o[c];
      if (kind) a[c] = v = std::tanh(v);
      const T r = v * alpha[c < n ? 0 : (c < 2 * n ? 1 : 2)] + bias[c];
      if (c < n) {
        h_pre[m * n + c] = kind ? r : T(1) / (T(1) + std::exp(-r));
      } else if (c < 2 * n) {
        h_post[m * n + c - n] = kind ? r : T(2) / (T(1) + std::exp(-r));
      } else {
        z[m * n * n + c - 2 * n] = r;
      }
    }
  }
}

// Its backward, given ∂h_pre, ∂h_post (M, n) and ∂raw_res (M, n²: the Sinkhorn backward's
// output for mhc, ∂H_res for hc): d_raw per column (σ′ = s(1 − s), (2σ)′ = 2s(1 − s) with
// s = h_post/2; identity for hc), then
//   grad_out = d_raw·α_col (·(1 − act²) for hc: the projection's output gradient),
//   gb (N,)  = Σ_m d_raw,    galpha (3,) = Σ over each group's columns and tokens of d_raw·act.
template <typename T>
void gates_bwd(const T* g_pre, const T* g_post, const T* d_res, const T* h_pre, const T* h_post,
               const T* act, const T* alpha, T* grad_out, T* gb, T* galpha, int64_t M, int64_t n,
               int kind) {
  const int64_t N = n * n + 2 * n;
  std::vector<T> sb(N, T(0));
  T sa[3] = {0, 0, 0};
  for (int64_t m = 0; m < M; ++m) {
    const T* a = act + m * N;
    T* go = grad_out + m * N;
    for (int64_t c = 0; c < N; ++c) {
      const int grp = c < n ? 0 : (c < 2 * n ? 1 : 2);
      T d;
      if (grp == 0) {
        const T g = g_pre[m * n + c];
        const T h = h_pre[m * n + c];
        d = kind ? g : g * ((T(1) - h) * h);
      } else if (grp == 1) {
        const T g = g_post[m * n + c - n];
        const T s = kind ? T(0) : T(0.5) * h_post[m * n + c - n];
        d = kind ? g : (T(2) * g) * ((T(1) - s) * s);
      } else {
        d = d_res[m * n * n + c - 2 * n];
      }
      sb[c] += d;
      sa[grp] += d * a[c];
      const T ga = d * alpha[grp];
      go[c] = kind ? ga * (T(1) - a[c] * a[c]) : ga;
    }
  }
  for (int64_t c = 0; c < N; ++c) gb[c] = sb[c];
  for (int k = 0; k < 3; ++k) galpha[k] = sa[k];
}

}  // namespace

#define HC_EXPORT(T, S)                                                                  \
  extern "C" void hc_pre_fwd_##S(const T* x, const T* h, T* u, int64_t M, int64_t n,    \
                                 int64_t C, int threads) {                               \
    pre_fwd<T>(x, h, u, M, n, C, threads);                                               \
  }                                                                                      \
  extern "C" void hc_pre_bwd_##S(const T* x, const T* h, const T* gu, T* gx,            \
                                 int accumulate, T* gh, int64_t M, int64_t n, int64_t C, \
                                 int threads) {                                          \
    pre_bwd<T>(x, h, gu, gx, accumulate, gh, M, n, C, threads);                          \
  }                                                                                      \
  extern "C" void hc_merge_fwd_##S(const T* x, const T* hr, const T* hp, const T* y,    \
                                   T* out, int64_t M, int64_t n, int64_t C,              \
                                   int threads) {                                        \
    merge_fwd<T>(x, hr, hp, y, out, M, n, C, threads);                                   \
  }                                                                                      \
  extern "C" void hc_merge_bwd_##S(const T* g, const T* x, const T* hr, const T* hp,    \
                                   const T* y, T* gx, T* ghr, T* ghp, T* gy, int64_t M,  \
                                   int64_t n, int64_t C, int threads) {                  \
    if (!merge_bwd_dispatch<T>(g, x, hr, hp, y, gx, ghr, ghp, gy, M, n, C, threads))     \
      merge_bwd<T>(g, x, hr, hp, y, gx, ghr, ghp, gy, M, n, C, threads);                 \
  }                                                                                      \
  extern "C" void hc_sinkhorn_fwd_##S(const T* z, T* p, int64_t M, int64_t n, int iters, \
                                      int threads) {                                     \
    sinkhorn_fwd<T>(z, p, M, n, iters, threads);                                         \
  }                                                                                      \
  extern "C" void hc_sinkhorn_bwd_##S(const T* z, const T* g, T* dz, int64_t M,         \
                                      int64_t n, int iters, int threads) {               \
    sinkhorn_bwd<T>(z, g, dz, M, n, iters, threads);                                     \
  }

#define HC_EXPORT_POLY(T, S)                                                             \
  extern "C" void hc_poly_fwd_##S(const T* x0, const T* coef, int steps, T* out, int64_t M,\
                                  int64_t m, int threads) {                              \
    poly_fwd<T>(x0, coef, steps, out, M, m, threads);                                    \
  }                                                                                      \
  extern "C" void hc_poly_bwd_##S(const T* x0, const T* coef, int steps, const T* g, T* dx,\
                                  int64_t M, int64_t m, int threads) {                   \
    poly_bwd<T>(x0, coef, steps, g, dx, M, m, threads);                                  \
  }

HC_EXPORT_POLY(float, f32)
HC_EXPORT_POLY(double, f64)
HC_EXPORT(float, f32)
HC_EXPORT(double, f64)

#define HC_EXPORT_PROJ(T, S)                                                             \
  extern "C" void hc_proj_fwd_##S(const T* x, const T* phi, T* out, T* inv, int64_t M,   \
                                  int64_t K, int64_t N, double eps, int threads) {       \
    proj_fwd<T>(x, phi, out, inv, M, K, N, static_cast<T>(eps), threads);                \
  }                                                                                      \
  extern "C" void hc_proj_bwd_##S(const T* x, const T* phi, const T* grad, const T* out, \
                                  const T* inv, T* dx, int accumulate, T* dphi,          \
                                  int64_t M, int64_t K, int64_t N, int threads) {        \
    proj_bwd<T>(x, phi, grad, out, inv, dx, accumulate, dphi, M, K, N, threads);         \
  }

HC_EXPORT_PROJ(float, f32)
HC_EXPORT_PROJ(double, f64)

#define HC_EXPORT_GATES(T, S)                                                            \
  extern "C" void hc_gates_fwd_##S(const T* out, const T* alpha, const T* bias, T* act,  \
                                   T* h_pre, T* h_post, T* z, int64_t M, int64_t n,      \
                                   int kind) {                                           \
    gates_fwd<T>(out, alpha, bias, act, h_pre, h_post, z, M, n, kind);                   \
  }                                                                                      \
  extern "C" void hc_gates_bwd_##S(const T* g_pre, const T* g_post, const T* d_res,      \
                                   const T* h_pre, const T* h_post, const T* act,        \
                                   const T* alpha, T* grad_out, T* gb, T* galpha,        \
                                   int64_t M, int64_t n, int kind) {                     \
    gates_bwd<T>(g_pre, g_post, d_res, h_pre, h_post, act, alpha, grad_out, gb, galpha,  \
                 M, n, kind);                                                            \
  }

HC_EXPORT_GATES(float, f32)
HC_EXPORT_GATES(double, f64)

extern "C" int hc_abi_version() { return 6; }
