"""Which backends of an op can run here, and running one on purpose.

Forcing goes through :func:`fastdense.ops.backend` only: the backend the
forward ran is carried into its backward, whichever thread autograd runs that
on, so nothing needs the ``FASTDENSE_BACKEND`` environment variable (which
stays a user's setting).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from fastdense.ops import _dispatch
from fastdense.ops._dispatch import Backend, BackendNotSupportedError


def registered(op: str) -> list[tuple[str, Backend]]:
    """``op``'s backends in the order of :data:`fastdense.ops.BACKENDS`."""
    return sorted(_dispatch.implementations(op).items(), key=lambda kv: _dispatch.BACKENDS.index(kv[0]))


def unavailable(op: str, name: str, *args) -> list[str]:
    """Why backend ``name`` cannot run ``op`` here: on ``args`` (the op's
    internal arguments) when given, else on this machine at all. Empty when it can."""
    impl = _dispatch.implementations(op).get(name)
    if impl is None:
        return [f"{op} has no {name} backend"]
    return impl.reasons(*args) if args else impl.machine_reasons()


@contextlib.contextmanager
def forced(name: str | None, op: str | None = None, *args) -> Iterator[None]:
    """Run the block with every fastdense op on backend ``name`` (None: automatic
    dispatch, whatever FASTDENSE_BACKEND says).

    With ``op`` (and its internal arguments), first raise
    :class:`BackendNotSupportedError` with the reasons when ``name`` cannot run
    them, so a benchmark or check can skip before it builds anything.
    """
    if name is not None and op is not None:
        reasons = unavailable(op, name, *args)
        if reasons:
            raise BackendNotSupportedError(f"{name}: " + "; ".join(reasons))
    with _dispatch.backend(name):
        yield
