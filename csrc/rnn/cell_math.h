// The gate math of the LSTM and the Elman RNN, written once for the CPU and the GPU.
//
// Every function is a template over the value type V and a math policy M that supplies
// the activation primitives (M::sigmoid, M::tanh, M::relu, M::relu_grad). The CUDA kernels
// instantiate it with V = float and device math; the CPU kernels with V = float/double
// scalars and with at::vec::Vectorized<float> for 8/16 lanes at a time. The formulas,
// i.e. what is saved and how each derivative is formed, are this file, so the CPU tests
// check the same math the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define SK_HD __host__ __device__ __forceinline__
#else
#define SK_HD inline
#endif

#include <cmath>

namespace seqkernels::rnn {

// Scalar activation primitives (host and device).
struct ScalarMath {
  SK_HD static float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
  SK_HD static double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
  SK_HD static float tanh(float x) { return tanhf(x); }
  SK_HD static double tanh(double x) { return ::tanh(x); }
  template <typename V>
  SK_HD static V relu(V x) { return x > V(0) ? x : V(0); }
  // d relu / d z expressed through the output h = relu(z): 1 where h > 0.
  template <typename V>
  SK_HD static V relu_grad(V h, V dh) { return h > V(0) ? dh : V(0); }
};

// --- LSTM, gates in torch's order i, f, g, o ---------------------------------------------
//
// forward:  i = sigmoid(z_i), f = sigmoid(z_f), g = tanh(z_g), o = sigmoid(z_o)
//           c = f * c_prev + i * g,   h = o * tanh(c)
// saved:    the activated gates i, f, g, o and c (tanh(c) is recomputed in the backward).
template <typename M, typename V>
SK_HD void lstm_forward(V& i, V& f, V& g, V& o, V c_prev, V& c, V& h) {
  i = M::sigmoid(i);
  f = M::sigmoid(f);
  g = M::tanh(g);
  o = M::sigmoid(o);
  c = f * c_prev + i * g;
  h = o * M::tanh(c);
}

// backward: given dh (gradient w.r.t. h) and dc_next (w.r.t. c from the next step),
//   dc = dc_next + dh * o * (1 - tanh(c)^2),   dc_prev = dc * f
//   dz_i = dc * g * i (1 - i),  dz_f = dc * c_prev * f (1 - f),
//   dz_g = dc * i * (1 - g^2),  dz_o = dh * tanh(c) * o (1 - o).
// On entry i, f, g, o hold the saved activations; on exit the pre-activation gradients.
template <typename M, typename V>
SK_HD void lstm_backward(V& i, V& f, V& g, V& o, V c, V c_prev, V dh, V& dc) {
  const V one(1);
  const V tc = M::tanh(c);
  dc = dc + dh * o * (one - tc * tc);
  const V dzi = dc * g * i * (one - i);
  const V dzf = dc * c_prev * f * (one - f);
  const V dzg = dc * i * (one - g * g);
  const V dzo = dh * tc * o * (one - o);
  dc = dc * f;
  i = dzi;
  f = dzf;
  g = dzg;
  o = dzo;
}

// --- Elman RNN: h = tanh(z) or relu(z) ------------------------------------------------------
template <typename M, typename V>
SK_HD V rnn_forward(V z, bool relu) {
  return relu ? M::relu(z) : M::tanh(z);
}

// dz from the output h and dh: tanh' = 1 - h^2, relu' = [h > 0].
template <typename M, typename V>
SK_HD V rnn_backward(V h, V dh, bool relu) {
  return relu ? M::relu_grad(h, dh) : dh * (V(1) - h * h);
}

}  // namespace seqkernels::rnn
