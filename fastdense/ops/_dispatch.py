"""Backends, what each one supports, and the choice of one per call.

Each op has one :class:`Backend` per implementation (``cuda``, ``triton``,
``cpp``, ``torch``). A backend answers two questions with *lists of reasons*
rather than booleans, in the style of xformers' ``not_supported_reasons``:

* ``machine_reasons()`` -- why it cannot run on this machine at all (extension
  not built, triton missing, no GPU). Printed by ``python -m fastdense info``.
* ``input_reasons(*args)`` -- why it cannot run on these particular inputs.
  Every backend answers it the same way from what it declares: the device it
  runs, the dtypes it supports (both read off the op's *lead* argument) and its
  :class:`Limit` s (e.g. "head dim d <= 256").

Dispatch picks the first backend of the device's priority list with no
reasons. A forced backend (``FASTDENSE_BACKEND`` or :func:`backend`) that has
reasons raises :class:`BackendNotSupportedError` listing them, so a benchmark or
test never silently measures a different backend than it asked for.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from typing import Callable, Iterator, Sequence

import torch

BACKENDS = ("cuda", "triton", "cpp", "torch")

# Order tried for tensors on each device type. Triton on CPU tensors only runs
# under TRITON_INTERPRET=1 (tests), so it is never chosen automatically there.
PRIORITY = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpp", "torch"),
}
DEFAULT_PRIORITY = ("torch",)

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fastdense_backend", default=None
)


class BackendNotSupportedError(RuntimeError):
    """A forced backend cannot run the op on the given inputs."""


def _no_reasons() -> list[str]:
    return []


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


@dataclasses.dataclass(frozen=True)
class Limit:
    """One declared limit of a backend: ``value(*args)`` must be <= ``maximum`` or in ``allowed``.

    ``maximum``/``allowed`` may be callables, read when checked: kernel limits
    exported by the compiled extension are known only once it is loaded.
    """

    what: str
    value: Callable[..., int]
    maximum: int | Callable[[], int | None] | None = None
    allowed: Sequence[int] | Callable[[], Sequence[int] | None] | None = None

    def reasons(self, backend: str, args) -> list[str]:
        maximum = self.maximum() if callable(self.maximum) else self.maximum
        allowed = self.allowed() if callable(self.allowed) else self.allowed
        if maximum is None and allowed is None:
            return []
        v = self.value(*args)
        if maximum is not None and v > maximum:
            return [f"{backend} supports {self.what} <= {maximum}, got {v}"]
        if allowed is not None and v not in allowed:
            return [f"{backend} supports {self.what} in {tuple(allowed)}, got {v}"]
        return []


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of an op and what it supports.

    ``device`` is the device type it runs ("cpu", "cuda"), None for any, or
    "triton" (CUDA tensors, or CPU tensors in the Triton interpreter);
    ``dtypes`` the lead argument's dtypes it takes (None: any). ``forward(*args)``
    and ``backward(*grads, *saved, needs)`` follow the op's tensor contract.
    """

    backend: str
    forward: Callable
    backward: Callable
    device: str | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    limits: tuple[Limit, ...] = ()
    machine: Callable[[], list[str]] = _no_reasons
    op: str = ""
    lead: int = 0  # index of the argument whose device and dtype are checked

    @property
    def name(self) -> str:
        return self.backend

    def machine_reasons(self) -> list[str]:
        return list(self.machine())

    def input_reasons(self, *args) -> list[str]:
        x = args[self.lead]
        if self.device == "triton":
            from fastdense import _triton

            reasons = _triton.device_reasons(x)
        elif self.device is not None and x.device.type != self.device:
            reasons = [f"{self.backend} runs {self.device.upper()} tensors, got {x.device.type}"]
        else:
            reasons = []
        if reasons:
            return reasons
        if self.dtypes is not None and x.dtype not in self.dtypes:
            return [f"{self.backend} supports {dtype_names(self.dtypes)}, got {x.dtype}"]
        return [r for limit in self.limits for r in limit.reasons(self.backend, args)]

    def reasons(self, *args) -> list[str]:
        return self.machine_reasons() or self.input_reasons(*args)


_REGISTRY: dict[str, dict[str, Backend]] = {}


def register(op: str, impl: Backend) -> Backend:
    if impl.backend not in BACKENDS:
        raise ValueError(f"unknown backend {impl.backend!r}; expected one of {BACKENDS}")
    impl = dataclasses.replace(impl, op=op)
    _REGISTRY.setdefault(op, {})[impl.backend] = impl
    return impl


def ops() -> list[str]:
    return sorted(_REGISTRY)


def implementations(op) -> dict[str, Backend]:
    """The backends of ``op`` (its name, or the declared operator itself)."""
    op = getattr(op, "name", op)
    try:
        return _REGISTRY[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; registered ops: {ops()}") from None


def _validate_backend_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a backend; expected one of {BACKENDS}")
    return name


def forced_backend() -> str | None:
    """The backend forced by :func:`backend` (innermost wins) or FASTDENSE_BACKEND."""
    name = _forced.get()
    if name is not None:
        return name or None  # "" is backend(None): automatic, whatever the environment says
    env = os.environ.get("FASTDENSE_BACKEND", "").strip()
    if env and env != "auto":
        return _validate_backend_name(env, "FASTDENSE_BACKEND")
    return None


@contextlib.contextmanager
def backend(name: str | None) -> Iterator[None]:
    """Force every fastdense op inside the block onto one backend.

    The forward's choice is carried into the backward, so a backward that
    autograd runs on another thread uses it too. ``backend(None)`` (or
    ``"auto"``) restores automatic selection, overriding FASTDENSE_BACKEND for
    the block.
    """
    if name == "auto":
        name = None
    if name is not None:
        _validate_backend_name(name, "backend")
    token = _forced.set(name if name is not None else "")
    try:
        yield
    finally:
        _forced.reset(token)


def select(op, device_type: str, *args) -> Backend:
    """Return the backend that will run ``op`` (a name or a declared operator) on ``args``."""
    op = getattr(op, "name", op)
    impls = implementations(op)
    name = forced_backend()
    if name:
        impl = impls.get(name)
        if impl is None:
            raise BackendNotSupportedError(
                f"fastdense op {op!r} has no {name!r} backend (it has {sorted(impls)})"
            )
        reasons = impl.reasons(*args)
        if reasons:
            raise BackendNotSupportedError(
                f"backend {name!r} was forced for op {op!r} but cannot run these inputs: "
                + "; ".join(reasons)
            )
        return impl
    tried = []
    for candidate in PRIORITY.get(device_type, DEFAULT_PRIORITY):
        impl = impls.get(candidate)
        if impl is None:
            continue
        reasons = impl.reasons(*args)
        if not reasons:
            return impl
        tried.append(f"{candidate}: {'; '.join(reasons)}")
    raise BackendNotSupportedError(
        f"no backend of op {op!r} can run these inputs on {device_type!r}: " + " | ".join(tried)
    )


def machine_report() -> dict[str, dict[str, list[str]]]:
    """{op: {backend: reasons it is unavailable on this machine ([] = available)}}."""
    return {
        op: {name: list(impl.machine_reasons()) for name, impl in sorted(
            _REGISTRY[op].items(), key=lambda kv: BACKENDS.index(kv[0]))}
        for op in ops()
    }
