// The packed-panel GEMM micro-kernel in bf16 (AVX512-BF16, vdpbf16ps), fp32 accumulation:
// panel.h's tiles and row blocks with B packed in k-pairs. The attention's bf16 forward and
// backward products (csrc/attention/flash_attention_cpu.cpp) run here.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstring>

#include "panel.h"

namespace seqkernels::cpu {

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
inline void accumulate_bf16(__m512 (&acc)[MR][4], const void* a, int64_t lda, const c10::BFloat16* panel,
                            int64_t kpairs) {
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
}

template <int MR, bool AT>
inline void panel_tile_bf16(const void* a, int64_t lda, const c10::BFloat16* panel, int64_t kpairs, float* c,
                            int64_t ldc, int nv, float alpha, bool accumulate) {
  __m512 acc[MR][4];
  zero_tile<MR>(acc);
  accumulate_bf16<MR, AT>(acc, a, lda, panel, kpairs);
  store_tile<MR>(acc, c, ldc, 16, nv, 16, alpha, accumulate);
}

// One operand pair of a bf16 panel product (as PanelInput): A row-major bf16 (row stride lda,
// even), a panel of kpairs k-pairs.
struct PanelInputBf16 {
  const c10::BFloat16* a;
  int64_t lda;
  const c10::BFloat16* panel;
  int64_t kpairs;
};

// panel_tile's bf16 form for the recurrent step: C = sum over the inputs of A times the panel
// ([x_t | h_prev] times [W_ih | W_hh] without forming the concatenation), stored as panel_tile
// stores (four groups of 16 columns gs apart: gs = H for the LSTM's gate layout).
template <int MR>
inline void panel_tile_bf16_inputs(const PanelInputBf16* in, int inputs, float* c, int64_t ldc, int64_t gs, int nv,
                                   int nv_step) {
  __m512 acc[MR][4];
  zero_tile<MR>(acc);
  for (int i = 0; i < inputs; ++i) accumulate_bf16<MR, false>(acc, in[i].a, in[i].lda, in[i].panel, in[i].kpairs);
  store_tile<MR>(acc, c, ldc, gs, nv, nv_step, 1.f, false);
}

inline void panel_rows_bf16(int mr, const PanelInputBf16* in, int inputs, float* c, int64_t ldc, int64_t gs, int nv,
                            int nv_step) {
  with_panel_rows(mr, [&](auto rows) {
    panel_tile_bf16_inputs<decltype(rows)::value>(in, inputs, c, ldc, gs, nv, nv_step);
  });
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
// W (n x k bf16, row-major, any k) packed into bf16 panels for products A W^T, as a tensor
// (panels packed in parallel, each kpairs = ceil(k / 2) pairs; a zero pair half past k).
// Lanes as pack_panels: gate layout (gates = true, n = 4H) lane g * 16 + j of panel p is row
// g * H + 16p + j; contiguous layout lane j is row 64p + j; zero past the rows there are.
inline at::Tensor pack_panels_bf16(const c10::BFloat16* w, int64_t n, int64_t k, bool gates) {
  const int64_t H = n / 4, panels = gates ? (H + 15) / 16 : (n + 63) / 64, kpairs = (k + 1) / 2;
  at::Tensor packed = at::zeros({panels * kpairs * 128}, at::TensorOptions().dtype(at::kBFloat16));
  c10::BFloat16* out = packed.mutable_data_ptr<c10::BFloat16>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      c10::BFloat16* panel = out + p * kpairs * 128;
      for (int64_t lane = 0; lane < 64; ++lane) {
        const int64_t unit = gates ? p * 16 + lane % 16 : p * 64 + lane;
        if (unit >= (gates ? H : n)) continue;
        const c10::BFloat16* wr = w + (gates ? (lane / 16) * H + unit : unit) * k;
        for (int64_t kk = 0; kk < k; ++kk) panel[(kk / 2) * 128 + lane * 2 + kk % 2] = wr[kk];
      }
    }
  });
  return packed;
}
#endif  // __AVX512BF16__

}  // namespace seqkernels::cpu
