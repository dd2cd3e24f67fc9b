// The decode kernel (decode.h), in its own translation unit. cpu/utils.h comes first: it sets
// at::vec's ISA from the build's target (each CPU capability's module is compiled with its own
// flags), and its row max and exp-and-sum are the ones the general kernel uses.
#include "../cpu/utils.h"
#include "decode.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace seqkernels::attention {
namespace {

using cpu::exp_sub_sum;
using cpu::nan_max;
using cpu::row_max;
using cpu::scale_row;

// A vector of A (float or double) from storage type T (the same, or bf16/fp16 widened).
template <typename A, typename T>
inline at::vec::Vectorized<A> load_as(const T* p) {
  if constexpr (std::is_same_v<A, T>) {
    return at::vec::Vectorized<A>::loadu(p);
  } else {
    static_assert(std::is_same_v<A, float>, "half-precision storage accumulates in float");
    at::vec::Vectorized<float> out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

constexpr int64_t kPrefetchRows = 16;

inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}
// The same into L2 only (a row read a little later).
inline void prefetch_row_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 2);
}

// Rows to prefetch into L2 one per key while a loop streams other rows: the next block's key
// rows while the value rows of this one are read, so that memory stays busy in both halves
// of a block.
template <typename T>
struct RowPrefetch {
  const T* const* rows = nullptr;
  int64_t count = 0, bytes = 0;
};

// While a block's scores are computed: the key rows kPrefetchRows ahead (kp holds n_ahead >= n
// valid rows: the block's, then the next block's first ones) into L1, and the block's value
// rows into L2, called once per step of keys j .. j + step.
template <typename T>
struct BlockPrefetch {
  const T* const* kp;
  const T* const* vp;
  int64_t n, n_ahead, k_bytes, v_bytes;
  void operator()(int64_t j, int64_t step) const {
    for (int64_t t = j + kPrefetchRows; t < std::min(j + step + kPrefetchRows, n_ahead); ++t) prefetch_row(kp[t], k_bytes);
    for (int64_t t = j; t < std::min(j + step, n); ++t) prefetch_row_l2(vp[t], v_bytes);
  }
};

// Calls tile(RT, KB, r0, j) (RT and KB as std::integral_constant) over the R rows of a block in
// row tiles and its n keys in steps of the tile's KB, prefetching on the first row tile's pass:
// row tiles of 8, 4, 2, 1 rows with 2, 4, 8, 8 keys for the AVX-512 tiles (32 registers), of 4,
// 2, 1 rows with 2, 4, 4 keys for the portable ones (16).
template <int RT, int KB, typename Tile, typename Prefetch>
inline void score_rows(int64_t r0, int64_t n, const Prefetch& prefetch, Tile& tile) {
  for (int64_t j = 0; j < n; j += KB) {
    if (r0 == 0) prefetch(j, KB);
    tile(std::integral_constant<int, RT>{}, std::integral_constant<int, KB>{}, r0, j);
  }
}
template <bool Wide, typename Tile, typename Prefetch>
inline void over_score_tiles(int64_t R, int64_t n, const Prefetch& prefetch, Tile&& tile) {
  for (int64_t r0 = 0; r0 < R;) {
    const int64_t left = R - r0;
    if constexpr (Wide) {
      if (left >= 8) {
        score_rows<8, 2>(r0, n, prefetch, tile);
        r0 += 8;
        continue;
      }
    }
    if (left >= 4) {
      score_rows<4, Wide ? 4 : 2>(r0, n, prefetch, tile);
      r0 += 4;
    } else if (left >= 2) {
      score_rows<2, Wide ? 8 : 4>(r0, n, prefetch, tile);
      r0 += 2;
    } else {
      score_rows<1, Wide ? 8 : 4>(r0, n, prefetch, tile);
      r0 += 1;
    }
  }
}

// The same from the first `count` (0 < count < size) elements, the other lanes 0.
template <typename A, typename T>
inline at::vec::Vectorized<A> load_part_as(const T* p, int64_t count) {
  if constexpr (std::is_same_v<A, T>) {
    return at::vec::Vectorized<A>::loadu(p, count);
  } else {
    alignas(64) A tmp[at::vec::Vectorized<A>::size()] = {};
    for (int64_t i = 0; i < count; ++i) tmp[i] = static_cast<A>(p[i]);
    return at::vec::Vectorized<A>::loadu(tmp);
  }
}

// Portable register tiles (at::vec: the avx2 build, float64, and CPUs without AVX-512), the
// counterparts of the AVX-512 ones below, sized for 16 vector registers.
// Scores of RT query rows against KB keys, S[r * ss + t] = Q[r] . k[t].
template <int RT, int KB, typename A, typename T>
inline void score_tile_vec(const A* Q, int64_t D, const T* const* k, A* S, int64_t ss) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  V acc[RT][KB];
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < KB; ++t) acc[r][t] = V(A(0));
  auto step = [&](int64_t c, auto load_k, auto load_q) {
    V kc[KB];
    for (int t = 0; t < KB; ++t) kc[t] = load_k(k[t] + c);
    for (int r = 0; r < RT; ++r) {
      const V qv = load_q(Q + r * D + c);
      for (int t = 0; t < KB; ++t) acc[r][t] = at::vec::fmadd(qv, kc[t], acc[r][t]);
    }
  };
  int64_t c = 0;
  for (; c + W <= D; c += W) step(c, [](const T* p) { return load_as<A>(p); }, [](const A* p) { return V::loadu(p); });
  if (c < D) {
    const int64_t m = D - c;
    step(c, [m](const T* p) { return load_part_as<A>(p, m); }, [m](const A* p) { return V::loadu(p, m); });
  }
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < KB; ++t) S[r * ss + t] = at::vec::vec_reduce_all<A>([](V a, V b) { return a + b; }, acc[r][t]);
}

// O[r][c0, c0 + W CB) += sum_j S[r * ss + j] v[j][c0, ...) over the block's n keys for RT rows,
// the output band in registers for the whole block; next-block rows prefetched as in the
// AVX-512 tile.
template <int RT, int CB, typename A, typename T, typename Prefetch>
inline void value_tile_vec(A* O, int64_t Dv, int64_t c0, const A* S, int64_t ss, const T* const* v, int64_t n,
                           const Prefetch& pf) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  int64_t cnt[CB];  // the band's columns in each chunk (W, fewer in the last, <= 0 past Dv)
  for (int cb = 0; cb < CB; ++cb) cnt[cb] = std::min<int64_t>(W, Dv - c0 - cb * W);
  V acc[RT][CB];
  for (int r = 0; r < RT; ++r)
    for (int cb = 0; cb < CB; ++cb) {
      const A* o = O + r * Dv + c0 + cb * W;
      acc[r][cb] = cnt[cb] == W ? V::loadu(o) : cnt[cb] > 0 ? V::loadu(o, cnt[cb]) : V(A(0));
    }
  for (int64_t j = 0; j < n; ++j) {
    if (j < pf.count) prefetch_row_l2(pf.rows[j], pf.bytes);
    V p[RT];
    for (int r = 0; r < RT; ++r) p[r] = V(S[r * ss + j]);
    const T* vj = v[j] + c0;
    for (int cb = 0; cb < CB; ++cb) {
      if (cnt[cb] <= 0) continue;
      const V vc = cnt[cb] == W ? load_as<A>(vj + cb * W) : load_part_as<A>(vj + cb * W, cnt[cb]);
      for (int r = 0; r < RT; ++r) acc[r][cb] = at::vec::fmadd(p[r], vc, acc[r][cb]);
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int cb = 0; cb < CB; ++cb) {
      A* o = O + r * Dv + c0 + cb * W;
      if (cnt[cb] == W) acc[r][cb].store(o);
      else if (cnt[cb] > 0) acc[r][cb].store(o, cnt[cb]);
    }
}

// Row tiles of the portable path: 4, 2 or 1 rows.
inline int row_tile_vec(int64_t rows_left) { return rows_left >= 4 ? 4 : rows_left >= 2 ? 2 : 1; }

#if defined(CPU_CAPABILITY_AVX512)
// 16 lanes of T as floats; lanes past `count` read as 0 (masked loads never touch them).
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
// The same with every lane present (plain loads).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <bool Full, typename T>
inline __m512 load16(const T* p, __mmask16 m) {
  if constexpr (Full) return load16(p);
  else return load16(p, m);
}

// 16 floats stored, plain when every lane is present (Full), else only the lanes of m.
template <bool Full>
inline void store16(float* p, __mmask16 m, __m512 x) {
  if constexpr (Full) _mm512_storeu_ps(p, x);
  else _mm512_mask_storeu_ps(p, m, x);
}

inline __mmask16 lanes(int64_t count) {
  if (count <= 0) return 0;
  return count >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << count) - 1u);
}

// The four sums of a0..a3 (each a 16-lane partial) as one 128-bit vector.
inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 t01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
  const __m512 t23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
  // 128-bit lane k now holds four partials of a_k
  __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xDD));
  u = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));
  u = _mm512_add_ps(u, _mm512_permute_ps(u, 0xB1));  // element 0 of lane k: the sum of a_k
  const __m512i idx = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(idx, u));
}

// The RT x KB dot products of a score tile, reduced four at a time, through finish (the
// native bf16 path scales them there), into S[r * ss + t].
template <int RT, int KB, typename Finish>
inline void store_scores(const __m512 (&acc)[RT][KB], float* S, int64_t ss, Finish finish) {
  for (int f = 0; f < RT * KB; f += 4) {
    const int r = f / KB, t = f % KB;
    const __m128 s4 = finish(reduce4(acc[r][t], acc[(f + 1) / KB][(f + 1) % KB], acc[(f + 2) / KB][(f + 2) % KB],
                                     acc[(f + 3) / KB][(f + 3) % KB]));
    if constexpr (KB >= 4) {
      _mm_storeu_ps(S + r * ss + t, s4);
    } else {  // KB == 2: two keys of rows r and r + 1
      _mm_storel_pi(reinterpret_cast<__m64*>(S + r * ss), s4);
      _mm_storeh_pi(reinterpret_cast<__m64*>(S + (r + 1) * ss), s4);
    }
  }
}

// Scores of RT query rows against KB keys, S[r * ss + t] = Q[r] . k[t]: each chunk of a key
// row is loaded (and widened) once and meets every row of the tile; RT x KB accumulators in
// registers, reduced four at a time.
template <int RT, int KB, bool Full, typename T>
inline void score_tile(const float* Q, int64_t D, const T* const* k, float* S, int64_t ss) {
  static_assert((RT * KB) % 4 == 0 && RT * KB <= 16, "tile of 4..16 accumulators");
  __m512 acc[RT][KB];
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < KB; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += 16) {
    const __mmask16 m = lanes(D - c);
    __m512 kc[KB];
    for (int t = 0; t < KB; ++t) kc[t] = load16<Full>(k[t] + c, m);
    for (int r = 0; r < RT; ++r) {
      const __m512 qv = load16<Full>(Q + r * D + c, m);
      for (int t = 0; t < KB; ++t) acc[r][t] = _mm512_fmadd_ps(qv, kc[t], acc[r][t]);
    }
  }
  store_scores(acc, S, ss, [](__m128 s4) { return s4; });
}

// O[r][c0, c0 + 16 CB) += sum_j S[r * ss + j] v[j][c0, ...) over the n keys of a block, for RT
// rows: the output band stays in registers for the whole block, each chunk of a value row is
// loaded (and widened) once for every row of the tile.
template <int RT, int CB, bool Full, typename T>
inline void value_tile(float* O, int64_t Dv, int64_t c0, const float* S, int64_t ss, const T* const* v, int64_t n,
                       const RowPrefetch<T>& pf) {
  __m512 acc[RT][CB];
  __mmask16 m[CB];
  for (int cb = 0; cb < CB; ++cb) m[cb] = lanes(Dv - c0 - 16 * cb);
  for (int r = 0; r < RT; ++r)
    for (int cb = 0; cb < CB; ++cb) acc[r][cb] = load16<Full>(O + r * Dv + c0 + 16 * cb, m[cb]);
  for (int64_t j = 0; j < n; ++j) {
    __m512 p[RT];
    for (int r = 0; r < RT; ++r) p[r] = _mm512_set1_ps(S[r * ss + j]);
    if (j < pf.count) prefetch_row_l2(pf.rows[j], pf.bytes);
    const T* vj = v[j] + c0;
    for (int cb = 0; cb < CB; ++cb) {
      const __m512 vc = load16<Full>(vj + 16 * cb, m[cb]);
      for (int r = 0; r < RT; ++r) acc[r][cb] = _mm512_fmadd_ps(p[r], vc, acc[r][cb]);
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int cb = 0; cb < CB; ++cb) store16<Full>(O + r * Dv + c0 + 16 * cb, m[cb], acc[r][cb]);
}

// The largest row tile (8, 4, 2 or 1 rows) that fits the rows left.
inline int row_tile(int64_t rows_left) { return rows_left >= 8 ? 8 : rows_left >= 4 ? 4 : rows_left >= 2 ? 2 : 1; }

#if defined(__AVX512BF16__)
// bf16 K/V with bf16 queries on AVX512-BF16: vdpbf16ps multiplies pairs of bf16 and adds
// both exact products to an fp32 lane, 32 elements per instruction and no widening. The
// scores are scale * (q . k) with q as stored; P is rounded to bf16 for the PV product
// (the row sums stay fp32), as the general bf16 kernel and the GPU flash kernels do.
inline __mmask32 lanes32(int64_t count) {
  if (count <= 0) return 0;
  return count >= 32 ? __mmask32(0xFFFFFFFFu) : static_cast<__mmask32>((1u << count) - 1u);
}
// 32 bf16 lanes, plain when every lane is present (Full), else masked (lanes past m read as 0).
template <bool Full>
inline __m512i load32_bf16(const c10::BFloat16* p, __mmask32 m) {
  if constexpr (Full) return _mm512_loadu_si512(p);
  else return _mm512_maskz_loadu_epi16(m, p);
}

// S[r * ss + t] = scale * Qb[r] . k[t] for RT rows of Qb (bf16, row stride Dp: D rounded up to
// 32, zero-padded) and KB keys.
template <int RT, int KB, bool Full>
inline void score_tile_bf16(const c10::BFloat16* Qb, int64_t Dp, int64_t D, const c10::BFloat16* const* k,
                            float scale, float* S, int64_t ss) {
  static_assert((RT * KB) % 4 == 0 && RT * KB <= 16, "tile of 4..16 accumulators");
  __m512 acc[RT][KB];
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < KB; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += 32) {
    const __mmask32 m = lanes32(D - c);
    __m512bh kc[KB];
    for (int t = 0; t < KB; ++t) kc[t] = (__m512bh)load32_bf16<Full>(k[t] + c, m);
    for (int r = 0; r < RT; ++r) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(Qb + r * Dp + c);
      for (int t = 0; t < KB; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], qv, kc[t]);
    }
  }
  const __m128 sc = _mm_set1_ps(scale);
  store_scores(acc, S, ss, [sc](__m128 s4) { return _mm_mul_ps(sc, s4); });
}

// O[r][c0, c0 + 32 CB) += sum_j P[r][j] v[j][...] over the block's n keys for RT rows, P in
// bf16 pairs (Pw: row stride pw words, word jp = keys 2jp and 2jp + 1, the odd tail paired
// with 0). Two value rows interleave into pairs (vpunpck{l,h}wd), which puts the columns of
// each 32-column group in the order (0-3, 8-11, 16-19, 24-27 | 4-7, ...): the output band is
// permuted into that order when loaded and back when stored.
template <int RT, int CB, bool Full>
inline void value_tile_bf16(float* O, int64_t Dv, int64_t c0, const int32_t* Pw, int64_t pw,
                            const c10::BFloat16* const* v, int64_t n, const RowPrefetch<c10::BFloat16>& pf) {
  // lo lane 4L + i holds column 8L + i, hi lane 4L + i column 8L + 4 + i (L the 128-bit lane)
  const __m512i to_lo = _mm512_set_epi32(27, 26, 25, 24, 19, 18, 17, 16, 11, 10, 9, 8, 3, 2, 1, 0);
  const __m512i to_hi = _mm512_set_epi32(31, 30, 29, 28, 23, 22, 21, 20, 15, 14, 13, 12, 7, 6, 5, 4);
  const __m512i from0 = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i from1 = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  __m512 lo[RT][CB], hi[RT][CB];
  __mmask32 m[CB];
  for (int cb = 0; cb < CB; ++cb) m[cb] = lanes32(Dv - c0 - 32 * cb);
  for (int r = 0; r < RT; ++r)
    for (int cb = 0; cb < CB; ++cb) {
      const float* o = O + r * Dv + c0 + 32 * cb;
      const __m512 o0 = load16<Full>(o, lanes(Dv - c0 - 32 * cb));
      const __m512 o1 = load16<Full>(o + 16, lanes(Dv - c0 - 32 * cb - 16));
      lo[r][cb] = _mm512_permutex2var_ps(o0, to_lo, o1);
      hi[r][cb] = _mm512_permutex2var_ps(o0, to_hi, o1);
    }
  for (int64_t jp = 0; 2 * jp < n; ++jp) {
    if (2 * jp < pf.count) prefetch_row_l2(pf.rows[2 * jp], pf.bytes);
    if (2 * jp + 1 < pf.count) prefetch_row_l2(pf.rows[2 * jp + 1], pf.bytes);
    const c10::BFloat16* va = v[2 * jp] + c0;
    const bool pair = 2 * jp + 1 < n;
    const c10::BFloat16* vb = v[pair ? 2 * jp + 1 : 2 * jp] + c0;
    __m512bh p[RT];
    for (int r = 0; r < RT; ++r) p[r] = (__m512bh)_mm512_set1_epi32(Pw[r * pw + jp]);
    for (int cb = 0; cb < CB; ++cb) {
      const __m512i a = load32_bf16<Full>(va + 32 * cb, m[cb]);
      const __m512i b = pair ? load32_bf16<Full>(vb + 32 * cb, m[cb]) : _mm512_setzero_si512();
      const __m512bh l = (__m512bh)_mm512_unpacklo_epi16(a, b), h = (__m512bh)_mm512_unpackhi_epi16(a, b);
      for (int r = 0; r < RT; ++r) {
        lo[r][cb] = _mm512_dpbf16_ps(lo[r][cb], p[r], l);
        hi[r][cb] = _mm512_dpbf16_ps(hi[r][cb], p[r], h);
      }
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int cb = 0; cb < CB; ++cb) {
      float* o = O + r * Dv + c0 + 32 * cb;
      store16<Full>(o, lanes(Dv - c0 - 32 * cb), _mm512_permutex2var_ps(lo[r][cb], from0, hi[r][cb]));
      store16<Full>(o + 16, lanes(Dv - c0 - 32 * cb - 16), _mm512_permutex2var_ps(lo[r][cb], from1, hi[r][cb]));
    }
}

// The block's scores for all R rows (as score_block, scores scaled here).
inline void score_block_bf16(const c10::BFloat16* Qb, int64_t R, int64_t Dp, int64_t D,
                             const c10::BFloat16* const* kp, int64_t n, float scale, float* S,
                             const BlockPrefetch<c10::BFloat16>& prefetch) {
  const bool full = D % 32 == 0;
  over_score_tiles<true>(R, n, prefetch, [&](auto rt, auto kb, int64_t r0, int64_t j) {
    constexpr int RT = decltype(rt)::value, KB = decltype(kb)::value;
    const c10::BFloat16* q = Qb + r0 * Dp;
    float* s = S + r0 * kDecodeBlock + j;
    full ? score_tile_bf16<RT, KB, true>(q, Dp, D, kp + j, scale, s, kDecodeBlock)
         : score_tile_bf16<RT, KB, false>(q, Dp, D, kp + j, scale, s, kDecodeBlock);
  });
}

// O += P V for the block, P rounded to bf16 pairs from the fp32 probabilities in S.
inline void value_block_bf16(float* O, int64_t R, int64_t Dv, const float* S, int32_t* Pw,
                             const c10::BFloat16* const* vp, int64_t n, const RowPrefetch<c10::BFloat16>& next_keys) {
  const RowPrefetch<c10::BFloat16> none;
  const int64_t pw = kDecodeBlock / 2;
  for (int64_t r = 0; r < R; ++r) {
    auto* pb = reinterpret_cast<c10::BFloat16*>(Pw + r * pw);
    const float* srow = S + r * kDecodeBlock;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(srow + j)));
    }
    if (j < n) {
      const __m512 t = _mm512_maskz_loadu_ps(lanes(n - j), srow + j);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + j), (__m256i)_mm512_cvtneps_pbh(t));  // zeros past n
    }
  }
  for (int64_t r0 = 0; r0 < R; r0 += row_tile(R - r0)) {
    const int rt = row_tile(R - r0);
    float* o = O + r0 * Dv;
    const int32_t* p = Pw + r0 * pw;
    bool first = r0 == 0;
    for (int64_t c = 0; c < Dv;) {
      const int64_t left = (Dv - c + 31) / 32;
      const int cb = static_cast<int>(std::min<int64_t>(8 / std::max(rt, 2), left >= 4 ? 4 : left >= 2 ? 2 : 1));
      switch (rt * 16 + cb) {
#define SEQKERNELS_VALUE_TILE(RT, CB) \
  case RT * 16 + CB:                                                                          \
    if (c + 32 * CB <= Dv) value_tile_bf16<RT, CB, true>(o, Dv, c, p, pw, vp, n, first ? next_keys : none); \
    else value_tile_bf16<RT, CB, false>(o, Dv, c, p, pw, vp, n, first ? next_keys : none);                  \
    break;
        SEQKERNELS_VALUE_TILE(8, 1)
        SEQKERNELS_VALUE_TILE(4, 2) SEQKERNELS_VALUE_TILE(4, 1)
        SEQKERNELS_VALUE_TILE(2, 4) SEQKERNELS_VALUE_TILE(2, 2) SEQKERNELS_VALUE_TILE(2, 1)
        SEQKERNELS_VALUE_TILE(1, 4) SEQKERNELS_VALUE_TILE(1, 2) SEQKERNELS_VALUE_TILE(1, 1)
#undef SEQKERNELS_VALUE_TILE
      }
      c += 32 * cb;
      first = false;
    }
  }
}
constexpr bool kNativeBf16Decode = true;
#else
constexpr bool kNativeBf16Decode = false;
#endif
#else
constexpr bool kNativeBf16Decode = false;
#endif

// Scores of the R rows of Q against the n keys kp[0, n) into S (row stride kDecodeBlock). kp
// holds n_ahead >= n valid rows (the block's, then up to kPrefetchRows of the next block's),
// padded past them to a multiple of 8 with valid rows whose scores are ignored; the rows
// kPrefetchRows ahead are prefetched as the first row tile streams past.
template <typename A, typename T>
inline void score_block(const A* Q, int64_t R, int64_t D, const T* const* kp, int64_t n, A* S,
                        const BlockPrefetch<T>& prefetch) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    const bool full = D % 16 == 0;
    over_score_tiles<true>(R, n, prefetch, [&](auto rt, auto kb, int64_t r0, int64_t j) {
      constexpr int RT = decltype(rt)::value, KB = decltype(kb)::value;
      const float* q = Q + r0 * D;
      float* s = S + r0 * kDecodeBlock + j;
      full ? score_tile<RT, KB, true, T>(q, D, kp + j, s, kDecodeBlock)
           : score_tile<RT, KB, false, T>(q, D, kp + j, s, kDecodeBlock);
    });
    return;
  }
#endif
  over_score_tiles<false>(R, n, prefetch, [&](auto rt, auto kb, int64_t r0, int64_t j) {
    score_tile_vec<decltype(rt)::value, decltype(kb)::value, A, T>(Q + r0 * D, D, kp + j, S + r0 * kDecodeBlock + j,
                                                                   kDecodeBlock);
  });
}

// O (R rows of Dv) += P V over the block's n keys vp[0, n), P the block's probabilities in S.
template <typename A, typename T>
inline void value_block(A* O, int64_t R, int64_t Dv, const A* S, const T* const* vp, int64_t n,
                        const RowPrefetch<T>& next_keys) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    const RowPrefetch<T> none;
    for (int64_t r0 = 0; r0 < R; r0 += row_tile(R - r0)) {
      const int rt = row_tile(R - r0);
      bool first = r0 == 0;
      float* o = O + r0 * Dv;
      const float* s = S + r0 * kDecodeBlock;
      // bands of up to 16 / rt chunks of 16 columns (at most 8), the last one no wider than what is left
      for (int64_t c = 0; c < Dv;) {
        const int64_t left = (Dv - c + 15) / 16;
        const int cb = static_cast<int>(std::min<int64_t>(16 / std::max(rt, 2), left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1));
        switch (rt * 16 + cb) {
#define SEQKERNELS_VALUE_TILE(RT, CB) \
  case RT * 16 + CB:                                                                          \
    if (c + 16 * CB <= Dv) value_tile<RT, CB, true, T>(o, Dv, c, s, kDecodeBlock, vp, n, first ? next_keys : none); \
    else value_tile<RT, CB, false, T>(o, Dv, c, s, kDecodeBlock, vp, n, first ? next_keys : none);                  \
    break;
          SEQKERNELS_VALUE_TILE(8, 2) SEQKERNELS_VALUE_TILE(8, 1)
          SEQKERNELS_VALUE_TILE(4, 4) SEQKERNELS_VALUE_TILE(4, 2) SEQKERNELS_VALUE_TILE(4, 1)
          SEQKERNELS_VALUE_TILE(2, 8) SEQKERNELS_VALUE_TILE(2, 4) SEQKERNELS_VALUE_TILE(2, 2) SEQKERNELS_VALUE_TILE(2, 1)
          SEQKERNELS_VALUE_TILE(1, 8) SEQKERNELS_VALUE_TILE(1, 4) SEQKERNELS_VALUE_TILE(1, 2) SEQKERNELS_VALUE_TILE(1, 1)
#undef SEQKERNELS_VALUE_TILE
        }
        c += 16 * cb;
        first = false;
      }
    }
    return;
  }
#endif
  constexpr int64_t W = at::vec::Vectorized<A>::size();
  const RowPrefetch<T> none;
  for (int64_t r0 = 0; r0 < R; r0 += row_tile_vec(R - r0)) {
    const int rt = row_tile_vec(R - r0);
    A* o = O + r0 * Dv;
    const A* s = S + r0 * kDecodeBlock;
    const int cb = 8 / std::max(rt, 1);  // bands of 8 / rt chunks (8 accumulators)
    for (int64_t c = 0; c < Dv; c += cb * W) {
      const RowPrefetch<T>& pf = r0 == 0 && c == 0 ? next_keys : none;
      switch (rt) {
        case 4: value_tile_vec<4, 2, A, T>(o, Dv, c, s, kDecodeBlock, vp, n, pf); break;
        case 2: value_tile_vec<2, 4, A, T>(o, Dv, c, s, kDecodeBlock, vp, n, pf); break;
        default: value_tile_vec<1, 8, A, T>(o, Dv, c, s, kDecodeBlock, vp, n, pf); break;
      }
    }
  }
}

// Number of key chunks per (batch, kv head): 1 when batch x kv heads keeps every thread
// busy, else enough for about four tasks per thread, each at least 256 keys.
inline int64_t decode_chunks(const DecodeDims& d) {
  const int64_t tasks = d.B * d.Hk, threads = at::get_num_threads();
  if (tasks >= 4 * threads || (tasks % threads == 0 && tasks >= threads)) return 1;
  const int64_t want = (4 * threads + tasks - 1) / tasks;
  return std::max<int64_t>(1, std::min(want, (d.Lk + 255) / 256));
}

// Per-thread scratch, kept across calls (no fresh buffers to fault in per call).
template <typename A>
struct DecodeScratch {
  std::vector<A> q, s, o, m, l;
  std::vector<c10::BFloat16> qb;  // the native bf16 path's queries, rows padded to 32
  std::vector<int32_t> pw;        // and its probabilities in bf16 pairs
  static DecodeScratch& get() {
    static thread_local DecodeScratch scratch;
    return scratch;
  }
};

}  // namespace

template <typename T, typename A>
void decode_forward(const DecodeDims& d, const Masking<A>& mk, const KVRows<T>& kv, const T* q, A scale, T* out,
                    A* lse) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t R = d.G * d.Lq;
  const int64_t nchunks = decode_chunks(d);
  const int64_t chunk_len = (d.Lk + nchunks - 1) / nchunks;
  // Partials of every (b, hk, chunk): row max, row sum, unnormalized output rows.
  std::vector<A> part_m, part_l, part_o;
  if (nchunks > 1) {
    part_m.assign(d.B * d.Hk * nchunks * R, kNegInf);
    part_l.assign(d.B * d.Hk * nchunks * R, A(0));
    part_o.resize(d.B * d.Hk * nchunks * R * d.Dv);
  }
  auto write_row = [&](int64_t b, int64_t hk, int64_t r, A m, A l, const A* o) {
    const int64_t h = hk * d.G + r / d.Lq, i = r % d.Lq;
    T* dst = out + ((b * d.H + h) * d.Lq + i) * d.Dv;
    A* ls = lse + (b * d.H + h) * d.Lq + i;
    if (l == A(0)) {  // the row sees no key
      std::fill(dst, dst + d.Dv, T(0));
      *ls = kNegInf;
      return;
    }
    const A inv = A(1) / l;
    for (int64_t c = 0; c < d.Dv; ++c) dst[c] = static_cast<T>(o[c] * inv);
    *ls = m + std::log(l);
  };

  // A small call runs on the calling thread: waking the pool costs more than it saves.
  const int64_t work = d.B * d.Hk * R * std::max<int64_t>(d.Lk, 1) * (d.D + d.Dv);
  const int64_t grain = work < (1 << 18) ? d.B * d.Hk * nchunks : 1;
  at::parallel_for(0, d.B * d.Hk * nchunks, grain, [&](int64_t begin, int64_t end) {
    auto& sc = DecodeScratch<A>::get();
    constexpr bool native = kNativeBf16Decode && std::is_same_v<T, c10::BFloat16>;
    sc.q.resize(native ? 0 : R * d.D);
    sc.s.resize(R * kDecodeBlock);
    sc.o.resize(R * d.Dv);
    sc.m.resize(R);
    sc.l.resize(R);
    A *Q = sc.q.data(), *S = sc.s.data(), *O = sc.o.data(), *M = sc.m.data(), *L = sc.l.data();
    const int64_t Dp = (d.D + 31) / 32 * 32;
    c10::BFloat16* Qb = nullptr;
    int32_t* PW = nullptr;
    if constexpr (native) {
      sc.qb.resize(R * Dp);
      sc.pw.resize(R * kDecodeBlock / 2 + 8);
      Qb = sc.qb.data();
      PW = sc.pw.data();
    }
    // Key row pointers of this block (KP) and of the next (KN, filled while this block's
    // values are read and swapped in), value row pointers of this block.
    const T* kbuf[2][kDecodeBlock + kPrefetchRows + 8];
    const T* VP[kDecodeBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task % nchunks, bhk = task / nchunks;
      const int64_t b = bhk / d.Hk, hk = bhk % d.Hk;
      // The query rows of the group, scaled once: row r is head hk * G + r / Lq, query r % Lq.
      // (The native bf16 path keeps them as stored, rows padded with zeros to Dp, and scales
      // the scores.)
      for (int64_t r = 0; r < R; ++r) {
        const T* src = q + ((b * d.H + hk * d.G + r / d.Lq) * d.Lq + r % d.Lq) * d.D;
        if constexpr (native) {
          std::copy(src, src + d.D, Qb + r * Dp);
          std::fill(Qb + r * Dp + d.D, Qb + (r + 1) * Dp, c10::BFloat16(0.f));
        } else {
          for (int64_t c = 0; c < d.D; ++c) Q[r * d.D + c] = static_cast<A>(src[c]) * scale;
        }
      }
      std::fill(O, O + R * d.Dv, A(0));
      std::fill(M, M + R, kNegInf);
      std::fill(L, L + R, A(0));
      int64_t row_end_max = 0;
      for (int64_t i = 0; i < d.Lq; ++i) row_end_max = std::max(row_end_max, mk.key_end(b, i));
      // keys before every row's window are never read (the chunks still split all of Lk)
      const int64_t j_lo = std::max(chunk * chunk_len, mk.key_begin(b, 0));
      const int64_t j_hi = std::min(row_end_max, chunk * chunk_len + chunk_len);
      const T** KP = kbuf[0];
      const T** KN = kbuf[1];
      int64_t ready = 0;  // leading rows of KP already filled (by the block before)
      for (int64_t j0 = j_lo; j0 < j_hi; j0 += kDecodeBlock) {
        const int64_t n = std::min(kDecodeBlock, j_hi - j0);
        // Row pointers of the block and of the next block's first kPrefetchRows (the keys are
        // prefetched that far ahead: K and V stream from memory, and the hardware prefetcher
        // alone reached a third of the read bandwidth here), padded with the first row.
        const int64_t n_ahead = std::min(n + kPrefetchRows, j_hi - j0);
        for (int64_t t = ready; t < n_ahead; ++t) KP[t] = kv.k_row(b, hk, j0 + t);
        for (int64_t t = n_ahead; t < n + 8; ++t) KP[t] = KP[0];
        for (int64_t t = 0; t < n; ++t) VP[t] = kv.v_row(b, hk, j0 + t);
        const BlockPrefetch<T> prefetch{KP, VP, n, n_ahead, d.D * int64_t(sizeof(T)), d.Dv * int64_t(sizeof(T))};
        if constexpr (native) {
          score_block_bf16(Qb, R, Dp, d.D, KP, n, scale, S, prefetch);
        } else {
          score_block<A, T>(Q, R, d.D, KP, n, S, prefetch);
        }
        for (int64_t r = 0; r < R; ++r) {
          A* srow = S + r * kDecodeBlock;
          const int64_t h = hk * d.G + r / d.Lq, i = r % d.Lq;
          mk.cap(srow, n);
          mk.apply(srow, b, h, i, j0, n, Masking<A>::Tile::kMixed);
          const A m_new = nan_max(M[r], row_max(srow, n));
          if (m_new == kNegInf) {  // nothing visible yet: the block adds nothing to this row
            std::fill(srow, srow + n, A(0));
            continue;
          }
          // A NaN max makes alpha, the sum and the row NaN (exp_sub_sum's fast exp would not).
          const A alpha = std::exp(M[r] - m_new);
          L[r] = L[r] * alpha + exp_sub_sum(srow, n, m_new);
          if (alpha != A(1)) scale_row(O + r * d.Dv, d.Dv, alpha);
          M[r] = m_new;
        }
        const int64_t n_next = std::min(kDecodeBlock, j_hi - j0 - n);
        for (int64_t t = 0; t < n_next; ++t) KN[t] = kv.k_row(b, hk, j0 + n + t);
        const RowPrefetch<T> next_keys{KN, std::min(n, n_next), d.D * int64_t(sizeof(T))};
        if constexpr (native) {
          value_block_bf16(O, R, d.Dv, S, PW, VP, n, next_keys);
        } else {
          value_block<A, T>(O, R, d.Dv, S, VP, n, next_keys);
        }
        std::swap(KP, KN);
        ready = n_next;
      }
      if (nchunks == 1) {
        for (int64_t r = 0; r < R; ++r) write_row(b, hk, r, M[r], L[r], O + r * d.Dv);
      } else {
        const int64_t base = task * R;
        std::copy(M, M + R, part_m.begin() + base);
        std::copy(L, L + R, part_l.begin() + base);
        std::copy(O, O + R * d.Dv, part_o.begin() + base * d.Dv);
      }
    }
  });
  if (nchunks == 1) return;
  // Merge the chunks of each row in chunk order (deterministic for a given thread count).
  at::parallel_for(0, d.B * d.Hk * R, 16, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(d.Dv);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bhk = row / R, r = row % R;
      A m = kNegInf;
      for (int64_t c = 0; c < nchunks; ++c) m = nan_max(m, part_m[(bhk * nchunks + c) * R + r]);
      std::fill(acc.begin(), acc.end(), A(0));
      A l = 0;
      if (m != kNegInf) {
        for (int64_t c = 0; c < nchunks; ++c) {
          const int64_t p = (bhk * nchunks + c) * R + r;
          if (part_m[p] == kNegInf) continue;  // a chunk that saw nothing of this row
          const A w = std::exp(part_m[p] - m);
          l += part_l[p] * w;
          const A* o = part_o.data() + p * d.Dv;
          for (int64_t e = 0; e < d.Dv; ++e) acc[e] += o[e] * w;
        }
      }
      write_row(bhk / d.Hk, bhk % d.Hk, r, m, l, acc.data());
    }
  });
}


template void decode_forward<float, float>(const DecodeDims&, const Masking<float>&, const KVRows<float>&, const float*,
                                           float, float*, float*);
template void decode_forward<double, double>(const DecodeDims&, const Masking<double>&, const KVRows<double>&,
                                             const double*, double, double*, double*);
template void decode_forward<c10::BFloat16, float>(const DecodeDims&, const Masking<float>&,
                                                   const KVRows<c10::BFloat16>&, const c10::BFloat16*, float,
                                                   c10::BFloat16*, float*);
template void decode_forward<c10::Half, float>(const DecodeDims&, const Masking<float>&, const KVRows<c10::Half>&,
                                               const c10::Half*, float, c10::Half*, float*);

}  // namespace seqkernels::attention
