"""A name -> constructor registry for backbones, in timm's style.

A constructor registers itself with the :func:`register_model` decorator under its
function name; :func:`create_model` builds one by name. The registry is filled when
the module that defines a constructor is imported (``fastdense.models.swin``
registers ``swin_t``, ``swin_s`` and ``swin_b``), so this module imports none of
them: it stays free of dependencies and of import cycles.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])

# name -> constructor. Module-level so that every importer sees one registry.
_MODELS: dict[str, Callable[..., Any]] = {}
# name -> what the model is for: "backbone", "multitask" (forward(image) -> {task: output},
# trained by `fastdense train`) or "fewshot" (adapted by `fastdense adapt`).
_KINDS: dict[str, str] = {}
KINDS = ("backbone", "multitask", "fewshot")


def _origin(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', getattr(fn, '__name__', '?'))}"


def register_model(fn: _F | None = None, *, kind: str = "backbone"):
    """Register ``fn`` under ``fn.__name__`` and return it unchanged (a decorator).

    ``@register_model`` or ``@register_model(kind="multitask")``: ``kind`` is one of
    :data:`KINDS` and lets the command line offer the right models.
    A second, different function under a taken name raises ValueError. Registering
    the function of the same module and qualified name again (a module reload)
    replaces the entry instead, so that reloading a model file does not fail.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if fn is None:
        return lambda f: register_model(f, kind=kind)
    name = getattr(fn, "__name__", None)
    if not callable(fn) or not name:
        raise TypeError(f"register_model expects a named function, got {fn!r}")
    old = _MODELS.get(name)
    if old is not None and _origin(old) != _origin(fn):
        raise ValueError(f"model {name!r} is already registered (by {_origin(old)}); "
                         f"cannot register {_origin(fn)} under the same name")
    _MODELS[name] = fn
    _KINDS[name] = kind
    return fn


def is_model(name: str) -> bool:
    """Whether a constructor is registered under ``name``."""
    return name in _MODELS


def list_models(pattern: str = "*", kind: str | None = None) -> list[str]:
    """Registered names matching the shell-style ``pattern`` (case-sensitive), sorted;
    only those of ``kind`` when given."""
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern) and kind in (None, _KINDS[n]))


def model_kind(name: str) -> str:
    """The kind a model was registered with (ValueError for an unknown name)."""
    if name not in _KINDS:
        raise ValueError(f"unknown model {name!r}")
    return _KINDS[name]


def model_constructor(name: str) -> Callable[..., Any]:
    """The registered constructor (for introspection: which keyword arguments it takes)."""
    if name not in _MODELS:
        create_model(name)  # raises the ValueError with close matches
    return _MODELS[name]


def create_model(name: str, **kwargs: Any) -> Any:
    """Build the model registered as ``name`` with ``kwargs``.

    An unknown name raises ValueError naming the closest registered names and all of them.
    """
    fn = _MODELS.get(name)
    if fn is None:
        close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        known = ", ".join(sorted(_MODELS)) or "none (import the module that defines the model first)"
        raise ValueError(f"unknown model {name!r}.{hint} Registered models: {known}.")
    return fn(**kwargs)


__all__ = ["KINDS", "create_model", "is_model", "list_models", "model_constructor", "model_kind", "register_model"]
