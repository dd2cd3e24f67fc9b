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

// Scores of one query row against keys k[0..nk) (nk <= 4, rows of D): s[jj] = q . k[jj].
// Generic version (at::vec); the AVX-512 one below keeps four independent accumulators and
// reduces them together.
template <typename A, typename T>
inline void dot_keys(const A* q, const T* const* k, int64_t nk, int64_t D, A* s) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  for (int64_t jj = 0; jj < nk; ++jj) {
    V acc(A(0));
    int64_t c = 0;
    for (; c + W <= D; c += W) acc = at::vec::fmadd(V::loadu(q + c), load_as<A>(k[jj] + c), acc);
    A t = at::vec::vec_reduce_all<A>([](V a, V b) { return a + b; }, acc);
    for (; c < D; ++c) t += q[c] * static_cast<A>(k[jj][c]);
    s[jj] = t;
  }
}

// o += sum_jj p[jj] * v[jj] over keys jj < nk (nk <= 4), rows of Dv.
template <typename A, typename T>
inline void axpy_keys(A* o, const A* p, const T* const* v, int64_t nk, int64_t Dv) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  int64_t c = 0;
  for (; c + W <= Dv; c += W) {
    V acc = V::loadu(o + c);
    for (int64_t jj = 0; jj < nk; ++jj) acc = at::vec::fmadd(V(p[jj]), load_as<A>(v[jj] + c), acc);
    acc.store(o + c);
  }
  for (; c < Dv; ++c) {
    A t = o[c];
    for (int64_t jj = 0; jj < nk; ++jj) t += p[jj] * static_cast<A>(v[jj][c]);
    o[c] = t;
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// 16 lanes of T as floats; lanes past `count` read as 0 (masked loads never touch them).
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

inline __mmask16 lanes(int64_t count) {
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

template <typename T>
inline void dot_keys_avx512(const float* q, const T* const* k, int64_t nk, int64_t D, float* s) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const T* k0 = k[0];
  const T* k1 = k[nk > 1 ? 1 : 0];
  const T* k2 = k[nk > 2 ? 2 : 0];
  const T* k3 = k[nk > 3 ? 3 : 0];
  for (int64_t c = 0; c < D; c += 16) {
    const __mmask16 m = lanes(D - c);
    const __m512 qv = _mm512_maskz_loadu_ps(m, q + c);
    a0 = _mm512_fmadd_ps(qv, load16(k0 + c, m), a0);
    a1 = _mm512_fmadd_ps(qv, load16(k1 + c, m), a1);
    a2 = _mm512_fmadd_ps(qv, load16(k2 + c, m), a2);
    a3 = _mm512_fmadd_ps(qv, load16(k3 + c, m), a3);
  }
  alignas(16) float out[4];
  _mm_store_ps(out, reduce4(a0, a1, a2, a3));
  for (int64_t jj = 0; jj < nk; ++jj) s[jj] = out[jj];
}

template <typename T>
inline void axpy_keys_avx512(float* o, const float* p, const T* const* v, int64_t nk, int64_t Dv) {
  const __m512 p0 = _mm512_set1_ps(p[0]), p1 = _mm512_set1_ps(nk > 1 ? p[1] : 0.f),
               p2 = _mm512_set1_ps(nk > 2 ? p[2] : 0.f), p3 = _mm512_set1_ps(nk > 3 ? p[3] : 0.f);
  const T* v0 = v[0];
  const T* v1 = v[nk > 1 ? 1 : 0];
  const T* v2 = v[nk > 2 ? 2 : 0];
  const T* v3 = v[nk > 3 ? 3 : 0];
  for (int64_t c = 0; c < Dv; c += 16) {
    const __mmask16 m = lanes(Dv - c);
    __m512 acc = _mm512_maskz_loadu_ps(m, o + c);
    acc = _mm512_fmadd_ps(p0, load16(v0 + c, m), acc);
    if (nk > 1) acc = _mm512_fmadd_ps(p1, load16(v1 + c, m), acc);
    if (nk > 2) acc = _mm512_fmadd_ps(p2, load16(v2 + c, m), acc);
    if (nk > 3) acc = _mm512_fmadd_ps(p3, load16(v3 + c, m), acc);
    _mm512_mask_storeu_ps(o + c, m, acc);
  }
}
#endif

constexpr int64_t kPrefetchRows = 16;

inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

template <typename A, typename T>
inline void dot_group(const A* q, const T* const* k, int64_t nk, int64_t D, A* s) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    dot_keys_avx512<T>(q, k, nk, D, s);
    return;
  }
#endif
  dot_keys<A, T>(q, k, nk, D, s);
}

template <typename A, typename T>
inline void axpy_group(A* o, const A* p, const T* const* v, int64_t nk, int64_t Dv) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    axpy_keys_avx512<T>(o, p, v, nk, Dv);
    return;
  }
#endif
  axpy_keys<A, T>(o, p, v, nk, Dv);
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
    sc.q.resize(R * d.D);
    sc.s.resize(R * kDecodeBlock);
    sc.o.resize(R * d.Dv);
    sc.m.resize(R);
    sc.l.resize(R);
    A *Q = sc.q.data(), *S = sc.s.data(), *O = sc.o.data(), *M = sc.m.data(), *L = sc.l.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task % nchunks, bhk = task / nchunks;
      const int64_t b = bhk / d.Hk, hk = bhk % d.Hk;
      // The query rows of the group, scaled once: row r is head hk * G + r / Lq, query r % Lq.
      for (int64_t r = 0; r < R; ++r) {
        const T* src = q + ((b * d.H + hk * d.G + r / d.Lq) * d.Lq + r % d.Lq) * d.D;
        for (int64_t c = 0; c < d.D; ++c) Q[r * d.D + c] = static_cast<A>(src[c]) * scale;
      }
      std::fill(O, O + R * d.Dv, A(0));
      std::fill(M, M + R, kNegInf);
      std::fill(L, L + R, A(0));
      int64_t row_end_max = 0;
      for (int64_t i = 0; i < d.Lq; ++i) row_end_max = std::max(row_end_max, mk.key_end(b, i));
      // keys before every row's window are never read (the chunks still split all of Lk)
      const int64_t j_lo = std::max(chunk * chunk_len, mk.key_begin(b, 0));
      const int64_t j_hi = std::min(row_end_max, chunk * chunk_len + chunk_len);
      for (int64_t j0 = j_lo; j0 < j_hi; j0 += kDecodeBlock) {
        const int64_t n = std::min(kDecodeBlock, j_hi - j0);
        for (int64_t jj = 0; jj < n; jj += 4) {  // four keys at a time, read once for every row
          const int64_t nk = std::min<int64_t>(4, n - jj);
          const T* krows[4];
          for (int64_t t = 0; t < nk; ++t) {
            krows[t] = kv.k_row(b, hk, j0 + jj + t);
            // K and V stream from memory: ask for the rows kPrefetchRows ahead, so that enough
            // loads are in flight (the hardware prefetcher alone reached a third of the read
            // bandwidth here).
            if (j0 + jj + t + kPrefetchRows < j_hi) {
              prefetch_row(kv.k_row(b, hk, j0 + jj + t + kPrefetchRows), d.D * sizeof(T));
            }
          }
          for (int64_t r = 0; r < R; ++r) dot_group<A, T>(Q + r * d.D, krows, nk, d.D, S + r * kDecodeBlock + jj);
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
        for (int64_t jj = 0; jj < n; jj += 4) {
          const int64_t nk = std::min<int64_t>(4, n - jj);
          const T* vrows[4];
          for (int64_t t = 0; t < nk; ++t) vrows[t] = kv.v_row(b, hk, j0 + jj + t);
          for (int64_t r = 0; r < R; ++r) axpy_group<A, T>(O + r * d.Dv, S + r * kDecodeBlock + jj, vrows, nk, d.Dv);
        }
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
