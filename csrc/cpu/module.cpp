// The Python module of one ISA build of the CPU kernels: seqkernels._cpu_<capability>.
//
// setup.py compiles csrc/attention/*_cpu.cpp, csrc/rnn/rnn_cpu.cpp and this file once per
// CPU capability, each into its own shared library with its own ISA flags (avx2: -mavx2
// -mfma -mf16c; avx512: those and -mavx512f/bw/dq/vl/cd; avx512_bf16: those and
// -mavx512bf16; "default", off x86: none). python/seqkernels/_cpu.py loads exactly one of them, chosen from the
// CPU's features (or SEQKERNELS_CPU_CAPABILITY), after seqkernels._C: its
// TORCH_LIBRARY_IMPL(seqkernels, CPU, ...) blocks register the CPU bodies of the ops that
// _C declares. One library per ISA, and only one loaded, keeps the ISAs apart: the inline
// functions of the headers (at::vec, the STL) are compiled for each ISA in its own library,
// so no AVX-512 copy of one can be picked by the linker for code running on an AVX2 CPU.
//
// SEQKERNELS_CAPABILITY is the module's capability name (setup.py defines it). The module
// is written against Python's C API alone: torch/extension.h (pybind11) would cost half a
// minute of compile time per capability for three functions.

#include <Python.h>

#include <atomic>

#ifndef SEQKERNELS_CAPABILITY
#error "SEQKERNELS_CAPABILITY must name the capability this module is built for (setup.py defines it)"
#endif

namespace seqkernels {

// Declared in common.h; each kernel module has its own (seqkernels._C has the CUDA side's).
std::atomic<bool>& poison_outputs_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

std::atomic<bool>& decode_regime_flag() {
  static std::atomic<bool> flag{true};
  return flag;
}

}  // namespace seqkernels

namespace {

PyObject* exchange(std::atomic<bool>& flag, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  return PyBool_FromLong(flag.exchange(on != 0));
}

PyObject* set_poison_outputs(PyObject*, PyObject* arg) { return exchange(seqkernels::poison_outputs_flag(), arg); }
PyObject* set_decode_regime(PyObject*, PyObject* arg) { return exchange(seqkernels::decode_regime_flag(), arg); }

PyMethodDef methods[] = {
    {"set_poison_outputs", set_poison_outputs, METH_O,
     "Fill every CPU kernel output with NaN before the kernel writes it; returns the previous setting"},
    {"set_decode_regime", set_decode_regime, METH_O,
     "Let flash_attention take the decode kernel for few query rows per K/V head (default on); returns the "
     "previous setting. Off: the general kernel only (for benchmarks and tests)"},
    {nullptr, nullptr, 0, nullptr}};

#define SK_STR2(x) #x
#define SK_STR(x) SK_STR2(x)
PyModuleDef module_def = {PyModuleDef_HEAD_INIT, SK_STR(TORCH_EXTENSION_NAME),
                          "seqkernels CPU kernels, compiled for one ISA (" SEQKERNELS_CAPABILITY ")", -1, methods};

}  // namespace

#define SK_CAT2(a, b) a##b
#define SK_CAT(a, b) SK_CAT2(a, b)
PyMODINIT_FUNC SK_CAT(PyInit_, TORCH_EXTENSION_NAME)() {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#if defined(__AVX512BF16__)
  const long bf16 = 1;
#else
  const long bf16 = 0;
#endif
  if (PyModule_AddStringConstant(m, "capability", SEQKERNELS_CAPABILITY) < 0 ||
      PyModule_AddObject(m, "avx512_bf16_compiled", PyBool_FromLong(bf16)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
