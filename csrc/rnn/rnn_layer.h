// One direction of one recurrent layer, forward and backward through time, written once
// for every device. A backend BK supplies a row-major GEMM on raw pointers and the fused
// pointwise passes (CPU: csrc/rnn/rnn_cpu.cpp, CUDA: csrc/rnn/rnn_cuda.cu); this file is
// the time loop:
//
//   forward   Z = X W_ih^T                one GEMM for all T steps (BK::input_projection)
//             for each step t:  Zh = h_prev W_hh^T     (one GEMM)
//                               fused pointwise pass on Z_t + Zh + b -> gates, c_t, h_t
//                               (the LSTM's BK::lstm_step does both; a backend may fuse them,
//                               and with BK::fuses_input form x_t W_ih^T in the step too)
//                               (LSTMP: h_t = r_t W_hr^T, one more GEMM)
//   backward  for each step, last to first:  fused pointwise pass -> dZ_t,
//                               dh_prev = dZ_t W_hh (one GEMM)
//             after each chunk of steps (GradChunks): dX = dZ W_ih, dW_ih += dZ^T X,
//             dW_hh += dZ^T H_prev, db += colsum(dZ): a few large GEMMs over the chunk's rows;
//             after the loop dW_hr = dH^T R (LSTMP).
//
// Every GEMM inside the time loop multiplies the step's rows by a weight as it is stored,
// C = A W^T in the forward and C = A W in the backward (beta = 0, all contiguous); the
// backend packs each weight for its own GEMM once per call (the CPU: panels for its
// micro-kernel, a transposed copy where oneDNN takes the product).
//
// Shapes (contiguous): x (T, B, I), h0 (B, P), c0 (B, H), w_ih (G*H, I), w_hh (G*H, P),
// bias (G*H) (b_ih + b_hh), w_hr (P, H); G = 4 for the LSTM (gates i, f, g, o), 1 for the
// RNN; P = proj_size or H. `reverse` runs t = T-1 ... 0. With `lengths` (B,), steps
// t >= lengths[b] leave sequence b's state untouched and give a zero output, so a reverse
// direction starts at each sequence's own last step: PackedSequence semantics.
//
// Saved for the backward: gates (T, B, 4H) activated i, f, g, o; cs (T, B, H) the cell
// state after each step; hs (T, B, P) the hidden state after each step (the output y
// itself when there are no lengths, since then they are equal); rs (T, B, H) o * tanh(c)
// before the projection (LSTMP only).
#pragma once

#include <ATen/ATen.h>

#include "../common.h"

namespace seqkernels::rnn {

enum class Tr : char { N = 'N', T = 'T' };

struct Layer {
  int64_t T, B, I, H, P;
  bool reverse;
  const int64_t* lengths;  // device pointer or nullptr
  int64_t step_time(int64_t s) const { return reverse ? T - 1 - s : s; }
  int64_t prev_time(int64_t t) const { return reverse ? t + 1 : t - 1; }
  bool first(int64_t t) const { return reverse ? t == T - 1 : t == 0; }
};

inline Layer make_layer(const at::Tensor& x, const at::Tensor& w_hh, int64_t G, bool reverse,
                        const std::optional<at::Tensor>& lengths) {
  Layer L;
  L.T = x.size(0);
  L.B = x.size(1);
  L.I = x.size(2);
  L.H = w_hh.size(0) / G;
  L.P = w_hh.size(1);
  L.reverse = reverse;
  L.lengths = lengths.has_value() && lengths->defined() ? lengths->const_data_ptr<int64_t>() : nullptr;
  return L;
}

inline void check_layer_args(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                             const at::Tensor& w_hh, int64_t G, const std::optional<at::Tensor>& lengths) {
  // The Python API checks all of this with friendlier messages; these guard direct op calls.
  TORCH_CHECK(x.dim() == 3, "recurrent layer: x must be (T, B, I)");
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0, "recurrent layer: T and B must be positive");
  TORCH_CHECK(w_ih.dim() == 2 && w_hh.dim() == 2 && w_ih.size(0) == w_hh.size(0) && w_hh.size(0) % G == 0,
              "recurrent layer: w_ih (G*H, I) and w_hh (G*H, P) disagree");
  TORCH_CHECK(w_ih.size(1) == x.size(2), "recurrent layer: w_ih has ", w_ih.size(1), " columns, x has ",
              x.size(2), " features");
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == x.size(1) && h0.size(1) == w_hh.size(1),
              "recurrent layer: h0 must be (B, P)");
  for (const at::Tensor* t : {&h0, &w_ih, &w_hh}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "recurrent layer: every tensor must have x's dtype and device");
  }
  if (lengths.has_value() && lengths->defined()) {
    check_index_arg(*lengths, "recurrent layer", "lengths", x.size(1), 1, x.size(0), x);
  }
}

// The states before steps t_lo .. t_lo+n-1, stacked (n, B, P): the state before step t is
// hs[t-1] forward, hs[t+1] reverse, and h0 before the first step. dW_hh = dZ^T of it.
inline at::Tensor previous_states(const Layer& L, const at::Tensor& h0, const at::Tensor& hs, int64_t t_lo,
                                  int64_t n) {
  const at::Tensor h0_ = h0.unsqueeze(0);
  if (!L.reverse) {
    return t_lo > 0 ? hs.narrow(0, t_lo - 1, n) : at::cat({h0_, hs.narrow(0, 0, n - 1)});
  }
  return t_lo + n < L.T ? hs.narrow(0, t_lo + 1, n) : at::cat({hs.narrow(0, t_lo + 1, n - 1), h0_});
}

inline void accumulate(at::Tensor& sum, at::Tensor part) {
  if (sum.defined()) {
    sum.add_(part);
  } else {
    sum = std::move(part);
  }
}

// dX and the weight gradients of the backward through time, a chunk of steps at a time.
// dZ is kept for one chunk (BK::grad_chunk_steps steps), not for all T: when a chunk is
// complete its rows of dX = dZ W_ih are one GEMM and its share of dW_ih, dW_hh and db comes
// from BK::weight_grads, summed over the chunks. On the CPU a fresh T*B*4H buffer costs its
// page faults (52 MB: ~11 ms at T=100, B=64, H=512 on the 2-core machine, more than the
// whole backward's pointwise work), while a chunk of ~2048 rows keeps the weight-gradient
// GEMMs deep enough to run at full rate.
template <class BK, typename scalar_t>
struct GradChunks {
  BK& bk;
  const Layer& L;
  int64_t GH;                   // G * H: the width of dZ
  const at::Tensor& x;          // (T, B, I)
  const at::Tensor& h0;         // (B, P)
  const at::Tensor& hs;         // (T, B, P): the state after each step
  const at::Tensor& w_ih;       // (GH, I)
  const bool has_bias;
  const int64_t steps = BK::grad_chunk_steps(L);
  at::Tensor dz = at::empty({steps, L.B, GH}, x.options());  // the chunk's dZ
  at::Tensor dx = new_output({L.T, L.B, L.I}, x.options());
  at::Tensor dw_ih, dw_hh, db;
  int64_t t_lo = 0, n = 0;      // the chunk being filled: steps t_lo .. t_lo+n-1

  scalar_t* dz_at(int64_t t) { return dz.mutable_data_ptr<scalar_t>() + (t - t_lo) * L.B * GH; }

  void flush() {
    const int64_t rows = n * L.B;
    bk.template gemm<scalar_t>(Tr::N, Tr::N, rows, L.I, GH, 1, dz.const_data_ptr<scalar_t>(), GH,
                               w_ih.const_data_ptr<scalar_t>(), L.I, 0,
                               dx.mutable_data_ptr<scalar_t>() + t_lo * L.B * L.I, L.I);
    auto [g_ih, g_hh, g_b] = bk.weight_grads(
        dz.narrow(0, 0, n).view({rows, GH}), x.narrow(0, t_lo, n).view({rows, L.I}),
        [&] { return previous_states(L, h0, hs, t_lo, n).reshape({rows, L.P}); }, has_bias);
    accumulate(dw_ih, std::move(g_ih));
    accumulate(dw_hh, std::move(g_hh));
    if (has_bias) accumulate(db, std::move(g_b));
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_grads() const {
    return {dw_ih, dw_hh, has_bias ? db : at::empty({0}, x.options())};
  }
};

// Runs step(t) for every step in the backward's order (last to first), a chunk at a time,
// and gc.flush() after each chunk. A chunk covers consecutive times [t_lo, t_lo + n).
template <class GC, class Step>
void backward_chunks(const Layer& L, GC& gc, Step&& step) {
  for (int64_t s_hi = L.T; s_hi > 0; s_hi -= gc.steps) {
    const int64_t s_lo = std::max<int64_t>(0, s_hi - gc.steps);
    gc.n = s_hi - s_lo;
    gc.t_lo = L.reverse ? L.T - s_hi : s_lo;
    for (int64_t s = s_hi - 1; s >= s_lo; --s) step(L.step_time(s));
    gc.flush();
  }
}

// --- LSTM ------------------------------------------------------------------------------------

// z_at(t): the step's pre-activations (x_t W_ih^T in, activated gates out); c_at(t): the
// cell state after step t; r_at(t): o * tanh(c) of step t (LSTMP). With a workspace these
// index (T, ...) buffers that the backward keeps; without, chunked and rolling buffers.
// With x and w_ih (BK::fuses_input), the step forms the input term itself and z_at(t)
// only receives the activated gates (null in inference: nothing is kept).
template <class BK, typename scalar_t, class ZAt, class CAt, class RAt>
void lstm_forward_loop(BK& bk, const Layer& L, const scalar_t* h0, const scalar_t* c0,
                       const scalar_t* w_hh, const scalar_t* bias, const scalar_t* w_hr,
                       ZAt&& z_at, CAt&& c_at, RAt&& r_at, scalar_t* zh, scalar_t* y, scalar_t* hs,
                       const scalar_t* x, const scalar_t* w_ih) {
  for (int64_t s = 0; s < L.T; ++s) {
    const int64_t t = L.step_time(s);
    const scalar_t* h_prev = L.first(t) ? h0 : hs + L.prev_time(t) * L.B * L.P;
    const scalar_t* c_prev = L.first(t) ? c0 : c_at(L.prev_time(t));
    scalar_t* z = z_at(t);
    scalar_t* h_t = hs + t * L.B * L.P;
    const scalar_t* x_t = x ? x + t * L.B * L.I : nullptr;
    if (w_hr == nullptr) {
      bk.template lstm_step<scalar_t>(L, t, z, h_prev, w_hh, bias, c_prev, h_prev, c_at(t), h_t, zh, x_t, w_ih);
    } else {
      scalar_t* r_t = r_at(t);
      bk.template lstm_step<scalar_t>(L, t, z, h_prev, w_hh, bias, c_prev, nullptr, c_at(t), r_t, zh, x_t, w_ih);
      bk.template gemm<scalar_t>(Tr::N, Tr::T, L.B, L.P, L.H, 1, r_t, L.H, w_hr, L.H, 0, h_t, L.P);
      if (L.lengths) bk.template keep_state<scalar_t>(L, t, h_t, h_prev, L.P);
    }
    if (L.lengths) bk.template mask_output<scalar_t>(L, t, y + t * L.B * L.P, h_t, L.P);
  }
}

template <class BK, typename scalar_t, class GC>
void lstm_backward_loop(BK& bk, const Layer& L, GC& gc, const scalar_t* dy, const scalar_t* x, const scalar_t* h0,
                        const scalar_t* c0, const scalar_t* w_hh, const scalar_t* w_hr, const scalar_t* gates,
                        const scalar_t* hs, const scalar_t* cs, scalar_t* dh_a, scalar_t* dh_b, scalar_t* dc,
                        scalar_t* dr, scalar_t* dhs, scalar_t** dh_final) {
  // dh_a holds dh_n on entry; dc holds dc_n; on exit *dh_final points at dh_0, dc is dc_0.
  const int64_t GH = 4 * L.H;
  scalar_t* dh_cur = dh_a;
  scalar_t* dh_next = dh_b;
  backward_chunks(L, gc, [&](int64_t t) {
    const scalar_t* c_prev = L.first(t) ? c0 : cs + L.prev_time(t) * L.B * L.H;
    const scalar_t* h_prev = L.first(t) ? h0 : hs + L.prev_time(t) * L.B * L.P;
    const scalar_t* dy_t = dy + t * L.B * L.P;
    scalar_t* dz_t = gc.dz_at(t);
    if (w_hr == nullptr) {
      bk.template lstm_pointwise_backward<scalar_t>(L, t, gates + t * L.B * GH, cs + t * L.B * L.H, c_prev,
                                                     dy_t, dh_cur, dc, dz_t);
    } else {
      // dL/dh_t = dy_t + dh; it reaches r_t through the projection: dr = dh_t W_hr.
      scalar_t* g_t = dhs + t * L.B * L.P;
      bk.template add<scalar_t>(g_t, dy_t, dh_cur, L.B * L.P);
      bk.template gemm<scalar_t>(Tr::N, Tr::N, L.B, L.H, L.P, 1, g_t, L.P, w_hr, L.H, 0, dr, L.H);
      bk.template lstm_pointwise_backward<scalar_t>(L, t, gates + t * L.B * GH, cs + t * L.B * L.H, c_prev,
                                                     dr, nullptr, dc, dz_t);
    }
    bk.template keep_step<scalar_t>(L, t - gc.t_lo, gc.n, dz_t, GH, x + t * L.B * L.I, h_prev);
    bk.template gemm<scalar_t>(Tr::N, Tr::N, L.B, L.P, GH, 1, dz_t, GH, w_hh, L.P, 0, dh_next, L.P);
    if (L.lengths) bk.template keep_state<scalar_t>(L, t, dh_next, dh_cur, L.P);
    std::swap(dh_cur, dh_next);
  });
  *dh_final = dh_cur;
}

// --- Elman RNN -------------------------------------------------------------------------------

template <class BK, typename scalar_t>
void rnn_forward_loop(BK& bk, const Layer& L, const scalar_t* h0, const scalar_t* w_hh, const scalar_t* bias, bool relu, scalar_t* z, scalar_t* zh, scalar_t* y,
                      scalar_t* hs) {
  for (int64_t s = 0; s < L.T; ++s) {
    const int64_t t = L.step_time(s);
    const scalar_t* h_prev = L.first(t) ? h0 : hs + L.prev_time(t) * L.B * L.H;
    scalar_t* z_t = z + t * L.B * L.H;
    const scalar_t* zh_t = bk.template matmul_nt<scalar_t>(L.B, L.H, L.H, h_prev, w_hh, zh);
    bk.template rnn_pointwise_forward<scalar_t>(L, t, z_t, zh_t, bias, h_prev, hs + t * L.B * L.H, relu);
    if (L.lengths) bk.template mask_output<scalar_t>(L, t, y + t * L.B * L.H, hs + t * L.B * L.H, L.H);
  }
}

template <class BK, typename scalar_t, class GC>
void rnn_backward_loop(BK& bk, const Layer& L, GC& gc, const scalar_t* dy, const scalar_t* x, const scalar_t* h0,
                       const scalar_t* w_hh, const scalar_t* hs, bool relu, scalar_t* dh_a, scalar_t* dh_b,
                       scalar_t** dh_final) {
  scalar_t* dh_cur = dh_a;
  scalar_t* dh_next = dh_b;
  backward_chunks(L, gc, [&](int64_t t) {
    scalar_t* dz_t = gc.dz_at(t);
    bk.template rnn_pointwise_backward<scalar_t>(L, t, hs + t * L.B * L.H, dy + t * L.B * L.H, dh_cur, dz_t, relu);
    const scalar_t* h_prev = L.first(t) ? h0 : hs + L.prev_time(t) * L.B * L.H;
    bk.template keep_step<scalar_t>(L, t - gc.t_lo, gc.n, dz_t, L.H, x + t * L.B * L.I, h_prev);
    bk.template gemm<scalar_t>(Tr::N, Tr::N, L.B, L.H, L.H, 1, dz_t, L.H, w_hh, L.H, 0, dh_next, L.H);
    if (L.lengths) bk.template keep_state<scalar_t>(L, t, dh_next, dh_cur, L.H);
    std::swap(dh_cur, dh_next);
  });
  *dh_final = dh_cur;
}

// The op bodies, generic over the backend. See csrc/seqkernels.cpp for the schemas.
// A backend object lives for one op call, so it may cache (for example weights packed
// for its GEMM) across the time steps of that call.

// Inference (workspace = false): nothing is kept for a backward. The input projection is
// computed a chunk of steps at a time (about 4 MiB: reused from the heap instead of a
// fresh T*B*4H buffer that the kernel has to fault in on every call), and the cell state
// lives in two rolling buffers.
constexpr int64_t kChunkBytes = 4 << 20;

// The LSTM's own arguments: c0 (B, H), w_hr (P, H) for LSTMP (else P == H), bias (4H).
inline void check_lstm_args(const at::Tensor& x, const at::Tensor& c0, const at::Tensor& whr, bool proj,
                            const std::optional<at::Tensor>& bias, const Layer& L, const char* op) {
  check_arg(c0, op, "c0", {L.B, L.H}, x);
  if (proj) {
    check_arg(whr, op, "w_hr", {L.P, L.H}, x);
  } else {
    TORCH_CHECK(L.P == L.H, op, ": w_hh must be (4H, H) without w_hr, got ", L.P, " columns for H = ", L.H);
  }
  if (bias.has_value() && bias->defined()) check_arg(*bias, op, "bias", {4 * L.H}, x);
}

template <class BK>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward(
    const at::Tensor& x_, const at::Tensor& h0_, const at::Tensor& c0_, const at::Tensor& w_ih_,
    const at::Tensor& w_hh_, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& lengths, bool reverse, bool workspace) {
  check_layer_args(x_, h0_, w_ih_, w_hh_, 4, lengths);
  const at::Tensor x = x_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous();
  const at::Tensor w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const bool proj = w_hr.has_value() && w_hr->defined();
  const at::Tensor whr = proj ? w_hr->contiguous() : at::Tensor();
  const Layer L = make_layer(x, w_hh, 4, reverse, lengths);
  check_lstm_args(x, c0, whr, proj, bias, L, "lstm_layer_forward");
  const auto opt = x.options();
  const int64_t GH = 4 * L.H;
  BK bk;
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = new_output({L.T, L.B, L.P}, opt);
  at::Tensor hs = L.lengths ? at::empty({L.T, L.B, L.P}, opt) : at::empty({0}, opt);
  at::Tensor zh = at::empty({L.B, GH}, opt);
  // With a workspace: the input term of every step at once, one (T*B, I) x (I, 4H) product
  // (or, where the step forms it, just the buffer for the activated gates).
  const bool fuse = BK::fuses_input(L, x.scalar_type());
  at::Tensor gates = !workspace ? at::empty({0}, opt)
                     : fuse     ? at::empty({L.T, L.B, GH}, opt)
                                : bk.input_projection(x.view({L.T * L.B, L.I}), w_ih).view({L.T, L.B, GH});
  at::Tensor cs = at::empty({workspace ? L.T : 2, L.B, L.H}, opt);
  at::Tensor rs = proj ? at::empty({workspace ? L.T : 1, L.B, L.H}, opt) : at::empty({0}, opt);
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, L.B * GH * x.element_size()));
  at::Tensor z_chunk;
  int64_t z_lo = 0, z_hi = 0;  // z_chunk holds steps [z_lo, z_hi)
  BK::dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    auto z_at = [&](int64_t t) -> scalar_t* {
      if (workspace) return gates.mutable_data_ptr<scalar_t>() + t * L.B * GH;
      if (fuse) return nullptr;  // the step forms the input term, and inference keeps no gates
      if (t < z_lo || t >= z_hi) {  // the chunk of steps that follow t in processing order
        z_lo = reverse ? std::max<int64_t>(0, t - chunk + 1) : t;
        z_hi = reverse ? t + 1 : std::min(L.T, t + chunk);
        z_chunk = bk.input_projection(x.narrow(0, z_lo, z_hi - z_lo).reshape({(z_hi - z_lo) * L.B, L.I}), w_ih);
      }
      return z_chunk.mutable_data_ptr<scalar_t>() + (t - z_lo) * L.B * GH;
    };
    auto c_at = [&](int64_t t) -> scalar_t* {
      return cs.mutable_data_ptr<scalar_t>() + (workspace ? t : t % 2) * L.B * L.H;
    };
    auto r_at = [&](int64_t t) -> scalar_t* {
      return proj ? rs.mutable_data_ptr<scalar_t>() + (workspace ? t : 0) * L.B * L.H : nullptr;
    };
    lstm_forward_loop<BK, scalar_t>(bk, L, h0.const_data_ptr<scalar_t>(), c0.const_data_ptr<scalar_t>(),
                                    w_hh.const_data_ptr<scalar_t>(), has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
                                    proj ? whr.const_data_ptr<scalar_t>() : nullptr, z_at, c_at, r_at,
                                    zh.mutable_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                    (L.lengths ? hs : y).mutable_data_ptr<scalar_t>(),
                                    fuse ? x.const_data_ptr<scalar_t>() : nullptr,
                                    fuse ? w_ih.const_data_ptr<scalar_t>() : nullptr);
  });
  const int64_t last = reverse ? 0 : L.T - 1;
  const at::Tensor& states = L.lengths ? hs : y;
  at::Tensor hn = new_output({L.B, L.P}, opt), cn = new_output({L.B, L.H}, opt);
  hn.copy_(states[last]);
  cn.copy_(cs[workspace ? last : last % 2]);
  if (!workspace) {
    return {y, hn, cn, gates, hs, at::empty({0}, opt), at::empty({0}, opt)};
  }
  return {y, hn, cn, gates, hs, cs, rs};
}

template <class BK>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_backward(
    const at::Tensor& dy_, const at::Tensor& dhn, const at::Tensor& dcn, const at::Tensor& x_,
    const at::Tensor& h0_, const at::Tensor& c0_, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths, bool reverse,
    const at::Tensor& gates, const at::Tensor& y, const at::Tensor& hs_, const at::Tensor& cs,
    const at::Tensor& rs, bool has_bias) {
  check_layer_args(x_, h0_, w_ih_, w_hh_, 4, lengths);
  const at::Tensor x = x_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous();
  const at::Tensor w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous(), dy = dy_.contiguous();
  const bool proj = w_hr.has_value() && w_hr->defined();
  const at::Tensor whr = proj ? w_hr->contiguous() : at::Tensor();
  const Layer L = make_layer(x, w_hh, 4, reverse, lengths);
  constexpr const char* op = "lstm_layer_backward";
  check_lstm_args(x, c0, whr, proj, std::nullopt, L, op);
  // What the backward reads beside the forward's inputs must cover every step and sequence
  // (a shorter tensor would be read out of bounds).
  check_arg(dy_, op, "grad_y", {L.T, L.B, L.P}, x);
  check_arg(dhn, op, "grad_h_n", {L.B, L.P}, x);
  check_arg(dcn, op, "grad_c_n", {L.B, L.H}, x);
  check_arg(gates, op, "gates", {L.T, L.B, 4 * L.H}, x);
  check_arg(y, op, "y", {L.T, L.B, L.P}, x);
  if (L.lengths) check_arg(hs_, op, "hs", {L.T, L.B, L.P}, x);
  check_arg(cs, op, "cs", {L.T, L.B, L.H}, x);
  if (proj) check_arg(rs, op, "rs", {L.T, L.B, L.H}, x);
  const at::Tensor hs = L.lengths ? hs_.contiguous() : y.contiguous();
  const at::Tensor gates_c = gates.contiguous(), cs_c = cs.contiguous();
  const at::Tensor rs_c = proj ? rs.contiguous() : rs;
  const auto opt = x.options();
  at::Tensor dh_a = dhn.contiguous().clone(), dh_b = at::empty_like(dh_a), dc = dcn.contiguous().clone();
  at::Tensor dr = proj ? at::empty({L.B, L.H}, opt) : at::empty({0}, opt);
  at::Tensor dhs = proj ? at::empty({L.T, L.B, L.P}, opt) : at::empty({0}, opt);
  at::Tensor dh0, dx, dw_ih, dw_hh, dbias;
  BK bk;
  BK::dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    GradChunks<BK, scalar_t> gc{bk, L, 4 * L.H, x, h0, hs, w_ih, has_bias};
    scalar_t* dh_final = nullptr;
    lstm_backward_loop<BK, scalar_t>(bk, L, gc, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                     h0.const_data_ptr<scalar_t>(), c0.const_data_ptr<scalar_t>(),
                                     w_hh.const_data_ptr<scalar_t>(),
                                     proj ? whr.const_data_ptr<scalar_t>() : nullptr,
                                     gates_c.const_data_ptr<scalar_t>(), hs.const_data_ptr<scalar_t>(),
                                     cs_c.const_data_ptr<scalar_t>(), dh_a.mutable_data_ptr<scalar_t>(),
                                     dh_b.mutable_data_ptr<scalar_t>(), dc.mutable_data_ptr<scalar_t>(),
                                     proj ? dr.mutable_data_ptr<scalar_t>() : nullptr,
                                     proj ? dhs.mutable_data_ptr<scalar_t>() : nullptr, &dh_final);
    dh0 = dh_final == dh_a.mutable_data_ptr<scalar_t>() ? dh_a : dh_b;
    dx = gc.dx;
    std::tie(dw_ih, dw_hh, dbias) = gc.weight_grads();
  });
  at::Tensor dw_hr = proj ? BK::mm(dhs.view({L.T * L.B, L.P}).t(), rs_c.view({L.T * L.B, L.H})) : at::empty({0}, opt);
  return {dx, dh0, dc, dw_ih, dw_hh, dbias, dw_hr};
}

template <class BK>
std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_layer_forward(const at::Tensor& x_, const at::Tensor& h0_, const at::Tensor& w_ih_,
                                          const at::Tensor& w_hh_, const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& lengths, bool reverse, bool relu) {
  check_layer_args(x_, h0_, w_ih_, w_hh_, 1, lengths);
  const at::Tensor x = x_.contiguous(), h0 = h0_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const Layer L = make_layer(x, w_hh, 1, reverse, lengths);
  TORCH_CHECK(L.P == L.H, "rnn_layer_forward: w_hh must be square, got ", w_hh.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_arg(*bias, "rnn_layer_forward", "bias", {L.H}, x);
  const auto opt = x.options();
  BK bk;
  at::Tensor z = bk.input_projection(x.view({L.T * L.B, L.I}), w_ih).view({L.T, L.B, L.H});
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = new_output({L.T, L.B, L.H}, opt);
  at::Tensor hs = L.lengths ? at::empty({L.T, L.B, L.H}, opt) : at::empty({0}, opt);
  at::Tensor zh = at::empty({L.B, L.H}, opt);
  BK::dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    rnn_forward_loop<BK, scalar_t>(bk, L, h0.const_data_ptr<scalar_t>(), w_hh.const_data_ptr<scalar_t>(),
                                   has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
                                   relu, z.mutable_data_ptr<scalar_t>(), zh.mutable_data_ptr<scalar_t>(),
                                   y.mutable_data_ptr<scalar_t>(),
                                   (L.lengths ? hs : y).mutable_data_ptr<scalar_t>());
  });
  at::Tensor hn = new_output({L.B, L.H}, opt);
  hn.copy_((L.lengths ? hs : y)[reverse ? 0 : L.T - 1]);
  return {y, hn, hs};
}

template <class BK>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_backward(const at::Tensor& dy_, const at::Tensor& dhn, const at::Tensor& x_,
                                           const at::Tensor& h0_, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
                                           const std::optional<at::Tensor>& lengths, bool reverse, bool relu,
                                           const at::Tensor& y, const at::Tensor& hs_, bool has_bias) {
  check_layer_args(x_, h0_, w_ih_, w_hh_, 1, lengths);
  const at::Tensor x = x_.contiguous(), h0 = h0_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const at::Tensor dy = dy_.contiguous();
  const Layer L = make_layer(x, w_hh, 1, reverse, lengths);
  constexpr const char* op = "rnn_layer_backward";
  TORCH_CHECK(L.P == L.H, op, ": w_hh must be square, got ", w_hh.sizes());
  check_arg(dy_, op, "grad_y", {L.T, L.B, L.H}, x);
  check_arg(dhn, op, "grad_h_n", {L.B, L.H}, x);
  check_arg(y, op, "y", {L.T, L.B, L.H}, x);
  if (L.lengths) check_arg(hs_, op, "hs", {L.T, L.B, L.H}, x);
  const at::Tensor hs = L.lengths ? hs_.contiguous() : y.contiguous();
  at::Tensor dh_a = dhn.contiguous().clone(), dh_b = at::empty_like(dh_a);
  at::Tensor dh0, dx, dw_ih, dw_hh, dbias;
  BK bk;
  BK::dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    GradChunks<BK, scalar_t> gc{bk, L, L.H, x, h0, hs, w_ih, has_bias};
    scalar_t* dh_final = nullptr;
    rnn_backward_loop<BK, scalar_t>(bk, L, gc, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                    h0.const_data_ptr<scalar_t>(), w_hh.const_data_ptr<scalar_t>(),
                                    hs.const_data_ptr<scalar_t>(), relu, dh_a.mutable_data_ptr<scalar_t>(),
                                    dh_b.mutable_data_ptr<scalar_t>(), &dh_final);
    dh0 = dh_final == dh_a.mutable_data_ptr<scalar_t>() ? dh_a : dh_b;
    dx = gc.dx;
    std::tie(dw_ih, dw_hh, dbias) = gc.weight_grads();
  });
  return {dx, dh0, dw_ih, dw_hh, dbias};
}

}  // namespace seqkernels::rnn
