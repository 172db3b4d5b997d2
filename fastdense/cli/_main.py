"""The command registry, the parser built from it, and ``main``.

A command is one function ``fn(args) -> exit code`` registered with
:func:`command`, plus, if it takes options, an ``arguments`` callback that
adds them; the module of each command holds both, so the parser is never
edited by hand.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Callable


@dataclasses.dataclass
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


# In registration order, which is the order of `fastdense --help`.
COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register ``fn(args) -> exit code`` as the subcommand ``name``."""

    def register(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = Command(name, help, fn, arguments)
        return fn

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdense",
        description="Fused kernels and modules for parameter-efficient multi-task and few-shot dense prediction.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.arguments is not None:
            cmd.arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)
