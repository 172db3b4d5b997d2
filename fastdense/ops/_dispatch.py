"""Backend registry and dispatch shared by every fastdense op.

Each op registers one implementation per backend (``cuda``, ``triton``,
``cpp``, ``torch``). An implementation answers two questions with *lists of
reasons* rather than booleans, in the style of xformers' ``not_supported_reasons``:

* ``machine_reasons()`` -- why it cannot run on this machine at all (extension
  not built, triton missing, no GPU). Printed by ``python -m fastdense info``.
* ``input_reasons(*args)`` -- why it cannot run on these particular inputs
  (device, dtype, shape limits).

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
from typing import Callable, Iterator

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


@dataclasses.dataclass(frozen=True)
class Implementation:
    op: str
    backend: str
    forward: Callable
    backward: Callable | None
    machine_reasons: Callable[[], list[str]]
    input_reasons: Callable[..., list[str]]

    def reasons(self, *args) -> list[str]:
        return list(self.machine_reasons()) or list(self.input_reasons(*args))


_REGISTRY: dict[str, dict[str, Implementation]] = {}


def register(
    op: str,
    backend: str,
    *,
    forward: Callable,
    backward: Callable | None = None,
    machine_reasons: Callable[[], list[str]] = lambda: [],
    input_reasons: Callable[..., list[str]] = lambda *a: [],
) -> Implementation:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    impl = Implementation(op, backend, forward, backward, machine_reasons, input_reasons)
    _REGISTRY.setdefault(op, {})[backend] = impl
    return impl


def device_dtype_reasons(backend: str, x, device_type: str, dtypes=None) -> list[str]:
    """Why ``backend``, which runs ``device_type`` tensors of ``dtypes`` (None: any), cannot take ``x``."""
    if x.device.type != device_type:
        return [f"{backend} runs {device_type.upper()} tensors, got {x.device.type}"]
    if dtypes is not None and x.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        return [f"{backend} supports {names}, got {x.dtype}"]
    return []


def ops() -> list[str]:
    return sorted(_REGISTRY)


def implementations(op: str) -> dict[str, Implementation]:
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
        return name
    env = os.environ.get("FASTDENSE_BACKEND", "").strip()
    if env and env != "auto":
        return _validate_backend_name(env, "FASTDENSE_BACKEND")
    return None


@contextlib.contextmanager
def backend(name: str | None) -> Iterator[None]:
    """Force every fastdense op inside the block onto one backend.

    ``backend(None)`` (or ``"auto"``) restores automatic selection, overriding
    FASTDENSE_BACKEND for the block.
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


def select(op: str, device_type: str, *args) -> Implementation:
    """Return the implementation that will run ``op`` on ``args``."""
    impls = implementations(op)
    name = forced_backend()
    if name:  # "" means explicitly automatic inside backend(None)
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
