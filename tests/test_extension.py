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
