"""``fastdense demo``: ``info``, then every available backend of the multi-task
LoRA op checked against the reference and timed against the MTLoRA-style eager
loop, then the other ops' backends checked, then a short training of the tiny
multi-task model compared with a constant baseline."""
from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from fastdense._progress import ProgressBar
from fastdense.cli import _options as checks
from fastdense.cli._common import UsageError, pick_device, usage_error
from fastdense.cli._main import command
from fastdense.cli.info import print_info

# FASTDENSE_DEMO_STEPS sets the demo's default number of training steps; 0 skips the training
# part (a test suite that checks the op part of the demo sets it to stay fast).
DEMO_STEPS_ENV = "FASTDENSE_DEMO_STEPS"


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--time-budget", type=float, default=0.08, metavar="SECONDS",
                   help="time spent measuring each timing entry (default 0.08)")
    p.add_argument("--train-steps", type=int, default=None, metavar="N",
                   help=f"steps of the training part (default ${DEMO_STEPS_ENV} or 300; 0 skips it)")
    p.add_argument("--resolution", type=int, default=64, help="training image side (default 64)")
    p.add_argument("--run-dir", default=None, help="where the training run goes (default: a new temp dir)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for the training part (default 1; 0 keeps torch's default)")


# What each option must be (fastdense.cli._options); --train-steps, which may come from the
# environment, is checked in cmd_demo. Checked before the op part, which takes minutes, so a
# bad option of the training part does not fail only at the end.
DEMO_SCHEMA = {"device": checks.device, "time_budget": checks.number(0), "resolution": checks.resolution,
               "threads": checks.threads, "run_dir": checks.optional(checks.writable_dir)}


@command("demo", "print info, check and time every available backend of the multi-task LoRA op, "
                 "check every other op's backends, then train the tiny multi-task model briefly "
                 "and compare it with a trivial baseline",
         arguments=_demo_arguments)
def cmd_demo(args: argparse.Namespace) -> int:
    steps = args.train_steps
    if steps is None:
        env = os.environ.get(DEMO_STEPS_ENV, "").strip()
        try:
            steps = int(env) if env else 300
        except ValueError:
            print(f"fastdense demo: error: {DEMO_STEPS_ENV}={env!r} is not an integer", file=sys.stderr)
            return 2
    if steps < 0:
        source = "--train-steps" if args.train_steps is not None else DEMO_STEPS_ENV
        print(f"fastdense demo: error: {source} must be >= 0, got {steps}", file=sys.stderr)
        return 2
    try:
        checks.check_options(vars(args), DEMO_SCHEMA)
        pick_device(args.device)  # --device cuda on a machine without one is a usage error here too
    except UsageError as exc:
        return usage_error("demo", exc)
    # One thread by default: the tiny model's ops are too small to gain from more, and on a machine
    # shared with other jobs OpenMP threads spin-wait for each other (measured here: 0.23 s/step with
    # one thread, 1.7 s/step with two on 2 busy cores).
    training = {"steps": steps, "resolution": args.resolution, "run_dir": args.run_dir, "threads": args.threads}
    return run_demo(device=args.device, time_budget=args.time_budget, training=training)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def run_demo(device: str = "auto", time_budget: float = 0.08, out: TextIO = sys.stdout,
             training: dict | None = None) -> int:
    """Info, the op checks and timings, then (with ``training`` and ``training["steps"] > 0``) a
    short training of the tiny multi-task model that must beat a constant baseline on every task."""
    import torch

    from fastdense.cli import _demo_lora as lora
    from fastdense.cli._demo_ops import check_ops
    from fastdense.cli._demo_training import run_demo_training
    from fastdense.ops import _dispatch
    from fastdense.testing.backends import registered

    print_info(out)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("demo: --device cuda but no CUDA device is visible", file=out)
        return 1
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    case = lora.DemoCase()
    print("", file=out)
    print(f"demo: multi-task LoRA linear on {dev.type} {_dtype_name(dtype)}: "
          f"x ({case.batch}, {case.tokens}, {case.in_features}) -> {1 + case.tasks} outputs "
          f"({case.batch}, {case.tokens}, {case.out_features}); shared rank {case.shared_rank}, "
          f"{case.tasks} tasks of rank {case.task_rank}, scale {case.scale}", file=out)

    t64 = case.tensors(dev)
    probe_args = case.op_args(t64, dtype)
    # A user's FASTDENSE_BACKEND narrows the demo to that backend, as it narrows dispatch.
    try:
        forced = _dispatch.forced_backend()
    except ValueError as exc:  # FASTDENSE_BACKEND names no backend
        print(f"demo: FAIL: {exc}", file=out)
        return 2
    runnable, skipped = [], []
    for name, impl in registered("mt_lora_linear"):
        reasons = impl.reasons(*probe_args)
        if forced and name != forced:
            skipped.append((name, [f"not selected (FASTDENSE_BACKEND={forced})"]))
        elif reasons:
            skipped.append((name, reasons))
        else:
            runnable.append(name)
    for name, reasons in skipped:
        print(f"  {name:<8} skipped: " + "; ".join(reasons), file=out)
    if not runnable:
        what = f"the forced backend {forced!r}" if forced else "no backend"
        print(f"demo: FAIL: {what} cannot run on {dev.type} {_dtype_name(dtype)}", file=out)
        return 1

    want = lora.expected(case, t64, dtype, dev)
    failures = 0
    results: dict[str, dict[str, float]] = {}
    bar = ProgressBar(len(runnable) * 3 + 2, stream=out)
    check_lines = []
    for name in runnable:
        try:
            ok, text = lora.check_line(name, case, t64, want, dtype, dev)
        except Exception as exc:  # a backend that claims it can run but raises is a failure, not a skip
            check_lines.append(f"  {name:<8} FAIL  raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            failures += 1
            for _ in range(3):  # its check and both timings are off
                bar.step(f"{name} failed")
            continue
        check_lines.append(text)
        failures += 0 if ok else 1
        bar.step(f"{name} checked")
        results[name] = lora.time_fused(name, t64, case, dtype, dev, time_budget, bar)
    results["mtlora-loop"] = lora.time_loop(t64, case, dtype, dev, time_budget, bar)

    print("", file=out)
    print("checks (forward and gradients of x, lora_a, lora_b):", file=out)
    for text in check_lines:
        print(text, file=out)
    print("", file=out)
    print(f"timing (median of repeated runs, {dev.type}, {_dtype_name(dtype)}; speed-up is the "
          "MTLoRA-style eager loop's time divided by the row's):", file=out)
    print(f"  {'implementation':<20} {'forward ms':>11} {'fwd+bwd ms':>11} {'speed-up fwd':>13} {'speed-up f+b':>13}",
          file=out)
    base = results["mtlora-loop"]
    for name, r in results.items():
        label = "mtlora-loop (eager)" if name == "mtlora-loop" else f"fused [{name}]"
        print(f"  {label:<20} {r['fwd']:>11.3f} {r['fwdbwd']:>11.3f} "
              f"{base['fwd'] / r['fwd']:>12.2f}x {base['fwdbwd'] / r['fwdbwd']:>12.2f}x", file=out)
    print("", file=out)
    print(f"checks of the other ops on {dev.type} {_dtype_name(dtype)} (forward and gradients "
          "vs the float64 reference):", file=out)
    op_failures, op_passed = check_ops(dev, dtype, forced, out)
    print("", file=out)
    failures += op_failures
    if failures:
        print(f"demo: FAIL ({failures} backend(s) failed the check)", file=out)
        return 1
    if training and training.get("steps", 0) > 0:
        try:
            trained = run_demo_training(training["steps"], run_dir=training.get("run_dir"),
                                        resolution=training.get("resolution", 64),
                                        threads=training.get("threads", 0), device=dev.type,
                                        val_samples=training.get("val_samples", 64), out=out)
        except UsageError as exc:
            print(f"demo: FAIL: {exc}", file=out)
            return 2
        if trained != 0:
            print("demo: FAIL (training did not beat the trivial baseline)", file=out)
            return 1
        print("", file=out)
    print(f"demo: PASS ({len(runnable)} backend(s) match the reference; other ops: {op_passed} op-backend "
          "pairs match)", file=out)
    return 0
