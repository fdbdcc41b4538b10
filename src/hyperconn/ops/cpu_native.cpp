// Per-token stream ops of the CPU path, one pass over the (M, n, C) stream tensor each.
//
// Built at first use by hyperconn/ops/cpu_native.py (plain C ABI, no torch headers, so
// it compiles in about a second) and called through ctypes from the autograd Functions
// of hyperconn/ops/cpu.py; the torch ops there are the fallback and the reference.
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

#include <cstdint>
#include <cstring>

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
  }

HC_EXPORT(float, f32)
HC_EXPORT(double, f64)

extern "C" int hc_abi_version() { return 1; }
