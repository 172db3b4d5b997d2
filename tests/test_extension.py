"""The compiled extension was built and carries the kernels it claims."""
import os

import pytest
import torch

from fastdense import _ext


@pytest.mark.skipif(os.environ.get("FASTDENSE_NO_EXT") == "1", reason="FASTDENSE_NO_EXT=1: pure-Python install")
def test_extension_loaded_with_cpu_kernels():
    assert _ext.available(), f"fastdense._C failed to load: {_ext.load_error}"
    for op in ("_mt_lora_fwd", "_mt_lora_bwd"):
        assert _ext.kernel_reasons(op, "CPU") == []


@pytest.mark.gpu
def test_extension_has_cuda_kernels_on_gpu_machines():
    assert _ext.has_cuda_kernels(), "built against CUDA torch but without CUDA kernels"
    assert _ext.kernel_reasons("_mt_lora_fwd", "CUDA") == []
    assert torch.cuda.is_available()


# fastdense._C.limits(): the CUDA kernels' limits, defined once in
# csrc/cuda/*_limits.h and read by the Python cuda backends for their input
# reasons. Exported by every build, CUDA or not.
LIMIT_TYPES = {
    "lora_cuda_max_adapters": int,
    "lora_cuda_max_padded_rank": int,
    "lora_cuda_max_dim": int,
    "dtf_cuda_kernel_sizes": list,
    "dtf_cuda_max_rank": int,
    "dtf_cuda_max_token_elements": int,
}
INT32_MAX = 2**31 - 1


def _limits() -> dict:
    if not _ext.available():
        pytest.skip(f"fastdense._C is not loaded ({_ext.load_error})")
    return _ext._C.limits()


def test_limits_have_the_documented_keys_and_types():
    limits = _limits()
    assert sorted(limits) == sorted(LIMIT_TYPES)
    for key, kind in LIMIT_TYPES.items():
        assert type(limits[key]) is kind, f"{key} = {limits[key]!r} is not a {kind.__name__}"
    assert all(type(k) is int for k in limits["dtf_cuda_kernel_sizes"])


def test_lora_limits_admit_every_adapter_count_they_allow():
    limits = _limits()
    max_adapters, max_padded = limits["lora_cuda_max_adapters"], limits["lora_cuda_max_padded_rank"]
    assert max_adapters >= 2  # a shared adapter and at least one task
    # Ranks are padded to multiples of 4: the budget must hold max_adapters rank-1 adapters.
    assert max_padded % 4 == 0 and max_padded >= 4 * max_adapters
    assert 1 <= limits["lora_cuda_max_dim"] <= INT32_MAX


def test_dtf_limits_cover_the_default_filter():
    limits = _limits()
    sizes = limits["dtf_cuda_kernel_sizes"]
    assert sizes == sorted(set(sizes)) and sizes, sizes
    assert all(k >= 1 and k % 2 == 1 for k in sizes), sizes  # a centred k x k filter
    assert 3 in sizes  # TADFormer's (and fastdense.nn's default) 3 x 3 filter
    assert 1 <= limits["dtf_cuda_max_rank"] <= 1024  # one thread per channel in a block
    assert 1 <= limits["dtf_cuda_max_token_elements"] <= INT32_MAX
