// seqkernels._C: the operator schemas of the seqkernels library and the build facts.
//
// Every op is declared here, in one place, with its schema. Its CPU body lives next to
// its family (csrc/rnn/, csrc/attention/) and registers itself with
// TORCH_LIBRARY_IMPL(seqkernels, CPU, m) from the CPU kernel module of one ISA
// (csrc/cpu/module.cpp), which Python loads after this one; CUDA bodies register for CUDA
// (C++, in this module) or from Python (Triton). Fake kernels and autograd are registered
// from Python (python/seqkernels/ops/). This module is compiled for the baseline of its
// architecture (no -march): it must load on every CPU, to tell which kernels can run.

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "common.h"

namespace seqkernels {

std::atomic<bool>& poison_outputs_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

}  // namespace seqkernels

TORCH_LIBRARY(seqkernels, m) {
  // Flash attention (csrc/attention/, kernels/). q: (B, H, Lq, D), k: (B, Hk, Lk, D),
  // v: (B, Hk, Lk, Dv). causal: bottom-right alignment when bottom_right, else top-left.
  // Returns the output (B, H, Lq, Dv) and the log-sum-exp of each row (B, H, Lq), in fp32
  // (fp64 for fp64 inputs). The backward takes the gradient of the LSE too (None = zero).
  // Optional: attn_mask, 4-D with each dim 1 (broadcast) or full, bool (True = take part)
  // or of q's dtype (added to the scaled scores); key_lengths (B,) int64, keys at or past
  // a batch's length are masked; dropout_p with rng_state = int64 [seed, offset] (on the
  // CPU for the CPU kernel, on q's device otherwise): the dropout mask is a function of
  // them (csrc/attention/masking.h), so the backward must get the same values. softcap > 0:
  // scores s -> softcap * tanh(s / softcap) before every mask (Gemma 2's logit capping).
  // window_left / window_right >= 0: flash-attn's sliding window, aligned as the causal mask.
  // alibi_slopes float32 (H,) or (B, H): score += -slope * |i + off - j| (ALiBi, after the cap).
  m.def(
      "flash_attention_forward(Tensor q, Tensor k, Tensor v, bool causal, bool bottom_right, "
      "float scale, Tensor? attn_mask=None, Tensor? key_lengths=None, float dropout_p=0., "
      "Tensor? rng_state=None, float softcap=0., int window_left=-1, int window_right=-1, "
      "Tensor? alibi_slopes=None) -> (Tensor, Tensor)");
  m.def(
      "flash_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, bool causal, bool bottom_right, float scale, Tensor? attn_mask=None, "
      "Tensor? key_lengths=None, float dropout_p=0., Tensor? rng_state=None, float softcap=0., "
      "int window_left=-1, int window_right=-1, Tensor? alibi_slopes=None) -> (Tensor, Tensor, Tensor)");

  // Packed variable-length batches (flash-attn's flash_attn_varlen_func): q (total_q, H, D),
  // k (total_k, Hk, D), v (total_k, Hk, Dv); sequence b is rows cu_seqlens_q[b] ..
  // cu_seqlens_q[b + 1] - 1 of q and cu_seqlens_k[b] .. of k and v (int32, (B + 1,)), no
  // longer than max_seqlen_q / max_seqlen_k. causal, the window and ALiBi are bottom-right on
  // each sequence's own lengths. Returns out (total_q, H, Dv) and the LSE (H, total_q). The
  // dropout counters are those of a (1, H, total_q, max_seqlen_k) batch.
  m.def(
      "flash_attention_varlen_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "SymInt max_seqlen_q, SymInt max_seqlen_k, bool causal, float scale, float dropout_p=0., Tensor? rng_state=None, "
      "float softcap=0., int window_left=-1, int window_right=-1, Tensor? alibi_slopes=None) -> (Tensor, Tensor)");
  m.def(
      "flash_attention_varlen_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, "
      "bool causal, float scale, float dropout_p=0., Tensor? rng_state=None, float softcap=0., "
      "int window_left=-1, int window_right=-1, Tensor? alibi_slopes=None) -> (Tensor, Tensor, Tensor)");

  // Attention against a KV cache (csrc/attention/kvcache_cpu.cpp, kernels/decode.py): the
  // new k/v (B, Hk, Lnew, D) or None are written in place into k_cache / v_cache at
  // positions cache_seqlens[b] .. + Lnew - 1, then q (B, H, Lq, D) attends to the first
  // cache_seqlens[b] + Lnew keys of its sequence (causal: bottom-right on that length).
  // Contiguous caches (B, Hk, Lmax, D); with block_table (B, max_blocks) int32, pools
  // (num_blocks, Hk, block_size, D). Returns out (B, H, Lq, Dv) and the LSE (fp32; fp64 for
  // fp64). Inference only (no autograd).
  m.def(
      "flash_attention_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, "
      "Tensor cache_seqlens, Tensor? block_table, bool causal, float scale, float softcap=0., "
      "int window_left=-1, int window_right=-1, Tensor? alibi_slopes=None) -> (Tensor, Tensor)");

  // Recurrent layers (csrc/rnn/): one direction of one layer over a whole sequence.
  // x (T, B, I), h0 (B, P), c0 (B, H), w_ih (G*H, I), w_hh (G*H, P), bias = b_ih + b_hh
  // (G*H), w_hr (P, H) for LSTMP, lengths (B,) int64: steps t >= lengths[b] keep the state
  // and give a zero output. The forward's extra outputs are what the backward needs:
  // gates (T, B, 4H) activated, hs (T, B, P) the states (empty without lengths: they are
  // y then), cs (T, B, H) the cell states, rs (T, B, H) o * tanh(c) (empty without w_hr).
  // workspace=False (inference): gates, cs and rs come back empty and there is no backward.
  m.def(
      "lstm_layer_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? bias, "
      "Tensor? w_hr, Tensor? lengths, bool reverse, bool workspace=True) "
      "-> (Tensor y, Tensor h_n, Tensor c_n, Tensor gates, Tensor hs, Tensor cs, Tensor rs)");
  m.def(
      "lstm_layer_backward(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0, "
      "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? lengths, bool reverse, Tensor gates, "
      "Tensor y, Tensor hs, Tensor cs, Tensor rs, bool has_bias) "
      "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_bias, Tensor grad_w_hr)");
  // The Elman RNN (G = 1): h = tanh(z) or relu(z). hs as for the LSTM.
  m.def(
      "rnn_layer_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor? lengths, "
      "bool reverse, bool relu) -> (Tensor y, Tensor h_n, Tensor hs)");
  m.def(
      "rnn_layer_backward(Tensor grad_y, Tensor grad_h_n, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, "
      "Tensor? lengths, bool reverse, bool relu, Tensor y, Tensor hs, bool has_bias) "
      "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
#ifdef SEQKERNELS_WITH_CUDA
  d["cuda_compiled"] = true;
  d["cuda_archs"] = std::string(SEQKERNELS_CUDA_ARCHS);
#else
  d["cuda_compiled"] = false;
  d["cuda_archs"] = std::string();
#endif
  d["torch_version_compiled"] = std::string(TORCH_VERSION);
  d["cpu_threads"] = at::get_num_threads();
  d["parallel_backend"] = at::get_parallel_info();
#if defined(_OPENMP)
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  return d;
}

// What this CPU can run, from cpuid and the OS's saved register state (libgcc's
// __builtin_cpu_supports checks both): the features each CPU kernel module needs.
pybind11::dict cpu_features() {
  pybind11::dict d;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  d["x86"] = true;
  d["avx2"] = __builtin_cpu_supports("avx2") != 0;
  d["fma"] = __builtin_cpu_supports("fma") != 0;
  d["f16c"] = __builtin_cpu_supports("f16c") != 0;
  d["avx512f"] = __builtin_cpu_supports("avx512f") != 0;
  d["avx512bw"] = __builtin_cpu_supports("avx512bw") != 0;
  d["avx512dq"] = __builtin_cpu_supports("avx512dq") != 0;
  d["avx512vl"] = __builtin_cpu_supports("avx512vl") != 0;
  d["avx512cd"] = __builtin_cpu_supports("avx512cd") != 0;
  d["avx512bf16"] = __builtin_cpu_supports("avx512bf16") != 0;
#else
  d["x86"] = false;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "seqkernels compiled core: op registrations and build facts";
  m.def("build_info", &build_info, "Facts about how seqkernels._C was built");
  m.def("cpu_features", &cpu_features, "The instruction-set features of this CPU that the CPU kernel modules need");
  m.def(
      "set_poison_outputs",
      [](bool on) { return seqkernels::poison_outputs_flag().exchange(on); },
      "Fill every CUDA kernel output with NaN before the kernel writes it; returns the previous setting");
  m.def(
      "poison_outputs", []() { return seqkernels::poison_outputs_flag().load(); },
      "Whether kernel outputs are NaN-poisoned");
}
