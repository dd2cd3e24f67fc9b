// The CPU backend of the recurrent layers (csrc/rnn/rnn_layer.h): BLAS GEMMs called on raw
// pointers (no dispatcher overhead per time step, which matters at batch 1) and the fused
// pointwise passes of csrc/rnn/cell_math.h, vectorized with at::vec and parallel over the
// batch with at::parallel_for. float32 and float64, and bfloat16 (its own forward loops, at
// the end of the file).

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "../cpu/panel_bf16.h"
#include "cell_math.h"
#include "rnn_layer.h"

namespace seqkernels::rnn {
namespace {

// at::vec activation primitives, the vector counterpart of ScalarMath. For float32 the
// sigmoid uses exp_u20 (at most 20 ulp, ~2.4e-6 relative) and tanh(x) = 2 sigmoid(2x) - 1
// (absolute error ~1e-7): both well inside float32 tolerances and about twice as fast as
// the 1-ulp Sleef functions. float64 keeps the exact ones.
struct VecMath {
  using VF = at::vec::Vectorized<float>;
  static VF sigmoid(VF x) {
#if defined(CPU_CAPABILITY_AVX512)
    // 1 / d by the 14-bit reciprocal estimate and one Newton step (r (2 - d r): ~2^-28
    // relative), not a division; exp's argument is capped at 88 so that d stays finite
    // (an infinite d would give inf * 0 in the Newton step; sigmoid(-88) ~ 6e-39 ~ 0).
    // Measured: the recurrent part of the forward (T=100, H=512) 3% faster at B=64, 12% at
    // B=8, alternating with nn.LSTM in one process.
    const VF d = VF(1) + at::vec::minimum(-x, VF(88.f)).exp_u20();
    const __m512 r = _mm512_rcp14_ps(d);
    return VF(_mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f))));
#else
    // exp_u20's AVX2 code clamps its argument with min/max, which turns a NaN into a bound:
    // put NaN back where the input has it (NaN must reach every output it touches)
    const VF y = VF(1) / (VF(1) + (-x).exp_u20());
    return VF::blendv(y, x, x != x);
#endif
  }
  static VF tanh(VF x) { return VF(2) * sigmoid(x + x) - VF(1); }
  template <typename V>
  static V sigmoid(V x) { return V(1) / (V(1) + (-x).exp()); }
  template <typename V>
  static V tanh(V x) { return x.tanh(); }
  template <typename V>
  static V relu(V x) { return at::vec::maximum(x, V(0)); }
  template <typename V>
  static V relu_grad(V h, V dh) { return V::blendv(V(0), dh, h > V(0)); }
};

// Run f(row b) for every batch row in parallel (grain: about 16K elements per task).
template <typename F>
void for_rows(const Layer& L, int64_t width, F&& f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
  at::parallel_for(0, L.B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

inline bool masked(const Layer& L, int64_t t, int64_t b) { return L.lengths && t >= L.lengths[b]; }

struct CpuBackend {
  // Batches up to kFusedBatch rows take matrix-vector products instead of GEMM calls
  // (lstm_step, small_product_nt): measured at T=100, I=H=512 on 2 cores, the fused LSTM
  // step ran 3.0 / 3.9 / 5.3 / 6.7 ms for B = 1 / 2 / 3 / 4 against 4.4 / 7.0 / 7.7 / 6.0
  // through oneDNN. Threads own blocks of kUnitBlock hidden units (or output columns).
  static constexpr int64_t kFusedBatch = 3;
  static constexpr int64_t kUnitBlock = 32;
  // Batches up to kPanelMaxRows take the packed-panel micro-kernel (cpu::panel_tile) in the
  // time loop; larger ones oneDNN, whose blocking suits products with many rows.
  static constexpr int64_t kPanelMaxRows = 256;

  // C (m x n) = A (m x k) W^T (W n x k), all contiguous, m <= kFusedBatch: threads own
  // blocks of output columns, each a matrix-vector product over its rows of W.
  static void small_product_nt(int64_t m, int64_t n, int64_t k, const float* a, const float* w, float* c) {
    at::parallel_for(0, (n + kUnitBlock - 1) / kUnitBlock, 1, [&](int64_t k0, int64_t k1) {
      const int64_t n0 = k0 * kUnitBlock, n1 = std::min(n, k1 * kUnitBlock);
      cpu::gemv_rows(w + n0 * k, n1 - n0, k, a, m, k, c + n0, n);
    });
  }

  template <typename F>
  static void dispatch(at::ScalarType t, F&& f) {
    switch (t) {
      case at::kFloat: f(float{}); break;
      case at::kDouble: f(double{}); break;
      default: TORCH_CHECK(false, "recurrent layer (CPU kernel): dtype must be float32 or float64, got ", t);
    }
  }

  // Weights prepared for a GEMM once per op call, keyed by (pointer, shape, form): the time
  // loop multiplies by the same weights at every step. The forms: packed for oneDNN (a
  // packed weight serves products with any number of rows: the row count given when
  // packing is a hint only, measured no different, so the chunked input projection's
  // shorter last chunk reuses it), packed into panels for cpu::panel_tile (W_hh in the
  // gate layout for lstm_step, other per-step weights in the contiguous layout, by rows
  // of W for A W^T or by columns for A W), and transposed for oneDNN's A W.
  enum class Form { kOneDnn, kGatePanels, kRowPanels, kColumnPanels, kTransposed };
  std::vector<std::tuple<const void*, int64_t, int64_t, Form, at::Tensor>> prepared_;
  at::Tensor last_;  // the result matmul_nt returned, kept alive until the next call

  template <class Make>
  at::Tensor prepared(const float* w, int64_t n, int64_t k, Form form, Make&& make) {
    for (auto& [ptr, rows, cols, f, t] : prepared_) {
      if (ptr == w && rows == n && cols == k && f == form) return t;
    }
    prepared_.emplace_back(w, n, k, form, make());
    return std::get<4>(prepared_.back());
  }

  // W (n x k) packed for oneDNN.
  at::Tensor packed(const float* w, int64_t n, int64_t k, int64_t batch) {
    return prepared(w, n, k, Form::kOneDnn, [&] {
      return cpu::onednn_pack(at::from_blob(const_cast<float*>(w), {n, k}, at::TensorOptions().dtype(at::kFloat)),
                              batch);
    });
  }

#if defined(__AVX512F__)
  // W (n x k) for products A W^T (kGatePanels, kRowPanels), or W (k x n) for A W
  // (kColumnPanels), packed for cpu::panel_tile.
  const float* panels(const float* w, int64_t n, int64_t k, Form form) {
    return prepared(w, n, k, form, [&] {
             return form == Form::kColumnPanels ? cpu::pack_panels_kn(w, k, n)
                                                : cpu::pack_panels(w, n, k, form == Form::kGatePanels);
           })
        .const_data_ptr<float>();
  }
#endif

  // W (k x n)^T as a contiguous (n x k) copy: the form oneDNN's linear takes for A W.
  const float* transposed(const float* w, int64_t k, int64_t n) {
    return prepared(w, n, k, Form::kTransposed, [&] {
             return at::from_blob(const_cast<float*>(w), {k, n}, at::TensorOptions().dtype(at::kFloat)).t().contiguous();
           })
        .const_data_ptr<float>();
  }

  // A (m x k) times W^T (W n x k), both contiguous float32, through oneDNN with W packed.
  at::Tensor product_nt(int64_t m, int64_t n, int64_t k, const float* a, const float* w) {
    return cpu::onednn_linear(at::from_blob(const_cast<float*>(a), {m, k}, at::kFloat), packed(w, n, k, m));
  }

  // C (m x n) = A (m x k) W^T (W n x k), all contiguous float32, for the products inside
  // the time loop, whose m is the batch: matrix-vector products up to kFusedBatch rows,
  // cpu::panel_product (W packed once per call) up to kPanelMaxRows. Returns false for
  // other sizes (oneDNN's turn). Measured on 2 cores, LSTM forward+backward at T=100,
  // I=H=512 (the backward's dh = dZ W_hh per step), alternating in one process: 2.4% faster
  // than oneDNN (packed) at B=64, 2.5% at B=16, 5.6% at B=8.
  bool step_product(int64_t m, int64_t n, int64_t k, const float* a, const float* w, float* c) {
    if (m <= kFusedBatch) {
      small_product_nt(m, n, k, a, w, c);
      return true;
    }
#if defined(__AVX512F__)
    if (m <= kPanelMaxRows) {
      cpu::panel_product(m, n, k, a, k, panels(w, n, k, Form::kRowPanels), c, n);
      return true;
    }
#endif
    return false;
  }

  // Row-major C = alpha op(A) op(B) + beta C. float32 products of the loop's forms, C = A W^T
  // and C = A W (contiguous), go to the panel micro-kernel up to kPanelMaxRows rows and to
  // oneDNN above (a product A W through a transposed copy of W); the rest (float64) to BLAS.
  template <typename scalar_t>
  void gemm(Tr ta, Tr tb, int64_t m, int64_t n, int64_t k, scalar_t alpha, const scalar_t* a, int64_t lda,
            const scalar_t* b, int64_t ldb, scalar_t beta, scalar_t* c, int64_t ldc) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      const bool plain = ta == Tr::N && alpha == 1.f && beta == 0.f && lda == k && ldc == n;
      const bool nt_form = plain && tb == Tr::T && ldb == k;
#if defined(__AVX512F__)
      if (plain && tb == Tr::N && ldb == n && m <= kPanelMaxRows) {  // C = A W, W (k x n) as stored
        cpu::panel_product(m, n, k, a, k, panels(b, n, k, Form::kColumnPanels), c, n);
        return;
      }
#endif
      if (plain && tb == Tr::N && ldb == n && cpu::onednn_available()) {
        gemm<float>(Tr::N, Tr::T, m, n, k, 1.f, a, k, transposed(b, k, n), k, 0.f, c, n);
        return;
      }
      if (nt_form && step_product(m, n, k, a, b, c)) return;
      if (nt_form && cpu::onednn_available()) {
        std::memcpy(c, product_nt(m, n, k, a, b).template const_data_ptr<float>(), sizeof(float) * m * n);
        return;
      }
    }
    cpu::gemm_rm<scalar_t>(ta == Tr::N ? cpu::N : cpu::T, tb == Tr::N ? cpu::N : cpu::T, m, n, k, alpha, a, lda,
                           b, ldb, beta, c, ldc);
  }

  // A (m x k) times W^T (W n x k), both contiguous. Returns the product: `out`, or (on the
  // oneDNN path, to save a copy per step) a buffer owned by this backend until its next call.
  template <typename scalar_t>
  const scalar_t* matmul_nt(int64_t m, int64_t n, int64_t k, const scalar_t* a, const scalar_t* w, scalar_t* out) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (step_product(m, n, k, a, w, out)) return out;
      if (cpu::onednn_available()) {
        last_ = product_nt(m, n, k, a, w);
        return last_.template const_data_ptr<float>();
      }
    }
    gemm<scalar_t>(Tr::N, Tr::T, m, n, k, 1, a, k, w, k, 0, out, n);
    return out;
  }

  // x (rows, I) W_ih^T: a new (rows, G*H) tensor. x and w_ih contiguous. W_ih is packed
  // once per op call (the chunked inference path calls this for every few steps).
  at::Tensor input_projection(const at::Tensor& x, const at::Tensor& w_ih) {
    if (x.scalar_type() == at::kFloat && cpu::onednn_available()) {
      return product_nt(x.size(0), w_ih.size(0), w_ih.size(1), x.const_data_ptr<float>(), w_ih.const_data_ptr<float>());
    }
    return at::mm(x, w_ih.t());
  }

  // The backward's chunks (GradChunks, csrc/rnn/rnn_layer.h): about kGradRows rows of dZ
  // each, split evenly over T. Measured for the 4H x I weight-gradient product at H=I=512
  // through oneDNN, summing over chunks: 341-387 GFLOP/s at depth 512, 466-472 at 2048.
  static constexpr int64_t kGradRows = 2048;

  static int64_t grad_chunk_steps(const Layer& L) {
    const int64_t chunks = std::max<int64_t>(1, (L.T * L.B + kGradRows - 1) / kGradRows);
    return (L.T + chunks - 1) / chunks;
  }

  // The weight-gradient products dZ^T x and dZ^T h_prev go to oneDNN, which takes both
  // operands with their depth (the chunk's rows) contiguous: dZ^T (G*H, rows), x^T (I, rows)
  // and h_prev^T (P, rows). keep_step fills them a step at a time while each step's blocks
  // are still in cache, instead of transposing whole arrays afterwards (a cold transpose is
  // mostly cache misses). Step `slot` of a chunk of n steps fills columns slot*B ..
  // (slot+1)*B - 1 of matrices n*B wide; the first chunk is the largest and sizes the buffers.
  at::Tensor dzt_, xt_, ht_;
  int64_t ht_cols_ = 0;  // P

  template <typename scalar_t>
  void keep_step(const Layer& L, int64_t slot, int64_t n, const scalar_t* dz_t, int64_t gh, const scalar_t* x_t,
                 const scalar_t* h_prev) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (!cpu::onednn_available()) return;
      const int64_t rows = n * L.B;
      if (!dzt_.defined()) {
        const auto opt = at::TensorOptions().dtype(at::kFloat);
        dzt_ = at::empty({gh * rows}, opt);
        xt_ = at::empty({L.I * rows}, opt);
        ht_ = at::empty({L.P * rows}, opt);
        ht_cols_ = L.P;
      }
      const int64_t col = slot * L.B;
      cpu::transpose_many({{dz_t, gh, dzt_.mutable_data_ptr<float>() + col},
                           {x_t, L.I, xt_.mutable_data_ptr<float>() + col},
                           {h_prev, L.P, ht_.mutable_data_ptr<float>() + col}},
                          L.B, rows);
    }
  }

  // A chunk's dW_ih = dZ^T x, dW_hh = dZ^T h_prev (dz2 (rows, G*H), x2 (rows, I);
  // h_prev2() builds (rows, P) on demand) and the bias gradient (column sums of dZ: sums
  // along the contiguous rows of dZ^T).
  template <typename HPrev>
  std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_grads(const at::Tensor& dz2, const at::Tensor& x2,
                                                             HPrev&& h_prev2, bool has_bias) {
    if (!dzt_.defined()) {
      return {at::mm(dz2.t(), x2), at::mm(dz2.t(), h_prev2()), has_bias ? dz2.sum(0) : at::empty({0}, dz2.options())};
    }
    const int64_t rows = dz2.size(0);
    auto first_rows = [rows](const at::Tensor& t, int64_t n) { return t.narrow(0, 0, n * rows).view({n, rows}); };
    const at::Tensor dzt = first_rows(dzt_, dz2.size(1));
    return {cpu::onednn_linear(dzt, first_rows(xt_, x2.size(1))), cpu::onednn_linear(dzt, first_rows(ht_, ht_cols_)),
            has_bias ? dzt.sum(1) : at::empty({0}, dz2.options())};
  }

  // Tensor product a @ b (2-D, any strides).
  static at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
    if (a.scalar_type() == at::kFloat && cpu::onednn_available()) return cpu::onednn_linear(a.contiguous(), b.t().contiguous());
    return at::mm(a, b);
  }

  // z (B, 4H): the input term x W_ih^T in, activated gates out; zh (B, 4H) the recurrent
  // term h_prev W_hh^T and bias (4H, may be null) are added here. c_t, out (B, H).
  template <typename scalar_t>
  static void lstm_pointwise_forward(const Layer& L, int64_t t, scalar_t* z, const scalar_t* zh,
                                     const scalar_t* bias, const scalar_t* c_prev, const scalar_t* h_prev, scalar_t* c_t, scalar_t* out) {
    for_rows(L, 4 * L.H, [&](int64_t b) {
      lstm_units_forward<scalar_t>(L, t, b, 0, L.H, z, zh, bias, c_prev, h_prev, c_t, out);
    });
  }

  // The pointwise step for batch row b and hidden units [u0, u1) (their four gate columns).
  // The pre-activations are z (the input term, unless z_in is false) + zh + bias; the
  // activated gates are written to z, unless z is null (inference with the input term
  // formed in the step: nothing is kept).
  template <typename scalar_t>
  static void lstm_units_forward(const Layer& L, int64_t t, int64_t b, int64_t u0, int64_t u1, scalar_t* z,
                                 const scalar_t* zh, const scalar_t* bias, const scalar_t* c_prev,
                                 const scalar_t* h_prev, scalar_t* c_t, scalar_t* out, bool z_in = true) {
    using Vec = at::vec::Vectorized<scalar_t>;
    const int64_t H = L.H, W = Vec::size();
    const bool keep = z != nullptr;  // null: no input term and no gates to keep (inference)
    scalar_t* zi = keep ? z + b * 4 * H : nullptr;
    const scalar_t* ri = zh + b * 4 * H;
    const scalar_t* cp = c_prev + b * H;
    scalar_t* c = c_t + b * H;
    scalar_t* h = out + b * H;
    if (masked(L, t, b)) {  // the state passes through; r (LSTMP) is zero
      std::copy(cp + u0, cp + u1, c + u0);
      if (h_prev) {
        std::copy(h_prev + b * L.P + u0, h_prev + b * L.P + u1, h + u0);
      } else {
        std::fill(h + u0, h + u1, scalar_t(0));
      }
      if (keep) {
        for (int64_t g = 0; g < 4; ++g) std::fill(zi + g * H + u0, zi + g * H + u1, scalar_t(0));
      }
      return;
    }
    z_in = z_in && keep;
    int64_t j = u0;
    for (; j + W <= u1; j += W) {
      Vec v[4];
      for (int64_t q = 0; q < 4; ++q) {
        v[q] = Vec::loadu(ri + q * H + j);
        if (z_in) v[q] = v[q] + Vec::loadu(zi + q * H + j);
        if (bias) v[q] = v[q] + Vec::loadu(bias + q * H + j);
      }
      Vec cn, hn;
      lstm_forward<VecMath>(v[0], v[1], v[2], v[3], Vec::loadu(cp + j), cn, hn);
      if (keep) {
        for (int64_t q = 0; q < 4; ++q) v[q].store(zi + q * H + j);
      }
      cn.store(c + j);
      hn.store(h + j);
    }
    for (; j < u1; ++j) {
      scalar_t v[4];
      for (int64_t q = 0; q < 4; ++q) {
        v[q] = (z_in ? zi[q * H + j] : scalar_t(0)) + ri[q * H + j] + (bias ? bias[q * H + j] : scalar_t(0));
      }
      lstm_forward<ScalarMath>(v[0], v[1], v[2], v[3], cp[j], c[j], h[j]);
      if (keep) {
        for (int64_t q = 0; q < 4; ++q) zi[q * H + j] = v[q];
      }
    }
  }

  // Whether lstm_step takes the input term itself (x_t W_ih^T, in the same micro-kernel as
  // the recurrent one) instead of reading it from z: float32 batches of 4 .. kPanelMaxRows
  // on AVX-512. Then no input projection is formed before the loop: at T=100, I=H=512,
  // B=64 the chunked projection through oneDNN took 30.5 of the forward's 65 ms (13.4
  // GFLOP at 440 GFLOP/s, with its per-chunk calls and buffers), and the forward went from
  // about 1.0x nn.LSTM to 1.08x with the input term in the step (alternating runs).
  static bool fuses_input(const Layer& L, at::ScalarType dtype) {
#if defined(__AVX512F__)
    return dtype == at::kFloat && L.B > kFusedBatch && L.B <= kPanelMaxRows;
#else
    return false;
#endif
  }

  // One LSTM step: zh = h_prev W_hh^T, then the pointwise pass (see lstm_pointwise_forward).
  // For float32 batches up to kPanelMaxRows the step is one parallel pass instead: a thread
  // owns blocks of hidden units, computes their four gate columns of h_prev W_hh^T and
  // finishes the pointwise work on them, so there is one fork/join per step and no GEMM
  // call; each thread's block of zh is written and read back by that thread while in cache.
  //  - B <= kFusedBatch: blocks of kUnitBlock units, matrix-vector products (cpu::gemv_rows)
  //    that read each row of W_hh once for the batch; at these sizes the step is bound by
  //    streaming W_hh from cache, and a GEMM call's fixed cost was a third of the step.
  //  - up to kPanelMaxRows: panels of 16 units, W_hh packed once per call (the units' four
  //    gate rows, k-major); cpu::panel_tile multiplies kPanelRows batch rows by a panel in
  //    registers and stores the tile into zh, where the pointwise work reads it from L1.
  //    With x_t (fuses_input), the tile is [x_t | h_prev] times [W_ih | W_hh] and z only
  //    receives the activated gates.
  template <typename scalar_t>
  void lstm_step(const Layer& L, int64_t t, scalar_t* z, const scalar_t* h_prev, const scalar_t* w_hh,
                 const scalar_t* bias, const scalar_t* c_prev, const scalar_t* h_prev_or_null, scalar_t* c_t,
                 scalar_t* out, scalar_t* zh, const scalar_t* x_t, const scalar_t* w_ih) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      const int64_t H = L.H;
      auto finish = [&](int64_t r0, int64_t r1, int64_t u0, int64_t u1) {
        for (int64_t b = r0; b < r1; ++b) {
          lstm_units_forward<float>(L, t, b, u0, u1, z, zh, bias, c_prev, h_prev_or_null, c_t, out, x_t == nullptr);
        }
      };
      if (L.B <= kFusedBatch) {
        at::parallel_for(0, (H + kUnitBlock - 1) / kUnitBlock, 1, [&](int64_t k0, int64_t k1) {
          const int64_t u0 = k0 * kUnitBlock, u1 = std::min(H, k1 * kUnitBlock);
          for (int64_t g = 0; g < 4; ++g) {
            cpu::gemv_rows(w_hh + (g * H + u0) * L.P, u1 - u0, L.P, h_prev, L.B, L.P, zh + g * H + u0, 4 * H);
          }
          finish(0, L.B, u0, u1);
        });
        return;
      }
#if defined(__AVX512F__)
      if (L.B <= kPanelMaxRows) {
        const float* pw = panels(w_hh, 4 * H, L.P, Form::kGatePanels);
        const float* pi = x_t ? panels(w_ih, 4 * H, L.I, Form::kGatePanels) : nullptr;
        at::parallel_for(0, (H + 15) / 16, 1, [&](int64_t p0, int64_t p1) {
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t u0 = p * 16, u1 = std::min(H, u0 + 16);
            cpu::for_row_blocks(L.B, [&](int64_t r0, int mr) {
              const cpu::PanelInput in[2] = {{h_prev + r0 * L.P, L.P, pw + p * L.P * 64, L.P},
                                             {x_t ? x_t + r0 * L.I : nullptr, L.I, pi ? pi + p * L.I * 64 : nullptr, L.I}};
              cpu::panel_rows(mr, in, x_t ? 2 : 1, zh + r0 * 4 * H + u0, 4 * H, H, static_cast<int>(u1 - u0), 0);
              finish(r0, r0 + mr, u0, u1);
            });
          }
        });
        return;
      }
#endif
    }
    TORCH_CHECK(x_t == nullptr, "lstm_step: the input term must be in z on this path");
    const scalar_t* zh_t = matmul_nt<scalar_t>(L.B, 4 * L.H, L.P, h_prev, w_hh, zh);
    lstm_pointwise_forward<scalar_t>(L, t, z, zh_t, bias, c_prev, h_prev_or_null, c_t, out);
  }

  // gates (B, 4H) saved activations; dh = dh_a + dh_b (dh_b may be null); dc (B, H) in/out;
  // dz (B, 4H) out.
  template <typename scalar_t>
  static void lstm_pointwise_backward(const Layer& L, int64_t t, const scalar_t* gates, const scalar_t* c_t,
                                      const scalar_t* c_prev, const scalar_t* dh_a, const scalar_t* dh_b,
                                      scalar_t* dc, scalar_t* dz) {
    using Vec = at::vec::Vectorized<scalar_t>;
    const int64_t H = L.H, W = Vec::size();
    const int64_t lda = dh_b ? L.P : H;  // dh_a is dy_t (B, P) or dr (B, H)
    for_rows(L, 4 * H, [&](int64_t b) {
      scalar_t* dzi = dz + b * 4 * H;
      if (masked(L, t, b)) {
        std::fill(dzi, dzi + 4 * H, scalar_t(0));
        return;
      }
      const scalar_t* gi = gates + b * 4 * H;
      const scalar_t *c = c_t + b * H, *cp = c_prev + b * H, *da = dh_a + b * lda;
      const scalar_t* db = dh_b ? dh_b + b * L.P : nullptr;
      scalar_t* dcb = dc + b * H;
      int64_t j = 0;
      for (; j + W <= H; j += W) {
        Vec i = Vec::loadu(gi + j), f = Vec::loadu(gi + H + j), g = Vec::loadu(gi + 2 * H + j),
            o = Vec::loadu(gi + 3 * H + j);
        Vec dh = db ? Vec::loadu(da + j) + Vec::loadu(db + j) : Vec::loadu(da + j);
        Vec dcv = Vec::loadu(dcb + j);
        lstm_backward<VecMath>(i, f, g, o, Vec::loadu(c + j), Vec::loadu(cp + j), dh, dcv);
        i.store(dzi + j); f.store(dzi + H + j); g.store(dzi + 2 * H + j); o.store(dzi + 3 * H + j);
        dcv.store(dcb + j);
      }
      for (; j < H; ++j) {
        scalar_t i = gi[j], f = gi[H + j], g = gi[2 * H + j], o = gi[3 * H + j];
        lstm_backward<ScalarMath>(i, f, g, o, c[j], cp[j], db ? da[j] + db[j] : da[j], dcb[j]);
        dzi[j] = i; dzi[H + j] = f; dzi[2 * H + j] = g; dzi[3 * H + j] = o;
      }
    });
  }

  template <typename scalar_t>
  static void rnn_pointwise_forward(const Layer& L, int64_t t, const scalar_t* z, const scalar_t* zh,
                                    const scalar_t* bias, const scalar_t* h_prev, scalar_t* h_t, bool relu) {
    using Vec = at::vec::Vectorized<scalar_t>;
    const int64_t H = L.H, W = Vec::size();
    for_rows(L, H, [&](int64_t b) {
      const scalar_t *zb = z + b * H, *rb = zh + b * H;
      scalar_t* hb = h_t + b * H;
      if (masked(L, t, b)) {
        std::copy(h_prev + b * H, h_prev + (b + 1) * H, hb);
        return;
      }
      int64_t j = 0;
      for (; j + W <= H; j += W) {
        Vec zv = Vec::loadu(zb + j) + Vec::loadu(rb + j);
        if (bias) zv = zv + Vec::loadu(bias + j);
        rnn_forward<VecMath>(zv, relu).store(hb + j);
      }
      for (; j < H; ++j) hb[j] = rnn_forward<ScalarMath>(zb[j] + rb[j] + (bias ? bias[j] : scalar_t(0)), relu);
    });
  }

  template <typename scalar_t>
  static void rnn_pointwise_backward(const Layer& L, int64_t t, const scalar_t* h_t, const scalar_t* dy,
                                     const scalar_t* dh, scalar_t* dz, bool relu) {
    using Vec = at::vec::Vectorized<scalar_t>;
    const int64_t H = L.H, W = Vec::size();
    for_rows(L, H, [&](int64_t b) {
      scalar_t* dzb = dz + b * H;
      if (masked(L, t, b)) {
        std::fill(dzb, dzb + H, scalar_t(0));
        return;
      }
      const scalar_t *hb = h_t + b * H, *dyb = dy + b * H, *dhb = dh + b * H;
      int64_t j = 0;
      for (; j + W <= H; j += W) {
        rnn_backward<VecMath>(Vec::loadu(hb + j), Vec::loadu(dyb + j) + Vec::loadu(dhb + j), relu).store(dzb + j);
      }
      for (; j < H; ++j) dzb[j] = rnn_backward<ScalarMath>(hb[j], dyb[j] + dhb[j], relu);
    });
  }

  // Rows b with t >= lengths[b]: dst[b] = src[b] (the state, or its gradient, passes through).
  template <typename scalar_t>
  static void keep_state(const Layer& L, int64_t t, scalar_t* dst, const scalar_t* src, int64_t n) {
    for (int64_t b = 0; b < L.B; ++b) {
      if (masked(L, t, b)) std::copy(src + b * n, src + (b + 1) * n, dst + b * n);
    }
  }

  // y[b] = h[b], or zero past the sequence's length.
  template <typename scalar_t>
  static void mask_output(const Layer& L, int64_t t, scalar_t* y, const scalar_t* h, int64_t n) {
    for (int64_t b = 0; b < L.B; ++b) {
      if (masked(L, t, b)) std::fill(y + b * n, y + (b + 1) * n, scalar_t(0));
      else std::copy(h + b * n, h + (b + 1) * n, y + b * n);
    }
  }

  template <typename scalar_t>
  static void add(scalar_t* out, const scalar_t* a, const scalar_t* b, int64_t n) {
    using Vec = at::vec::Vectorized<scalar_t>;
    at::vec::map2([](Vec x, Vec y) { return x + y; }, out, a, b, n);
  }
};

// --- bfloat16 ------------------------------------------------------------------------------
// bf16 layers: x, the hidden state h (y, hs), h0 and the weights in bf16; the products
// accumulate in fp32, and the gates, the cell state (cs, rs: fp32 tensors, saved for the
// backward) and the pointwise math are fp32. h is rounded to bf16 after each step, as a
// bf16 nn.LSTM's output is, and that rounded state feeds the next step; c_n is rounded once.
// Where the build has AVX512-BF16 and I and P are even, each step is one pass of the bf16
// micro-kernel (cpu::panel_tile_bf16_inputs) over [x_t | h_prev] times [W_ih | W_hh], with the
// pointwise work on the tile and h rounded in the same thread; elsewhere the same math runs in
// fp32 on the float32 path's products (the bf16 values converted, so the result differs only
// by the order of the fp32 sums). The backward runs the float32 kernels on float32 copies of
// the bf16 tensors (the gradient of the rounding is taken as 1) and rounds the gradients.

using BF16 = c10::BFloat16;

// dst[0:n] = bf16(src[0:n]), round to nearest even (NaN stays NaN).
inline void round_bf16(const float* src, BF16* dst, int64_t n) {
#if defined(__AVX512BF16__)
  cpu::to_bf16_padded(src, n, dst, n);
#else
  for (int64_t j = 0; j < n; ++j) dst[j] = BF16(src[j]);
#endif
}

inline void widen_bf16(const BF16* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

// Whether the bf16 micro-kernel takes a layer's products: an AVX512-BF16 build and even
// depths (the kernel reads A's k in pairs).
inline bool native_bf16(const Layer& L) {
#if defined(__AVX512BF16__)
  return L.I % 2 == 0 && L.P % 2 == 0;
#else
  (void)L;
  return false;
#endif
}

// h_t's rows [r0, r1), units [u0, u1): the fp32 values src (row stride lds) rounded to bf16, or,
// for a row past its sequence's length, the state h_prev passed through; h_prev and h_t have
// row stride ld.
inline void store_state(const Layer& L, int64_t t, int64_t r0, int64_t r1, int64_t u0, int64_t u1, const float* src,
                        int64_t lds, const BF16* h_prev, BF16* h_t, int64_t ld) {
  for (int64_t b = r0; b < r1; ++b) {
    if (masked(L, t, b)) std::copy(h_prev + b * ld + u0, h_prev + b * ld + u1, h_t + b * ld + u0);
    else round_bf16(src + b * lds + u0, h_t + b * ld + u0, u1 - u0);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_bf16(
    const at::Tensor& x_, const at::Tensor& h0_, const at::Tensor& c0_, const at::Tensor& w_ih_,
    const at::Tensor& w_hh_, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& lengths, bool reverse, bool workspace) {
  check_layer_args(x_, h0_, w_ih_, w_hh_, 4, lengths);
  const at::Tensor x = x_.contiguous(), h0 = h0_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const bool proj = w_hr.has_value() && w_hr->defined();
  const Layer L = make_layer(x, w_hh, 4, reverse, lengths);
  check_lstm_args(x, c0_, proj ? *w_hr : at::Tensor(), proj, bias, L, "lstm_layer_forward");
  const int64_t GH = 4 * L.H, B = L.B, H = L.H, P = L.P;
  const auto opt = x.options(), fopt = opt.dtype(at::kFloat);
  const at::Tensor c0 = to_float(c0_).contiguous(), whr = proj ? to_float(*w_hr).contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() && bias->defined() ? to_float(*bias).contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  at::Tensor y = new_output({L.T, B, P}, opt);
  at::Tensor hs = L.lengths ? at::empty({L.T, B, P}, opt) : at::empty({0}, opt);
  at::Tensor cs = at::empty({workspace ? L.T : 2, B, H}, fopt);
  at::Tensor rs = proj ? at::empty({workspace ? L.T : 1, B, H}, fopt) : at::empty({0}, fopt);
  at::Tensor zh = at::empty({B, GH}, fopt), hf = at::empty({B, H}, fopt);
  at::Tensor hpf2 = proj ? at::empty({B, P}, fopt) : at::Tensor();
  BF16* states = (L.lengths ? hs : y).mutable_data_ptr<BF16>();
  float* zhp = zh.mutable_data_ptr<float>();
  CpuBackend bk;
  const bool native = native_bf16(L);
  // the float32 path's weights, widened h_prev and input term (a chunk of steps at a time, as
  // the float32 inference path forms it; all T steps into `gates` with a workspace)
  at::Tensor w_ih_f, w_hh_f, hpf, z_chunk;
  int64_t z_lo = 0, z_hi = 0;
  if (!native) {
    w_ih_f = to_float(w_ih);
    w_hh_f = to_float(w_hh);
    hpf = at::empty({B, P}, fopt);
  }
  const at::Tensor gates = !workspace ? at::empty({0}, fopt)
                           : native   ? at::empty({L.T, B, GH}, fopt)
                                      : bk.input_projection(to_float(x).view({L.T * B, L.I}), w_ih_f).view({L.T, B, GH});
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, B * GH * 4));
  auto z_at = [&](int64_t t) -> float* {
    if (workspace) return gates.mutable_data_ptr<float>() + t * B * GH;
    if (native) return nullptr;
    if (t < z_lo || t >= z_hi) {
      z_lo = reverse ? std::max<int64_t>(0, t - chunk + 1) : t;
      z_hi = reverse ? t + 1 : std::min(L.T, t + chunk);
      z_chunk = bk.input_projection(to_float(x.narrow(0, z_lo, z_hi - z_lo)).view({(z_hi - z_lo) * B, L.I}), w_ih_f);
    }
    return z_chunk.mutable_data_ptr<float>() + (t - z_lo) * B * GH;
  };
  float* hfp = hf.mutable_data_ptr<float>();
#if defined(__AVX512BF16__)
  at::Tensor pw, pi;
  if (native) {
    pw = cpu::pack_panels_bf16(w_hh.const_data_ptr<BF16>(), GH, P, true);
    pi = cpu::pack_panels_bf16(w_ih.const_data_ptr<BF16>(), GH, L.I, true);
  }
#endif
  for (int64_t s = 0; s < L.T; ++s) {
    const int64_t t = L.step_time(s);
    const BF16* h_prev = L.first(t) ? h0.const_data_ptr<BF16>() : states + L.prev_time(t) * B * P;
    const float* c_prev = L.first(t) ? c0.const_data_ptr<float>() : cs.mutable_data_ptr<float>() + (workspace ? L.prev_time(t) : L.prev_time(t) % 2) * B * H;
    float* c_t = cs.mutable_data_ptr<float>() + (workspace ? t : t % 2) * B * H;
    float* r_t = proj ? rs.mutable_data_ptr<float>() + (workspace ? t : 0) * B * H : hfp;  // o * tanh(c), fp32
    BF16* h_t = states + t * B * P;
    float* z = z_at(t);
    if (native) {
#if defined(__AVX512BF16__)
      const BF16* x_t = x.const_data_ptr<BF16>() + t * B * L.I;
      at::parallel_for(0, (H + 15) / 16, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t u0 = p * 16, u1 = std::min(H, u0 + 16);
          cpu::for_row_blocks(B, [&](int64_t r0, int mr) {
            const cpu::PanelInputBf16 in[2] = {{h_prev + r0 * P, P, pw.const_data_ptr<BF16>() + p * (P / 2) * 128, P / 2},
                                               {x_t + r0 * L.I, L.I, pi.const_data_ptr<BF16>() + p * (L.I / 2) * 128, L.I / 2}};
            cpu::panel_rows_bf16(mr, in, 2, zhp + r0 * GH + u0, GH, H, static_cast<int>(u1 - u0), 0);
            for (int64_t bb = r0; bb < r0 + mr; ++bb) {
              CpuBackend::lstm_units_forward<float>(L, t, bb, u0, u1, z, zhp, bp, c_prev, nullptr, c_t, r_t, false);
            }
            if (!proj) store_state(L, t, r0, r0 + mr, u0, u1, r_t, H, h_prev, h_t, P);
          });
        }
      });
#endif
    } else {
      float* hp = hpf.mutable_data_ptr<float>();
      widen_bf16(h_prev, hp, B * P);
      const float* zh_t = bk.matmul_nt<float>(B, GH, P, hp, w_hh_f.const_data_ptr<float>(), zhp);
      at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t bb = r0; bb < r1; ++bb) {
          CpuBackend::lstm_units_forward<float>(L, t, bb, 0, H, z, zh_t, bp, c_prev, nullptr, c_t, r_t, true);
        }
        if (!proj) store_state(L, t, r0, r1, 0, H, r_t, H, h_prev, h_t, P);
      });
    }
    if (proj) {  // h_t = r_t W_hr^T in fp32, rounded
      float* hp2 = hpf2.mutable_data_ptr<float>();
      bk.gemm<float>(Tr::N, Tr::T, B, P, H, 1.f, r_t, H, whr.const_data_ptr<float>(), H, 0.f, hp2, P);
      store_state(L, t, 0, B, 0, P, hp2, P, h_prev, h_t, P);
    }
    if (L.lengths) CpuBackend::mask_output<BF16>(L, t, y.mutable_data_ptr<BF16>() + t * B * P, h_t, P);
  }
  const int64_t last = reverse ? 0 : L.T - 1;
  at::Tensor hn = new_output({B, P}, opt), cn = new_output({B, H}, opt);
  hn.copy_((L.lengths ? hs : y)[last]);
  cn.copy_(cs[workspace ? last : last % 2]);
  if (!workspace) return {y, hn, cn, gates, hs, at::empty({0}, fopt), at::empty({0}, fopt)};
  return {y, hn, cn, gates, hs, cs, rs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_forward_bf16(const at::Tensor& x_, const at::Tensor& h0_,
                                                                const at::Tensor& w_ih_, const at::Tensor& w_hh_,
                                                                const std::optional<at::Tensor>& bias,
                                                                const std::optional<at::Tensor>& lengths, bool reverse,
                                                                bool relu) {
  check_layer_args(x_, h0_, w_ih_, w_hh_, 1, lengths);
  const at::Tensor x = x_.contiguous(), h0 = h0_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const Layer L = make_layer(x, w_hh, 1, reverse, lengths);
  TORCH_CHECK(L.P == L.H, "rnn_layer_forward: w_hh must be square, got ", w_hh.sizes());
  if (bias.has_value() && bias->defined()) check_arg(*bias, "rnn_layer_forward", "bias", {L.H}, x);
  const int64_t B = L.B, H = L.H;
  const auto opt = x.options(), fopt = opt.dtype(at::kFloat);
  const at::Tensor b = bias.has_value() && bias->defined() ? to_float(*bias).contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  at::Tensor y = new_output({L.T, B, H}, opt);
  at::Tensor hs = L.lengths ? at::empty({L.T, B, H}, opt) : at::empty({0}, opt);
  at::Tensor zh = at::empty({B, H}, fopt), hf = at::empty({B, H}, fopt);
  BF16* states = (L.lengths ? hs : y).mutable_data_ptr<BF16>();
  float* zhp = zh.mutable_data_ptr<float>();
  float* hfp = hf.mutable_data_ptr<float>();
  CpuBackend bk;
  const bool native = native_bf16(L);
  at::Tensor w_hh_f, hpf, z;  // the float32 path's W_hh, widened h_prev and input term
  if (!native) {
    w_hh_f = to_float(w_hh);
    hpf = at::empty({B, H}, fopt);
    z = bk.input_projection(to_float(x).view({L.T * B, L.I}), to_float(w_ih)).view({L.T, B, H});
  }
#if defined(__AVX512BF16__)
  at::Tensor pw, pi;
  if (native) {
    pw = cpu::pack_panels_bf16(w_hh.const_data_ptr<BF16>(), H, H, false);
    pi = cpu::pack_panels_bf16(w_ih.const_data_ptr<BF16>(), H, L.I, false);
  }
#endif
  for (int64_t s = 0; s < L.T; ++s) {
    const int64_t t = L.step_time(s);
    const BF16* h_prev = L.first(t) ? h0.const_data_ptr<BF16>() : states + L.prev_time(t) * B * H;
    BF16* h_t = states + t * B * H;
    if (native) {
#if defined(__AVX512BF16__)
      using Vec = at::vec::Vectorized<float>;
      const BF16* x_t = x.const_data_ptr<BF16>() + t * B * L.I;
      at::parallel_for(0, (H + 63) / 64, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t u0 = p * 64, u1 = std::min(H, u0 + 64);
          cpu::for_row_blocks(B, [&](int64_t r0, int mr) {
            const cpu::PanelInputBf16 in[2] = {{h_prev + r0 * H, H, pw.const_data_ptr<BF16>() + p * (H / 2) * 128, H / 2},
                                               {x_t + r0 * L.I, L.I, pi.const_data_ptr<BF16>() + p * (L.I / 2) * 128, L.I / 2}};
            cpu::panel_rows_bf16(mr, in, 2, zhp + r0 * H + u0, H, 16, static_cast<int>(u1 - u0), 16);
            for (int64_t bb = r0; bb < r0 + mr; ++bb) {
              const float* zr = zhp + bb * H;
              float* hr = hfp + bb * H;
              int64_t j = u0;
              for (; j + Vec::size() <= u1; j += Vec::size()) {
                Vec v = Vec::loadu(zr + j);
                if (bp) v = v + Vec::loadu(bp + j);
                rnn_forward<VecMath>(v, relu).store(hr + j);
              }
              for (; j < u1; ++j) hr[j] = rnn_forward<ScalarMath>(zr[j] + (bp ? bp[j] : 0.f), relu);
            }
            store_state(L, t, r0, r0 + mr, u0, u1, hfp, H, h_prev, h_t, H);
          });
        }
      });
#endif
    } else {
      float* hp = hpf.mutable_data_ptr<float>();
      widen_bf16(h_prev, hp, B * H);
      const float* zh_t = bk.matmul_nt<float>(B, H, H, hp, w_hh_f.const_data_ptr<float>(), zhp);
      CpuBackend::rnn_pointwise_forward<float>(L, t, z.const_data_ptr<float>() + t * B * H, zh_t, bp, hp, hfp, relu);
      store_state(L, t, 0, B, 0, H, hfp, H, h_prev, h_t, H);
    }
    if (L.lengths) CpuBackend::mask_output<BF16>(L, t, y.mutable_data_ptr<BF16>() + t * B * H, h_t, H);
  }
  at::Tensor hn = new_output({B, H}, opt);
  hn.copy_((L.lengths ? hs : y)[reverse ? 0 : L.T - 1]);
  return {y, hn, hs};
}

// The op bodies: bf16 to the functions above (the backward through float32 copies), the
// rest to the generic layer.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_cpu(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& lengths, bool reverse, bool workspace) {
  if (x.scalar_type() == at::kBFloat16) return lstm_forward_bf16(x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, reverse, workspace);
  return lstm_layer_forward<CpuBackend>(x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, reverse, workspace);
}

template <class Tuple, size_t... I>
Tuple rounded(Tuple g, std::index_sequence<I...>) {
  ((std::get<I>(g) = std::get<I>(g).to(at::kBFloat16)), ...);
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward_cpu(
    const at::Tensor& dy, const at::Tensor& dhn, const at::Tensor& dcn, const at::Tensor& x, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& lengths, bool reverse, const at::Tensor& gates, const at::Tensor& y,
    const at::Tensor& hs, const at::Tensor& cs, const at::Tensor& rs, bool has_bias) {
  if (x.scalar_type() != at::kBFloat16) {
    return lstm_layer_backward<CpuBackend>(dy, dhn, dcn, x, h0, c0, w_ih, w_hh, w_hr, lengths, reverse, gates, y, hs,
                                           cs, rs, has_bias);
  }
  TORCH_CHECK(gates.scalar_type() == at::kFloat && cs.scalar_type() == at::kFloat,
              "lstm_layer_backward: a bfloat16 layer's gates and cs are float32 (what lstm_layer_forward returns)");
  check_arg(y, "lstm_layer_backward", "y", y.sizes(), x);
  auto g = lstm_layer_backward<CpuBackend>(to_float(dy), to_float(dhn), to_float(dcn), to_float(x), to_float(h0),
                                           to_float(c0), to_float(w_ih), to_float(w_hh), to_float(w_hr), lengths,
                                           reverse, gates, to_float(y), to_float(hs), cs, to_float(rs), has_bias);
  return rounded(std::move(g), std::make_index_sequence<7>());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_forward_cpu(const at::Tensor& x, const at::Tensor& h0,
                                                               const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                               const std::optional<at::Tensor>& bias,
                                                               const std::optional<at::Tensor>& lengths, bool reverse,
                                                               bool relu) {
  if (x.scalar_type() == at::kBFloat16) return rnn_forward_bf16(x, h0, w_ih, w_hh, bias, lengths, reverse, relu);
  return rnn_layer_forward<CpuBackend>(x, h0, w_ih, w_hh, bias, lengths, reverse, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_backward_cpu(
    const at::Tensor& dy, const at::Tensor& dhn, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& lengths, bool reverse, bool relu, const at::Tensor& y,
    const at::Tensor& hs, bool has_bias) {
  if (x.scalar_type() != at::kBFloat16) {
    return rnn_layer_backward<CpuBackend>(dy, dhn, x, h0, w_ih, w_hh, lengths, reverse, relu, y, hs, has_bias);
  }
  check_arg(y, "rnn_layer_backward", "y", y.sizes(), x);
  auto g = rnn_layer_backward<CpuBackend>(to_float(dy), to_float(dhn), to_float(x), to_float(h0), to_float(w_ih),
                                          to_float(w_hh), lengths, reverse, relu, to_float(y), to_float(hs), has_bias);
  return rounded(std::move(g), std::make_index_sequence<5>());
}

}  // namespace

TORCH_LIBRARY_IMPL(seqkernels, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_forward_cpu);
  m.impl("lstm_layer_backward", &lstm_backward_cpu);
  m.impl("rnn_layer_forward", &rnn_forward_cpu);
  m.impl("rnn_layer_backward", &rnn_backward_cpu);
}

}  // namespace seqkernels::rnn
