"""Helpers for tests that compare two implementations, outputs and gradients."""

import torch


def grads_of(outputs, inputs, seed=1):
    """Gradients of sum(out * w) over ``outputs`` (random fixed weights w) w.r.t. ``inputs``.

    Random weights rather than a plain sum, so that a gradient that is merely summed
    wrongly (a transposed or permuted result) cannot pass.
    """
    outputs = [o for o in outputs if o is not None]
    g = torch.Generator().manual_seed(seed)
    # drawn in float64 whatever the dtype, so that two implementations in different dtypes
    # get the same weights
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype)).sum()
               for o in outputs)
    inputs = [i for i in inputs if i is not None]
    return torch.autograd.grad(loss, inputs, allow_unused=False)


def assert_all_close(actual, expected, rtol=1e-10, atol=1e-10, what="tensor"):
    assert len(actual) == len(expected), f"{what}: {len(actual)} vs {len(expected)}"
    for n, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{what} {n}: {m}")
