// Flash attention on the CPU: tiled, online softmax, O(n) extra memory.
//
// out = softmax(Q K^T * scale + causal mask) V, computed one (query block, key block) tile
// at a time, so the Lq x Lk score matrix never exists. Registered as the CPU kernel of
// seqkernels::flash_attention_forward / _backward (schemas in csrc/seqkernels.cpp).
//
// Layout: q (B, H, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv), contiguous; Hk divides H
// (grouped-query heads: query head h reads k/v head h / (H / Hk)). The varlen ops take
// packed batches instead (flash-attn's flash_attn_varlen_func): q (total_q, H, D), k
// (total_k, Hk, D), v (total_k, Hk, Dv), sequence b in rows cu_seqlens[b] .. cu_seqlens[b+1]-1;
// the kernels read both layouts in place through Rows, and split their work at sequence
// boundaries (a tile never spans two sequences). Causal masking lets
// query i see key j when j <= i + offset, with offset = Lk - Lq (bottom-right) or 0
// (top-left). A row that sees no key gets output 0 and LSE -inf. Optional: per-batch key
// lengths, an attention mask (boolean or additive, any broadcast, read through strides)
// and dropout on the probabilities (Philox, regenerated in the backward); see masking.h.
// Tiles that the causal mask, the key lengths or a boolean mask hide entirely are skipped.
//
// Tile sizes (measured on a 2-core AMD EPYC with AVX-512, 1 MiB L2 per core; see
// bench/results/). One thread works on a block of kFwdQ = 256 query rows against kv
// tiles of 384 keys (D <= 64). The working set of one step is the Q block (256 x 64
// floats, 64 KiB), a K and a V tile (96 KiB each), the score tile S (384 KiB) and the
// output rows (64 KiB): about 700 KiB, inside L2. Tall Q blocks matter most: the score
// GEMM has depth D (64), so a bigger block amortizes BLAS packing of each K tile over
// more rows (64-row blocks ran about 5% slower). Larger head dims shorten the kv tile to
// stay in L2. The backward runs five GEMMs per tile and keeps two (rows x keys) buffers,
// P and dS, so it uses 128 x 64 tiles; 64 to 256 in either direction changed its time by
// less than the noise (about 5%).

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common.h"
#include "../cpu/panel_bf16.h"
#include "decode.h"
#include "masking.h"

namespace seqkernels {
namespace {

using namespace seqkernels::cpu;

constexpr int64_t kFwdQ = 256;
constexpr int64_t kFwdKMax = 384;
constexpr int64_t kBwdQ = 128;
constexpr int64_t kBwdK = 64;
// Lazy rescaling: the running row max is only raised when a tile exceeds it by more than
// kSlack (natural log units). exp() of the scores then stays <= e^kSlack, far from
// float32 overflow, and the rescale of the output row that a new max costs is skipped
// for most tiles. The result is exact: sum and output use the same (stale) max.
constexpr double kSlack = 8.0;

// Forward kv tile length: kFwdKMax for head dims up to 64, shorter for larger ones so that
// the K and V tiles (kK x D each) plus S still fit in L2 next to the Q block.
inline int64_t fwd_kv_tile(int64_t d) {
  return d <= 64 ? kFwdKMax : (d <= 128 ? 256 : (d <= 256 ? 128 : 64));
}

// Lq and Lk are the per-sequence lengths of a (B, H, L, D) batch; for a packed batch the
// total query rows and the longest key sequence (Masking::lq / lk give each sequence's).
struct Dims {
  int64_t B, H, Hk, G, Lq, Lk, D, Dv;
};

// Where the rows of one tensor live: row i of head h of sequence b starts at element
// base(b) + h * hs + i * rs. A (B, H, L, X) batch: base = b * bs, hs = L * X, rs = X. A packed
// (total, H, X) batch: base = cu[b] * rs, hs = X, rs = H * X; its LSE (H, total): hs = total,
// rs = 1.
struct Rows {
  int64_t bs = 0, hs = 0, rs = 0;
  const int32_t* cu = nullptr;
  int64_t at(int64_t b, int64_t h, int64_t i) const { return (cu ? cu[b] * rs : b * bs) + h * hs + i * rs; }
};

Rows batched_rows(const at::Tensor& t) {  // (B, H, L, X) or, for the LSE, (B, H, L)
  const int64_t x = t.dim() == 4 ? t.size(3) : 1;
  return {t.size(1) * t.size(2) * x, t.size(2) * x, x, nullptr};
}
Rows packed_rows(const at::Tensor& t, const int32_t* cu) {  // (total, H, X)
  return {0, t.size(2), t.size(1) * t.size(2), cu};
}
Rows packed_lse_rows(int64_t total, const int32_t* cu) { return {0, total, 1, cu}; }  // (H, total)

// The row layouts of every tensor the kernels touch; gradients share their input's.
struct Layout {
  Rows q, k, v, o, lse;
};

Layout batched_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
                      const at::Tensor& lse) {
  return {batched_rows(q), batched_rows(k), batched_rows(v), batched_rows(o), batched_rows(lse)};
}

Dims make_dims(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  Dims d;
  d.B = q.size(0);
  d.H = q.size(1);
  d.Hk = k.size(1);
  d.G = d.H / d.Hk;
  d.Lq = q.size(2);
  d.Lk = k.size(2);
  d.D = q.size(3);
  d.Dv = v.size(3);
  return d;
}

// The optional inputs of both ops, checked (the Python API checks them first with friendlier
// messages) and turned into a Masking. The tensors it points into must outlive it.
struct MaskInputs {
  at::Tensor mask, key_lengths, alibi;
};

template <typename scalar_t>
attention::Masking<scalar_t> make_masking(const Dims& d, bool causal, bool bottom_right,
                                          const MaskInputs& in, double dropout_p,
                                          const std::optional<at::Tensor>& rng_state, double softcap,
                                          int64_t window_left, int64_t window_right) {
  attention::Masking<scalar_t> m;
  m.H = d.H;
  m.Lq = d.Lq;
  m.Lk = d.Lk;
  m.causal = causal;
  m.bottom_right = bottom_right;
  if (in.key_lengths.defined()) m.key_lengths = in.key_lengths.const_data_ptr<int64_t>();
  if (in.mask.defined()) {
    const at::Tensor& a = in.mask;
    int64_t st[4];
    for (int i = 0; i < 4; ++i) st[i] = a.size(i) == 1 ? 0 : a.stride(i);
    m.sb = st[0], m.sh = st[1], m.si = st[2], m.sj = st[3];
    if (a.scalar_type() == at::kBool) {
      m.bool_mask = a.const_data_ptr<bool>();
    } else {
      m.add_mask = a.const_data_ptr<scalar_t>();
    }
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "flash_attention: dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, "flash_attention: softcap must be a finite number >= 0, got ",
              softcap);
  m.softcap = static_cast<scalar_t>(softcap);
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "flash_attention: window sizes must be >= -1 (-1 = unbounded), "
              "got (", window_left, ", ", window_right, ")");
  m.window_left = window_left;
  m.window_right = window_right;
  attention::set_alibi(m, in.alibi);
  if (dropout_p > 0.0) {
    TORCH_CHECK(rng_state.has_value() && rng_state->defined() && rng_state->numel() == 2 &&
                    rng_state->scalar_type() == at::kLong && rng_state->device().is_cpu(),
                "flash_attention: dropout needs rng_state, an int64 CPU tensor [seed, offset]");
    const at::Tensor rs = rng_state->contiguous();
    m.dropout_p = dropout_p;
    m.threshold = attention::dropout_threshold(dropout_p);
    m.seed = static_cast<uint64_t>(rs.const_data_ptr<int64_t>()[0]);
    m.rng_offset = static_cast<uint64_t>(rs.const_data_ptr<int64_t>()[1]);
  }
  return m;
}

// bf16 / fp16 inputs: fp32 accumulation, fp32 softmax statistics (LSE) and additive masks.
bool is_half(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf; }

MaskInputs check_mask_inputs(const Dims& d, const at::Tensor& q,
                             const std::optional<at::Tensor>& attn_mask,
                             const std::optional<at::Tensor>& key_lengths,
                             const std::optional<at::Tensor>& alibi_slopes) {
  MaskInputs in;
  in.alibi = attention::checked_alibi_slopes(alibi_slopes, d.B, d.H, q, "flash_attention");
  if (attn_mask.has_value() && attn_mask->defined()) {
    const at::Tensor& a = *attn_mask;
    TORCH_CHECK(a.dim() == 4, "flash_attention: attn_mask must be 4-D, got ", a.dim(), " dims");
    const int64_t full[4] = {d.B, d.H, d.Lq, d.Lk};
    for (int i = 0; i < 4; ++i) {
      TORCH_CHECK(a.size(i) == 1 || a.size(i) == full[i], "flash_attention: attn_mask of shape ",
                  a.sizes(), " does not broadcast to (B, H, Lq, Lk) = ", at::IntArrayRef(full, 4));
    }
    TORCH_CHECK(a.scalar_type() == at::kBool || a.scalar_type() == q.scalar_type() ||
                    (is_half(q) && a.scalar_type() == at::kFloat),
                "flash_attention: attn_mask must be bool or ", q.scalar_type(), is_half(q) ? " or float32" : "",
                ", got ", a.scalar_type());
    TORCH_CHECK(a.device() == q.device(), "flash_attention: attn_mask must be on ", q.device());
    in.mask = is_half(q) ? to_float(a) : a;  // added to fp32 scores
  }
  if (key_lengths.has_value() && key_lengths->defined()) {
    check_index_arg(*key_lengths, "flash_attention", "key_lengths", d.B, 0, d.Lk, q);
    in.key_lengths = key_lengths->contiguous();
  }
  return in;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  // The Python API checks all of this with friendlier messages; these guard direct op calls.
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "flash_attention: q, k, v must be 4-D");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "flash_attention: q, k, v must have the same dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble || is_half(q),
              "flash_attention (CPU kernel): dtype must be float32, float64, bfloat16 or float16, got ",
              q.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "flash_attention: batch sizes differ");
  TORCH_CHECK(k.size(1) == v.size(1) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "flash_attention: key/value heads must be equal and divide the query heads");
  TORCH_CHECK(k.size(2) == v.size(2), "flash_attention: k and v lengths differ");
  TORCH_CHECK(q.size(3) == k.size(3), "flash_attention: q and k head dims differ");
  TORCH_CHECK(q.size(2) > 0 && k.size(2) > 0, "flash_attention: lengths must be positive");
  TORCH_CHECK(q.size(3) > 0 && v.size(3) > 0, "flash_attention: head dims must be positive, got ", q.size(3),
              " and ", v.size(3));
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), "flash_attention: q, k, v must be on one device");
}

// The backward's lse (a floating tensor of the given shape on q's device) and its optional
// gradient (lse's shape); returns whether the gradient is given.
bool check_lse_args(const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, at::IntArrayRef shape,
                    const char* shape_name, const at::Tensor& q, const char* op) {
  TORCH_CHECK(lse.sizes() == shape && at::isFloatingType(lse.scalar_type()) && lse.device() == q.device(), op,
              ": lse must be a floating tensor of shape ", shape_name, " = ", shape, " on ", q.device(), ", got ",
              lse.scalar_type(), " of shape ", lse.sizes());
  const bool has = grad_lse.has_value() && grad_lse->defined();
  if (has) {
    TORCH_CHECK(grad_lse->sizes() == lse.sizes() && at::isFloatingType(grad_lse->scalar_type()) &&
                    grad_lse->device() == q.device(),
                op, ": grad_lse must be a floating tensor of lse's shape ", lse.sizes(), ", got ",
                grad_lse->scalar_type(), " of shape ", grad_lse->sizes());
  }
  return has;
}

// delta_i = rowsum(dO_i * O_i) - dlse_i, in the LSE's layout ((H, total_q) when packed): one
// O(n d) pass, then O(n) memory.
at::Tensor backward_delta(const at::Tensor& dout, const at::Tensor& out, const std::optional<at::Tensor>& grad_lse,
                          bool has_glse, bool packed, at::ScalarType dtype) {
  at::Tensor delta = (dout * out).sum(-1);
  if (packed) delta = delta.t();
  if (has_glse) delta = delta - grad_lse->to(dtype);
  return delta.contiguous();
}

// The backward's dQ partials: one per key chunk, more than 1 only when (batch x kv heads)
// alone cannot keep every thread busy.
int64_t backward_chunks(const Dims& d) {
  const int64_t tasks = d.B * d.Hk, threads = at::get_num_threads();
  const int64_t nkb = (d.Lk + kBwdK - 1) / kBwdK;
  if (tasks == 0 || tasks % threads == 0 || tasks >= 4 * threads) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(nkb, (4 * threads + tasks - 1) / tasks));
}

// in_t = scalar_t (float, double), or in_t = BFloat16 with scalar_t = float where the CPU has
// AVX512-BF16: q, k, v and out in bf16, both tile products in the bf16 micro-kernel (fp32
// accumulation), the softmax in fp32, P rounded to bf16 for the PV product as the GPU flash
// kernels do, O accumulated in fp32 and rounded once at the end.
template <typename scalar_t, typename in_t = scalar_t>
void forward_kernel(const Dims& d, const Layout& lay, const attention::Masking<scalar_t>& mk, const in_t* q,
                    const in_t* k, const in_t* v, in_t* out, scalar_t* lse, scalar_t scale) {
  constexpr bool kBf16 = !std::is_same_v<in_t, scalar_t>;
  const int64_t kFwdK = fwd_kv_tile(d.D);
  constexpr scalar_t kNegInf = -std::numeric_limits<scalar_t>::infinity();
  // Tasks (sequence b, head h, query block qb) in that order; sequence b's first is first[b]
  // (sequences of a packed batch have their own number of query blocks).
  std::vector<int64_t> first(d.B + 1, 0);
  for (int64_t b = 0; b < d.B; ++b) first[b + 1] = first[b] + d.H * ((mk.lq(b) + kFwdQ - 1) / kFwdQ);
  const int64_t qrs = lay.q.rs, krs = lay.k.rs, vrs = lay.v.rs, ors = lay.o.rs;
  // float32 tiles: the packed-panel micro-kernel (K and V tiles packed, S and O written in
  // place; L=2048 H=8 against torch's SDPA in turns: 0.95x-1.00x through oneDNN, 1.11x-1.37x
  // through the AVX-512 kernel, 2026-12-02; in the avx2 build, L=2048 D=64, 1.03x-1.04x
  // through its AVX2 form against 0.89x-1.00x through oneDNN, alternating processes). Without
  // either (no AVX2 + FMA) they go to oneDNN's matmul when torch registers it, which computes
  // X W^T into a fresh tensor, so the softmax scale is folded into a scaled copy of the Q
  // block, and the PV product takes the V tile transposed (a Dv x cols copy) and is added into
  // O. A packed batch's K rows are strided: each tile is copied to contiguous rows first
  // (once per 256 query rows).
#if defined(SEQKERNELS_CPU_PANELS)
  constexpr bool kPanelF32 = std::is_same_v<in_t, float>;  // float32 on the packed-panel micro-kernel
#else
  constexpr bool kPanelF32 = false;
#endif
  const bool use_onednn = !kBf16 && !kPanelF32 && std::is_same_v<scalar_t, float> && onednn_available();
  at::parallel_for(0, first[d.B], 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> s_buf(kFwdQ * kFwdK), m(kFwdQ), l(kFwdQ), z(mk.has_dropout() ? kFwdK : 0);
    std::vector<scalar_t> q_scaled(use_onednn ? kFwdQ * d.D : 0), v_t(use_onednn ? kFwdK * d.Dv : 0);
    std::vector<scalar_t> k_pack(use_onednn && krs != d.D ? kFwdK * d.D : 0);
    // bf16: the fp32 output rows, the K tile and V tile as bf16 panels (64-byte aligned), P in
    // bf16; float32 on the panel micro-kernel: the K and V tiles as float panels
    std::vector<scalar_t> o_acc(kBf16 ? kFwdQ * d.Dv : 0);
#if defined(SEQKERNELS_CPU_PANELS)
    at::Tensor f32_buf;
    float *k_f32 = nullptr, *v_f32 = nullptr;
    if constexpr (kPanelF32) {
      const int64_t nk = panel_floats(kFwdK, d.D);
      f32_buf = at::empty({nk + panel_floats(d.Dv, kFwdK)}, at::kFloat);
      k_f32 = f32_buf.mutable_data_ptr<float>();
      v_f32 = k_f32 + nk;
    }
#endif
#if defined(__AVX512BF16__)
    const int64_t p_ld = (kFwdK + 1) / 2 * 2;
    at::Tensor bf16_buf;
    in_t *k_panels = nullptr, *v_panels = nullptr, *p_bf16 = nullptr;
    if constexpr (kBf16) {
      const int64_t nk = panel_elems_bf16(kFwdK, d.D), nv = panel_elems_bf16(d.Dv, kFwdK);
      bf16_buf = at::empty({nk + nv + kFwdQ * p_ld + 64}, at::kBFloat16);
      k_panels = bf16_buf.mutable_data_ptr<in_t>();
      v_panels = k_panels + nk;
      p_bf16 = v_panels + nv;
    }
#endif
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = std::upper_bound(first.begin(), first.end(), task) - first.begin() - 1;
      const int64_t nqb = (mk.lq(b) + kFwdQ - 1) / kFwdQ;
      const int64_t h = (task - first[b]) / nqb, qb = (task - first[b]) % nqb, hk = h / d.G;
      const int64_t i0 = qb * kFwdQ, rows = std::min(kFwdQ, mk.lq(b) - i0);
      const in_t* Q = q + lay.q.at(b, h, i0);
      const in_t* K = k + lay.k.at(b, hk, 0);
      const in_t* V = v + lay.v.at(b, hk, 0);
      scalar_t* O;  // the output rows, row stride o_rs: out itself, or fp32 rows for bf16
      int64_t o_rs;
      if constexpr (kBf16) {
        O = o_acc.data(), o_rs = d.Dv;
      } else {
        O = out + lay.o.at(b, h, i0), o_rs = ors;
      }
      for (int64_t r = 0; r < rows; ++r) std::fill(O + r * o_rs, O + r * o_rs + d.Dv, scalar_t(0));
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), scalar_t(0));

      if (use_onednn) {
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t e = 0; e < d.D; ++e) q_scaled[r * d.D + e] = Q[r * qrs + e] * scale;
        }
      }
      const int64_t kend = mk.key_end(b, i0 + rows - 1);  // keys past it are masked for every row
      // keys before the window of the block's first row are hidden for every row: the tiles
      // start there (a window of 512 then costs 2 tiles of 384 per block of 256 rows, not 3;
      // 128-row blocks under a window measured no faster)
      for (int64_t j0 = mk.key_begin(b, i0); j0 < kend; j0 += kFwdK) {
        int64_t cols = std::min(kFwdK, kend - j0);
        const auto tile = mk.tile_state(b, h, i0, rows, j0, cols);
        if (tile == attention::Masking<scalar_t>::Tile::kHidden) continue;
        if (tile == attention::Masking<scalar_t>::Tile::kMixed) cols = mk.shown_cols(b, h, i0, rows, j0, cols);
        scalar_t* S = s_buf.data();
        at::Tensor s_tile;  // oneDNN's result, alive until the PV product is done
        if constexpr (std::is_same_v<in_t, float>) {
          if (use_onednn) {
            const float* Kt = K + j0 * krs;
            if (krs != d.D) {
              for (int64_t c = 0; c < cols; ++c) std::copy(Kt + c * krs, Kt + c * krs + d.D, k_pack.data() + c * d.D);
              Kt = k_pack.data();
            }
            s_tile = onednn_linear(at::from_blob(q_scaled.data(), {rows, d.D}, at::kFloat),
                                   at::from_blob(const_cast<float*>(Kt), {cols, d.D}, at::kFloat));
            S = s_tile.mutable_data_ptr<float>();
          }
        }
        if constexpr (kBf16) {
#if defined(__AVX512BF16__)
          pack_nk_bf16(k_panels, K + j0 * krs, krs, cols, d.D);
          panel_gemm_bf16(rows, cols, d.D / 2, Q, qrs, k_panels, S, cols, scale, false);
#endif
        } else if constexpr (kPanelF32) {
#if defined(SEQKERNELS_CPU_PANELS)
          pack_nk_into(k_f32, K + j0 * krs, krs, cols, d.D);
          panel_gemm<false>(rows, cols, d.D, Q, qrs, k_f32, S, cols, scale, false);
#endif
        } else if (!use_onednn) {
          gemm_rm<scalar_t>(N, T, rows, cols, d.D, scale, Q, qrs, K + j0 * krs, krs, 0, S, cols);
        }
        for (int64_t r = 0; r < rows; ++r) {
          scalar_t* srow = S + r * cols;
          mk.cap(srow, cols);
          mk.apply(srow, b, h, i0 + r, j0, cols, tile);
          const scalar_t tile_max = row_max(srow, cols);
          // NaN anywhere (a score, the running max) makes m_new NaN, and with it alpha, l
          // and the whole row: NaN reaches every output it touches, as in the math.
          const scalar_t m_new = (m[r] != kNegInf && tile_max <= m[r] + scalar_t(kSlack))
                                     ? m[r]
                                     : nan_max(m[r], tile_max);
          if (m_new == kNegInf) {  // nothing visible yet: this tile adds nothing to the row
            std::fill(srow, srow + cols, scalar_t(0));
            continue;
          }
          const scalar_t alpha = std::exp(m[r] - m_new);  // 0 when m[r] = -inf
          l[r] = l[r] * alpha + exp_sub_sum(srow, cols, m_new);
          if (alpha != scalar_t(1)) scale_row(O + r * o_rs, d.Dv, alpha);
          m[r] = m_new;
          if (mk.has_dropout()) {  // the sum above is over all keys; only the output drops
            mk.dropout_row(z.data(), b, h, i0 + r, j0, cols);
            for (int64_t j = 0; j < cols; ++j) srow[j] *= z[j];
          }
        }
        if constexpr (std::is_same_v<in_t, float>) {
          if (use_onednn) {
            transpose_tile(V + j0 * vrs, vrs, cols, d.Dv, v_t.data(), cols);  // (cols x Dv) -> (Dv x cols)
            at::Tensor pv = onednn_linear(at::from_blob(S, {rows, cols}, at::kFloat),
                                          at::from_blob(v_t.data(), {d.Dv, cols}, at::kFloat));
            const float* P = pv.const_data_ptr<float>();
            if (o_rs == d.Dv) {
              add_into(O, P, rows * d.Dv);
            } else {
              for (int64_t r = 0; r < rows; ++r) add_into(O + r * o_rs, P + r * d.Dv, d.Dv);
            }
          }
        }
        if constexpr (kBf16) {
#if defined(__AVX512BF16__)
          const int64_t cp = (cols + 1) / 2 * 2;  // P's rows padded to whole pairs with a zero
          for (int64_t r = 0; r < rows; ++r) to_bf16_padded(S + r * cols, cols, p_bf16 + r * cp, cp);
          pack_kn_bf16(v_panels, V + j0 * vrs, vrs, cols, d.Dv);
          panel_gemm_bf16(rows, d.Dv, cp / 2, p_bf16, cp, v_panels, O, o_rs, 1.f, true);
#endif
        } else if constexpr (kPanelF32) {
#if defined(SEQKERNELS_CPU_PANELS)
          pack_kn_into(v_f32, V + j0 * vrs, vrs, cols, d.Dv);
          panel_gemm<false>(rows, d.Dv, cols, S, cols, v_f32, O, o_rs, 1.f, true);
#endif
        } else if (!use_onednn) {
          gemm_rm<scalar_t>(N, N, rows, d.Dv, cols, 1, S, cols, V + j0 * vrs, vrs, 1, O, o_rs);
        }
      }
      scalar_t* LSE = lse + lay.lse.at(b, h, i0);
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* orow = O + r * o_rs;
        if (l[r] == scalar_t(0)) {  // the row sees no key
          std::fill(orow, orow + d.Dv, scalar_t(0));
          LSE[r] = kNegInf;
        } else {
          scale_row(orow, d.Dv, scalar_t(1) / l[r]);
          LSE[r] = m[r] + std::log(l[r]);
        }
        if constexpr (kBf16) at::vec::convert(orow, out + lay.o.at(b, h, i0 + r), d.Dv);
      }
    }
  });
}

// The decode kernel on a (B, H, L, D) batch: q, k, v, out stored in T, accumulation and the
// LSE in A (A = T for float and double, float for bf16 / fp16).
template <typename T, typename A>
void run_decode(const Dims& d, const attention::Masking<A>& mk, const at::Tensor& q, const at::Tensor& k,
                const at::Tensor& v, double scale, at::Tensor& out, at::Tensor& lse) {
  attention::KVRows<T> kv;
  kv.k = k.const_data_ptr<T>();
  kv.v = v.const_data_ptr<T>();
  kv.Hk = d.Hk, kv.D = d.D, kv.Dv = d.Dv, kv.rows = d.Lk;
  const attention::DecodeDims dd{d.B, d.H, d.Hk, d.G, d.Lq, d.D, d.Dv, d.Lk};
  attention::decode_forward<T, A>(dd, mk, kv, q.const_data_ptr<T>(), static_cast<A>(scale), out.mutable_data_ptr<T>(),
                                  lse.mutable_data_ptr<A>());
}

std::tuple<at::Tensor, at::Tensor> flash_attention_forward_cpu(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, bool causal,
    bool bottom_right, double scale, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_lengths, double dropout_p,
    const std::optional<at::Tensor>& rng_state, double softcap, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& alibi_slopes) {
  check_inputs(q_, k_, v_);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const Dims d = make_dims(q, k, v);
  const MaskInputs mask_in = check_mask_inputs(d, q, attn_mask, key_lengths, alibi_slopes);
  // Few query rows per K/V head (decoding): the bandwidth-bound decode kernel (decode.h),
  // which reads bf16 / fp16 K and V as they are (widened in registers).
  const bool decode = dropout_p == 0.0 && d.G * d.Lq <= attention::kDecodeMaxRows && decode_regime_flag().load();
#if defined(__AVX512BF16__)
  const bool native_bf16 = q.scalar_type() == at::kBFloat16 && d.D % 2 == 0;  // bf16 tile products (forward_kernel)
#else
  const bool native_bf16 = false;
#endif
  if (is_half(q) && !decode && !native_bf16) {  // the float32 kernel on float32 copies, the output rounded once
    auto [o, l] = flash_attention_forward_cpu(to_float(q), to_float(k), to_float(v), causal, bottom_right, scale,
                                              mask_in.mask.defined() ? std::optional<at::Tensor>(mask_in.mask)
                                                                     : std::nullopt,
                                              key_lengths, dropout_p, rng_state, softcap, window_left, window_right,
                                              alibi_slopes);
    return {o.to(q.scalar_type()), l};
  }
  at::Tensor out = new_output({d.B, d.H, d.Lq, d.Dv}, q.options());
  at::Tensor lse = new_output({d.B, d.H, d.Lq}, q.options().dtype(is_half(q) ? at::kFloat : q.scalar_type()));
  if (is_half(q)) {  // the decode kernel, or bf16 tile products
    const auto mk = make_masking<float>(d, causal, bottom_right, mask_in, dropout_p, rng_state, softcap, window_left,
                                        window_right);
    if (decode) {
      AT_DISPATCH_REDUCED_FLOATING_TYPES(q.scalar_type(), "flash_attention_forward_cpu", [&] {
        run_decode<scalar_t, float>(d, mk, q, k, v, scale, out, lse);
      });
    } else {
#if defined(__AVX512BF16__)
      using bf16 = c10::BFloat16;
      forward_kernel<float, bf16>(d, batched_layout(q, k, v, out, lse), mk, q.const_data_ptr<bf16>(),
                                  k.const_data_ptr<bf16>(), v.const_data_ptr<bf16>(), out.mutable_data_ptr<bf16>(),
                                  lse.mutable_data_ptr<float>(), static_cast<float>(scale));
#endif
    }
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "flash_attention_forward_cpu", [&] {
    const auto mk = make_masking<scalar_t>(d, causal, bottom_right, mask_in, dropout_p, rng_state, softcap, window_left,
                                           window_right);
    if (decode) return run_decode<scalar_t, scalar_t>(d, mk, q, k, v, scale, out, lse);
    forward_kernel<scalar_t>(d, batched_layout(q, k, v, out, lse), mk, q.const_data_ptr<scalar_t>(),
                             k.const_data_ptr<scalar_t>(),
                             v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                             lse.mutable_data_ptr<scalar_t>(), static_cast<scalar_t>(scale));
  });
  return {out, lse};
}

// The backward's five tile products, for one key block (cols keys of K, V) and one query tile
// (rows of Q, dO) at a time. float32 on AVX-512: the packed-panel micro-kernel
// (cpu/panel.h, cpu/panel_bf16.h), with the key block's K and V packed when the block starts (three packs,
// reused by every query tile of every head of the group) and the tile's Q and dO when it
// starts; P and dS are read in place, transposed where a product needs P^T or dS^T. MKL's
// sgemm, which these products called before, runs its AVX2 code on the AMD machines here.
// The avx2 build keeps MKL here: its AVX2 form of the micro-kernel, which the forward takes,
// measured slower than MKL in the backward (L=2048 D=64 H=8 forward+backward against SDPA:
// 0.88x-0.89x against 1.01x-1.03x).
// bf16 (in_t = BFloat16, AVX512-BF16 builds): the same packs in bf16 pairs and the vdpbf16ps
// micro-kernel; P and dS (fp32 here) are rounded to bf16 for their products, as pair words
// for P^T and dS^T. float64, and builds without AVX-512: BLAS on the tiles as they are.
template <typename scalar_t, typename in_t = scalar_t>
class BackwardTiles {
 public:
  explicit BackwardTiles(const Dims& d) : D_(d.D), Dv_(d.Dv) {
#if defined(__AVX512F__)
    if constexpr (kPanels) {
      const int64_t sizes[] = {panel_floats(kBwdK, D_), panel_floats(kBwdK, Dv_), panel_floats(D_, kBwdK),
                               panel_floats(D_, kBwdQ), panel_floats(Dv_, kBwdQ)};
      int64_t total = 0;
      for (int64_t n : sizes) total += n;
      buf_ = at::empty({total}, at::kFloat);  // 64-byte aligned; every size is a multiple of 64 floats
      float* p = buf_.mutable_data_ptr<float>();
      float** dst[] = {&kt_, &vt_, &kn_, &qn_, &don_};
      for (int i = 0; i < 5; ++i) {
        *dst[i] = p;
        p += sizes[i];
      }
    }
#endif
#if defined(__AVX512BF16__)
    if constexpr (kBf16) {  // bf16 panels as above, the pair words of P^T / dS^T, dS in bf16
      const int64_t sizes[] = {panel_elems_bf16(kBwdK, D_), panel_elems_bf16(kBwdK, Dv_), panel_elems_bf16(D_, kBwdK),
                               panel_elems_bf16(D_, kBwdQ), panel_elems_bf16(Dv_, kBwdQ),
                               (kBwdQ + 1) / 2 * kBwdK * 2, kBwdQ * (kBwdK + 1) / 64 * 64 + 64};
      int64_t total = 0;
      for (int64_t n : sizes) total += n;
      buf_ = at::empty({total}, at::kBFloat16);  // every size a multiple of 64 elements: each 64-byte aligned
      in_t* p = buf_.mutable_data_ptr<in_t>();
      in_t** dst[] = {&kt16_, &vt16_, &kn16_, &qn16_, &don16_};
      for (int i = 0; i < 5; ++i) {
        *dst[i] = p;
        p += sizes[i];
      }
      pairs_ = reinterpret_cast<int32_t*>(p);  // written and read only as int32 words
      ds16_ = p + sizes[5];
    }
#endif
  }

  void key_block(const in_t* K, int64_t krs, const in_t* V, int64_t vrs, int64_t cols) {
    K_ = K, krs_ = krs, V_ = V, vrs_ = vrs, cols_ = cols;
#if defined(__AVX512F__)
    if constexpr (kPanels) {
      pack_nk_into(kt_, K, krs, cols, D_);   // S = Q K^T
      pack_nk_into(vt_, V, vrs, cols, Dv_);  // dP = dO V^T
      pack_kn_into(kn_, K, krs, cols, D_);   // dQ += dS K
    }
#endif
#if defined(__AVX512BF16__)
    if constexpr (kBf16) {
      pack_nk_bf16(kt16_, K, krs, cols, D_);
      pack_nk_bf16(vt16_, V, vrs, cols, Dv_);
      pack_kn_bf16(kn16_, K, krs, cols, D_);
    }
#endif
  }

  void query_tile(const in_t* Q, int64_t qrs, const in_t* dO, int64_t ors, int64_t rows) {
    Q_ = Q, qrs_ = qrs, dO_ = dO, ors_ = ors, rows_ = rows;
#if defined(__AVX512F__)
    if constexpr (kPanels) {
      pack_kn_into(qn_, Q, qrs, rows, D_);     // dK += dS^T Q
      pack_kn_into(don_, dO, ors, rows, Dv_);  // dV += P^T dO
    }
#endif
#if defined(__AVX512BF16__)
    if constexpr (kBf16) {
      pack_kn_bf16(qn16_, Q, qrs, rows, D_);
      pack_kn_bf16(don16_, dO, ors, rows, Dv_);
    }
#endif
  }

  // S (rows x cols) = scale Q K^T
  void scores(scalar_t* S, scalar_t scale) const {
#if defined(__AVX512F__)
    if constexpr (kPanels) return panel_gemm<false>(rows_, cols_, D_, Q_, qrs_, kt_, S, cols_, scale, false);
#endif
#if defined(__AVX512BF16__)
    if constexpr (kBf16) return panel_gemm_bf16(rows_, cols_, D_ / 2, Q_, qrs_, kt16_, S, cols_, scale, false);
#endif
    if constexpr (!kBf16) gemm_rm<scalar_t>(N, T, rows_, cols_, D_, scale, Q_, qrs_, K_, krs_, 0, S, cols_);
  }
  // dV (cols x Dv, row stride vrs) += P^T dO, P (rows x cols)
  void grad_v(const scalar_t* P, scalar_t* dV, int64_t vrs) const {
#if defined(__AVX512F__)
    if constexpr (kPanels) return panel_gemm<true>(cols_, Dv_, rows_, P, cols_, don_, dV, vrs, 1.f, true);
#endif
#if defined(__AVX512BF16__)
    if constexpr (kBf16) {  // P rounded to bf16, as the forward's PV product
      pair_rows_f32(P, cols_, rows_, cols_, pairs_, cols_);
      return panel_gemm_bf16<true>(cols_, Dv_, (rows_ + 1) / 2, pairs_, cols_, don16_, dV, vrs, 1.f, true);
    }
#endif
    if constexpr (!kBf16) gemm_rm<scalar_t>(T, N, cols_, Dv_, rows_, 1, P, cols_, dO_, ors_, 1, dV, vrs);
  }
  // dP (rows x cols) = dO V^T
  void grad_p(scalar_t* dP) const {
#if defined(__AVX512F__)
    if constexpr (kPanels) return panel_gemm<false>(rows_, cols_, Dv_, dO_, ors_, vt_, dP, cols_, 1.f, false);
#endif
#if defined(__AVX512BF16__)
    if constexpr (kBf16) return panel_gemm_bf16(rows_, cols_, Dv_ / 2, dO_, ors_, vt16_, dP, cols_, 1.f, false);
#endif
    if constexpr (!kBf16) gemm_rm<scalar_t>(N, T, rows_, cols_, Dv_, 1, dO_, ors_, V_, vrs_, 0, dP, cols_);
  }
  // dK (cols x D, row stride krs) += scale dS^T Q
  void grad_k(const scalar_t* dS, scalar_t* dK, int64_t krs, scalar_t scale) const {
#if defined(__AVX512F__)
    if constexpr (kPanels) return panel_gemm<true>(cols_, D_, rows_, dS, cols_, qn_, dK, krs, scale, true);
#endif
#if defined(__AVX512BF16__)
    if constexpr (kBf16) {  // dS rounded to bf16 for both of its products
      pair_rows_f32(dS, cols_, rows_, cols_, pairs_, cols_);
      return panel_gemm_bf16<true>(cols_, D_, (rows_ + 1) / 2, pairs_, cols_, qn16_, dK, krs, scale, true);
    }
#endif
    if constexpr (!kBf16) gemm_rm<scalar_t>(T, N, cols_, D_, rows_, scale, dS, cols_, Q_, qrs_, 1, dK, krs);
  }
  // dQ (rows x D, row stride qrs) += scale dS K
  void grad_q(const scalar_t* dS, scalar_t* dQ, int64_t qrs, scalar_t scale) const {
#if defined(__AVX512F__)
    if constexpr (kPanels) return panel_gemm<false>(rows_, D_, cols_, dS, cols_, kn_, dQ, qrs, scale, true);
#endif
#if defined(__AVX512BF16__)
    if constexpr (kBf16) {
      const int64_t cp = (cols_ + 1) / 2 * 2;
      for (int64_t r = 0; r < rows_; ++r) to_bf16_padded(dS + r * cols_, cols_, ds16_ + r * cp, cp);
      return panel_gemm_bf16(rows_, D_, cp / 2, ds16_, cp, kn16_, dQ, qrs, scale, true);
    }
#endif
    if constexpr (!kBf16) gemm_rm<scalar_t>(N, N, rows_, D_, cols_, scale, dS, cols_, K_, krs_, 1, dQ, qrs);
  }

 private:
  static constexpr bool kBf16 = !std::is_same_v<in_t, scalar_t>;  // only in builds with AVX512-BF16
#if defined(__AVX512F__)
  static constexpr bool kPanels = std::is_same_v<in_t, float>;
#endif
  int64_t D_, Dv_;
  const in_t *K_ = nullptr, *V_ = nullptr, *Q_ = nullptr, *dO_ = nullptr;
  int64_t krs_ = 0, vrs_ = 0, qrs_ = 0, ors_ = 0, cols_ = 0, rows_ = 0;
  at::Tensor buf_;
  float *kt_ = nullptr, *vt_ = nullptr, *kn_ = nullptr, *qn_ = nullptr, *don_ = nullptr;
  in_t *kt16_ = nullptr, *vt16_ = nullptr, *kn16_ = nullptr, *qn16_ = nullptr, *don16_ = nullptr, *ds16_ = nullptr;
  int32_t* pairs_ = nullptr;
};

// Backward. With P = exp(S - lse) recomputed tile by tile and
// delta_i = rowsum(dO_i * O_i) - dlse_i:
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dK = scale dS^T Q,  dQ = scale dS K.
// With dropout (multipliers Z, 0 or 1/(1-p), regenerated from the same counters), the
// output used P * Z: dV = (P * Z)^T dO and dP = (dO V^T) * Z; delta is unchanged, since
// rowsum(P * dP) = rowsum(dO * O) still.
// Work is split over (batch, key/value head, key chunk): a task owns the dK/dV rows of its
// key blocks (summing over the query heads of its group), so no two threads ever write
// the same dK/dV row. dQ gets one partial per key chunk, summed in chunk order at the
// end: the result does not depend on scheduling (it is bitwise reproducible for a given
// thread count, which fixes the number of chunks).
//
// in_t = scalar_t, or in_t = BFloat16 with scalar_t = float (AVX512-BF16 builds): q, k, v, dO
// and dK, dV in bf16, the tile products in bf16 (P and dS rounded), dK and dV accumulated
// in fp32 rows per key block, dQ in fp32 partials.
template <typename scalar_t, typename in_t = scalar_t>
void backward_kernel(const Dims& d, const Layout& lay, const attention::Masking<scalar_t>& mk, int64_t nchunks,
                     const in_t* q, const in_t* k, const in_t* v, const in_t* dout, const scalar_t* lse,
                     const scalar_t* delta, scalar_t* dq_parts, int64_t dq_part_size, in_t* dk, in_t* dv,
                     scalar_t scale) {
  constexpr bool kBf16 = !std::is_same_v<in_t, scalar_t>;
  constexpr scalar_t kNegInf = -std::numeric_limits<scalar_t>::infinity();
  const int64_t qrs = lay.q.rs, krs = lay.k.rs, vrs = lay.v.rs, ors = lay.o.rs;
  at::parallel_for(0, d.B * d.Hk * nchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> p_buf(kBwdQ * kBwdK), dp_buf(kBwdQ * kBwdK);
    std::vector<scalar_t> z_buf(mk.has_dropout() ? kBwdQ * kBwdK : 0);
    std::vector<scalar_t> g_buf(mk.has_softcap() ? kBwdQ * kBwdK : 0);  // the cap's slope, 0 where unused
    BackwardTiles<scalar_t, in_t> tiles(d);
    std::vector<scalar_t> dk_acc(kBf16 ? kBwdK * d.D : 0), dv_acc(kBf16 ? kBwdK * d.Dv : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task % nchunks, bhk = task / nchunks;
      const int64_t b = bhk / d.Hk, hk = bhk % d.Hk;
      scalar_t* dQp = dq_parts + chunk * dq_part_size;
      const int64_t nkb = (mk.lk(b) + kBwdK - 1) / kBwdK;
      // Key blocks chunk, chunk + nchunks, ...: interleaved, so that under a causal mask
      // every chunk gets a similar share of long and short key blocks.
      for (int64_t kb = chunk; kb < nkb; kb += nchunks) {
        const int64_t j0 = kb * kBwdK, cols = std::min(kBwdK, mk.lk(b) - j0);
        const in_t* K = k + lay.k.at(b, hk, j0);
        const in_t* V = v + lay.v.at(b, hk, j0);
        scalar_t *dK, *dV;  // the block's gradient rows: dk / dv themselves, or fp32 rows for bf16
        int64_t dk_rs, dv_rs;
        if constexpr (kBf16) {
          dK = dk_acc.data(), dV = dv_acc.data(), dk_rs = d.D, dv_rs = d.Dv;
        } else {
          dK = dk + lay.k.at(b, hk, j0), dV = dv + lay.v.at(b, hk, j0), dk_rs = krs, dv_rs = vrs;
        }
        for (int64_t c = 0; c < cols; ++c) {
          std::fill(dK + c * dk_rs, dK + c * dk_rs + d.D, scalar_t(0));
          std::fill(dV + c * dv_rs, dV + c * dv_rs + d.Dv, scalar_t(0));
        }
        const auto flush = [&] {  // bf16: the block's fp32 rows rounded into dk / dv
          if constexpr (kBf16) {
            for (int64_t c = 0; c < cols; ++c) {
              at::vec::convert(dK + c * dk_rs, dk + lay.k.at(b, hk, j0 + c), d.D);
              at::vec::convert(dV + c * dv_rs, dv + lay.v.at(b, hk, j0 + c), d.Dv);
            }
          }
        };
        if (j0 >= mk.key_limit(b)) {  // padding keys: zero gradients, no work
          flush();
          continue;
        }
        tiles.key_block(K, krs, V, vrs, cols);
        const int64_t qstart = mk.first_query(b, j0), qend = mk.query_end(b, j0 + cols - 1);
        for (int64_t h = hk * d.G; h < (hk + 1) * d.G; ++h) {
          for (int64_t i0 = qstart; i0 < qend; i0 += kBwdQ) {
            const int64_t rows = std::min(kBwdQ, qend - i0);
            const auto tile = mk.tile_state(b, h, i0, rows, j0, cols);
            if (tile == attention::Masking<scalar_t>::Tile::kHidden) continue;
            const in_t* Q = q + lay.q.at(b, h, i0);
            const in_t* dO = dout + lay.o.at(b, h, i0);
            const scalar_t* LSE = lse + lay.lse.at(b, h, i0);
            const scalar_t* DELTA = delta + lay.lse.at(b, h, i0);
            scalar_t* P = p_buf.data();
            scalar_t* dS = dp_buf.data();
            scalar_t* G = g_buf.data();
            tiles.query_tile(Q, qrs, dO, ors, rows);
            tiles.scores(P, scale);
            for (int64_t r = 0; r < rows; ++r) {
              scalar_t* prow = P + r * cols;
              if (LSE[r] == kNegInf) {
                std::fill(prow, prow + cols, scalar_t(0));
                continue;
              }
              if (LSE[r] != LSE[r]) {  // a NaN row: exp_sub_sum's fast exp would not keep it NaN
                std::fill(prow, prow + cols, std::numeric_limits<scalar_t>::quiet_NaN());
                continue;
              }
              if (mk.has_softcap()) {  // capped scores, and the cap's slope for dS
                mk.cap(prow, cols);
                mk.cap_slope(prow, cols, G + r * cols);
              }
              mk.apply(prow, b, h, i0 + r, j0, cols, tile);
              exp_sub_sum(prow, cols, LSE[r]);
            }
            using Vec = at::vec::Vectorized<scalar_t>;
            scalar_t* Z = z_buf.data();
            if (mk.has_dropout()) {  // dS holds P * Z for the dV product, then dO V^T
              for (int64_t r = 0; r < rows; ++r) mk.dropout_row(Z + r * cols, b, h, i0 + r, j0, cols);
              at::vec::map2([](Vec p, Vec z) { return p * z; }, dS, P, Z, rows * cols);
              tiles.grad_v(dS, dV, dv_rs);
            } else {
              tiles.grad_v(P, dV, dv_rs);
            }
            tiles.grad_p(dS);
            for (int64_t r = 0; r < rows; ++r) {
              const Vec dl(DELTA[r]);
              scalar_t* dsrow = dS + r * cols;
              if (mk.has_dropout()) {
                at::vec::map3([dl](Vec p, Vec dp, Vec z) { return p * (dp * z - dl); }, dsrow,
                              P + r * cols, dsrow, Z + r * cols, cols);
              } else {
                at::vec::map2([dl](Vec p, Vec dp) { return p * (dp - dl); }, dsrow, P + r * cols,
                              dsrow, cols);
              }
              if (mk.has_softcap()) {  // through the cap: d tanh = 1 - tanh^2
                at::vec::map2([](Vec ds, Vec g) { return ds * g; }, dsrow, dsrow, G + r * cols, cols);
              }
            }
            tiles.grad_k(dS, dK, dk_rs, scale);
            tiles.grad_q(dS, dQp + lay.q.at(b, h, i0), qrs, scale);
          }
        }
        flush();
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward_cpu(
    const at::Tensor& grad_out_, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& out_,
    const at::Tensor& lse_, bool causal, bool bottom_right, double scale,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_lengths,
    double dropout_p, const std::optional<at::Tensor>& rng_state, double softcap, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& alibi_slopes) {
  check_inputs(q_, k_, v_);
#if defined(__AVX512BF16__)
  // bf16 tile products (backward_kernel): bf16 inputs with even head dims
  const bool native_bf16 = q_.scalar_type() == at::kBFloat16 && q_.size(3) % 2 == 0 && v_.size(3) % 2 == 0;
#else
  const bool native_bf16 = false;
#endif
  if (is_half(q_) && !native_bf16) {  // the float32 kernel on float32 copies, the gradients rounded once
    TORCH_CHECK(grad_out_.scalar_type() == q_.scalar_type() && out_.scalar_type() == q_.scalar_type(),
                "flash_attention_backward: grad_out and out must have q's dtype ", q_.scalar_type(), ", got ",
                grad_out_.scalar_type(), " and ", out_.scalar_type());
    auto [dq, dk, dv] = flash_attention_backward_cpu(
        to_float(grad_out_), grad_lse, to_float(q_), to_float(k_), to_float(v_), to_float(out_), lse_, causal,
        bottom_right, scale, to_float(attn_mask), key_lengths, dropout_p, rng_state, softcap, window_left, window_right,
        alibi_slopes);
    return {dq.to(q_.scalar_type()), dk.to(q_.scalar_type()), dv.to(q_.scalar_type())};
  }
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const Dims d = make_dims(q, k, v);
  // Every tensor the kernel reads, checked against q's problem: a wrong batch, heads or
  // length would be read out of bounds.
  constexpr const char* op = "flash_attention_backward";
  check_arg(grad_out_, op, "grad_out", {d.B, d.H, d.Lq, d.Dv}, q);
  check_arg(out_, op, "out", {d.B, d.H, d.Lq, d.Dv}, q);
  const bool has_glse = check_lse_args(lse_, grad_lse, {d.B, d.H, d.Lq}, "(B, H, Lq)", q, op);
  const at::Tensor dout = grad_out_.contiguous();
  const at::ScalarType acc = native_bf16 ? at::kFloat : q.scalar_type();  // LSE, delta, the dQ partials
  const at::Tensor lse = lse_.contiguous().to(acc);
  const MaskInputs mask_in = check_mask_inputs(d, q, attn_mask, key_lengths, alibi_slopes);

  const at::Tensor delta = native_bf16 ? backward_delta(dout.to(acc), out_.to(acc), grad_lse, has_glse, false, acc)
                                       : backward_delta(dout, out_, grad_lse, has_glse, false, acc);
  const int64_t nchunks = backward_chunks(d);
  at::Tensor dq = new_output({d.B, d.H, d.Lq, d.D}, q.options());
  at::Tensor dq_parts = nchunks == 1 && !native_bf16 ? dq.zero_()
                                                     : at::zeros({nchunks, d.B, d.H, d.Lq, d.D}, q.options().dtype(acc));
  at::Tensor dk = new_output({d.B, d.Hk, d.Lk, d.D}, q.options());
  at::Tensor dv = new_output({d.B, d.Hk, d.Lk, d.Dv}, q.options());
#if defined(__AVX512BF16__)
  if (native_bf16) {
    const auto mk = make_masking<float>(d, causal, bottom_right, mask_in, dropout_p, rng_state, softcap, window_left,
                                        window_right);
    using bf16 = c10::BFloat16;
    backward_kernel<float, bf16>(d, batched_layout(q, k, v, dout, lse), mk, nchunks, q.const_data_ptr<bf16>(),
                                 k.const_data_ptr<bf16>(), v.const_data_ptr<bf16>(), dout.const_data_ptr<bf16>(),
                                 lse.const_data_ptr<float>(), delta.const_data_ptr<float>(),
                                 dq_parts.mutable_data_ptr<float>(), q.numel(), dk.mutable_data_ptr<bf16>(),
                                 dv.mutable_data_ptr<bf16>(), static_cast<float>(scale));
    dq.copy_(nchunks == 1 ? dq_parts[0] : dq_parts.sum(0));
    return {dq, dk, dv};
  }
#endif
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "flash_attention_backward_cpu", [&] {
    const auto mk = make_masking<scalar_t>(d, causal, bottom_right, mask_in, dropout_p, rng_state, softcap, window_left,
                                           window_right);
    backward_kernel<scalar_t>(d, batched_layout(q, k, v, dout, lse), mk, nchunks, q.const_data_ptr<scalar_t>(),
                              k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                              dout.const_data_ptr<scalar_t>(), lse.const_data_ptr<scalar_t>(),
                              delta.const_data_ptr<scalar_t>(), dq_parts.mutable_data_ptr<scalar_t>(), q.numel(),
                              dk.mutable_data_ptr<scalar_t>(),
                              dv.mutable_data_ptr<scalar_t>(), static_cast<scalar_t>(scale));
  });
  if (nchunks > 1) at::sum_out(dq, dq_parts, {0});
  return {dq, dk, dv};
}

// --- packed batches (varlen) ------------------------------------------------------------

// A packed problem's inputs, checked: shapes, dtypes, devices, and the cu_seqlens values
// (cu[0] = 0, non-decreasing, cu[B] = the rows given, no sequence longer than its max).
struct Packed {
  Dims d;
  at::Tensor cu_q, cu_k;  // int32, contiguous
};

Packed check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                    const at::Tensor& cu_k, int64_t max_q, int64_t max_k, const char* op) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op, ": q, k, v must be 3-D (total, heads, head_dim)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must have the same dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
              " (CPU kernel): dtype must be float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), op, ": q, k, v must be on one device");
  TORCH_CHECK(k.size(0) == v.size(0), op, ": k and v must have the same number of rows");
  TORCH_CHECK(q.size(1) > 0 && k.size(1) > 0 && k.size(1) == v.size(1) && q.size(1) % k.size(1) == 0, op,
              ": key/value heads must be equal and divide the query heads");
  TORCH_CHECK(q.size(2) == k.size(2), op, ": q and k head dims differ");
  TORCH_CHECK(q.size(2) > 0 && v.size(2) > 0, op, ": head dims must be positive");
  for (const at::Tensor* t : {&cu_q, &cu_k}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->size(0) >= 1 && t->device() == q.device(), op,
                ": cu_seqlens_q / cu_seqlens_k must be int32 tensors of shape (batch + 1,) on ", q.device(),
                ", got ", t->scalar_type(), " of shape ", t->sizes());
  }
  TORCH_CHECK(cu_q.size(0) == cu_k.size(0), op, ": cu_seqlens_q and cu_seqlens_k must have the same length, got ",
              cu_q.size(0), " and ", cu_k.size(0));
  TORCH_CHECK_VALUE(max_q >= 0 && max_k >= 0, op, ": max_seqlen_q and max_seqlen_k must be >= 0");
  Packed p;
  p.cu_q = cu_q.contiguous();
  p.cu_k = cu_k.contiguous();
  const int64_t B = cu_q.size(0) - 1;
  const struct {
    const at::Tensor& cu;
    int64_t rows, max;
    const char* name;
  } sides[2] = {{p.cu_q, q.size(0), max_q, "cu_seqlens_q"}, {p.cu_k, k.size(0), max_k, "cu_seqlens_k"}};
  for (const auto& side : sides) {
    const int32_t* c = side.cu.const_data_ptr<int32_t>();
    TORCH_CHECK_VALUE(c[0] == 0, op, ": ", side.name, "[0] must be 0, got ", c[0]);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = int64_t(c[b + 1]) - c[b];
      TORCH_CHECK_VALUE(n >= 0, op, ": ", side.name, " must be non-decreasing, got ", c[b], " then ", c[b + 1]);
      TORCH_CHECK_VALUE(n <= side.max, op, ": sequence ", b, " has ", n, " rows in ", side.name,
                        ", more than its max_seqlen ", side.max);
    }
    TORCH_CHECK_VALUE(c[B] == side.rows, op, ": ", side.name, "[-1] = ", c[B], " must be the number of rows given, ",
                      side.rows);
  }
  p.d = Dims{B, q.size(1), k.size(1), q.size(1) / k.size(1), q.size(0), max_k, q.size(2), v.size(2)};
  return p;
}

Layout packed_layout(const Packed& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& o) {
  const int32_t* cq = p.cu_q.const_data_ptr<int32_t>();
  const int32_t* ck = p.cu_k.const_data_ptr<int32_t>();
  return {packed_rows(q, cq), packed_rows(k, ck), packed_rows(v, ck), packed_rows(o, cq),
          packed_lse_rows(q.size(0), cq)};
}

template <typename scalar_t>
attention::Masking<scalar_t> packed_masking(const Packed& p, bool causal, const MaskInputs& in, double dropout_p,
                                            const std::optional<at::Tensor>& rng_state, double softcap,
                                            int64_t window_left, int64_t window_right) {
  // bottom-right on each sequence's own lengths (flash-attn's varlen convention)
  auto m = make_masking<scalar_t>(p.d, causal, true, in, dropout_p, rng_state, softcap, window_left, window_right);
  m.cu_q = p.cu_q.const_data_ptr<int32_t>();
  m.cu_k = p.cu_k.const_data_ptr<int32_t>();
  return m;
}

std::tuple<at::Tensor, at::Tensor> flash_attention_varlen_forward_cpu(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale,
    double dropout_p, const std::optional<at::Tensor>& rng_state, double softcap, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& alibi_slopes) {
  constexpr const char* op = "flash_attention_varlen_forward";
  const Packed p = check_varlen(q_, k_, v_, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, op);
  const Dims& d = p.d;
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  MaskInputs in;
  in.alibi = attention::checked_alibi_slopes(alibi_slopes, d.B, d.H, q, op);
  at::Tensor out = new_output({d.Lq, d.H, d.Dv}, q.options());
  at::Tensor lse = new_output({d.H, d.Lq}, q.options());
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), op, [&] {
    const auto mk = packed_masking<scalar_t>(p, causal, in, dropout_p, rng_state, softcap, window_left, window_right);
    forward_kernel<scalar_t>(d, packed_layout(p, q, k, v, out), mk, q.const_data_ptr<scalar_t>(),
                             k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                             out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>(),
                             static_cast<scalar_t>(scale));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_varlen_backward_cpu(
    const at::Tensor& grad_out_, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q_,
    const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& out_, const at::Tensor& lse_,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    bool causal, double scale, double dropout_p, const std::optional<at::Tensor>& rng_state, double softcap,
    int64_t window_left, int64_t window_right, const std::optional<at::Tensor>& alibi_slopes) {
  constexpr const char* op = "flash_attention_varlen_backward";
  const Packed p = check_varlen(q_, k_, v_, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, op);
  const Dims& d = p.d;
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  check_arg(grad_out_, op, "grad_out", {d.Lq, d.H, d.Dv}, q);
  check_arg(out_, op, "out", {d.Lq, d.H, d.Dv}, q);
  const bool has_glse = check_lse_args(lse_, grad_lse, {d.H, d.Lq}, "(H, total_q)", q, op);
  MaskInputs in;
  in.alibi = attention::checked_alibi_slopes(alibi_slopes, d.B, d.H, q, op);
  const at::Tensor dout = grad_out_.contiguous();
  const at::Tensor lse = lse_.contiguous().to(q.scalar_type());
  const at::Tensor delta = backward_delta(dout, out_, grad_lse, has_glse, true, q.scalar_type());
  const int64_t nchunks = backward_chunks(d);
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dq_parts = nchunks == 1 ? dq.zero_() : at::zeros({nchunks, d.Lq, d.H, d.D}, q.options());
  at::Tensor dk = new_output(k.sizes(), q.options());
  at::Tensor dv = new_output(v.sizes(), q.options());
  if (q.numel() == 0 || k.numel() == 0) {
    dk.zero_();
    dv.zero_();
    return {dq.zero_(), dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), op, [&] {
    const auto mk = packed_masking<scalar_t>(p, causal, in, dropout_p, rng_state, softcap, window_left, window_right);
    backward_kernel<scalar_t>(d, packed_layout(p, q, k, v, dout), mk, nchunks, q.const_data_ptr<scalar_t>(),
                              k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                              dout.const_data_ptr<scalar_t>(), lse.const_data_ptr<scalar_t>(),
                              delta.const_data_ptr<scalar_t>(), dq_parts.mutable_data_ptr<scalar_t>(), q.numel(),
                              dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(),
                              static_cast<scalar_t>(scale));
  });
  if (nchunks > 1) at::sum_out(dq, dq_parts, {0});
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(seqkernels, CPU, m) {
  m.impl("flash_attention_forward", &flash_attention_forward_cpu);
  m.impl("flash_attention_backward", &flash_attention_backward_cpu);
  m.impl("flash_attention_varlen_forward", &flash_attention_varlen_forward_cpu);
  m.impl("flash_attention_varlen_backward", &flash_attention_varlen_backward_cpu);
}

}  // namespace seqkernels
