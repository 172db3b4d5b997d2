"""Kernel launches, and what they would compile on a GPU.

Every host launcher of this package starts its kernels through :func:`launch`.
Normally that is ``kernel[grid](*args, **kwargs)``. Inside :func:`recording`
nothing runs: each launch is written down instead, so that a launcher called
on ``meta`` tensors (shapes and strides, no data) tells which kernels, block
sizes and constexpr branches a call of that size would compile -- through the
launcher's own code, not a copy of it. :func:`specs` turns the recorded
launches into :class:`Spec` (signature, constexprs, compile options) the way
Triton's JIT specialises arguments on a GPU (integers equal to 1 become
constexprs, multiples of 16 and 16-byte aligned pointers get divisibility
hints), one per autotune config the GPU autotuner could pick.
tests/kernels/test_sm90_compile.py compiles them for Hopper on any machine.

While recording, :func:`interpreting` is False even under TRITON_INTERPRET=1:
the launchers then pick the block sizes they pick on a GPU.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Iterator

import triton

from fastdense._triton import interpreting as _env_interpreting

# Streaming multiprocessors assumed while recording (H100 SXM / H200: 132):
# launchers that size grids by the SM count use it in place of a device's.
RECORDING_SMS = 132

_RECORDER: contextvars.ContextVar[list | None] = contextvars.ContextVar("fastdense_kernel_recorder", default=None)


def interpreting() -> bool:
    """True when launches go to Triton's CPU interpreter (never while recording)."""
    return _RECORDER.get() is None and _env_interpreting()


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device`` (RECORDING_SMS while recording)."""
    if _RECORDER.get() is not None:
        return RECORDING_SMS
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or recorded when inside :func:`recording`."""
    recorder = _RECORDER.get()
    if recorder is None:
        kernel[grid](*args, **kwargs)
    else:
        recorder.append((kernel, args, kwargs))


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collect the launches made inside the block (nothing is launched)."""
    launches: list = []
    token = _RECORDER.set(launches)
    try:
        yield launches
    finally:
        _RECORDER.reset(token)


# ----------------------------------------------------------------------------- autotuning
def autotune(configs: Callable[[bool], list], key: list[str], prune: Callable | None = None,
             reset_to_zero: list[str] | None = None):
    """``triton.autotune`` over ``configs(interpreting)``, remembering the GPU list.

    The interpreter gets ``configs(True)`` (one small config: every tile op is
    numpy work there); :func:`specs` reads ``configs(False)`` and ``prune`` (a
    function ``(configs, named_args, **kwargs) -> configs``, Triton's
    ``early_config_prune``) to know what a GPU could pick, whatever this
    process's TRITON_INTERPRET says.
    """
    def wrap(fn):
        on_interpreter = _env_interpreting()
        tuner = triton.autotune(
            configs=configs(on_interpreter), key=key,
            prune_configs_by={"early_config_prune": prune} if (prune and not on_interpreter) else None,
            reset_to_zero=reset_to_zero)(fn)
        tuner.fastdense_gpu_configs = configs(False)
        tuner.fastdense_prune = prune
        return tuner

    return wrap


# ----------------------------------------------------------------------------- specs
@dataclasses.dataclass(frozen=True)
class Spec:
    """One compilation: what Triton would build for one launch with one config.

    ``signature`` maps every non-constexpr argument to its Triton type
    ("*bf16", "i32", "fp32", ...); ``constexprs`` holds the constexpr
    arguments (the kernel's own and the integers specialised as 1);
    ``divisible`` the arguments Triton marks as multiples of 16 (pointers: 16-byte
    aligned). ``case`` says where the spec came from and is not part of its identity.
    """

    fn: Any  # the @triton.jit function (not the autotuner around it)
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    divisible: frozenset[str]
    num_warps: int
    num_stages: int
    case: str = dataclasses.field(default="", compare=False)

    @property
    def kernel(self) -> str:
        module = self.fn.__module__.rsplit(".", 1)[-1]
        return f"{module}.{self.fn.__name__}"

    @property
    def config(self) -> str:
        """The block sizes and options, for tables."""
        blocks = " ".join(f"{k}={v}" for k, v in self.constexprs if k.isupper())
        pointers = [t[1:] for _, t in self.signature if t.startswith("*")]
        return f"{pointers[0] if pointers else '-'} {blocks} w{self.num_warps} s{self.num_stages}"

    def source(self):
        """``triton.compiler.ASTSource`` arguments: (fn, signature, constexprs, attrs)."""
        names = self.fn.arg_names
        constexprs = dict(self.constexprs)
        signature = {n: ("constexpr" if n in constexprs else dict(self.signature)[n]) for n in names}
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in self.divisible}
        return self.fn, signature, constexprs, attrs


class _Pointer:
    """Stands in for a tensor argument: its dtype and (relative) address only."""

    def __init__(self, tensor):
        self.dtype = tensor.dtype
        self._offset = tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        # Allocations are 256-byte aligned: only a view's offset can misalign.
        return 1024 + self._offset


def _backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", 90, 32))


def _specialize(backend, value, param) -> tuple[str, str | None]:
    """(type, hint) as Triton's JIT would give ``value``: type 'constexpr' for an int equal to 1."""
    from triton.runtime.jit import native_specialize_impl

    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        value = _Pointer(value)
    spec = native_specialize_impl(backend, value, param.is_const, not param.do_not_specialize,
                                  not param.do_not_specialize_on_alignment)
    return spec[0], spec[1]


def _bind(fn, args, kwargs) -> dict:
    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    for p in fn.params:
        if p.name not in bound and p.has_default:
            bound[p.name] = p.default
    return bound


def specs(launches, case: str = "") -> list[Spec]:
    """The compilations the recorded ``launches`` need on a GPU: one per (launch, autotune config)."""
    backend = _backend()
    out = []
    for kernel, args, kwargs in launches:
        kwargs = dict(kwargs)
        if isinstance(kernel, triton.runtime.Autotuner):
            fn = kernel.fn
            configs = kernel.fastdense_gpu_configs
            if kernel.fastdense_prune is not None and len(configs) > 1:
                configs = kernel.fastdense_prune(configs, dict(zip(kernel.arg_names, args)), **kwargs)
            variants = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in configs]
        else:
            fn = kernel
            variants = [({}, kwargs.pop("num_warps", 4), kwargs.pop("num_stages", 3))]
        for meta, warps, stages in variants:
            bound = _bind(fn, args, {**kwargs, **meta})
            signature, constexprs, divisible = [], [], set()
            for p in fn.params:
                value = bound[p.name]
                if p.is_constexpr:
                    constexprs.append((p.name, value))
                    continue
                ty, hint = _specialize(backend, value, p)
                if ty == "constexpr":
                    constexprs.append((p.name, value))
                else:
                    signature.append((p.name, ty))
                    if hint and "D" in hint:
                        divisible.add(p.name)
            out.append(Spec(fn, tuple(signature), tuple(constexprs), frozenset(divisible), warps, stages, case))
    return out


def meta_tensor(*shape, dtype):
    """An uninitialised ``meta`` tensor: shapes and strides for :func:`recording`, no memory."""
    import torch

    return torch.empty(*shape, dtype=dtype, device="meta")
