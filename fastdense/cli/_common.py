"""What several commands share: usage errors and the device option."""
from __future__ import annotations

import sys


class UsageError(Exception):
    """A bad option, path or configuration: reported in one line, exit code 2."""


def usage_error(cmd: str, exc: Exception) -> int:
    print(f"fastdense {cmd}: error: {exc}", file=sys.stderr)
    return 2


def pick_device(name: str):
    """``--device auto|cpu|cuda`` as a torch.device; auto is cuda when one is visible."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible")
    return torch.device(name)
