// The CUDA backend of the recurrent layers (csrc/rnn/rnn_layer.h): cuBLAS GEMMs and fused
// pointwise kernels built on csrc/rnn/cell_math.h, all on the current stream. float32,
// float64, float16 and bfloat16; the pointwise math runs in fp32 for the 16-bit types
// (at::opmath_type), and cuBLAS accumulates their GEMMs in fp32.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "cell_math.h"
#include "rnn_layer.h"

namespace seqkernels::rnn {
namespace {

constexpr int kThreads = 256;

inline dim3 blocks_for(int64_t n) { return dim3(static_cast<unsigned>((n + kThreads - 1) / kThreads)); }

__device__ __forceinline__ bool masked(const int64_t* lengths, int64_t t, int64_t b) {
  return lengths != nullptr && t >= lengths[b];
}

// One thread per (b, j), j < H. See CpuBackend::lstm_pointwise_forward for the contract.
template <typename scalar_t>
__global__ void lstm_forward_kernel(int64_t B, int64_t H, int64_t P, int64_t t, const int64_t* lengths,
                                    scalar_t* z, const scalar_t* zh, const scalar_t* bias,
                                    const scalar_t* c_prev, const scalar_t* h_prev, scalar_t* c_t,
                                    scalar_t* out) {
  using A = at::opmath_type<scalar_t>;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * H) return;
  const int64_t b = idx / H, j = idx % H;
  scalar_t* zr = z + b * 4 * H;
  if (masked(lengths, t, b)) {
    c_t[idx] = c_prev[idx];
    out[idx] = h_prev ? h_prev[b * P + j] : scalar_t(0);
    zr[j] = zr[H + j] = zr[2 * H + j] = zr[3 * H + j] = scalar_t(0);
    return;
  }
  const scalar_t* rr = zh + b * 4 * H;
  A g4[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    g4[k] = A(zr[k * H + j]) + A(rr[k * H + j]) + (bias ? A(bias[k * H + j]) : A(0));
  }
  A c, h;
  lstm_forward<ScalarMath>(g4[0], g4[1], g4[2], g4[3], A(c_prev[idx]), c, h);
#pragma unroll
  for (int k = 0; k < 4; ++k) zr[k * H + j] = scalar_t(g4[k]);
  c_t[idx] = scalar_t(c);
  out[idx] = scalar_t(h);
}

template <typename scalar_t>
__global__ void lstm_backward_kernel(int64_t B, int64_t H, int64_t P, int64_t lda, int64_t t,
                                     const int64_t* lengths, const scalar_t* gates, const scalar_t* c_t,
                                     const scalar_t* c_prev, const scalar_t* dh_a, const scalar_t* dh_b,
                                     scalar_t* dc, scalar_t* dz) {
  using A = at::opmath_type<scalar_t>;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * H) return;
  const int64_t b = idx / H, j = idx % H;
  scalar_t* dzr = dz + b * 4 * H;
  if (masked(lengths, t, b)) {
    dzr[j] = dzr[H + j] = dzr[2 * H + j] = dzr[3 * H + j] = scalar_t(0);
    return;
  }
  const scalar_t* gr = gates + b * 4 * H;
  A i = A(gr[j]), f = A(gr[H + j]), g = A(gr[2 * H + j]), o = A(gr[3 * H + j]);
  A dh = A(dh_a[b * lda + j]) + (dh_b ? A(dh_b[b * P + j]) : A(0));
  A dcv = A(dc[idx]);
  lstm_backward<ScalarMath>(i, f, g, o, A(c_t[idx]), A(c_prev[idx]), dh, dcv);
  dzr[j] = scalar_t(i);
  dzr[H + j] = scalar_t(f);
  dzr[2 * H + j] = scalar_t(g);
  dzr[3 * H + j] = scalar_t(o);
  dc[idx] = scalar_t(dcv);
}

template <typename scalar_t>
__global__ void rnn_forward_kernel(int64_t B, int64_t H, int64_t t, const int64_t* lengths, const scalar_t* z,
                                   const scalar_t* zh, const scalar_t* bias, const scalar_t* h_prev, scalar_t* h_t,
                                   bool relu) {
  using A = at::opmath_type<scalar_t>;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * H) return;
  const int64_t b = idx / H, j = idx % H;
  if (masked(lengths, t, b)) {
    h_t[idx] = h_prev[idx];
    return;
  }
  const A v = A(z[idx]) + A(zh[idx]) + (bias ? A(bias[j]) : A(0));
  h_t[idx] = scalar_t(rnn_forward<ScalarMath>(v, relu));
}

template <typename scalar_t>
__global__ void rnn_backward_kernel(int64_t B, int64_t H, int64_t t, const int64_t* lengths, const scalar_t* h_t,
                                    const scalar_t* dy, const scalar_t* dh, scalar_t* dz, bool relu) {
  using A = at::opmath_type<scalar_t>;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * H) return;
  if (masked(lengths, t, idx / H)) {
    dz[idx] = scalar_t(0);
    return;
  }
  dz[idx] = scalar_t(rnn_backward<ScalarMath>(A(h_t[idx]), A(dy[idx]) + A(dh[idx]), relu));
}

// keep_state: masked rows dst = src. mask_output: y = masked ? 0 : h. add: out = a + b.
template <typename scalar_t>
__global__ void keep_state_kernel(int64_t B, int64_t n, int64_t t, const int64_t* lengths, scalar_t* dst,
                                  const scalar_t* src) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx < B * n && masked(lengths, t, idx / n)) dst[idx] = src[idx];
}

template <typename scalar_t>
__global__ void mask_output_kernel(int64_t B, int64_t n, int64_t t, const int64_t* lengths, scalar_t* y,
                                   const scalar_t* h) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx < B * n) y[idx] = masked(lengths, t, idx / n) ? scalar_t(0) : h[idx];
}

template <typename scalar_t>
__global__ void add_kernel(int64_t n, scalar_t* out, const scalar_t* a, const scalar_t* b) {
  using A = at::opmath_type<scalar_t>;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx < n) out[idx] = scalar_t(A(a[idx]) + A(b[idx]));
}

struct CudaBackend {
  template <typename F>
  static void dispatch(at::ScalarType t, F&& f) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "recurrent_layer_cuda", [&] { f(scalar_t{}); });
  }

  // Row-major C = alpha op(A) op(B) + beta C, through at::mm_out / addmm_ on views of the
  // buffers (cuBLAS on the current stream). libtorch does not export at::cuda::blas::gemm
  // to extensions, and the tensor API is the public way to the same call.
  template <typename scalar_t>
  void gemm(Tr ta, Tr tb, int64_t m, int64_t n, int64_t k, scalar_t alpha, const scalar_t* a, int64_t lda,
            const scalar_t* b, int64_t ldb, scalar_t beta, scalar_t* c, int64_t ldc) {
    const auto opts = at::TensorOptions()
                          .dtype(c10::CppTypeToScalarType<scalar_t>::value)
                          .device(at::kCUDA, c10::cuda::current_device());
    auto view = [&](const scalar_t* p, Tr t, int64_t rows, int64_t cols, int64_t ld) {
      // op(X) is rows x cols; X is stored row-major with leading dimension ld.
      return t == Tr::N ? at::from_blob(const_cast<scalar_t*>(p), {rows, cols}, {ld, 1}, opts)
                        : at::from_blob(const_cast<scalar_t*>(p), {cols, rows}, {ld, 1}, opts).t();
    };
    at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
    at::Tensor A = view(a, ta, m, k, lda), B = view(b, tb, k, n, ldb);
    if (static_cast<double>(beta) == 0.0 && static_cast<double>(alpha) == 1.0) {
      at::mm_out(C, A, B);
    } else {
      C.addmm_(A, B, static_cast<double>(beta), static_cast<double>(alpha));
    }
  }

  template <typename scalar_t>
  const scalar_t* matmul_nt(int64_t m, int64_t n, int64_t k, const scalar_t* a, const scalar_t* w, scalar_t* out) {
    gemm<scalar_t>(Tr::N, Tr::T, m, n, k, scalar_t(1), a, k, w, k, scalar_t(0), out, n);
    return out;
  }

  at::Tensor input_projection(const at::Tensor& x, const at::Tensor& w_ih) { return at::mm(x, w_ih.t()); }

  static at::Tensor mm(const at::Tensor& a, const at::Tensor& b) { return at::mm(a, b); }

  // The CPU backend keeps transposed copies for its weight gradients (keep_step); cuBLAS
  // takes the transposes as they are.
  template <typename scalar_t>
  void keep_step(const Layer&, int64_t, int64_t, const scalar_t*, int64_t, const scalar_t*, const scalar_t*) {}

  // The backward keeps dZ for all steps at once (GradChunks): memory from the caching
  // allocator costs no page faults, and one chunk means one GEMM each for dX and the
  // weight gradients.
  static int64_t grad_chunk_steps(const Layer& L) { return L.T; }

  // A chunk's dZ^T x, dZ^T h_prev and the bias gradient.
  template <typename HPrev>
  std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_grads(const at::Tensor& dz2, const at::Tensor& x2,
                                                             HPrev&& h_prev2, bool has_bias) {
    return {at::mm(dz2.t(), x2), at::mm(dz2.t(), h_prev2()), has_bias ? dz2.sum(0) : at::empty({0}, dz2.options())};
  }

  template <typename scalar_t>
  void lstm_pointwise_forward(const Layer& L, int64_t t, scalar_t* z, const scalar_t* zh, const scalar_t* bias,
                              const scalar_t* c_prev, const scalar_t* h_prev, scalar_t* c_t, scalar_t* out) {
    lstm_forward_kernel<scalar_t><<<blocks_for(L.B * L.H), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        L.B, L.H, L.P, t, L.lengths, z, zh, bias, c_prev, h_prev, c_t, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // The input projection stays one GEMM over all steps (lstm_step never gets x_t).
  static bool fuses_input(const Layer&, at::ScalarType) { return false; }

  // One LSTM step: the recurrent GEMM (cuBLAS), then the fused pointwise kernel.
  template <typename scalar_t>
  void lstm_step(const Layer& L, int64_t t, scalar_t* z, const scalar_t* h_prev, const scalar_t* w_hh,
                 const scalar_t* bias, const scalar_t* c_prev, const scalar_t* h_prev_or_null, scalar_t* c_t,
                 scalar_t* out, scalar_t* zh, const scalar_t*, const scalar_t*) {
    const scalar_t* zh_t = matmul_nt<scalar_t>(L.B, 4 * L.H, L.P, h_prev, w_hh, zh);
    lstm_pointwise_forward<scalar_t>(L, t, z, zh_t, bias, c_prev, h_prev_or_null, c_t, out);
  }

  template <typename scalar_t>
  void lstm_pointwise_backward(const Layer& L, int64_t t, const scalar_t* gates, const scalar_t* c_t,
                               const scalar_t* c_prev, const scalar_t* dh_a, const scalar_t* dh_b, scalar_t* dc,
                               scalar_t* dz) {
    const int64_t lda = dh_b ? L.P : L.H;
    lstm_backward_kernel<scalar_t><<<blocks_for(L.B * L.H), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        L.B, L.H, L.P, lda, t, L.lengths, gates, c_t, c_prev, dh_a, dh_b, dc, dz);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t>
  void rnn_pointwise_forward(const Layer& L, int64_t t, const scalar_t* z, const scalar_t* zh, const scalar_t* bias,
                             const scalar_t* h_prev, scalar_t* h_t, bool relu) {
    rnn_forward_kernel<scalar_t><<<blocks_for(L.B * L.H), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        L.B, L.H, t, L.lengths, z, zh, bias, h_prev, h_t, relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t>
  void rnn_pointwise_backward(const Layer& L, int64_t t, const scalar_t* h_t, const scalar_t* dy,
                              const scalar_t* dh, scalar_t* dz, bool relu) {
    rnn_backward_kernel<scalar_t><<<blocks_for(L.B * L.H), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        L.B, L.H, t, L.lengths, h_t, dy, dh, dz, relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t>
  void keep_state(const Layer& L, int64_t t, scalar_t* dst, const scalar_t* src, int64_t n) {
    keep_state_kernel<scalar_t><<<blocks_for(L.B * n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        L.B, n, t, L.lengths, dst, src);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t>
  void mask_output(const Layer& L, int64_t t, scalar_t* y, const scalar_t* h, int64_t n) {
    mask_output_kernel<scalar_t><<<blocks_for(L.B * n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        L.B, n, t, L.lengths, y, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t>
  void add(scalar_t* out, const scalar_t* a, const scalar_t* b, int64_t n) {
    add_kernel<scalar_t><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(n, out, a, b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(seqkernels, CUDA, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward<CudaBackend>);
  m.impl("lstm_layer_backward", &lstm_layer_backward<CudaBackend>);
  m.impl("rnn_layer_forward", &rnn_layer_forward<CudaBackend>);
  m.impl("rnn_layer_backward", &rnn_layer_backward<CudaBackend>);
}

}  // namespace seqkernels::rnn
