"""What several commands share: usage errors and the device option."""
from __future__ import annotations

import os
import sys


class UsageError(Exception):
    """A bad option, path or configuration: reported in one line, exit code 2."""


def usage_error(cmd: str, exc: Exception) -> int:
    print(f"fastdense {cmd}: error: {exc}", file=sys.stderr)
    return 2


def require_file(path: str, what: str) -> None:
    """UsageError unless ``path`` is a file: "<what> not found: <path>", or that it is a folder."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a folder, not a file")
    if not os.path.isfile(path):
        raise UsageError(f"{what} not found: {path}")


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message, else its type's name (an empty message
    must not turn the report of one error into an IndexError of its own)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def pick_device(name: str):
    """``--device auto|cpu|cuda`` as a torch.device; auto is cuda when one is visible."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible")
    return torch.device(name)
