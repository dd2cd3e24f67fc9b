// Shared helpers for every seqkernels kernel: output allocation (with optional NaN
// poisoning for tests) and argument checks.
#pragma once

#include <ATen/ATen.h>

#include <atomic>

namespace seqkernels {

// When set (tests do, through seqkernels.testing.poison_outputs), every output buffer a
// kernel allocates with new_output() is filled with NaN (floating types) before the
// kernel writes it, so an element the kernel never writes fails the comparison.
std::atomic<bool>& poison_outputs_flag();

// Whether flash_attention may take the decode kernel for few query rows per K/V head (on by
// default; benchmarks and tests turn it off to time or check the general kernel alone).
std::atomic<bool>& decode_regime_flag();

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (poison_outputs_flag().load(std::memory_order_relaxed) && at::isFloatingType(t.scalar_type())) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return t;
}

inline at::Tensor new_output_like(const at::Tensor& like) {
  return new_output(like.sizes(), like.options());
}

// A half-precision call's floating arguments in float32, for a float32 kernel (other tensors,
// masks and indices, as they are; strides kept where .to keeps them).
inline at::Tensor to_float(const at::Tensor& t) {
  return t.defined() && at::isFloatingType(t.scalar_type()) ? t.to(at::kFloat) : t;
}
inline std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(to_float(*t)) : std::nullopt;
}

// Argument checks of direct op calls (the Python API checks first, with friendlier
// messages): t must be defined, have exactly these sizes, and share like's dtype and
// device. The message names the op and the argument.
inline void check_arg(const at::Tensor& t, const char* op, const char* name, at::IntArrayRef sizes,
                      const at::Tensor& like) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
}

// An int64 index tensor of shape (n,) on like's device whose values lie in [lo, hi].
inline void check_index_arg(const at::Tensor& t, const char* op, const char* name, int64_t n, int64_t lo,
                            int64_t hi, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == n && t.device() == like.device(),
              op, ": ", name, " must be an int64 tensor of shape (", n, ",) on ", like.device(), ", got ",
              t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
  if (n > 0) {
    const auto mm = at::aminmax(t);
    const int64_t mn = std::get<0>(mm).item<int64_t>(), mx = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK_VALUE(mn >= lo && mx <= hi, op, ": ", name, " must lie in [", lo, ", ", hi, "], got values in [",
                      mn, ", ", mx, "]");
  }
}

}  // namespace seqkernels
