"""``fastdense info`` (what was built, which backend each op would run on) and
``fastdense device-name`` (the tag that names benchmark results)."""
from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import TextIO

from fastdense._device import device_tag
from fastdense.cli._main import command


@command("device-name", "print a short file-name-safe tag of this machine's accelerator (GPU, else CPU)")
def cmd_device_name(args: argparse.Namespace) -> int:
    print(device_tag())
    return 0


def _kernel_registrations() -> list[tuple[str, bool, bool]]:
    """(op, has CPU kernel, has CUDA kernel) for the internal ops fastdense._C declares.

    The extension can load and still lack a kernel (a source file missing from
    the build); this is the line of ``info`` that shows it. By convention the
    C++-declared ops are the underscore-prefixed ones of the namespace.
    """
    import torch

    try:
        names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastdense::_"))
        return [(n, torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU"),
                 torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")) for n in names]
    except Exception:  # private API; info must still print the rest
        return []


def _auto_pick(op: str, device_type: str) -> str:
    """The backend automatic dispatch tries first that this machine can run.

    Only machine reasons are known without inputs; dtype or shape limits of
    the chosen backend can still send a particular call further down the list.
    """
    from fastdense.ops import _dispatch

    impls = _dispatch.implementations(op)
    refused = []
    for name in _dispatch.PRIORITY.get(device_type, _dispatch.DEFAULT_PRIORITY):
        impl = impls.get(name)
        if impl is None:
            continue
        if not impl.machine_reasons():
            return name
        refused.append(name)
    return f"none (refused: {', '.join(refused)})"


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _threads_summary() -> str:
    import torch

    backend = "unknown"
    for text in torch.__config__.parallel_info().splitlines():
        if text.startswith("ATen parallel backend:"):
            backend = text.split(":", 1)[1].strip()
    return (f"ATen {backend}, intra-op {torch.get_num_threads()}, "
            f"inter-op {torch.get_num_interop_threads()}, CPUs {os.cpu_count()}")


def print_info(out: TextIO = sys.stdout) -> None:
    import torch

    import fastdense
    from fastdense import _ext, _triton
    from fastdense.ops import _dispatch

    def line(key: str, value: str) -> None:
        print(f"{key:<18} {value}", file=out)

    line("fastdense", f"{fastdense.__version__} ({os.path.dirname(fastdense.__file__)})")
    line("python", f"{platform.python_version()} ({sys.executable})")
    line("torch", torch.__version__)
    triton_err = _triton.import_error()
    if triton_err is None:
        import triton

        line("triton", triton.__version__)
    else:
        line("triton", f"not installed ({triton_err})")
    if torch.version.cuda is None:
        line("CUDA", "torch built without CUDA")
    elif torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        line("CUDA", f"{torch.version.cuda}, devices: {names}")
    else:
        line("CUDA", f"{torch.version.cuda}, no CUDA device visible")
    if _ext.available():
        line("fastdense._C", f"loaded ({getattr(_ext._C, '__file__', '?')})")
    else:
        line("fastdense._C", f"not loaded: {_ext.load_error}")
    line("  CPU kernels", _yes_no(_ext.available()))
    line("  CUDA kernels", _yes_no(_ext.has_cuda_kernels()))
    for op, cpu, cuda in _kernel_registrations():
        line(f"  {op}", f"CPU kernel: {_yes_no(cpu)}, CUDA kernel: {_yes_no(cuda)}")
    line("threads", _threads_summary())
    line("FASTDENSE_BACKEND", os.environ.get("FASTDENSE_BACKEND") or "not set (automatic dispatch)")
    if os.environ.get("TRITON_INTERPRET"):
        line("TRITON_INTERPRET", os.environ["TRITON_INTERPRET"])

    print("", file=out)
    print("ops and backends (dispatch order: CUDA tensors "
          + " > ".join(_dispatch.PRIORITY["cuda"]) + "; CPU tensors "
          + " > ".join(_dispatch.PRIORITY["cpu"]) + ")", file=out)
    forced = os.environ.get("FASTDENSE_BACKEND", "").strip()
    for op, backends in _dispatch.machine_report().items():
        print(f"  {op}", file=out)
        for name, reasons in backends.items():
            status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            print(f"    {name:<8} {status}", file=out)
        cuda_pick = _auto_pick(op, "cuda") if torch.cuda.is_available() else "n/a (no CUDA device)"
        print(f"    auto     CPU tensors -> {_auto_pick(op, 'cpu')}; CUDA tensors -> {cuda_pick}", file=out)
        if forced and forced != "auto":
            print(f"    forced   FASTDENSE_BACKEND={forced} overrides automatic dispatch", file=out)

    from fastdense.models import KINDS, list_models

    print("", file=out)
    print("models (fastdense.models.create_model; `train --model` takes multitask, `adapt --model` fewshot)",
          file=out)
    for kind in KINDS:
        print(f"  {kind:<10} {', '.join(list_models(kind=kind)) or '-'}", file=out)


@command("info", "print versions, what fastdense._C was built with, and each op's backends")
def cmd_info(args: argparse.Namespace) -> int:
    print_info()
    return 0
