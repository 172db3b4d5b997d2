"""Checkpoints that load with ``torch.load(weights_only=True)``.

Everything stored is a tensor or a primitive container (dict, list, int,
float, str, bool, None): the weights-only unpickler refuses arbitrary
objects, which is what makes loading an untrusted checkpoint safe. RNG states
are therefore converted to tensors (numpy's and Python's states are tuples of
numbers and an array) and rebuilt on load.

Writes are atomic: the file is written next to its destination and moved
over it with ``os.replace``, so an interrupted save never leaves a truncated
checkpoint under the final name.

A file that is empty, truncated, not a torch file, refused by the weights-only
unpickler, or not laid out as :func:`save_checkpoint` writes it raises
:class:`CheckpointError` naming the file; weights that do not fit the model
raise it from :func:`restore`, with a one-line summary of what differs.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

FORMAT_VERSION = 1


class CheckpointError(ValueError, pickle.UnpicklingError):
    """A file that is not a readable checkpoint, or weights that do not fit the model.

    Also an ``UnpicklingError``: that is what loading a file the weights-only
    unpickler refuses raised before this class existed, so callers that catch it
    keep working. ``problem`` is the reason alone ("the file is empty"), for
    callers that phrase their own sentence; ``path`` names the file (None when
    raised by :func:`restore`, which only sees the loaded dict).
    """

    def __init__(self, problem: str, path=None) -> None:
        super().__init__(problem if path is None else f"{path} is not a checkpoint: {problem}")
        self.problem = problem
        self.path = None if path is None else str(path)


# What torch.load raises on bytes that are not a checkpoint it can read. Its zip reader,
# pickle machine and storage rebuilder each fail in their own way on foreign, truncated or
# corrupted files (seen by feeding it truncations, bit flips and random bytes: all of these
# occurred); the call reads nothing but the file, so each of them means a bad file.
_DECODE_ERRORS = (pickle.UnpicklingError, EOFError, RuntimeError, UnicodeDecodeError, ValueError, KeyError,
                  IndexError, TypeError, AttributeError, AssertionError, OverflowError, struct.error, OSError)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _decode_reason(exc: BaseException) -> str:
    """One line saying why torch.load failed: its messages span many lines (with terminal
    colour codes), and some are empty (EOFError) or a bare key (KeyError: '101')."""
    text = _ANSI.sub("", str(exc))
    if "WeightsUnpickler error:" in text:
        # The rest is advice on loading untrusted files unsafely; only the refusal's reason helps.
        after = text.split("WeightsUnpickler error:", 1)[1]
        detail = next((ln.strip() for ln in after.splitlines() if ln.strip()), "")
        detail = detail.split(". ")[0].rstrip(".")
        return "refused by the weights-only unpickler" + (f": {detail}" if detail else "")
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line if len(line) <= 160 else line[:157] + "..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


# ----------------------------------------------------------------------------- RNG states
def rng_state() -> Dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and Python ``random`` states as tensors/primitives."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        # Python's Mersenne-Twister state is 625 ints below 2**32: they fit in int64.
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


# ----------------------------------------------------------------------------- save / load
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # A DDP-wrapped model's keys carry a "module." prefix; checkpoints hold the bare model's.
    return getattr(model, "module", model)


def save_checkpoint(path, *, model: torch.nn.Module, step: int, optimizer=None, scheduler=None,
                    sampler=None, config: Optional[Dict[str, Any]] = None,
                    metrics: Optional[Dict[str, Any]] = None) -> Path:
    """Write model, optimiser, scheduler and sampler states, RNG states, ``step`` and
    ``config`` (a dict of primitives, e.g. how to rebuild the model) atomically to ``path``."""
    ckpt = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "sampler": sampler.state_dict() if sampler is not None else None,
        "rng": rng_state(),
        "config": dict(config or {}),
        "metrics": dict(metrics or {}),
    }
    return atomic_torch_save(ckpt, path)


def load_checkpoint(path, map_location="cpu") -> Dict[str, Any]:
    """Read a checkpoint with the weights-only unpickler.

    A missing file raises FileNotFoundError naming it; a file that cannot be read as a
    checkpoint, or holds something other than the dict :func:`save_checkpoint` writes
    (at least ``step`` and ``model``), raises :class:`CheckpointError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError("the file is empty", path)
    try:
        with warnings.catch_warnings():
            # Plain pickles (not torch.save's) make the weights-only unpickler warn about their
            # protocol before it fails on them; the error below says it all, in one line.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except _DECODE_ERRORS as exc:
        raise CheckpointError(f"torch cannot read it ({_decode_reason(exc)})", path) from exc
    problem = _layout_problem(ckpt)
    if problem:
        raise CheckpointError(problem, path)
    return ckpt


def _layout_problem(ckpt: Any) -> Optional[str]:
    if not isinstance(ckpt, dict):
        return f"it holds a {type(ckpt).__name__}, not a dict of states"
    missing = [k for k in ("step", "model") if k not in ckpt]
    if missing:
        return f"it lacks {' and '.join(repr(k) for k in missing)} (found keys {sorted(map(str, ckpt))[:8]})"
    if not isinstance(ckpt["step"], int) or isinstance(ckpt["step"], bool):
        return f"its 'step' is a {type(ckpt['step']).__name__}, not an int"
    if not isinstance(ckpt["model"], dict):
        return f"its 'model' is a {type(ckpt['model']).__name__}, not a state dict"
    if not isinstance(ckpt.get("config", {}), dict):
        return f"its 'config' is a {type(ckpt['config']).__name__}, not a dict"
    return None


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


def weights_mismatch(model: torch.nn.Module, state: Dict[str, Any]) -> Optional[str]:
    """Why ``state`` would not load into ``model`` (strictly), in one line; None when it fits.

    load_state_dict says the same over many lines, headed by a line that names nothing; a
    command line reports one line, so this counts each kind of difference and names the first.
    """
    own = _unwrap(model).state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    # Only tensors are compared: a module's extra state (get_extra_state) may be anything.
    reshaped = [k for k, v in own.items() if k in state and isinstance(v, torch.Tensor)
                and (not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]!r})")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape (first {k!r}: {_shape(state[k])} in the checkpoint, "
                     f"{_shape(own[k])} in the model)")
    return "; ".join(parts) or None


def restore(ckpt: Dict[str, Any], *, model: torch.nn.Module, optimizer=None, scheduler=None, sampler=None,
            rng: bool = True) -> int:
    """Load the states of ``ckpt`` into the given objects; returns the step to continue from.

    Weights that do not fit ``model`` raise :class:`CheckpointError` before anything is loaded.
    """
    problem = weights_mismatch(model, ckpt["model"])
    if problem:
        raise CheckpointError(f"its weights do not fit {type(_unwrap(model)).__name__}: {problem}")
    _unwrap(model).load_state_dict(ckpt["model"])
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if sampler is not None and ckpt.get("sampler") is not None:
        sampler.load_state_dict(ckpt["sampler"])
    if rng:
        set_rng_state(ckpt["rng"])
    return int(ckpt["step"])
