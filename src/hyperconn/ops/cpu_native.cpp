// Per-token stream ops of the CPU path, one pass over the (M, n, C) stream tensor each.
//
// Built at first use by hyperconn/ops/cpu_native.py (plain C ABI, no torch headers, so
// it compiles in about a second) and called through ctypes from the autograd Functions
// of hyperconn/ops/cpu.py; the torch ops there are the fallback and the reference.
//
// Also the per-token Sinkhorn of mhc/hybrid (sinkhorn_fwd / sinkhorn_bwd): z, p, g, dz
// (M, n, n); the torch path runs ~8 tiny ops per half-step over all tokens, here one
// token's n×n iteration stays in registers/L1.
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

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

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
      if (gh) {
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t c = 0; c < C; ++c) s += xj[c] * gum[c];
        gh[m * n + j] = s;
      }
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
      if (ghr) {
        for (int64_t j = 0; j < n; ++j) {
          const T* xj = xm + j * C;
          T s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t c = 0; c < C; ++c) s += gi[c] * xj[c];
          ghr[(m * n + i) * n + j] = s;
        }
      }
      if (ghp) {
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t c = 0; c < C; ++c) s += gi[c] * ym[c];
        ghp[m * n + i] = s;
      }
    }
  }
}


// ---------------------------------------------------------------------------- Sinkhorn
// Iterates of the truncated map, columns then rows, `iters` times, into trace
// (2·iters matrices of n×n: trace[2t] after the t-th column step, trace[2t+1] after the
// row step). Exp domain (P ← P / Σ_d P after a max shift) when the logit range allows it
// without underflow (same rule as projections/sinkhorn.py), log domain otherwise.
// Returns false for a matrix with a non-finite logit (the caller writes NaN).
template <typename T>
bool sinkhorn_trace(const T* z, T* trace, int64_t n, int iters) {
  const int64_t nn = n * n;
  T lo = z[0], hi = z[0];
  for (int64_t k = 0; k < nn; ++k) {
    if (!std::isfinite(z[k])) return false;
    lo = z[k] < lo ? z[k] : lo;
    hi = z[k] > hi ? z[k] : hi;
  }
  const T limit = sizeof(T) == 4 ? T(30) : T(300);
  if (hi - lo <= limit) {
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

// Iterates of BT tokens into tr (2·iters, nn, BT); lanes past `count` hold copies of a
// harmless matrix (all ones) and are never written back.
template <typename T>
void block_trace(const T* z, const T* shift, int64_t count, T* tr, T* p0, int64_t n, int iters) {
  const int64_t nn = n * n;
  for (int64_t k = 0; k < nn; ++k)
    for (int64_t b = 0; b < BT; ++b) p0[k * BT + b] = b < count ? std::exp(z[b * nn + k] - shift[b]) : T(1);
  const T* prev = p0;
  for (int t = 0; t < iters; ++t) {
    T* col = tr + (2 * t) * nn * BT;
    T* row = col + nn * BT;
    for (int64_t j = 0; j < n; ++j) {
      T s[BT] = {};
      for (int64_t i = 0; i < n; ++i) {
        const T* v = prev + (i * n + j) * BT;
#pragma omp simd
        for (int64_t b = 0; b < BT; ++b) s[b] += v[b];
      }
      for (int64_t i = 0; i < n; ++i) {
        const T* v = prev + (i * n + j) * BT;
        T* o = col + (i * n + j) * BT;
#pragma omp simd
        for (int64_t b = 0; b < BT; ++b) o[b] = v[b] / s[b];
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      T s[BT] = {};
      for (int64_t j = 0; j < n; ++j) {
        const T* v = col + (i * n + j) * BT;
#pragma omp simd
        for (int64_t b = 0; b < BT; ++b) s[b] += v[b];
      }
      for (int64_t j = 0; j < n; ++j) {
        const T* v = col + (i * n + j) * BT;
        T* o = row + (i * n + j) * BT;
#pragma omp simd
        for (int64_t b = 0; b < BT; ++b) o[b] = v[b] / s[b];
      }
    }
    prev = row;
  }
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
        block_trace(z + m0 * nn, shift, count, trace.data(), p0.data(), n, iters);
        const T* last = trace.data() + (2 * iters - 1) * nn * BT;
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
        block_trace(z + m0 * nn, shift, count, tr, p0.data(), n, iters);
        const T* last = tr + (2 * iters - 1) * nn * BT;
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
    merge_bwd<T>(g, x, hr, hp, y, gx, ghr, ghp, gy, M, n, C, threads);                   \
  }                                                                                      \
  extern "C" void hc_sinkhorn_fwd_##S(const T* z, T* p, int64_t M, int64_t n, int iters, \
                                      int threads) {                                     \
    sinkhorn_fwd<T>(z, p, M, n, iters, threads);                                         \
  }                                                                                      \
  extern "C" void hc_sinkhorn_bwd_##S(const T* z, const T* g, T* dz, int64_t M,         \
                                      int64_t n, int iters, int threads) {               \
    sinkhorn_bwd<T>(z, g, dz, M, n, iters, threads);                                     \
  }

HC_EXPORT(float, f32)
HC_EXPORT(double, f64)

extern "C" int hc_abi_version() { return 2; }
