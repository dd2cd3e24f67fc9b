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

}  // namespace seqkernels
