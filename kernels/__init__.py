"""Triton kernels (installed as ``seqkernels.kernels``): @triton.jit functions and their launchers."""
