"""The checks of every command's options, in one place: a schema per command.

A schema maps an option's Python name (``batch_size``) to a checker. A checker
takes the value as given (a flag's value parsed by argparse, or whatever a
``--config`` file held: a YAML ``true``, a string where a number belongs) and
returns it, normalised, or raises :class:`Invalid` saying what the value must
be. :func:`check_options` runs a schema over merged options and turns the first
failure into a :class:`~fastdense.cli._common.UsageError` naming the option
where the user wrote it: ``--steps`` for a flag, ``steps in config file
run.yaml`` for a config key.

Numbers are strict: a bool is not an int (``steps: true`` would otherwise
train for one step), a float is not an int, and NaN and infinities are not
numbers anyone means as a learning rate. Paths are checked for what the
command will do with them (a folder it will write into, a file it will read
or write) before any work starts, so a bad path fails in a second rather than
after training.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from fastdense.cli._common import UsageError

Checker = Callable[[Any], Any]

DEVICES = ("auto", "cpu", "cuda")
MAX_SEED = 2**32 - 1  # numpy's and the data generators' seeds stay below 2**32


class Invalid(ValueError):
    """What a value must be, as the rest of a sentence that starts with the option's name."""


def _got(value) -> str:
    return f"got {value!r}"


def integer(minimum: int | None = None, maximum: int | None = None, what: str | None = None) -> Checker:
    """An int (not a bool, not a float) in [minimum, maximum]."""
    if what is None:
        if minimum is not None and maximum is not None:
            what = f"an integer in [{minimum}, {maximum}]"
        elif minimum is not None:
            what = f"an integer >= {minimum}"
        else:
            what = "an integer"

    def check(value):
        if (not isinstance(value, int) or isinstance(value, bool)
                or (minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
            raise Invalid(f"must be {what}, {_got(value)}")
        return value

    return check


positive = integer(1, what="a positive integer")
non_negative = integer(0)
seed = integer(0, MAX_SEED)
threads = integer(0, what="an integer >= 0 (0 keeps torch's default)")


def number(minimum: float | None = None, above: float | None = None, maximum: float | None = None) -> Checker:
    """A finite int or float (not a bool) >= minimum / > above / <= maximum; returned as a float."""
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum:g}")
    if above is not None:
        bounds.append(f"> {above:g}")
    if maximum is not None:
        bounds.append(f"<= {maximum:g}")
    what = "a finite number" + (" " + " and ".join(bounds) if bounds else "")

    def check(value):
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or (minimum is not None and value < minimum) or (above is not None and value <= above)
                or (maximum is not None and value > maximum)):
            raise Invalid(f"must be {what}, {_got(value)}")
        return float(value)

    return check


probability = number(0.0, maximum=1.0)


def boolean(value):
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, {_got(value)}")
    return value


def text(value):
    """A non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"must be a non-empty string, {_got(value)}")
    return value


def choice(*values: str) -> Checker:
    def check(value):
        if not isinstance(value, str) or value not in values:
            raise Invalid(f"must be one of {', '.join(values)}, {_got(value)}")
        return value

    return check


device = choice(*DEVICES)


def optional(checker: Checker) -> Checker:
    """None (the option's "not given") or what ``checker`` accepts."""

    def check(value):
        return None if value is None else checker(value)

    return check


def name_list(value):
    """Names as a comma-separated string or a list of strings; returned as the string a flag takes."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        return ",".join(value)
    if isinstance(value, str) and value.strip():
        return value
    raise Invalid(f"must be comma-separated names or a list of names, {_got(value)}")


def resolution(value):
    if not isinstance(value, int) or isinstance(value, bool) or value % 4 or not 64 <= value <= 448:
        raise Invalid(f"must be a multiple of 4 in [64, 448], {_got(value)}")
    return value


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (a relative path ends at the working folder)."""
    while True:
        try:
            if path.exists() or path == path.parent:
                return path
        except OSError as exc:  # e.g. a folder on the way that may not be searched
            raise Invalid(f"must be a path that can be reached, but {path} cannot ({exc.strerror})") from None
        path = path.parent


def _can_write_in(folder: Path) -> None:
    # A real write rather than os.access: it also sees read-only mounts and ACLs, and asks the
    # file system the question the command will ask. The file disappears when closed.
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise Invalid(f"must be a writable location, but {folder} is not writable ({exc.strerror})") from None


def _writable_folder(path: Path, what: str, target: Path | None = None) -> None:
    """Invalid unless ``path`` is a folder that can be written into, or can be created as one;
    ``target`` (default ``path``) is what the user named, for the message."""
    target = path if target is None else target
    existing = _nearest_existing(path)
    if not existing.is_dir():
        where = "" if existing == target else f" (on the way to {target})"
        raise Invalid(f"must be {what}, but {existing}{where} is a file")
    _can_write_in(existing)


def writable_dir(value):
    """A folder that exists and can be written into, or a path where one can be created."""
    _writable_folder(Path(text(value)), "a folder")
    return value


def writable_file(value):
    """A file path that can be written: not a folder, in a folder that exists or can be created."""
    path = Path(text(value))
    if path.is_dir():
        raise Invalid(f"must be a file path, but {path} is a folder")
    _writable_folder(path.parent, "a file path in a folder", target=path)
    return value


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(opts: Mapping[str, Any], schema: Mapping[str, Checker],
                  sources: Mapping[str, str] | None = None) -> dict:
    """``opts`` with every option of ``schema`` checked and normalised, in the schema's order.

    ``sources`` names where an option came from (default: its flag); the first bad value
    raises UsageError naming it. Options not in the schema pass through unchecked.
    """
    sources = sources or {}
    checked = dict(opts)
    for name, checker in schema.items():
        if name not in opts:
            continue
        try:
            checked[name] = checker(opts[name])
        except Invalid as exc:
            raise UsageError(f"{sources.get(name, flag(name))} {exc}") from None
    return checked
