"""Helpers for the conformance tests: each compares seqkernels with torch's own function."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def torch_math_sdpa(*args, **kwargs):
    """torch's SDPA on its math backend (the definition the flash kernels must match)."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def assert_same_nan_and_values(actual, expected, atol=1e-6, rtol=1e-5, what=""):
    """Same shape, NaN in the same places, equal values elsewhere."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), (f"{what}: NaN at {int(nan_a.sum())} places, torch at {int(nan_e.sum())} "
                                       f"({int((nan_a != nan_e).sum())} differ)")
    torch.testing.assert_close(a.nan_to_num(), e.nan_to_num(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def raised_by(call):
    """The exception a call raises (the test fails when it raises none)."""
    try:
        call()
    except Exception as e:  # noqa: BLE001
        return e
    pytest.fail("the call raised nothing")


def assert_raises_like_torch(ours, theirs, match: str | None = None):
    """Both calls raise; ours is an instance of the type torch raised (and matches `match`)."""
    t, o = raised_by(theirs), raised_by(ours)
    assert isinstance(o, type(t)), f"torch raised {type(t).__name__} ({t}); seqkernels {type(o).__name__} ({o})"
    if match is not None:
        assert match in str(o), f"message {str(o)!r} lacks {match!r}"


@contextlib.contextmanager
def no_warnings_about_autograd():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
