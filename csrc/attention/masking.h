// What may change a score besides Q K^T * scale: the causal mask, per-batch key lengths,
// an attention mask (boolean or additive, broadcast through strides) and dropout. Shared
// by the forward and the backward of the CPU flash attention, so that both see exactly
// the same masks.
//
// Dropout uses Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
// 3", SC 2011), a counter-based generator: the keep/drop decision of score (b, h, i, j)
// is a pure function of (seed, offset, index), recomputed in the backward, never stored.
// Row r = (b * H + h) * Lq + i owns ceil(Lk / 4) consecutive Philox blocks from
// offset + r * ceil(Lk / 4): key j uses word j % 4 of block offset + r * ceil(Lk / 4) + j / 4.
// A block is Philox4x32-10 with counter (block number as two 32-bit words, low first, 0, 0)
// and key (seed low word, seed high word): the stream of Triton's tl.randint4x(seed, block),
// so the CPU kernel, the Triton kernels and seqkernels.reference.dropout_keep_mask agree
// bit for bit. Four keys per block, aligned to the row start, let a tile draw one block per
// four scores. A score is kept when its word is >= threshold = round(p * 2^32).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>

namespace seqkernels {
namespace attention {

struct Philox4 {
  uint32_t v[4];
};

inline Philox4 philox4x32_10(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pa = uint64_t(0xD2511F53u) * c0, pb = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// The keep threshold for drop probability p in [0, 1): a word w is kept when w >= it.
inline uint32_t dropout_threshold(double p) {
  const double t = std::nearbyint(p * 4294967296.0);
  return t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t);
}

// s[j] = c * tanh(s[j] / c) in float, branch-free so that the compiler vectorizes the loop
// (std::tanh per element made a capped forward 3.8x slower than a plain one). tanh(x) =
// sign(x) (1 - e) / (1 + e) with e = exp(-2|x|), |x| clamped to 9 (tanh(9) rounds to 1);
// exp(y) = 2^k p(r), k = round(y / ln 2), r = y - k ln 2 in two parts (Cody-Waite), p the
// degree-6 Taylor polynomial (|r| <= ln 2 / 2: relative error below 2e-7); below |x| = 1e-2,
// where 1 - e cancels, x - x^3 / 3. NaN stays NaN.
inline void softcap_float(float* s, int64_t n, float c) {
  const float inv = 1.0f / c;
  for (int64_t j = 0; j < n; ++j) {
    const float x = s[j] * inv;
    const float a = std::fabs(x);
    const float y = -2.0f * (a < 9.0f ? a : 9.0f);
    const float k = (y * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
    const float r = (y - k * 0.693145751953125f) - k * 1.42860682e-06f;
    float p = 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    uint32_t bits;
    std::memcpy(&bits, &p, sizeof bits);
    bits += static_cast<uint32_t>(static_cast<int32_t>(k)) << 23;  // times 2^k (k in [-26, 0])
    float e;
    std::memcpy(&e, &bits, sizeof e);
    float t = (1.0f - e) / (1.0f + e);
    t = a < 1e-2f ? a - a * a * a * (1.0f / 3) : t;
    t = std::copysign(t, x);
    s[j] = x != x ? x : c * t;
  }
}

// Everything that masks or rescales a score, read-only, for one call.
template <typename scalar_t>
struct Masking {
  int64_t H = 1, Lq = 1, Lk = 1;
  // Packed sequences (varlen): sequence b's queries are rows cu_q[b] .. cu_q[b + 1] - 1 of the
  // packed batch and its keys rows cu_k[b] .. cu_k[b + 1] - 1; Lq is then the total number
  // of query rows and Lk the longest key sequence (the dropout counters' row length). Null
  // for a (B, H, L, D) batch, where every sequence has Lq queries and Lk keys.
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;
  // Causal: query i sees keys j <= i + offset(b): query i sits at key position i + offset(b)
  // (lk(b) - lq(b) bottom-right, 0 top-left; with causal_from_length, key_limit(b) - Lq:
  // bottom-right on each sequence's own length, as a KV cache holds sequences of different
  // lengths). The window and ALiBi use the same positions.
  bool causal = false;
  bool bottom_right = true;
  bool causal_from_length = false;
  // Key lengths (B,), int64: keys j >= key_lengths[b] are masked. Null when absent.
  const int64_t* key_lengths = nullptr;
  // Attention mask of 4 dims, read at b*sb + h*sh + i*si + j*sj (stride 0 on broadcast
  // dims). Exactly one of bool_mask / add_mask is set when a mask is given.
  const bool* bool_mask = nullptr;
  const scalar_t* add_mask = nullptr;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
  // Sliding window (flash-attn's window_size): query i sees keys j with
  // i + offset(b) - window_left <= j <= i + offset(b) + window_right; -1 = unbounded on that
  // side.
  int64_t window_left = -1, window_right = -1;
  // Logit softcapping: softcap > 0 maps a scaled score s to softcap * tanh(s / softcap),
  // before any mask is added or applied (flash-attn's order); 0 = off.
  scalar_t softcap = 0;
  // ALiBi (Press et al., "Train short, test long", 2022), flash-attn's convention: score +=
  // -slope(b, h) * |i + offset(b) - j|, added after the cap. Slopes
  // are float32, (H,) or (B, H): slope(b, h) = alibi[b * alibi_sb + h] (alibi_sb 0 or H).
  // Null = off.
  const float* alibi = nullptr;
  int64_t alibi_sb = 0;
  // Dropout: 0 <= p < 1; kept probabilities are scaled by 1 / (1 - p).
  double dropout_p = 0.0;
  uint32_t threshold = 0;
  uint64_t seed = 0, rng_offset = 0;

  bool has_mask() const { return bool_mask != nullptr || add_mask != nullptr; }
  bool has_softcap() const { return softcap > 0; }

  // Scores s[0:n] (scaled) -> softcap * tanh(s / softcap); called before apply(). NaN stays
  // NaN; +-inf become +-softcap, as in the math.
  void cap(scalar_t* s, int64_t n) const {
    if (!has_softcap()) return;
    if constexpr (std::is_same_v<scalar_t, float>) {
      softcap_float(s, n, softcap);
    } else {
      const scalar_t inv = scalar_t(1) / softcap;
      for (int64_t j = 0; j < n; ++j) s[j] = softcap * std::tanh(s[j] * inv);
    }
  }
  // The derivative of the cap at capped scores t[0:n]: 1 - (t / softcap)^2, into g.
  void cap_slope(const scalar_t* t, int64_t n, scalar_t* g) const {
    const scalar_t inv = scalar_t(1) / softcap;
    for (int64_t j = 0; j < n; ++j) g[j] = scalar_t(1) - (t[j] * inv) * (t[j] * inv);
  }
  bool has_dropout() const { return dropout_p > 0.0; }

  // The queries and keys of sequence b.
  int64_t lq(int64_t b) const { return cu_q ? cu_q[b + 1] - cu_q[b] : Lq; }
  int64_t lk(int64_t b) const { return cu_k ? cu_k[b + 1] - cu_k[b] : Lk; }
  // One past the last key any query of batch b may see (key lengths only).
  int64_t key_limit(int64_t b) const {
    return key_lengths ? std::clamp<int64_t>(key_lengths[b], 0, lk(b)) : lk(b);
  }
  // The key position of query 0 of sequence b (the causal, window and ALiBi alignment).
  int64_t offset(int64_t b) const {
    if (causal_from_length) return key_limit(b) - lq(b);
    return bottom_right ? lk(b) - lq(b) : 0;
  }
  // One past the last key query row i of batch b may see (causal, window and key lengths).
  int64_t key_end(int64_t b, int64_t i) const {
    const int64_t lim = key_limit(b);
    int64_t end = lim;
    if (causal) end = std::clamp<int64_t>(i + offset(b) + 1, 0, lim);
    if (window_right >= 0) end = std::min(end, std::clamp<int64_t>(i + offset(b) + window_right + 1, 0, lim));
    return end;
  }
  // The first key query row i of batch b may see (the window's left edge; 0 without one).
  int64_t key_begin(int64_t b, int64_t i) const {
    return window_left >= 0 ? std::clamp<int64_t>(i + offset(b) - window_left, 0, lk(b)) : 0;
  }
  // The first query row of sequence b that sees key j under the causal mask and the
  // window's right edge.
  int64_t first_query(int64_t b, int64_t j) const {
    const int64_t n = lq(b), off = offset(b);
    int64_t q0 = causal ? std::clamp<int64_t>(j - off, 0, n) : 0;
    if (window_right >= 0) q0 = std::max(q0, std::clamp<int64_t>(j - off - window_right, 0, n));
    return q0;
  }
  // One past the last query row of sequence b that sees key j (the window's left edge).
  int64_t query_end(int64_t b, int64_t j) const {
    return window_left >= 0 ? std::clamp<int64_t>(j - offset(b) + window_left + 1, 0, lq(b)) : lq(b);
  }

  // What the boolean mask does to the tile of queries [i0, i0 + rows) x keys [j0, j0 + cols):
  // hides all of it (the tile is skipped), shows all of it (the mask need not be read
  // again for this tile) or some of each. With si == 0 (a mask broadcast over the queries,
  // as key padding is) one row decides. Without a boolean mask every tile is kOpen.
  enum class Tile { kHidden, kOpen, kMixed };
  Tile tile_state(int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols) const {
    if (bool_mask == nullptr) return Tile::kOpen;
    const int64_t nrows = si == 0 ? 1 : rows;
    int64_t shown = 0;
    for (int64_t r = 0; r < nrows; ++r) {
      const bool* m = bool_mask + b * sb + h * sh + (i0 + r) * si + j0 * sj;
      shown += count_true(m, cols, sj);
      // once both values were seen the tile is mixed: the rest of it need not be read
      if (shown != 0 && shown != (r + 1) * cols) return Tile::kMixed;
    }
    return shown == 0 ? Tile::kHidden : Tile::kOpen;
  }

  // For a kMixed tile: one past the last key column the boolean mask shows to any of its
  // rows (the keys after it are hidden for the whole tile and need not be computed: a
  // padded tail, or the far side of a causal diagonal given as a mask). At most cols.
  int64_t shown_cols(int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols) const {
    const int64_t nrows = si == 0 ? 1 : rows;
    int64_t end = 0;
    for (int64_t r = 0; r < nrows && end < cols; ++r) {
      const bool* m = bool_mask + b * sb + h * sh + (i0 + r) * si + j0 * sj;
      for (int64_t j = cols - 1; j >= end; --j) {
        if (m[j * sj]) {
          end = j + 1;
          break;
        }
      }
    }
    return end;
  }

  // How many of m[0], m[s], ..., m[(n - 1) s] are true. A torch bool is one byte, 0 or 1, so
  // the contiguous case is a byte sum, which the compiler vectorizes (the classification of
  // a 256 x 384 tile was a scalar loop costing a third of the tile's arithmetic).
  static int64_t count_true(const bool* m, int64_t n, int64_t s) {
    if (s != 1) {
      int64_t c = 0;
      for (int64_t j = 0; j < n; ++j) c += m[j * s];
      return c;
    }
    const uint8_t* p = reinterpret_cast<const uint8_t*>(m);
    uint32_t c = 0;
    for (int64_t j = 0; j < n; ++j) c += p[j];
    return c;
  }

  // Scores of row i, keys [j0, j0 + cols), already scaled: set the masked ones to -inf
  // (causal, key lengths, and the boolean mask unless the tile is kOpen) and add the
  // additive mask.
  void apply(scalar_t* s, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t cols, Tile tile) const {
    constexpr scalar_t kNegInf = -std::numeric_limits<scalar_t>::infinity();
    const int64_t visible = std::max<int64_t>(key_end(b, i) - j0, 0);
    if (visible < cols) std::fill(s + visible, s + cols, kNegInf);
    const int64_t n = std::min(visible, cols);
    const int64_t lo = std::clamp<int64_t>(key_begin(b, i) - j0, 0, n);  // left of the window
    if (lo > 0) std::fill(s, s + lo, kNegInf);
    const int64_t base = b * sb + h * sh + i * si + j0 * sj;
    if (bool_mask != nullptr && tile == Tile::kMixed) {
      const bool* m = bool_mask + base;
      if (sj == 1) {
        for (int64_t j = lo; j < n; ++j) s[j] = m[j] ? s[j] : kNegInf;
      } else {
        for (int64_t j = lo; j < n; ++j) s[j] = m[j * sj] ? s[j] : kNegInf;
      }
    } else if (add_mask != nullptr) {
      const scalar_t* m = add_mask + base;
      if (sj == 1) {
        for (int64_t j = lo; j < n; ++j) s[j] += m[j];
      } else {
        for (int64_t j = lo; j < n; ++j) s[j] += m[j * sj];
      }
    }
    if (alibi != nullptr) {  // -slope * |position of the query - position of the key|
      const scalar_t slope = static_cast<scalar_t>(alibi[b * alibi_sb + h]);
      const scalar_t pos = static_cast<scalar_t>(i + offset(b) - j0);
      for (int64_t j = lo; j < n; ++j) s[j] -= slope * std::abs(pos - static_cast<scalar_t>(j));
    }
  }

  // The dropout multipliers of row i, keys [j0, j0 + cols): 0 (dropped) or 1 / (1 - p).
  void dropout_row(scalar_t* z, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t cols) const {
    const scalar_t kept = scalar_t(1.0 / (1.0 - dropout_p));
    // the counters' row: (b, h, i) of a (B, H, Lq, Lk) batch; packed, row h * Lq + cu_q[b] + i
    // of a (1, H, total, longest) one
    const int64_t row = cu_q ? h * Lq + cu_q[b] + i : (b * H + h) * Lq + i;
    const uint64_t row_block = rng_offset + static_cast<uint64_t>(row * ((Lk + 3) / 4));
    int64_t j = 0;
    while (j < cols) {
      const int64_t key = j0 + j;
      const Philox4 r = philox4x32_10(row_block + static_cast<uint64_t>(key / 4), seed);
      for (int lane = static_cast<int>(key % 4); lane < 4 && j < cols; ++lane, ++j) {
        z[j] = r.v[lane] >= threshold ? kept : scalar_t(0);
      }
    }
  }
};

// alibi_slopes as an op received it, checked: float32, (H,) or (B, H), on like's device.
// Returns the contiguous tensor the Masking points into (undefined when absent).
inline at::Tensor checked_alibi_slopes(const std::optional<at::Tensor>& slopes, int64_t B, int64_t H,
                                       const at::Tensor& like, const char* op) {
  if (!slopes.has_value() || !slopes->defined()) return {};
  const at::Tensor& a = *slopes;
  TORCH_CHECK(a.scalar_type() == at::kFloat, op, ": alibi_slopes must be float32, got ", a.scalar_type());
  TORCH_CHECK((a.dim() == 1 && a.size(0) == H) || (a.dim() == 2 && a.size(0) == B && a.size(1) == H), op,
              ": alibi_slopes must have shape (H,) = (", H, ",) or (B, H) = (", B, ", ", H, "), got ", a.sizes());
  TORCH_CHECK(a.device() == like.device(), op, ": alibi_slopes must be on ", like.device(), ", got ", a.device());
  return a.contiguous();
}

template <typename scalar_t>
void set_alibi(Masking<scalar_t>& m, const at::Tensor& slopes) {
  if (!slopes.defined()) return;
  m.alibi = slopes.const_data_ptr<float>();
  m.alibi_sb = slopes.dim() == 2 ? slopes.size(1) : 0;
}

}  // namespace attention
}  // namespace seqkernels
