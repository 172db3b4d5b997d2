"""``fastdense bench``: the pytest-benchmark suite of bench/ into ``bench/results/<device-name>.json``."""
from __future__ import annotations

import argparse
import os
import sys

from fastdense._device import device_tag
from fastdense.cli import _options as checks
from fastdense.cli._common import UsageError, usage_error
from fastdense.cli._main import command


def _have_pytest_benchmark() -> bool:
    import importlib.util

    return importlib.util.find_spec("pytest_benchmark") is not None


def _find_bench_dir(given: str | None) -> str:
    if given is not None:
        candidates = [given]
    else:
        # ./bench from a checkout, else the bench/ next to an editable install's package.
        import fastdense

        candidates = ["bench", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(fastdense.__file__))),
                                            "bench")]
    for c in candidates:
        if os.path.isfile(os.path.join(c, "conftest.py")):
            return os.path.abspath(c)
    raise UsageError(f"no benchmark suite (bench/conftest.py) found in {', '.join(candidates)}; "
                     "run from the fastdense source tree or pass --bench-dir")


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-k", dest="keyword", metavar="EXPRESSION", help="pytest -k expression selecting benchmarks")
    p.add_argument("--bench-dir", help="the benchmark suite folder (default ./bench, else the source tree's)")
    p.add_argument("--output", metavar="FILE",
                   help="benchmark JSON (default <bench-dir>/results/<device-name>.json)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER,
                   help="further pytest arguments, after -- (e.g. -- -x --benchmark-min-rounds=3)")


@command("bench", "run the pytest-benchmark suite in bench/ and write bench/results/<device-name>.json",
         arguments=_bench_arguments)
def cmd_bench(args: argparse.Namespace) -> int:
    import subprocess

    try:
        if not _have_pytest_benchmark():
            raise UsageError("pytest-benchmark is not installed; pip install pytest-benchmark")
        bench_dir = _find_bench_dir(args.bench_dir)
        # Written after the whole suite has run: a path that cannot take it must fail first.
        checks.check_options(vars(args), {"output": checks.optional(checks.writable_file)})
    except UsageError as exc:
        return usage_error("bench", exc)
    output = os.path.abspath(args.output or os.path.join(bench_dir, "results", f"{device_tag()}.json"))
    os.makedirs(os.path.dirname(output), exist_ok=True)
    # pytest-benchmark writes its JSON even when nothing ran or a benchmark failed; writing to a
    # temporary name first keeps an earlier complete result from being overwritten by such a run.
    tmp = f"{output}.{os.getpid()}.tmp"
    extra = list(args.pytest_args or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    cmd = [sys.executable, "-m", "pytest", bench_dir, "-q", f"--benchmark-json={tmp}"]
    if args.keyword:
        cmd += ["-k", args.keyword]
    cmd += extra
    try:
        rc = subprocess.run(cmd, cwd=os.path.dirname(bench_dir)).returncode
        if rc == 0 and os.path.isfile(tmp):
            os.replace(tmp, output)
            print(f"benchmark results: {output}")
            return 0
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if rc == 0:  # e.g. --benchmark-disable: the tests ran but pytest-benchmark wrote no data
        print(f"fastdense bench: error: the benchmarks ran but wrote no timings; {output} left unchanged",
              file=sys.stderr)
        return 1
    if rc == 5:
        sel = f" matched -k {args.keyword!r}" if args.keyword else " were collected"
        print(f"fastdense bench: error: no benchmarks{sel}; nothing written to {output}", file=sys.stderr)
        return 2
    print(f"fastdense bench: pytest exited with {rc}; {output} left unchanged", file=sys.stderr)
    return rc or 1
