"""Checkpoints that load with ``torch.load(weights_only=True)``.

Everything stored is a tensor or a primitive container (dict, list, int,
float, str, bool, None): the weights-only unpickler refuses arbitrary
objects, which is what makes loading an untrusted checkpoint safe. RNG states
are therefore converted to tensors (numpy's and Python's states are tuples of
numbers and an array) and rebuilt on load.

Writes are atomic: the file is written next to its destination and moved
over it with ``os.replace``, so an interrupted save never leaves a truncated
checkpoint under the final name.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

FORMAT_VERSION = 1


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
    """Read a checkpoint with the weights-only unpickler; a missing file raises FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def restore(ckpt: Dict[str, Any], *, model: torch.nn.Module, optimizer=None, scheduler=None, sampler=None,
            rng: bool = True) -> int:
    """Load the states of ``ckpt`` into the given objects; returns the step to continue from."""
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
