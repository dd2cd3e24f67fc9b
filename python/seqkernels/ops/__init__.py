"""Custom-op registrations: fake kernels, autograd and device dispatch, one module per family."""
