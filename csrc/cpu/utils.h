// CPU building blocks shared by the CPU kernels: at::vec with the ISA this file is
// compiled for, row-major GEMM on raw pointers, and vectorized row operations.
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
#include <cstring>
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

// x[j] = exp(x[j] - sub); returns the sum. exp(-inf) = 0, so masked entries drop out.
// float uses at::vec's exp_u20 (max error 20 ulp, ~2.4e-6 relative): well inside the
// float32 tolerance and several times faster than the 1-ulp exp (its cheaper sibling
// fexp_u20 was measured at 3e-4 error here: too coarse). double is exact std::exp.
// exp_u20 clamps its argument, so a NaN argument gives a finite value: callers whose row
// may hold NaN (NaN inputs, a NaN row max) must handle it at the row level, as the
// attention kernels do (a NaN max makes the whole row NaN).
inline float exp_sub_sum(float* x, int64_t n, float sub) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const Vec vsub(sub);
  Vec acc0(0.f), acc1(0.f);
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    Vec e0 = (Vec::loadu(x + j) - vsub).exp_u20();
    Vec e1 = (Vec::loadu(x + j + W) - vsub).exp_u20();
    e0.store(x + j);
    e1.store(x + j + W);
    acc0 = acc0 + e0;
    acc1 = acc1 + e1;
  }
  for (; j + W <= n; j += W) {
    Vec e = (Vec::loadu(x + j) - vsub).exp_u20();
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

#if defined(__AVX512F__)
// One operand pair of a panel product: A (rows x K) and a panel (K x 64, k-major:
// panel[k * 64 + n], 64-byte aligned). Element (r, k) of A is a[r * lda + k], or a[k * lda + r]
// when the kernel is instantiated with AT (A stored transposed: the attention backward's
// P^T dO and dS^T Q read the P and dS tiles as they are).
struct PanelInput {
  const float* a;
  int64_t lda;
  const float* panel;
  int64_t K;
};

template <int MR>
inline void zero_tile(__m512 (&acc)[MR][4]) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) acc[r][g] = _mm512_setzero_ps();
  }
}

// The end of a panel micro-kernel: C = alpha * acc (+ C when accumulate), MR rows of four
// groups of 16 columns, gs apart, group g keeping its first clamp(nv - g * nv_step, 0, 16).
template <int MR>
inline void store_tile(const __m512 (&acc)[MR][4], float* c, int64_t ldc, int64_t gs, int nv, int nv_step,
                       float alpha, bool accumulate) {
  __mmask16 m[4];
  for (int g = 0; g < 4; ++g) {
    const int n = std::clamp(nv - g * nv_step, 0, 16);
    m[g] = static_cast<__mmask16>((1u << n) - 1);
  }
  const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      float* cg = c + r * ldc + g * gs;
      const __m512 v = accumulate ? _mm512_fmadd_ps(va, acc[r][g], _mm512_maskz_loadu_ps(m[g], cg))
                                  : (alpha == 1.f ? acc[r][g] : _mm512_mul_ps(va, acc[r][g]));
      _mm512_mask_storeu_ps(cg, m[g], v);
    }
  }
}

// A GEMM micro-kernel on packed panels: C (MR x 64) = alpha * sum over the inputs of A times
// the panel (two inputs: [x_t | h_prev] times [W_ih | W_hh] for the LSTM, without forming the
// concatenation), plus C's old values when accumulate. Column n of C goes to
// c[r * ldc + (n / 16) * gs + n % 16]: four groups of 16 columns, gs apart (gs = 16: 64
// contiguous columns; gs = H: the four gates of 16 hidden units). Group g stores its first
// clamp(nv - g * nv_step, 0, 16) columns (nv_step = 16 for contiguous columns, 0 for gates).
// MR * 4 accumulators stay in registers (24 of the 32 zmm at MR = 6); each k loads four panel
// vectors and broadcasts MR values of A. Measured alone on the 2-core machine for the LSTM
// step's 64 x 2048 x 512 product: 498 GFLOP/s (oneDNN, packed: 471). (Running the LSTM's
// pointwise step on the accumulators, instead of storing them for it to read back from L1,
// measured about 10% slower.)
template <int MR, bool AT = false>
inline void panel_tile(const PanelInput* in, int inputs, float* c, int64_t ldc, int64_t gs, int nv, int nv_step,
                       float alpha = 1.f, bool accumulate = false) {
  __m512 acc[MR][4];
  zero_tile<MR>(acc);
  for (int i = 0; i < inputs; ++i) {
    const float* a = in[i].a;
    const int64_t lda = in[i].lda;
    for (int64_t k = 0; k < in[i].K; ++k) {
      const float* pk = in[i].panel + k * 64;
      const __m512 b0 = _mm512_load_ps(pk), b1 = _mm512_load_ps(pk + 16), b2 = _mm512_load_ps(pk + 32),
                   b3 = _mm512_load_ps(pk + 48);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 av = _mm512_set1_ps(AT ? a[k * lda + r] : a[r * lda + k]);
        acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(av, b2, acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(av, b3, acc[r][3]);
      }
    }
  }
  store_tile<MR>(acc, c, ldc, gs, nv, nv_step, alpha, accumulate);
}

// f(std::integral_constant<int, MR>()) for a run-time row count 1 <= mr <= kPanelRows: the
// micro-kernels are templates on their row count.
constexpr int kPanelRows = 6;
template <class F>
inline void with_panel_rows(int mr, F&& f) {
  switch (mr) {
    case 1: return f(std::integral_constant<int, 1>());
    case 2: return f(std::integral_constant<int, 2>());
    case 3: return f(std::integral_constant<int, 3>());
    case 4: return f(std::integral_constant<int, 4>());
    case 5: return f(std::integral_constant<int, 5>());
    case 6: return f(std::integral_constant<int, 6>());
    default: TORCH_CHECK(false, "panel micro-kernel: ", mr, " rows is above ", kPanelRows);
  }
}

// panel_tile for any row count mr <= kPanelRows.
template <bool AT = false>
inline void panel_rows(int mr, const PanelInput* in, int inputs, float* c, int64_t ldc, int64_t gs, int nv,
                       int nv_step, float alpha = 1.f, bool accumulate = false) {
  with_panel_rows(mr, [&](auto rows) {
    panel_tile<decltype(rows)::value, AT>(in, inputs, c, ldc, gs, nv, nv_step, alpha, accumulate);
  });
}

// Panels of 64 floats per k needed for n columns.
inline int64_t panel_floats(int64_t n, int64_t k) { return (n + 63) / 64 * k * 64; }

// W (n x k, row stride ldw) packed into contiguous-layout panels for a product A W^T, into
// out (panel_floats(n, k) floats, 64-byte aligned): panel p holds rows [64p, 64p + 64) of W,
// transposed (lane j of k-row kk = W[64p + j, kk]), zero past row n. Single-threaded: the
// attention backward packs its tiles this way on each thread.
inline void pack_nk_into(float* out, const float* w, int64_t ldw, int64_t n, int64_t k) {
  for (int64_t p = 0; p * 64 < n; ++p) {
    for (int64_t g = 0; g < 4; ++g) {
      const int64_t row0 = p * 64 + g * 16, rows = std::clamp<int64_t>(n - row0, 0, 16);
      float* lanes = out + p * k * 64 + g * 16;
      transpose_tile(w + row0 * ldw, ldw, rows, k, lanes, 64);
      if (rows < 16) {
        for (int64_t kk = 0; kk < k; ++kk) std::fill(lanes + kk * 64 + rows, lanes + kk * 64 + 16, 0.f);
      }
    }
  }
}

// W (k x n, row stride ldw) packed into contiguous-layout panels for a product A W (not A
// W^T), into out (panel_floats(n, k) floats, aligned): panel p holds columns [64p, 64p + 64),
// k-major, each k a 64-float run of row k of W (a strided copy, no transpose), zero past n.
inline void pack_kn_into(float* out, const float* w, int64_t ldw, int64_t k, int64_t n) {
  for (int64_t p = 0; p * 64 < n; ++p) {
    const int64_t cols = std::min<int64_t>(64, n - p * 64);
    for (int64_t kk = 0; kk < k; ++kk) {
      float* dst = out + (p * k + kk) * 64;
      std::copy(w + kk * ldw + p * 64, w + kk * ldw + p * 64 + cols, dst);
      std::fill(dst + cols, dst + 64, 0.f);
    }
  }
}

// W (n x k, row-major) packed into panels for panel_tile, as a tensor. Gate layout (gates =
// true, n = 4H with H = n / 4): panel p holds hidden units [16p, 16p + 16) of the four gates,
// lane g * 16 + j = row g * H + 16p + j. Contiguous layout (gates = false): pack_nk_into.
// Each group of 16 lanes is 16 contiguous rows of W, transposed into the panel.
inline at::Tensor pack_panels(const float* w, int64_t n, int64_t k, bool gates) {
  const int64_t H = n / 4, panels = gates ? (H + 15) / 16 : (n + 63) / 64;
  at::Tensor packed = at::empty({panels * k * 64}, at::TensorOptions().dtype(at::kFloat));
  float* out = packed.mutable_data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      if (!gates) {
        pack_nk_into(out + p * k * 64, w + p * 64 * k, k, std::min<int64_t>(64, n - p * 64), k);
        continue;
      }
      for (int64_t g = 0; g < 4; ++g) {
        const int64_t row0 = g * H + p * 16;
        const int64_t rows = std::clamp<int64_t>(H - p * 16, 0, 16);
        float* lanes = out + p * k * 64 + g * 16;
        transpose_tile(w + row0 * k, k, rows, k, lanes, 64);
        if (rows < 16) {
          for (int64_t kk = 0; kk < k; ++kk) std::fill(lanes + kk * 64 + rows, lanes + kk * 64 + 16, 0.f);
        }
      }
    }
  });
  return packed;
}

// W (k x n, row-major) packed by pack_kn_into, as a tensor (panels packed in parallel).
inline at::Tensor pack_panels_kn(const float* w, int64_t k, int64_t n) {
  const int64_t panels = (n + 63) / 64;
  at::Tensor packed = at::empty({panels * k * 64}, at::TensorOptions().dtype(at::kFloat));
  float* out = packed.mutable_data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) pack_kn_into(out + p * k * 64, w + p * 64, n, k, std::min<int64_t>(64, n - p * 64));
  });
  return packed;
}

// The row blocks of an m-row product: kPanelRows rows each, the rest in the last. (Blocks
// of nearly equal size, 4 + 4 rows instead of 6 + 2 at m = 8, measured slower: 5.7 against
// 6.4 ms for the LSTM's recurrent steps at B = 8, T = 100, H = 512.)
template <class F>
inline void for_row_blocks(int64_t m, F&& f) {
  for (int64_t r0 = 0; r0 < m; r0 += kPanelRows) f(r0, static_cast<int>(std::min<int64_t>(kPanelRows, m - r0)));
}

// C (m x n, row stride ldc) = A (m x k, row stride lda) W^T (W packed by pack_panels in
// the contiguous layout) or A W (pack_panels_kn): threads own panels of 64 output columns.
inline void panel_product(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* panels, float* c,
                          int64_t ldc) {
  at::parallel_for(0, (n + 63) / 64, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int nv = static_cast<int>(std::min<int64_t>(64, n - p * 64));
      for_row_blocks(m, [&](int64_t r0, int mr) {
        const PanelInput in{a + r0 * lda, lda, panels + p * k * 64, k};
        panel_rows(mr, &in, 1, c + r0 * ldc + p * 64, ldc, 16, nv, 16);
      });
    }
  });
}

// C (m x n, row stride ldc) = alpha * A B, plus C when accumulate, on the calling thread: A is
// m x k (a[r * lda + kk], or a[kk * lda + r] with AT), B packed in ceil(n / 64) panels by
// pack_nk_into (B = W^T) or pack_kn_into (B = W).
template <bool AT>
inline void panel_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* panels, float* c,
                       int64_t ldc, float alpha, bool accumulate) {
  for (int64_t p = 0; p * 64 < n; ++p) {
    const int nv = static_cast<int>(std::min<int64_t>(64, n - p * 64));
    for_row_blocks(m, [&](int64_t r0, int mr) {
      const PanelInput in{AT ? a + r0 : a + r0 * lda, lda, panels + p * k * 64, k};
      panel_rows<AT>(mr, &in, 1, c + r0 * ldc + p * 64, ldc, 16, nv, 16, alpha, accumulate);
    });
  }
}

#if defined(__AVX512BF16__)
// bf16 tile products with fp32 accumulation (AVX512-BF16's vdpbf16ps: each fp32 lane adds the
// products of one pair of bf16 values, twice the multiply-adds of an fp32 FMA per instruction).
// A bf16 panel holds 64 columns of B for k in pairs: panel[kp * 128 + n * 2 + t] = B[2kp + t, n]
// (the bit patterns, 64-byte aligned), so one 32-bit broadcast of A's pair (A[r, 2kp],
// A[r, 2kp + 1]) meets 16 columns' pairs per vector. A is row-major bf16 with an even k extent
// (lda even, a zero pad column where k is odd), or, with AT, a buffer of pair words
// (uint32: low half A[r, 2kp], high half A[r, 2kp + 1]) at a[kp * lda + r], which
// pair_rows_f32 makes from a tile whose rows are A's columns (P^T, dS^T in the backward).
template <int MR, bool AT>
inline void panel_tile_bf16(const void* a, int64_t lda, const c10::BFloat16* panel, int64_t kpairs, float* c,
                            int64_t ldc, int nv, float alpha, bool accumulate) {
  __m512 acc[MR][4];
  zero_tile<MR>(acc);
  for (int64_t kp = 0; kp < kpairs; ++kp) {
    const c10::BFloat16* pk = panel + kp * 128;
    __m512bh b[4];
    for (int g = 0; g < 4; ++g) b[g] = (__m512bh)_mm512_load_si512(pk + 32 * g);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      if constexpr (AT) {
        pair = static_cast<const int32_t*>(a)[kp * lda + r];
      } else {
        std::memcpy(&pair, static_cast<const c10::BFloat16*>(a) + r * lda + 2 * kp, sizeof(pair));
      }
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], av, b[g]);
    }
  }
  store_tile<MR>(acc, c, ldc, 16, nv, 16, alpha, accumulate);
}

// C (m x n, row stride ldc) = alpha * A B (+ C when accumulate) on the calling thread: A (m x 2
// kpairs, as panel_tile_bf16 reads it), B in ceil(n / 64) bf16 panels of kpairs pairs each.
template <bool AT = false>
inline void panel_gemm_bf16(int64_t m, int64_t n, int64_t kpairs, const void* a, int64_t lda,
                            const c10::BFloat16* panels, float* c, int64_t ldc, float alpha, bool accumulate) {
  for (int64_t p = 0; p * 64 < n; ++p) {
    const int nv = static_cast<int>(std::min<int64_t>(64, n - p * 64));
    const c10::BFloat16* panel = panels + p * kpairs * 128;
    for_row_blocks(m, [&](int64_t r0, int mr) {
      const void* ar = AT ? static_cast<const void*>(static_cast<const int32_t*>(a) + r0)
                          : static_cast<const void*>(static_cast<const c10::BFloat16*>(a) + r0 * lda);
      float* cr = c + r0 * ldc + p * 64;
      with_panel_rows(mr, [&](auto rows) {
        panel_tile_bf16<decltype(rows)::value, AT>(ar, lda, panel, kpairs, cr, ldc, nv, alpha, accumulate);
      });
    });
  }
}

// y[0:n] = x[0:n] rounded to bf16 (nearest even), then zeros up to n_pad.
inline void to_bf16_padded(const float* x, int64_t n, c10::BFloat16* y, int64_t n_pad) {
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + j + 16), _mm512_loadu_ps(x + j));
    _mm512_storeu_si512(y + j, (__m512i)v);
  }
  for (; j < n; ++j) y[j] = c10::BFloat16(x[j]);
  for (; j < n_pad; ++j) y[j] = c10::BFloat16(0.f);
}

// Pair words of rows 2kp and 2kp + 1 of a k x n tile (row stride ldx), for kp < ceil(k / 2)
// and columns j < n: out[kp * ldo + j] = bf16(x[2kp, j]) | bf16(x[2kp + 1, j]) << 16, a zero
// high half past row k. fp32 sources are rounded (nearest even); bf16 sources copied.
inline __m512i pair_words(__m256i lo16, __m256i hi16) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(lo16), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi16), 16));
}

inline void pair_rows_f32(const float* x, int64_t ldx, int64_t k, int64_t n, int32_t* out, int64_t ldo) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < (k + 1) / 2; ++kp) {
    const float* x0 = x + 2 * kp * ldx;
    const float* x1 = 2 * kp + 1 < k ? x0 + ldx : nullptr;
    int32_t* o = out + kp * ldo;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = static_cast<__mmask16>(n - j >= 16 ? 0xFFFF : (1u << (n - j)) - 1);
      const __m512 a = _mm512_maskz_loadu_ps(m, x0 + j), b = x1 ? _mm512_maskz_loadu_ps(m, x1 + j) : zero;
      const __m512i w = pair_words((__m256i)_mm512_cvtneps_pbh(a), (__m256i)_mm512_cvtneps_pbh(b));
      _mm512_mask_storeu_epi32(o + j, m, w);
    }
  }
}

// Panel elements (bf16) for n columns and k rows of B.
inline int64_t panel_elems_bf16(int64_t n, int64_t k) { return (n + 63) / 64 * ((k + 1) / 2) * 128; }

// B = W^T for W (n x k bf16, row stride ldw, k even): column j of B is row j of W, whose
// pairs are already adjacent; each panel is a transpose of 32-bit pairs. Zero past row n.
inline void pack_nk_bf16(c10::BFloat16* out, const c10::BFloat16* w, int64_t ldw, int64_t n, int64_t k) {
  const int64_t kpairs = k / 2;
  for (int64_t p = 0; p * 64 < n; ++p) {
    c10::BFloat16* panel = out + p * kpairs * 128;
    const int64_t rows = std::min<int64_t>(64, n - p * 64);
    for (int64_t j = 0; j < 64; ++j) {
      const c10::BFloat16* wr = w + (p * 64 + j) * ldw;
      for (int64_t kp = 0; kp < kpairs; ++kp) {
        c10::BFloat16* dst = panel + kp * 128 + j * 2;
        if (j < rows) {
          std::memcpy(dst, wr + 2 * kp, 2 * sizeof(c10::BFloat16));
        } else {
          std::memset(dst, 0, 2 * sizeof(c10::BFloat16));
        }
      }
    }
  }
}

// B = W for W (k x n bf16, row stride ldw): rows 2kp and 2kp + 1 interleaved (pair words), a
// zero row past k, zero past column n.
inline void pack_kn_bf16(c10::BFloat16* out, const c10::BFloat16* w, int64_t ldw, int64_t k, int64_t n) {
  const int64_t kpairs = (k + 1) / 2;
  for (int64_t p = 0; p * 64 < n; ++p) {
    c10::BFloat16* panel = out + p * kpairs * 128;
    const int64_t cols = std::min<int64_t>(64, n - p * 64);
    for (int64_t kp = 0; kp < kpairs; ++kp) {
      const c10::BFloat16* w0 = w + 2 * kp * ldw + p * 64;
      const c10::BFloat16* w1 = 2 * kp + 1 < k ? w0 + ldw : nullptr;
      c10::BFloat16* dst = panel + kp * 128;
      for (int64_t j = 0; j < 64; j += 16) {  // 16 columns: 16 pair words
        const int64_t left = std::clamp<int64_t>(cols - j, 0, 16);
        const __mmask16 m = static_cast<__mmask16>((1u << left) - 1);
        const __m256i a = _mm256_maskz_loadu_epi16(m, w0 + j);
        const __m256i b = w1 ? _mm256_maskz_loadu_epi16(m, w1 + j) : _mm256_setzero_si256();
        _mm512_store_si512(dst + 2 * j, pair_words(a, b));
      }
    }
  }
}
#endif  // __AVX512BF16__
#endif

}  // namespace seqkernels::cpu
