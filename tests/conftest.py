"""Test configuration shared by the whole suite.

Without a CUDA device, Triton kernels run in the Triton interpreter on CPU
tensors. TRITON_INTERPRET must be set before anything imports triton or
fastdense.kernels, which is why it is done here, at collection time.
"""
import atexit
import os
import shutil
import tempfile


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A fresh Inductor cache per run: the default one in /tmp outlives the session,
# and its cached graphs can call fastdense ops with a schema that has changed since.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _inductor_cache = tempfile.mkdtemp(prefix="fastdense-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache
    atexit.register(shutil.rmtree, _inductor_cache, ignore_errors=True)

# The subprocess demo tests check the op part; the demo's training is tested
# in-process with tiny settings (tests/engine).
os.environ.setdefault("FASTDENSE_DEMO_STEPS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastdense  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (runs on the GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread, then restore the previous count.

    Tiny tensors on a shared 2-core machine: a second torch thread only spins
    against the other processes. Restoring also undoes in-process CLI runs'
    ``--threads``.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
