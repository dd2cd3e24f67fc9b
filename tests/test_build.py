"""The build facts and the test utilities themselves."""

import subprocess
import sys

import pytest
import torch

import seqkernels
from seqkernels import testing


def test_build_info_keys_and_types():
    info = seqkernels.build_info()
    for key in ("seqkernels", "torch", "triton", "cuda", "cuda_compiled", "cuda_archs",
                "gpu_visible", "triton_interpret", "cpu_threads", "openmp"):
        assert key in info, key
    assert info["seqkernels"] == seqkernels.__version__
    assert info["torch"] == torch.__version__
    assert info["cpu_threads"] == torch.get_num_threads() >= 1
    assert info["openmp"] is True, "the extension must be built with -fopenmp for at::parallel_for"
    assert info["gpu_visible"] == torch.cuda.is_available()
    if info["cuda_compiled"]:
        assert info["cuda_archs"]


def test_cuda_compiled_whenever_toolkit_and_cuda_torch():
    """The CUDA sources are compiled whenever they exist and the toolchain does."""
    import glob
    import os
    import shutil

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    has_cu = bool(glob.glob(os.path.join(root, "csrc", "**", "*.cu"), recursive=True))
    if not (has_cu and torch.version.cuda and shutil.which("nvcc")) or os.environ.get("SEQKERNELS_CUDA") == "0":
        pytest.skip("no .cu sources, no nvcc or not a CUDA build of torch")
    assert seqkernels.build_info()["cuda_compiled"]


def test_python_m_seqkernels_prints_facts():
    out = subprocess.run([sys.executable, "-m", "seqkernels"], capture_output=True, text=True, check=True)
    for key in ("seqkernels", "torch", "triton", "cuda_compiled", "gpu_visible", "cpu_threads"):
        assert key in out.stdout


def test_poison_outputs_fills_nan_and_restores():
    from seqkernels import _C

    assert _C.poison_outputs()  # the autouse fixture turns it on for every test
    with testing.poison_outputs(False):
        assert not _C.poison_outputs()
    assert _C.poison_outputs()
    assert torch.isnan(testing.poisoned_empty(5, 7)).all()
    assert not testing.poisoned_empty(4, dtype=torch.int64).is_floating_point()


def test_assert_close_catches_unwritten_nan():
    expected = torch.zeros(4, dtype=torch.float64)
    actual = testing.poisoned_empty(4)
    actual[:3] = 0  # a "kernel" that forgets the last element
    with pytest.raises(AssertionError, match="NaN"):
        testing.assert_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_tolerance_table_is_ordered(dtype):
    rtol, atol = testing.tolerance(dtype)
    assert 0 < rtol < 0.05 and 0 < atol < 0.05
    assert testing.tolerance(dtype, 10)[0] == pytest.approx(10 * rtol)


def test_assert_close_rejects_difference_beyond_tolerance():
    e = torch.ones(3, dtype=torch.float64)
    testing.assert_close(e.float() + 1e-6, e)
    with pytest.raises(AssertionError):
        testing.assert_close(e.float() + 1e-3, e)


def test_seed_is_reproducible():
    testing.seed(123)
    a = torch.randn(5)
    testing.seed(123)
    assert torch.equal(a, torch.randn(5))
