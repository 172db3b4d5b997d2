"""Backend selection: priority lists, forcing, and the errors a user sees."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastdense
from fastdense.ops import _dispatch
from fastdense.ops.lora import OP


def _args(device="cpu", dtype=torch.float32):
    x = torch.randn(4, 6, device=device, dtype=dtype)
    return (x, torch.randn(5, 6, dtype=dtype, device=device), None, torch.randn(3, 6, dtype=dtype, device=device),
            torch.randn(5, 3, dtype=dtype, device=device), [2, 1], [1.0, 1.0], False, None, None)


def _expected_auto(device_type, args):
    for name in _dispatch.PRIORITY[device_type]:
        if not _dispatch.implementations(OP)[name].reasons(*args):
            return name
    raise AssertionError("no backend")


def test_auto_picks_first_backend_without_reasons():
    args = _args()
    chosen = _dispatch.select(OP, "cpu", *args).backend
    assert chosen == _expected_auto("cpu", args)
    if not _dispatch.implementations(OP)["cpp"].machine_reasons():
        assert chosen == "cpp"


def test_float64_on_cpu_never_reaches_triton():
    args = _args(dtype=torch.float64)
    assert "float64" in " ".join(_dispatch.implementations(OP)["triton"].input_reasons(*args))


def test_forcing_an_unsupported_backend_lists_the_reasons():
    args = _args()
    with fastdense.ops.backend("cuda"):
        with pytest.raises(fastdense.ops.BackendNotSupportedError, match="'cuda' was forced") as info:
            _dispatch.select(OP, "cpu", *args)
    assert "CUDA" in str(info.value)


def test_forced_backend_is_used_and_context_nests():
    args = _args()
    with fastdense.ops.backend("torch"):
        assert _dispatch.select(OP, "cpu", *args).backend == "torch"
        with fastdense.ops.backend(None):
            assert _dispatch.select(OP, "cpu", *args).backend == _expected_auto("cpu", args)
        assert _dispatch.select(OP, "cpu", *args).backend == "torch"
    assert fastdense.ops.forced_backend() in (None, os.environ.get("FASTDENSE_BACKEND"))


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="not a backend"):
        with fastdense.ops.backend("cudnn"):
            pass


def test_environment_variable_forces_and_validates(monkeypatch):
    args = _args()
    monkeypatch.setenv("FASTDENSE_BACKEND", "torch")
    assert _dispatch.select(OP, "cpu", *args).backend == "torch"
    monkeypatch.setenv("FASTDENSE_BACKEND", "cuda")
    with pytest.raises(fastdense.ops.BackendNotSupportedError):
        _dispatch.select(OP, "cpu", *args)
    monkeypatch.setenv("FASTDENSE_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTDENSE_BACKEND='fast'"):
        _dispatch.select(OP, "cpu", *args)


def test_every_backend_explains_itself_in_the_machine_report():
    report = _dispatch.machine_report()[OP.name]
    assert list(report) == [b for b in _dispatch.BACKENDS if b in report]
    assert report["torch"] == []
    if not torch.cuda.is_available():
        assert any("CUDA" in r for r in report["cuda"])


def test_missing_extension_is_one_warning_and_torch_takes_over(tmp_path):
    """Simulate a broken build: fastdense._C raises at import."""
    script = r'''
import importlib.abc, sys, logging
class Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fastdense._C":
            raise ImportError("simulated broken build")
sys.meta_path.insert(0, Broken())
import torch, fastdense
from fastdense.ops import _dispatch, mt_lora_linear
from fastdense.ops.lora import OP
x = torch.randn(3, 4)
out = mt_lora_linear(x, torch.randn(2, 4), None, torch.randn(1, 4), torch.randn(2, 1), [1], [1.0])
print("SHAPE", tuple(out.shape))
print("CPP", _dispatch.implementations(OP)["cpp"].machine_reasons())
'''
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "FASTDENSE_BACKEND"})
    assert proc.returncode == 0, proc.stderr
    assert "SHAPE (1, 3, 2)" in proc.stdout
    assert "simulated broken build" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "fastdense._C is unavailable" in line]
    assert len(warnings) == 1, proc.stderr


def test_backward_uses_the_backend_forced_at_forward_even_on_another_thread(monkeypatch):
    """CUDA autograd runs backward on a worker thread that does not see the context variable."""
    import dataclasses
    import threading

    from fastdense.ops import mt_lora_linear

    x = torch.randn(4, 6, requires_grad=True)
    seen = []
    impls = _dispatch.implementations(OP)

    def spying(impl):
        def backward(*args):
            seen.append(impl.backend)
            return impl.backward(*args)
        return dataclasses.replace(impl, backward=backward)

    for name, impl in list(impls.items()):
        monkeypatch.setitem(impls, name, spying(impl))
    with fastdense.ops.backend("torch"):
        out = mt_lora_linear(x, torch.randn(5, 6), None, torch.randn(3, 6), torch.randn(5, 3), [2, 1], [1.0, 1.0])
    worker = threading.Thread(target=lambda: out.sum().backward())
    worker.start()
    worker.join()
    assert seen == ["torch"]
    assert x.grad is not None
