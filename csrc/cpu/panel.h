// The packed-panel GEMM micro-kernel in float32: C tiles of up to 6 x 64, B packed into
// k-major panels of 64 columns. The LSTM/RNN step and both attention passes run their
// products here (csrc/rnn/rnn_cpu.cpp, csrc/attention/flash_attention_cpu.cpp). On AVX-512 a
// 6 x 64 tile is 24 zmm accumulators; on AVX2 + FMA (16 ymm registers) the same panels are
// taken 16 columns at a time, 6 x 16 in 12 ymm accumulators (BLIS's Haswell shape), so the
// panel layout, the packing and every caller are the same on both. SEQKERNELS_CPU_PANELS is
// defined where one of the two is compiled.
#pragma once

#include "utils.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define SEQKERNELS_CPU_PANELS 1
#endif

namespace seqkernels::cpu {

#if defined(SEQKERNELS_CPU_PANELS)
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

// Where a panel's four groups of 16 columns sit. The AVX-512 kernel reads a whole k-row of 64
// columns per k, so a panel is k-major: (k, n) at panel[k * 64 + n]. The AVX2 kernel makes one
// pass over k per group of 16 columns, so there each group is its own k-major block,
// (k, n) at panel[(n / 16) * 16 K + k * 16 + n % 16], read sequentially: with the k-major
// layout each pass read one cache line in four, and the LSTM forward (K = 1024 in the step)
// ran 1.9x slower than with the AVX-512 kernel, whose rate per core the AVX2 one matches on
// L1-resident data (106 against 112 GFLOP/s, one thread, this shared machine's slow hour).
#if defined(__AVX512F__)
constexpr int64_t kPanelRowStride = 64;  // from (k, n) to (k + 1, n)
inline int64_t panel_group_offset(int64_t g, int64_t /*K*/) { return g * 16; }
#else
constexpr int64_t kPanelRowStride = 16;
inline int64_t panel_group_offset(int64_t g, int64_t K) { return g * 16 * K; }
#endif

#if defined(__AVX512F__)
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

#else  // AVX2 + FMA
// panel_tile's contract (above) on 256-bit vectors: each group g of 16 columns is its own 6 x
// 16 pass over k (two panel vectors and MR broadcasts of A per k, 12 FMAs); a group with no
// columns to store is skipped, work included.
template <int MR, bool AT = false>
inline void panel_tile(const PanelInput* in, int inputs, float* c, int64_t ldc, int64_t gs, int nv, int nv_step,
                       float alpha = 1.f, bool accumulate = false) {
  for (int g = 0; g < 4; ++g) {
    const int n = std::clamp(nv - g * nv_step, 0, 16);
    if (n == 0) continue;
    __m256 acc[MR][2];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int i = 0; i < inputs; ++i) {
      const float* a = in[i].a;
      const int64_t lda = in[i].lda;
      const float* pg = in[i].panel + panel_group_offset(g, in[i].K);
      for (int64_t k = 0; k < in[i].K; ++k) {
        const __m256 b0 = _mm256_load_ps(pg + k * kPanelRowStride), b1 = _mm256_load_ps(pg + k * kPanelRowStride + 8);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          const __m256 av = _mm256_broadcast_ss(AT ? a + k * lda + r : a + r * lda + k);
          acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
        }
      }
    }
    // Full groups store from the registers; a partial one (a tile's edge) goes through a
    // buffer. No store masks: GCC hoisted them (and alpha's broadcast) above the k loop, where
    // they took the register of the second panel vector, which it then reloaded for each of
    // the MR FMAs (the LSTM forward ran 1.9x slower than with the AVX-512 kernel).
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      float* cg = c + r * ldc + g * gs;
      if (n == 16) {
        for (int h = 0; h < 2; ++h) {
          __m256 v = acc[r][h];
          if (accumulate) {
            v = _mm256_fmadd_ps(_mm256_set1_ps(alpha), v, _mm256_loadu_ps(cg + 8 * h));
          } else if (alpha != 1.f) {
            v = _mm256_mul_ps(_mm256_set1_ps(alpha), v);
          }
          _mm256_storeu_ps(cg + 8 * h, v);
        }
      } else {
        alignas(32) float t[16];
        _mm256_store_ps(t, acc[r][0]);
        _mm256_store_ps(t + 8, acc[r][1]);
        for (int j = 0; j < n; ++j) cg[j] = accumulate ? std::fma(alpha, t[j], cg[j]) : (alpha == 1.f ? t[j] : alpha * t[j]);
      }
    }
  }
}
#endif

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
  // a switch of direct calls, not with_panel_rows' generic lambda: through the lambda GCC 12
  // compiled the float32 attention backward 1.5x slower (L=2048 D=64 H=8: 186 against 259-299
  // ms, alternating runs)
  switch (mr) {
    case 1: return panel_tile<1, AT>(in, inputs, c, ldc, gs, nv, nv_step, alpha, accumulate);
    case 2: return panel_tile<2, AT>(in, inputs, c, ldc, gs, nv, nv_step, alpha, accumulate);
    case 3: return panel_tile<3, AT>(in, inputs, c, ldc, gs, nv, nv_step, alpha, accumulate);
    case 4: return panel_tile<4, AT>(in, inputs, c, ldc, gs, nv, nv_step, alpha, accumulate);
    case 5: return panel_tile<5, AT>(in, inputs, c, ldc, gs, nv, nv_step, alpha, accumulate);
    case 6: return panel_tile<6, AT>(in, inputs, c, ldc, gs, nv, nv_step, alpha, accumulate);
    default: TORCH_CHECK(false, "panel_rows: ", mr, " rows is above ", kPanelRows);
  }
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
      float* lanes = out + p * k * 64 + panel_group_offset(g, k);
      transpose_tile(w + row0 * ldw, ldw, rows, k, lanes, kPanelRowStride);
      if (rows < 16) {
        for (int64_t kk = 0; kk < k; ++kk) {
          std::fill(lanes + kk * kPanelRowStride + rows, lanes + kk * kPanelRowStride + 16, 0.f);
        }
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
      const float* src = w + kk * ldw + p * 64;
      if constexpr (kPanelRowStride == 64) {
        float* dst = out + (p * k + kk) * 64;
        std::copy(src, src + cols, dst);
        std::fill(dst + cols, dst + 64, 0.f);
      } else {
        for (int64_t g = 0; g < 4; ++g) {
          float* dst = out + p * k * 64 + panel_group_offset(g, k) + kk * kPanelRowStride;
          const int64_t n = std::clamp<int64_t>(cols - g * 16, 0, 16);
          std::copy(src + g * 16, src + g * 16 + n, dst);
          std::fill(dst + n, dst + 16, 0.f);
        }
      }
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
        float* lanes = out + p * k * 64 + panel_group_offset(g, k);
        transpose_tile(w + row0 * k, k, rows, k, lanes, kPanelRowStride);
        if (rows < 16) {
          for (int64_t kk = 0; kk < k; ++kk) {
            std::fill(lanes + kk * kPanelRowStride + rows, lanes + kk * kPanelRowStride + 16, 0.f);
          }
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
#endif  // SEQKERNELS_CPU_PANELS

}  // namespace seqkernels::cpu
