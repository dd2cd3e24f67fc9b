// CPU building blocks shared by the CPU kernels: at::vec with the ISA this file is
// compiled for, row-major GEMM on raw pointers (BLAS, oneDNN), vectorized row operations and
// transposes. The packed-panel GEMM micro-kernels are in panel.h (float32) and panel_bf16.h.
//
// Every CPU kernel is compiled once per ISA (csrc/cpu/module.cpp, setup.py): avx2 (AVX2,
// FMA, F16C), avx512 (plus AVX-512 F/BW/DQ/VL/CD), avx512_bf16 (plus AVX512-BF16);
// seqkernels loads the one module the CPU can run (python/seqkernels/_cpu.py).
#pragma once

// at::vec picks its implementation from CPU_CAPABILITY_* macros that torch's own build
// defines per ISA. An extension has to define them itself: follow what the compiler
// targets, so each module gets at::vec's AVX512 or AVX2 code (otherwise at::vec is its
// generic code: loops over 8 lanes and a scalar exp).
#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

namespace seqkernels::cpu {

enum class Trans : char { N = 'N', T = 'T' };
constexpr Trans N = Trans::N;
constexpr Trans T = Trans::T;

}  // namespace seqkernels::cpu

// The Fortran BLAS GEMMs. torch's x86 builds link MKL statically and export these from
// libtorch_cpu; they are declared weak so that a torch built without them still loads,
// and gemm_rm below then falls back to at::mm. (at::native::cpublas::gemm would be the
// natural call, but libtorch does not export it.)
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace seqkernels::cpu {

inline bool have_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

template <typename scalar_t>
void gemm_colmajor(Trans ta, Trans tb, int m, int n, int k, scalar_t alpha, const scalar_t* a,
                   int lda, const scalar_t* b, int ldb, scalar_t beta, scalar_t* c, int ldc) {
  const char cta = static_cast<char>(ta), ctb = static_cast<char>(tb);
  if constexpr (std::is_same_v<scalar_t, float>) {
    sgemm_(&cta, &ctb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
  } else {
    dgemm_(&cta, &ctb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
  }
}

// Row-major C (m x n, leading dim ldc) = alpha * op(A) op(B) + beta * C, with op(A) m x k
// and op(B) k x n, A and B row-major with leading dims lda, ldb. BLAS is column-major: a
// row-major matrix is its transpose in column-major, so C^T = op(B)^T op(A)^T is one
// column-major GEMM with the operands swapped and the same transpose flags.
template <typename scalar_t>
inline void gemm_rm(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, scalar_t alpha,
                    const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb,
                    scalar_t beta, scalar_t* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (have_blas()) {
    gemm_colmajor<scalar_t>(tb, ta, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
    return;
  }
  // Fallback: the same product through at::mm on tensors wrapping the buffers.
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto wrap = [&](const scalar_t* p, Trans t, int64_t rows, int64_t cols, int64_t ld) {
    // op(X) is rows x cols; X itself is stored row-major with leading dim ld.
    at::Tensor x = t == Trans::N
        ? at::from_blob(const_cast<scalar_t*>(p), {rows, cols}, {ld, 1}, opts)
        : at::from_blob(const_cast<scalar_t*>(p), {cols, rows}, {ld, 1}, opts).t();
    return x;
  };
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::Tensor prod = at::mm(wrap(a, ta, m, k, lda), wrap(b, tb, k, n, ldb)).mul_(alpha);
  if (beta == scalar_t(0)) {
    C.copy_(prod);
  } else {
    C.mul_(beta).add_(prod);
  }
}

// oneDNN's matmul, through torch's own ops mkldnn::_linear_pointwise (Y = X W^T) and
// mkldnn::_reorder_linear_weight (W packed once for a given batch size), which x86 and
// aarch64 builds of torch register. On this project's AMD machines MKL's sgemm (what
// at::mm and cblas reach) runs its AVX2 code at about half the speed of oneDNN's AVX-512
// kernels, which nn.LSTM uses: measured 145 (MKL), 352 (oneDNN) and 489 GFLOP/s (oneDNN,
// packed W) for the per-step 64 x 512 x 2048 product. Where the ops are missing or have
// another signature, BLAS is used.
using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<c10::Scalar>>,
                            std::optional<c10::string_view>);
using PackFn = at::Tensor(const at::Tensor&, std::optional<int64_t>);

template <typename Fn>
inline std::optional<c10::TypedOperatorHandle<Fn>> find_op(const char* name) {
  auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  if (!handle) return std::nullopt;
  try {
    return handle->typed<Fn>();
  } catch (const c10::Error&) {
    return std::nullopt;
  }
}

inline const std::optional<c10::TypedOperatorHandle<LinearFn>>& linear_op() {
  static const auto op = find_op<LinearFn>("mkldnn::_linear_pointwise");
  return op;
}

inline const std::optional<c10::TypedOperatorHandle<PackFn>>& pack_op() {
  static const auto op = find_op<PackFn>("mkldnn::_reorder_linear_weight");
  return op;
}

inline bool onednn_available() { return linear_op().has_value() && pack_op().has_value(); }

inline at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w) {
  return linear_op()->call(x, w, std::nullopt, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
}

inline at::Tensor onednn_pack(const at::Tensor& w, int64_t batch) { return pack_op()->call(w, batch); }

// max of x[0:n], NaN if any element is NaN (at::vec::maximum propagates NaN; the scalar
// tail must too: std::max(m, NaN) would return m). Four independent accumulators: a
// single chain of vector max instructions would be bound by their latency, not by loads.
template <typename scalar_t>
inline scalar_t nan_max(scalar_t a, scalar_t b) {
  return (a != a || b != b) ? std::numeric_limits<scalar_t>::quiet_NaN() : std::max(a, b);
}

template <typename scalar_t>
inline scalar_t row_max(const scalar_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const Vec lowest(-std::numeric_limits<scalar_t>::infinity());
  Vec m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    m0 = at::vec::maximum(m0, Vec::loadu(x + j));
    m1 = at::vec::maximum(m1, Vec::loadu(x + j + W));
    m2 = at::vec::maximum(m2, Vec::loadu(x + j + 2 * W));
    m3 = at::vec::maximum(m3, Vec::loadu(x + j + 3 * W));
  }
  for (; j + W <= n; j += W) m0 = at::vec::maximum(m0, Vec::loadu(x + j));
  m0 = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
  scalar_t m = at::vec::vec_reduce_all<scalar_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, m0);
  for (; j < n; ++j) m = nan_max(m, x[j]);
  return m;
}

// exp(x) for softmax rows, in float32: exp(x) = 2^t with t = x log2(e), split as 2^n 2^f
// with n = round(t) and |f| <= 1/2; 2^f is a degree-5 polynomial (the minimax fit of its
// relative error on [-1/2, 1/2], computed for this file: at most 1.5e-7 in float32 Horner
// steps, against exp_u20's 2.4e-6), and 2^n is written into the exponent bits. t is clamped
// to [-127, 128]: below about 2^-126.5 the result is 0 (exp(-inf) = 0, so a masked score
// drops out), from 2^127.5 up it is inf; a NaN stays NaN. 15 vector operations against
// at::vec's exp_u20's 19: the softmax's share of an attention tile (about a fifth of the
// forward at D = 64 on an AVX2 machine) shrinks with it.
inline at::vec::Vectorized<float> exp_fast(at::vec::Vectorized<float> x) {
  using Vec = at::vec::Vectorized<float>;
  using VecI = at::vec::Vectorized<int32_t>;
  const Vec t = at::vec::clamp(x * Vec(1.44269504088896341f), Vec(-127.f), Vec(128.f));
  const Vec n = t.round();
  const Vec f = t - n;
  Vec p = at::vec::fmadd(f, Vec(0.0013266964815557003f), Vec(0.009672051295638084f));
  p = at::vec::fmadd(f, p, Vec(0.055507197976112366f));
  p = at::vec::fmadd(f, p, Vec(0.24022233486175537f));
  p = at::vec::fmadd(f, p, Vec(0.6931470036506653f));
  p = at::vec::fmadd(f, p, Vec(1.f));
  const VecI bits = (at::vec::convert_to_int_of_same_size(n) + VecI(127)) << VecI(23);
  return p * at::vec::cast<float>(bits);
}

// x[j] = exp(x[j] - sub); returns the sum. exp(-inf) = 0, so masked entries drop out.
// float uses exp_fast above; double is exact std::exp. A NaN argument gives NaN, but
// callers whose row may hold NaN (NaN inputs, a NaN row max) handle it at the row level, as
// the attention kernels do (a NaN max makes the whole row NaN), and do not rely on it.
inline float exp_sub_sum(float* x, int64_t n, float sub) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const Vec vsub(sub);
  Vec acc0(0.f), acc1(0.f);
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    Vec e0 = exp_fast(Vec::loadu(x + j) - vsub);
    Vec e1 = exp_fast(Vec::loadu(x + j + W) - vsub);
    e0.store(x + j);
    e1.store(x + j + W);
    acc0 = acc0 + e0;
    acc1 = acc1 + e1;
  }
  for (; j + W <= n; j += W) {
    Vec e = exp_fast(Vec::loadu(x + j) - vsub);
    e.store(x + j);
    acc0 = acc0 + e;
  }
  float s = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, acc0 + acc1);
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - sub);
    s += x[j];
  }
  return s;
}

inline double exp_sub_sum(double* x, int64_t n, double sub) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - sub);
    s += x[j];
  }
  return s;
}

// out[0:n] += x[0:n]
template <typename scalar_t>
inline void add_into(scalar_t* out, const scalar_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  at::vec::map2([](Vec a, Vec b) { return a + b; }, out, out, x, n);
}

template <typename scalar_t>
inline void scale_row(scalar_t* x, int64_t n, scalar_t a) {
  using Vec = at::vec::Vectorized<scalar_t>;
  at::vec::map([a](Vec v) { return v * Vec(a); }, x, x, n);
}

// One matrix of transpose_many: src (rows x cols, contiguous) is written transposed to dst
// (cols x rows, row stride ld_dst).
struct TransposeJob {
  const float* src;
  int64_t cols;
  float* dst;
};

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols: a tile of a transpose.
// 8 x 8 blocks go through AVX registers (eight loads, three rounds of shuffles, eight
// stores), the edges element by element.
inline void transpose_tile(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst) {
  int64_t r0 = 0;
#if defined(__AVX2__)
  for (; r0 + 8 <= rows; r0 += 8) {
    int64_t c0 = 0;
    for (; c0 + 8 <= cols; c0 += 8) {
      const float* s = src + r0 * ld_src + c0;
      __m256 v[8], t[8];
      for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(s + i * ld_src);
      for (int i = 0; i < 8; i += 2) {  // interleave row pairs (0,1), (2,3), ...
        t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {  // then pairs of pairs: four rows per 128-bit lane
        v[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        v[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        v[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        v[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
      }
      float* d = dst + c0 * ld_dst + r0;
      for (int i = 0; i < 4; ++i) {  // low lanes hold columns 0-3, high lanes 4-7
        _mm256_storeu_ps(d + i * ld_dst, _mm256_permute2f128_ps(v[i], v[i + 4], 0x20));
        _mm256_storeu_ps(d + (i + 4) * ld_dst, _mm256_permute2f128_ps(v[i], v[i + 4], 0x31));
      }
    }
    for (int64_t c = c0; c < cols; ++c) {
      for (int64_t r = r0; r < r0 + 8; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
    }
  }
#endif
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = r0; r < rows; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
  }
}

// Several transposes of matrices with the same number of rows, in one parallel region over
// the 32-column blocks of all of them (a task has at least 16K elements: a batch-1 step's
// three rows are copied by the calling thread, without waking the others).
inline void transpose_many(std::initializer_list<TransposeJob> jobs, int64_t rows, int64_t ld_dst) {
  constexpr int64_t kT = 32;
  std::vector<int64_t> first_block{0};  // job j owns blocks [first_block[j], first_block[j + 1])
  for (const TransposeJob& j : jobs) first_block.push_back(first_block.back() + (j.cols + kT - 1) / kT);
  const int64_t grain = std::max<int64_t>(1, 16384 / (kT * std::max<int64_t>(rows, 1)));
  at::parallel_for(0, first_block.back(), grain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t j = std::upper_bound(first_block.begin(), first_block.end(), k) - first_block.begin() - 1;
      const TransposeJob& job = jobs.begin()[j];
      const int64_t cb = (k - first_block[j]) * kT, ce = std::min(job.cols, cb + kT);
      transpose_tile(job.src + cb, job.cols, rows, ce - cb, job.dst + cb * ld_dst, ld_dst);
    }
  });
}

// out[b * ldo + r] = dot(w[r, :], x[b * ldx, :]) for rows r < rows and batch rows b < NB,
// w row-major (rows x k). Four rows of w at a time, each read once for all NB batch rows:
// the matrix-vector product of a small-batch recurrent step, bound by reading w.
template <int NB>
inline void gemv_rows_nb(const float* w, int64_t rows, int64_t k, const float* x, int64_t ldx, float* out,
                         int64_t ldo) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t V = Vec::size();
  constexpr int kR = 4;
  for (int64_t r = 0; r < rows; r += kR) {
    const int nr = static_cast<int>(std::min<int64_t>(kR, rows - r));
    const float* wr[kR];
    for (int i = 0; i < kR; ++i) wr[i] = w + (r + std::min(i, nr - 1)) * k;  // short tail: repeat a row
    Vec acc[kR][NB];
    for (int i = 0; i < kR; ++i) {
      for (int b = 0; b < NB; ++b) acc[i][b] = Vec(0.f);
    }
    int64_t j = 0;
    for (; j + V <= k; j += V) {
      Vec wv[kR];
      for (int i = 0; i < kR; ++i) wv[i] = Vec::loadu(wr[i] + j);
      for (int b = 0; b < NB; ++b) {
        const Vec xv = Vec::loadu(x + b * ldx + j);
        for (int i = 0; i < kR; ++i) acc[i][b] = at::vec::fmadd(wv[i], xv, acc[i][b]);
      }
    }
    for (int i = 0; i < nr; ++i) {
      for (int b = 0; b < NB; ++b) {
        float sum = at::vec::vec_reduce_all<float>([](Vec p, Vec q) { return p + q; }, acc[i][b]);
        for (int64_t jj = j; jj < k; ++jj) sum += wr[i][jj] * x[b * ldx + jj];
        out[b * ldo + r + i] = sum;
      }
    }
  }
}

inline void gemv_rows(const float* w, int64_t rows, int64_t k, const float* x, int64_t batch, int64_t ldx,
                      float* out, int64_t ldo) {
  switch (batch) {
    case 1: return gemv_rows_nb<1>(w, rows, k, x, ldx, out, ldo);
    case 2: return gemv_rows_nb<2>(w, rows, k, x, ldx, out, ldo);
    case 3: return gemv_rows_nb<3>(w, rows, k, x, ldx, out, ldo);
    case 4: return gemv_rows_nb<4>(w, rows, k, x, ldx, out, ldo);
    default: TORCH_CHECK(false, "gemv_rows: batch ", batch, " is above 4");
  }
}

}  // namespace seqkernels::cpu
