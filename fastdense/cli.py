"""The ``fastdense`` command (also ``python -m fastdense``).

Subcommands register themselves with :func:`command`; a later one (train,
eval, adapt, ...) is one decorated function plus, if it takes options, an
``arguments`` callback, so the parser is never edited by hand.

* ``info``         what was built and which backend each op would run on
* ``device-name``  a short file-name-safe tag of this machine's accelerator
                   (names the benchmark JSON: ``bench/results/<tag>.json``)
* ``demo``         ``info``, then every available backend of the multi-task
                   LoRA op checked against the reference and timed against
                   the MTLoRA-style eager loop, then a short training of the
                   tiny multi-task model compared with a constant baseline
* ``train``        train a model on the synthetic scenes (``--help`` lists the options)
* ``eval``         evaluate a training checkpoint and print its metrics
* ``adapt``        few-shot: meta-train (or load) a tiny token matcher, fine-tune it
                   on N shots of the held-out fold's tasks, mean ± std over R support sets
* ``bench``        run the pytest-benchmark suite into ``bench/results/<device-name>.json``
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable, Iterator, TextIO

# ----------------------------------------------------------------------------- command registry


@dataclasses.dataclass
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


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


# ----------------------------------------------------------------------------- device-name


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# Marketing words that name a product line rather than the chip; dropping
# them keeps "NVIDIA GeForce RTX 4090" and "Tesla V100-SXM2" short and stable.
_GPU_NOISE = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct", "graphics"}


def gpu_tag(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100"``; vendor, then words up to the model number."""
    vendor = "amd" if re.search(r"\b(amd|radeon|instinct)\b", name, re.I) else "nvidia"
    words = [w for w in re.split(r"[\s\-_/]+", name.lower()) if w and w not in _GPU_NOISE]
    model = []
    for w in words:
        model.append(w)
        if re.search(r"\d", w):  # the model number ends the tag: memory sizes and form factors follow it
            break
    return _slug("-".join([vendor] + model[:3])) or vendor


# Words in /proc/cpuinfo model names that say nothing about the chip.
_CPU_NOISE = {"r", "tm", "cpu", "processor", "core", "with", "radeon", "graphics"}


def cpu_tag(model_name: str | None = None) -> str:
    """``"Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"`` -> ``"cpu-intel-xeon-platinum-8481c-<n>c"``.

    The core count is part of the tag because the same CPU model measured on
    a 2-core slice and on a whole socket must not overwrite each other's results.
    """
    if model_name is None:
        model_name = _cpu_model_name()
    name = model_name.split("@")[0]
    name = re.sub(r"\(.*?\)", " ", name)
    name = re.sub(r"\b\d+-core\b", " ", name, flags=re.I)
    words = [w for w in re.split(r"[^A-Za-z0-9]+", name.lower()) if w and w not in _CPU_NOISE]
    model = "-".join(words[:4]) or _slug(platform.machine()) or "unknown"
    return f"cpu-{_slug(model)}-{os.cpu_count() or 1}c"


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_tag() -> str:
    """Tag of the device benchmarks run on: the first CUDA GPU if any, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return gpu_tag(torch.cuda.get_device_name(0))
    return cpu_tag()


@command("device-name", "print a short file-name-safe tag of this machine's accelerator (GPU, else CPU)")
def cmd_device_name(args: argparse.Namespace) -> int:
    print(device_tag())
    return 0


# ----------------------------------------------------------------------------- info


def _kernel_registrations() -> list[tuple[str, bool, bool]]:
    """(op, has CPU kernel, has CUDA kernel) for the internal ops fastdense._C declares.

    The extension can load and still lack a kernel (a source file missing from
    the build); this is the line of ``info`` that shows it. By convention the
    C++-declared ops are the underscore-prefixed ones of the namespace.
    """
    import torch

    try:
        names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastdense::_"))
        return [(n, torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU"),
                 torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")) for n in names]
    except Exception:  # private API; info must still print the rest
        return []


def _auto_pick(op: str, device_type: str) -> str:
    """The backend automatic dispatch tries first that this machine can run.

    Only machine reasons are known without inputs; dtype or shape limits of
    the chosen backend can still send a particular call further down the list.
    """
    from fastdense.ops import _dispatch

    impls = _dispatch.implementations(op)
    refused = []
    for name in _dispatch.PRIORITY.get(device_type, _dispatch.DEFAULT_PRIORITY):
        impl = impls.get(name)
        if impl is None:
            continue
        reasons = impl.machine_reasons()
        if not reasons:
            return name
        refused.append(name)
    return f"none (refused: {', '.join(refused)})"


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def print_info(out: TextIO = sys.stdout) -> None:
    import torch

    import fastdense
    from fastdense import _ext, _triton
    from fastdense.ops import _dispatch

    def line(key: str, value: str) -> None:
        print(f"{key:<18} {value}", file=out)

    line("fastdense", f"{fastdense.__version__} ({os.path.dirname(fastdense.__file__)})")
    line("python", f"{platform.python_version()} ({sys.executable})")
    line("torch", torch.__version__)
    triton_err = _triton.import_error()
    if triton_err is None:
        import triton

        line("triton", triton.__version__)
    else:
        line("triton", f"not installed ({triton_err})")
    if torch.version.cuda is None:
        line("CUDA", "torch built without CUDA")
    elif torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        line("CUDA", f"{torch.version.cuda}, devices: {names}")
    else:
        line("CUDA", f"{torch.version.cuda}, no CUDA device visible")
    if _ext.available():
        line("fastdense._C", f"loaded ({getattr(_ext._C, '__file__', '?')})")
    else:
        line("fastdense._C", f"not loaded: {_ext.load_error}")
    line("  CPU kernels", _yes_no(_ext.available()))
    line("  CUDA kernels", _yes_no(_ext.has_cuda_kernels()))
    for op, cpu, cuda in _kernel_registrations():
        line(f"  {op}", f"CPU kernel: {_yes_no(cpu)}, CUDA kernel: {_yes_no(cuda)}")
    line("threads", _threads_summary())
    line("FASTDENSE_BACKEND", os.environ.get("FASTDENSE_BACKEND") or "not set (automatic dispatch)")
    if os.environ.get("TRITON_INTERPRET"):
        line("TRITON_INTERPRET", os.environ["TRITON_INTERPRET"])

    print("", file=out)
    print("ops and backends (dispatch order: CUDA tensors "
          + " > ".join(_dispatch.PRIORITY["cuda"]) + "; CPU tensors "
          + " > ".join(_dispatch.PRIORITY["cpu"]) + ")", file=out)
    forced = os.environ.get("FASTDENSE_BACKEND", "").strip()
    for op, backends in _dispatch.machine_report().items():
        print(f"  {op}", file=out)
        for name, reasons in backends.items():
            status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            print(f"    {name:<8} {status}", file=out)
        cuda_pick = _auto_pick(op, "cuda") if torch.cuda.is_available() else "n/a (no CUDA device)"
        print(f"    auto     CPU tensors -> {_auto_pick(op, 'cpu')}; CUDA tensors -> {cuda_pick}", file=out)
        if forced and forced != "auto":
            print(f"    forced   FASTDENSE_BACKEND={forced} overrides automatic dispatch", file=out)


def _threads_summary() -> str:
    import torch

    backend = "unknown"
    for text in torch.__config__.parallel_info().splitlines():
        if text.startswith("ATen parallel backend:"):
            backend = text.split(":", 1)[1].strip()
    return (f"ATen {backend}, intra-op {torch.get_num_threads()}, "
            f"inter-op {torch.get_num_interop_threads()}, CPUs {os.cpu_count()}")


@command("info", "print versions, what fastdense._C was built with, and each op's backends")
def cmd_info(args: argparse.Namespace) -> int:
    print_info()
    return 0


# ----------------------------------------------------------------------------- progress bar


class ProgressBar:
    """A one-line text progress bar.

    On a terminal it redraws in place; into a pipe or file it writes the
    finished bar once, so captured output (CI logs, tests) stays readable.
    """

    def __init__(self, total: int, width: int = 30, stream: TextIO | None = None):
        self.total = max(1, total)
        self.width = width
        self.stream = stream if stream is not None else sys.stdout
        self.done = 0
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())

    def render(self, label: str = "") -> str:
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        return f"[{bar}] {self.done}/{self.total} {label}".rstrip()

    def step(self, label: str = "") -> None:
        self.done = min(self.total, self.done + 1)
        if self.interactive:
            self.stream.write("\r\033[K" + self.render(label))
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif self.done == self.total:
            self.stream.write(self.render("done") + "\n")
            self.stream.flush()


# ----------------------------------------------------------------------------- demo


@contextlib.contextmanager
def _force_backend(name: str) -> Iterator[None]:
    """Force ``name`` for forward *and* backward.

    The autograd engine runs CUDA backward passes on its own worker thread,
    where the context variable set by ``fastdense.ops.backend`` is not visible;
    the environment variable is, so the demo sets both.
    """
    import fastdense

    old = os.environ.get("FASTDENSE_BACKEND")
    os.environ["FASTDENSE_BACKEND"] = name
    try:
        with fastdense.ops.backend(name):
            yield
    finally:
        if old is None:
            del os.environ["FASTDENSE_BACKEND"]
        else:
            os.environ["FASTDENSE_BACKEND"] = old


def mtlora_loop(x, weight, bias, a_list, b_list, scales):
    """Multi-task LoRA as MTLoRA's code computes it: one base linear, then a
    Python loop of per-adapter ``x Aᵀ Bᵀ s`` GEMMs added to it.

    Returns ``(shared_out, {task_index: task_out})`` like ``MTLoRALinear``.
    """
    import torch.nn.functional as F

    pretrained = F.linear(x, weight, bias)
    shared = pretrained + (x @ a_list[0].t() @ b_list[0].t()) * scales[0]
    tasks = {}
    for t in range(1, len(a_list)):
        tasks[t] = pretrained + (x @ a_list[t].t() @ b_list[t].t()) * scales[t]
    return shared, tasks


@dataclasses.dataclass
class DemoCase:
    batch: int = 1
    tokens: int = 28 * 28  # Swin-T stage 3 at 448² input
    in_features: int = 96
    out_features: int = 384  # fc1: C -> 4C
    tasks: int = 4
    shared_rank: int = 64
    task_rank: int = 4
    scale: float = 4.0  # MTLoRA's shared and task scale

    @property
    def ranks(self) -> list[int]:
        return [self.shared_rank] + [self.task_rank] * self.tasks

    @property
    def scales(self) -> list[float]:
        return [self.scale] * (1 + self.tasks)


def _demo_tensors(case: DemoCase, device, dtype):
    import torch

    gen = torch.Generator().manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(device)

    k, n, r = case.in_features, case.out_features, sum(case.ranks)
    # B is random rather than LoRA's zero init: with B = 0 the adapter paths
    # contribute nothing and a wrong kernel could still pass the check.
    return {
        "x": randn(case.batch, case.tokens, k),
        "weight": randn(n, k, std=k ** -0.5),
        "bias": randn(n, std=0.1),
        "lora_a": randn(r, k, std=k ** -0.5),
        "lora_b": randn(n, r, std=r ** -0.5),
        "grad": randn(1 + case.tasks, case.batch, case.tokens, n),
    }


# What the demo differentiates: the input (earlier layers train too) and the
# adapters; W0 and its bias are frozen, as in every PEFT method reproduced here.
_GRAD_NAMES = ("x", "lora_a", "lora_b")


def _outputs_and_grads(op, t64: dict, case: DemoCase, dtype):
    """Outputs of ``op`` (the fused op or the reference) in ``dtype`` and the gradients of _GRAD_NAMES."""
    leaves = {k: v.to(dtype).detach().requires_grad_(k in _GRAD_NAMES) for k, v in t64.items() if k != "grad"}
    out = op(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"],
             case.ranks, case.scales)
    out.backward(t64["grad"].to(dtype))
    return out.detach(), {k: leaves[k].grad for k in _GRAD_NAMES}


def _max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def _tolerance(ref_err: float, ref_mag: float, dtype) -> float:
    """Twice the error of the reference computed in the same dtype (flash-attn's
    rule), plus a floor relative to the output's magnitude so that a reference
    that happens to round exactly does not demand bit-identical results."""
    import torch

    floor = {torch.float32: 1e-5, torch.float64: 1e-10}.get(dtype, 1e-2)
    return 2.0 * ref_err + floor * max(1.0, ref_mag)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], None], device, budget_s: float, min_reps: int = 3, max_reps: int = 50) -> float:
    """Median wall time of ``fn`` in ms after one warm-up call, within about ``budget_s``."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    reps = int(min(max_reps, max(min_reps, budget_s / max(first, 1e-6))))
    times = [first]
    for _ in range(reps - 1):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


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


@command("demo", "print info, check and time every available backend of the multi-task LoRA op, "
                 "check every other op's backends, then train the tiny multi-task model briefly and compare it with a trivial baseline",
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
        print(f"fastdense demo: error: --train-steps must be >= 0, got {steps}", file=sys.stderr)
        return 2
    # One thread by default: the tiny model's ops are too small to gain from more, and on a machine
    # shared with other jobs OpenMP threads spin-wait for each other (measured here: 0.23 s/step with
    # one thread, 1.7 s/step with two on 2 busy cores).
    training = {"steps": steps, "resolution": args.resolution, "run_dir": args.run_dir, "threads": args.threads}
    return run_demo(device=getattr(args, "device", "auto"), time_budget=getattr(args, "time_budget", 0.08),
                    training=training)


def run_demo(device: str = "auto", time_budget: float = 0.08, out: TextIO = sys.stdout,
             training: dict | None = None) -> int:
    """Info, the op checks and timings, then (with ``training`` and ``training["steps"] > 0``) a
    short training of the tiny multi-task model that must beat a constant baseline on every task."""
    import torch

    from fastdense.ops import _dispatch, mt_lora_linear, reference

    print_info(out)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("demo: --device cuda but no CUDA device is visible", file=out)
        return 1
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    case = DemoCase()
    m = case.batch * case.tokens
    print("", file=out)
    print(f"demo: multi-task LoRA linear on {dev.type} {str(dtype).replace('torch.', '')}: "
          f"x ({case.batch}, {case.tokens}, {case.in_features}) -> {1 + case.tasks} outputs "
          f"({case.batch}, {case.tokens}, {case.out_features}); shared rank {case.shared_rank}, "
          f"{case.tasks} tasks of rank {case.task_rank}, scale {case.scale}", file=out)

    t64 = _demo_tensors(case, dev, dtype)
    probe = {k: v.to(dtype) for k, v in t64.items()}
    probe_args = (probe["x"].reshape(m, -1), probe["weight"], probe["bias"], probe["lora_a"], probe["lora_b"],
                  case.ranks, case.scales, False, None, None)
    # FASTDENSE_BACKEND narrows the demo to that backend, as it narrows dispatch.
    try:
        forced = _dispatch.forced_backend()
    except ValueError as exc:  # FASTDENSE_BACKEND names no backend
        print(f"demo: FAIL: {exc}", file=out)
        return 2
    runnable, skipped = [], []
    for name, impl in sorted(_dispatch.implementations("mt_lora_linear").items(),
                             key=lambda kv: _dispatch.BACKENDS.index(kv[0])):
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
        print(f"demo: FAIL: {what} cannot run on {dev.type} {str(dtype).replace('torch.', '')}", file=out)
        return 1

    # Ground truth in float64; the error of the same-dtype reference sets the tolerance.
    truth_out, truth_grads = _outputs_and_grads(reference.mt_lora_linear, t64, case, torch.float64)
    ref_out, ref_grads = _outputs_and_grads(reference.mt_lora_linear, t64, case, dtype)
    tolerances = {"out": _tolerance(_max_err(ref_out, truth_out), truth_out.abs().max().item(), dtype)}
    for k in _GRAD_NAMES:
        tolerances[k] = _tolerance(_max_err(ref_grads[k], truth_grads[k]), truth_grads[k].abs().max().item(), dtype)

    failures = 0
    results: dict[str, dict[str, float]] = {}
    bar = ProgressBar(len(runnable) * 3 + 2, stream=out)
    check_lines = []
    for name in runnable:
        try:
            with _force_backend(name):
                got_out, got_grads = _outputs_and_grads(mt_lora_linear, t64, case, dtype)
            errors = {"out": _max_err(got_out, truth_out)}
            errors.update({k: _max_err(got_grads[k], truth_grads[k]) for k in _GRAD_NAMES})
            ok = all(errors[k] <= tolerances[k] for k in errors)
            detail = ", ".join(f"{'forward' if k == 'out' else 'd' + k} {errors[k]:.2e} (tol {tolerances[k]:.1e})"
                               for k in errors)
            check_lines.append(f"  {name:<8} {'PASS' if ok else 'FAIL'}  max abs error vs float64 reference: {detail}")
            failures += 0 if ok else 1
        except Exception as exc:  # a backend that claims it can run but raises is a failure, not a skip
            check_lines.append(f"  {name:<8} FAIL  raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            failures += 1
            for _ in range(3):  # its check and both timings are off
                bar.step(f"{name} failed")
            continue
        bar.step(f"{name} checked")
        results[name] = _time_fused(name, t64, case, dtype, dev, time_budget, bar)
    results["mtlora-loop"] = _time_loop(t64, case, dtype, dev, time_budget, bar)

    print("", file=out)
    print("checks (forward and gradients of x, lora_a, lora_b):", file=out)
    for text in check_lines:
        print(text, file=out)
    print("", file=out)
    print(f"timing (median of repeated runs, {dev.type}, {str(dtype).replace('torch.', '')}; speed-up is the "
          "MTLoRA-style eager loop's time divided by the row's):", file=out)
    header = f"  {'implementation':<20} {'forward ms':>11} {'fwd+bwd ms':>11} {'speed-up fwd':>13} {'speed-up f+b':>13}"
    print(header, file=out)
    base = results["mtlora-loop"]
    for name, r in results.items():
        label = "mtlora-loop (eager)" if name == "mtlora-loop" else f"fused [{name}]"
        print(f"  {label:<20} {r['fwd']:>11.3f} {r['fwdbwd']:>11.3f} "
              f"{base['fwd'] / r['fwd']:>12.2f}x {base['fwdbwd'] / r['fwdbwd']:>12.2f}x", file=out)
    print("", file=out)
    from fastdense import _demo_checks

    print(f"checks of the other ops on {dev.type} {str(dtype).replace('torch.', '')} (forward and gradients "
          "vs the float64 reference):", file=out)
    op_failures, op_passed = _demo_checks.check_ops(dev, dtype, _tolerance, _max_err, forced, _force_backend, out)
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


def _time_fused(name, t64, case, dtype, dev, budget, bar) -> dict[str, float]:
    import fastdense

    leaves = {k: v.to(dtype).detach().requires_grad_(k in _GRAD_NAMES) for k, v in t64.items()}
    grad = leaves.pop("grad").detach()

    def forward():
        return fastdense.ops.mt_lora_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"],
                                            leaves["lora_b"], case.ranks, case.scales)

    def fwd_bwd():
        for k in _GRAD_NAMES:
            leaves[k].grad = None
        forward().backward(grad)

    with _force_backend(name):
        fwd = _median_ms(forward, dev, budget)
        bar.step(f"{name} forward timed")
        both = _median_ms(fwd_bwd, dev, budget)
        bar.step(f"{name} forward+backward timed")
    return {"fwd": fwd, "fwdbwd": both}


def _time_loop(t64, case, dtype, dev, budget, bar) -> dict[str, float]:
    import torch

    x = t64["x"].to(dtype).requires_grad_(True)
    weight, bias = t64["weight"].to(dtype), t64["bias"].to(dtype)
    # Separate leaf tensors per adapter, as MTLoRA holds one nn.Linear pair per task.
    a_list = [a.to(dtype).clone().requires_grad_(True) for a in t64["lora_a"].split(case.ranks, 0)]
    b_list = [b.to(dtype).clone().requires_grad_(True) for b in t64["lora_b"].split(case.ranks, 1)]
    grads = list(t64["grad"].to(dtype).unbind(0))

    def forward():
        return mtlora_loop(x, weight, bias, a_list, b_list, case.scales)

    def fwd_bwd():
        for t in [x, *a_list, *b_list]:
            t.grad = None
        shared, tasks = forward()
        torch.autograd.backward([shared, *tasks.values()], grads)

    fwd = _median_ms(forward, dev, budget)
    bar.step("loop forward timed")
    both = _median_ms(fwd_bwd, dev, budget)
    bar.step("loop forward+backward timed")
    return {"fwd": fwd, "fwdbwd": both}


# ----------------------------------------------------------------------------- train / eval

ALL_TRAIN_TASKS = ("semseg", "normal", "depth_euclidean", "saliency")

# Defaults of `train`; the flags default to None so that a value from --config is only
# overridden by a flag the user actually gave (defaults < config file < command line).
TRAIN_DEFAULTS = {
    "model": "tiny_mtl", "tasks": ",".join(ALL_TRAIN_TASKS), "steps": 300, "batch_size": 16, "resolution": 64,
    "lr": 3e-3, "weight_decay": 0.01, "warmup_steps": 20, "grad_accum": 1, "clip_grad": 1.0, "eval_every": 0,
    "log_every": 10, "save_every": 0, "train_samples": 512, "val_samples": 64, "seed": 0,
    "run_dir": "runs/train", "resume": None, "device": "auto", "threads": 0, "progress": True,
}


class UsageError(Exception):
    """A bad option, path or configuration: reported in one line, exit code 2."""


def _train_arguments(p: argparse.ArgumentParser) -> None:
    d = TRAIN_DEFAULTS
    p.add_argument("--config", metavar="FILE",
                   help="JSON (or YAML, if PyYAML is installed) file of options; keys are the flag names "
                        "(with - or _); flags given on the command line override it")
    p.add_argument("--model", help=f"model name (default {d['model']})")
    p.add_argument("--tasks", help=f"comma-separated tasks (default {d['tasks']})")
    p.add_argument("--steps", type=int, help=f"optimiser steps in total (default {d['steps']})")
    p.add_argument("--batch-size", type=int, help=f"images per optimiser step (default {d['batch_size']})")
    p.add_argument("--resolution", type=int, help=f"image side, multiple of 4 in [64, 448] (default {d['resolution']})")
    p.add_argument("--lr", type=float, help=f"peak AdamW learning rate (default {d['lr']})")
    p.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d['weight_decay']})")
    p.add_argument("--warmup-steps", type=int, help=f"linear warm-up steps before the cosine (default {d['warmup_steps']})")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step (default 1)")
    p.add_argument("--clip-grad", type=float, help="max gradient norm, 0 disables (default 1.0)")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps; 0: only at the end (default 0)")
    p.add_argument("--log-every", type=int, help=f"log.jsonl line every N steps (default {d['log_every']})")
    p.add_argument("--save-every", type=int, help="also write checkpoint_step<N>.pt every N steps (default 0: "
                                                   "only checkpoint.pt at the end)")
    p.add_argument("--train-samples", type=int, help=f"synthetic training scenes (default {d['train_samples']})")
    p.add_argument("--val-samples", type=int, help=f"synthetic validation scenes (default {d['val_samples']})")
    p.add_argument("--seed", type=int, help="seed of data order, scenes and initialisation (default 0)")
    p.add_argument("--run-dir", help=f"where log.jsonl, checkpoint.pt and PNGs go (default {d['run_dir']})")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue from this checkpoint (same model and tasks)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads; 0 keeps torch's default")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                   help="no progress bar")


def _load_config_file(path: str) -> dict:
    import json

    if not os.path.isfile(path):
        raise UsageError(f"config file not found: {path}")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise UsageError(f"{path}: YAML configs need PyYAML (pip install pyyaml); or write the config as JSON")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"{path}: invalid YAML: {exc}")
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: invalid JSON: {exc}")
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the config must be a mapping of option names to values")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(TRAIN_DEFAULTS))
    if unknown:
        raise UsageError(f"{path}: unknown option(s) {unknown}; valid: {sorted(TRAIN_DEFAULTS)}")
    if isinstance(data.get("tasks"), list):
        data["tasks"] = ",".join(data["tasks"])
    return data


def train_options(args: argparse.Namespace) -> dict:
    opts = dict(TRAIN_DEFAULTS)
    if getattr(args, "config", None):
        opts.update(_load_config_file(args.config))
    for key in TRAIN_DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    return opts


def _pick_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible")
    return torch.device(name)


def _check_run_setup(opts: dict) -> list:
    """Validate model, tasks, numbers and paths before any work; returns the task list."""
    from fastdense.models import MODELS, check_tasks

    if opts["model"] not in MODELS:
        raise UsageError(f"unknown model {opts['model']!r}; valid models: {', '.join(sorted(MODELS))}")
    try:
        tasks = check_tasks(opts["tasks"])
    except ValueError as exc:
        raise UsageError(str(exc))
    unsupported = [t for t in tasks if t not in ALL_TRAIN_TASKS]
    if unsupported:
        raise UsageError(f"task(s) {unsupported} cannot be trained; supported: {', '.join(ALL_TRAIN_TASKS)}")
    for key in ("steps", "batch_size", "train_samples", "val_samples", "grad_accum"):
        if not isinstance(opts[key], int) or opts[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be a positive integer, got {opts[key]!r}")
    res = opts["resolution"]
    if not isinstance(res, int) or res % 4 or not 64 <= res <= 448:
        raise UsageError(f"--resolution must be a multiple of 4 in [64, 448], got {res!r}")
    if opts["resume"] and not os.path.isfile(opts["resume"]):
        raise UsageError(f"checkpoint to resume not found: {opts['resume']}")
    return tasks


_LOWER_IS_BETTER = {"mean", "median", "rmse", "abs_rel"}


def format_metrics_table(result: dict, baseline: dict | None = None) -> str:
    """One row per task and metric; with a baseline, its value and whether the model beats it
    (judged on each task's primary metric)."""
    from fastdense.engine import losses as L

    header = f"  {'task':<16} {'metric':<13} {'model':>10}"
    if baseline is not None:
        header += f" {'baseline':>10}  better"
    lines = [header]
    for task, values in result.items():
        primary = L.PRIMARY[task][0]
        for key, value in values.items():
            row = f"  {task:<16} {key + (' *' if key == primary else ''):<13} {value:>10.4f}"
            if baseline is not None:
                b = baseline[task][key]
                better = value < b if key in _LOWER_IS_BETTER else value > b
                row += f" {b:>10.4f}  {'yes' if better else 'no'}"
            lines.append(row)
    lines.append("  (* primary metric; lower is better for normal mean/median and depth rmse/abs_rel)")
    return "\n".join(lines)


def run_train(opts: dict, out: TextIO | None = None) -> dict:
    """Train as ``fastdense train`` does; returns {"metrics", "run_dir", "checkpoint", "trainer"}."""
    out = out if out is not None else sys.stdout  # looked up per call: tests and callers redirect sys.stdout
    import torch

    from fastdense.data import SyntheticScenes
    from fastdense.engine import MultiTaskTrainer, TrainConfig
    from fastdense.engine import distributed as fd_dist
    from fastdense.models import build_model

    tasks = _check_run_setup(opts)
    device = _pick_device(opts["device"])
    if opts["threads"]:
        torch.set_num_threads(int(opts["threads"]))
    fd_dist.init_distributed()
    if device.type == "cuda" and fd_dist.is_distributed():
        device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(opts["seed"])
    model = build_model(opts["model"], tasks)
    # Validation scenes come from another seed, so they are scenes the model never trained on.
    train_set = SyntheticScenes(opts["train_samples"], opts["resolution"], seed=opts["seed"], tasks=tasks)
    val_seed = opts["seed"] + 1_000_003
    val_set = SyntheticScenes(opts["val_samples"], opts["resolution"], seed=val_seed, tasks=tasks)
    cfg = TrainConfig(steps=opts["steps"], batch_size=opts["batch_size"], lr=opts["lr"],
                      weight_decay=opts["weight_decay"], warmup_steps=opts["warmup_steps"],
                      grad_accum=opts["grad_accum"], clip_grad=opts["clip_grad"] or None,
                      eval_every=opts["eval_every"], log_every=opts["log_every"], save_every=opts["save_every"],
                      seed=opts["seed"], progress=bool(opts["progress"]))
    spec = {"model": opts["model"], "model_kwargs": {}, "tasks": tasks,
            "data": {"dataset": "synthetic", "resolution": opts["resolution"], "val_samples": opts["val_samples"],
                     "val_seed": val_seed}}
    try:
        trainer = MultiTaskTrainer(model, tasks, train_set, val_set, config=cfg, run_dir=opts["run_dir"],
                                   device=device, run_spec=spec)
    except ValueError as exc:
        raise UsageError(str(exc))
    if opts["resume"]:
        try:
            step = trainer.resume(opts["resume"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UsageError(f"cannot resume from {opts['resume']}: {str(exc).splitlines()[0]}")
        print(f"resumed from {opts['resume']} at step {step}", file=out)
    is_main = fd_dist.is_main_process()
    try:
        metrics = trainer.fit()
        path = trainer.save()
    finally:
        fd_dist.cleanup()
    return {"metrics": metrics, "run_dir": opts["run_dir"], "checkpoint": path, "trainer": trainer,
            "is_main": is_main}


def _usage_error(cmd: str, exc: Exception) -> int:
    print(f"fastdense {cmd}: error: {exc}", file=sys.stderr)
    return 2


@command("train", "train a multi-task model on the synthetic scenes (checkpoint, log.jsonl, PNGs in --run-dir)",
         arguments=_train_arguments)
def cmd_train(args: argparse.Namespace) -> int:
    try:
        opts = train_options(args)
        result = run_train(opts)
    except UsageError as exc:
        return _usage_error("train", exc)
    if not result["is_main"]:  # under torchrun only rank 0 reports
        return 0
    print(f"trained {opts['model']} for {opts['steps']} steps; run dir: {result['run_dir']}")
    if result["checkpoint"] is not None:
        print(f"checkpoint: {result['checkpoint']}")
    print("validation metrics:")
    print(format_metrics_table(result["metrics"]))
    return 0


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `fastdense train`")
    p.add_argument("--val-samples", type=int, help="number of validation scenes (default: as in training)")
    p.add_argument("--batch-size", type=int, default=16, help="images per evaluation batch (default 16)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--run-dir", help="if given, a prediction PNG is written there")


def run_eval(checkpoint: str, val_samples: int | None = None, batch_size: int = 16, device: str = "auto",
             run_dir: str | None = None) -> dict:
    from fastdense.data import SyntheticScenes
    from fastdense.engine import MultiTaskTrainer, TrainConfig, load_checkpoint, restore
    from fastdense.models import build_model

    if not os.path.isfile(checkpoint):
        raise UsageError(f"checkpoint not found: {checkpoint}")
    try:
        ckpt = load_checkpoint(checkpoint)
        spec = ckpt["config"]["spec"]
    except Exception as exc:  # not a torch file, or not one written by `fastdense train`
        raise UsageError(f"{checkpoint} is not a fastdense training checkpoint: {str(exc).splitlines()[0]}")
    tasks = list(spec["tasks"])
    try:
        model = build_model(spec["model"], tasks, **spec.get("model_kwargs", {}))
    except ValueError as exc:
        raise UsageError(f"{checkpoint}: {exc}")
    restore(ckpt, model=model, rng=False)
    data = spec["data"]
    n = val_samples or data["val_samples"]
    if n < 1:
        raise UsageError(f"--val-samples must be positive, got {n}")
    val_set = SyntheticScenes(n, data["resolution"], seed=data["val_seed"], tasks=tasks)
    cfg = TrainConfig(steps=max(1, ckpt["step"]), batch_size=batch_size, progress=False)
    evaluator = MultiTaskTrainer(model, tasks, val_set, val_set, config=cfg, run_dir=run_dir,
                                 device=_pick_device(device), run_spec=spec)
    evaluator.step = ckpt["step"]
    return evaluator.evaluate()


@command("eval", "evaluate a training checkpoint on the synthetic validation scenes and print the metrics",
         arguments=_eval_arguments)
def cmd_eval(args: argparse.Namespace) -> int:
    try:
        metrics = run_eval(args.checkpoint, args.val_samples, args.batch_size, args.device, args.run_dir)
    except UsageError as exc:
        return _usage_error("eval", exc)
    print(f"checkpoint: {args.checkpoint}")
    print(format_metrics_table(metrics))
    return 0


# ----------------------------------------------------------------------------- demo training

# FASTDENSE_DEMO_STEPS sets the demo's default number of training steps; 0 skips the training
# part (a test suite that checks the op part of the demo sets it to stay fast).
DEMO_STEPS_ENV = "FASTDENSE_DEMO_STEPS"


def run_demo_training(steps: int, run_dir: str | None = None, resolution: int = 64, batch_size: int = 16,
                      threads: int = 0, device: str = "cpu", val_samples: int = 64,
                      out: TextIO | None = None) -> int:
    """Train the tiny model on the synthetic scenes and compare it with the constant baseline.

    Returns 0 when the model beats the baseline on every task's primary metric, else 1.
    """
    import tempfile

    from fastdense.engine import beats, constant_baseline, evaluate_constant

    out = out if out is not None else sys.stdout
    run_dir = run_dir or tempfile.mkdtemp(prefix="fastdense-demo-")
    opts = dict(TRAIN_DEFAULTS, steps=steps, run_dir=run_dir, resolution=resolution, batch_size=batch_size,
                threads=threads, device=device, val_samples=val_samples, warmup_steps=min(TRAIN_DEFAULTS["warmup_steps"], max(1, steps // 10)),
                log_every=max(1, min(10, steps // 10)))
    print("", file=out)
    print(f"demo training: {opts['model']} on {opts['train_samples']} synthetic scenes at {resolution}x{resolution}, "
          f"{steps} steps of batch {batch_size}, tasks {opts['tasks']}", file=out)
    out.flush()
    import torch

    old_threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        result = run_train(dict(opts, progress=True), out=out)
    finally:
        torch.set_num_threads(old_threads)
    elapsed = time.perf_counter() - start
    tasks = list(result["metrics"])
    trainer = result["trainer"]
    const = constant_baseline(trainer.train_set, tasks)
    baseline = evaluate_constant(const, trainer.val_set, tasks)
    wins = beats(result["metrics"], baseline)
    print(f"trained in {elapsed:.1f} s; metrics on {opts['val_samples']} held-out scenes vs the trivial baseline "
          "(majority class / mean normal / mean depth / mean saliency of the training set):", file=out)
    print(format_metrics_table(result["metrics"], baseline), file=out)
    print(f"run dir (log.jsonl, checkpoint.pt, prediction PNGs): {run_dir}", file=out)
    lost = [t for t, ok in wins.items() if not ok]
    if lost:
        print(f"demo training: FAIL: the trained model does not beat the trivial baseline on {', '.join(lost)}",
              file=out)
        return 1
    print(f"demo training: OK (beats the trivial baseline on all {len(wins)} tasks)", file=out)
    return 0


# ----------------------------------------------------------------------------- adapt

ADAPT_DEFAULTS = {"fold": 0, "shots": 4, "runs": 3, "meta_steps": 60, "adapt_steps": 10, "queries": 4,
                  "resolution": 64, "train_samples": 32, "test_samples": 16, "seed": 0}


def _adapt_arguments(p: argparse.ArgumentParser) -> None:
    d = ADAPT_DEFAULTS
    p.add_argument("--checkpoint", help="checkpoint.pt of an earlier `fastdense adapt --run-dir` meta-training; "
                                        "without it a tiny model is meta-trained first")
    p.add_argument("--fold", type=int, help=f"held-out fold 0-4 (default {d['fold']}, or the checkpoint's)")
    p.add_argument("--shots", type=int, default=d["shots"], help=f"support images per run (default {d['shots']})")
    p.add_argument("--runs", type=int, default=d["runs"], help=f"support sets to average over (default {d['runs']})")
    p.add_argument("--adapt-steps", type=int, default=d["adapt_steps"],
                   help=f"fine-tuning steps per support set; 0 evaluates without fine-tuning (default {d['adapt_steps']})")
    p.add_argument("--meta-steps", type=int, default=d["meta_steps"],
                   help=f"meta-training episodes when no --checkpoint is given (default {d['meta_steps']})")
    p.add_argument("--queries", type=int, default=d["queries"],
                   help=f"query images per meta-training episode (default {d['queries']})")
    # The data options only apply to a fresh meta-training; a checkpoint brings its own.
    p.add_argument("--resolution", type=int, default=d["resolution"],
                   help=f"image side, multiple of 4 in [64, 448] (default {d['resolution']})")
    p.add_argument("--train-samples", type=int, default=d["train_samples"],
                   help=f"synthetic scenes for meta-training (default {d['train_samples']})")
    p.add_argument("--test-samples", type=int, default=d["test_samples"],
                   help=f"other synthetic scenes the supports and queries of the held-out tasks come from "
                        f"(default {d['test_samples']})")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of scenes, episodes and initialisation (default 0)")
    p.add_argument("--run-dir", help="write log.jsonl and checkpoint.pt of the meta-training there")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _positive(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or value < minimum:
        raise UsageError(f"--{name} must be an integer >= {minimum}, got {value!r}")


def run_adapt(args: argparse.Namespace, out: TextIO | None = None) -> dict:
    """Meta-train (or load), then fine-tune and evaluate on the held-out fold; returns the results."""
    out = out if out is not None else sys.stdout
    import torch

    from fastdense.engine import load_checkpoint
    from fastdense.engine.fewshot import (SYNTHETIC_FOLDS, SYNTHETIC_TASKS, EpisodicConfig, EpisodicTrainer,
                                          synthetic_sampler)
    from fastdense.models import build_model

    spec = None
    if args.fold is not None and not 0 <= args.fold < len(SYNTHETIC_FOLDS):
        raise UsageError(f"--fold must be in [0, {len(SYNTHETIC_FOLDS) - 1}], got {args.fold}")
    if args.checkpoint is not None:
        if not os.path.isfile(args.checkpoint):
            raise UsageError(f"checkpoint not found: {args.checkpoint}")
        try:
            ckpt = load_checkpoint(args.checkpoint)
            spec = ckpt["config"]["spec"]
            saved_fold = int(ckpt["config"]["sampler"]["fold"])
            missing = {"model", "tasks", "data"} - set(spec)
            if missing:
                raise KeyError(f"its run spec lacks {sorted(missing)}")
            data = dict(spec["data"])
        except Exception as exc:  # not a torch file, or not written by `fastdense adapt`
            raise UsageError(f"{args.checkpoint} is not a fastdense episodic checkpoint: {str(exc).splitlines()[0]}")
        if args.fold is not None and args.fold != saved_fold:
            raise UsageError(f"{args.checkpoint} was meta-trained with fold {saved_fold} held out; --fold {args.fold} "
                             "would test on tasks it was trained on")
        fold = saved_fold
    else:
        fold = ADAPT_DEFAULTS["fold"] if args.fold is None else args.fold
        data = {"dataset": "synthetic", "resolution": args.resolution, "train_samples": args.train_samples,
                "test_samples": args.test_samples, "seed": args.seed}
    if not 0 <= fold < len(SYNTHETIC_FOLDS):
        raise UsageError(f"{args.checkpoint} holds out fold {fold}, not one of 0-{len(SYNTHETIC_FOLDS) - 1}")
    _positive("shots", args.shots)
    _positive("runs", args.runs)
    _positive("queries", args.queries)
    _positive("meta-steps", args.meta_steps)
    _positive("adapt-steps", args.adapt_steps, 0)
    _positive("train-samples", data["train_samples"])
    _positive("test-samples", data["test_samples"])
    res = data["resolution"]
    if not isinstance(res, int) or res % 4 or not 64 <= res <= 448:
        raise UsageError(f"--resolution must be a multiple of 4 in [64, 448], got {res!r}")
    if args.shots + 1 > data["test_samples"]:
        raise UsageError(f"--shots {args.shots} leaves no query image among {data['test_samples']} test scenes; "
                         "use fewer shots or more --test-samples")
    if args.checkpoint is None and args.shots + args.queries > data["train_samples"]:
        raise UsageError(f"--shots {args.shots} + --queries {args.queries} exceed the {data['train_samples']} "
                         "meta-training scenes; raise --train-samples")
    device = _pick_device(args.device)
    if args.threads:
        torch.set_num_threads(int(args.threads))
    sampler = synthetic_sampler(fold=fold, shots=args.shots, queries=args.queries,
                                train_samples=data["train_samples"], test_samples=data["test_samples"],
                                resolution=res, seed=data["seed"])
    if spec is None:
        spec = {"model": "tiny_fewshot", "model_kwargs": {}, "tasks": list(SYNTHETIC_TASKS), "data": data}
    torch.manual_seed(data["seed"])
    try:
        model = build_model(spec["model"], spec["tasks"], **spec.get("model_kwargs", {}))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"cannot build model {spec['model']!r}: {exc}")
    cfg = EpisodicConfig(steps=args.meta_steps, warmup_steps=max(1, min(10, args.meta_steps // 10)),
                         adapt_steps=args.adapt_steps, seed=data["seed"], progress=args.progress)
    trainer = EpisodicTrainer(model, sampler, config=cfg, run_dir=args.run_dir, device=device, run_spec=spec)
    print(f"held-out fold {fold}: {', '.join(sampler.test_tasks)}; meta-training tasks: "
          f"{', '.join(sampler.train_tasks)}", file=out)
    if args.checkpoint is not None:
        try:
            step = trainer.resume(args.checkpoint, rng=False)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UsageError(f"cannot load {args.checkpoint}: {str(exc).splitlines()[0]}")
        print(f"loaded {args.checkpoint} (meta-trained for {step} episodes)", file=out)
    else:
        start = time.perf_counter()
        records = trainer.fit()
        # Episodes of different tasks have losses of different sizes, so single episodes say
        # little; the means of the first and last tenth show the trend.
        k = max(1, len(records) // 10)
        head, tail = (statistics.fmean(r["loss"] for r in part) for part in (records[:k], records[-k:]))
        print(f"meta-trained {spec['model']} for {trainer.step} episodes in {time.perf_counter() - start:.1f} s "
              f"(mean episode loss: first {k} {head:.4f}, last {k} {tail:.4f})", file=out)
        path = trainer.save()
        if path is not None:
            print(f"checkpoint: {path}", file=out)
    results = trainer.evaluate(runs=args.runs, shots=args.shots, adapt_steps=args.adapt_steps)
    print(f"fine-tuned on {args.shots} shots for {args.adapt_steps} steps; mean ± std over {args.runs} support sets "
          "(normalised label units, lower is better):", file=out)
    for task, metrics in results.items():
        cells = "  ".join(f"{k} {r.mean:.4f} ± {r.std:.4f}" for k, r in metrics.items())
        print(f"  {task:<20} {cells}", file=out)
    summary = {"fold": fold, "shots": args.shots, "runs": args.runs, "adapt_steps": args.adapt_steps,
               "meta_steps": trainer.step,
               "tasks": {t: {k: {"mean": r.mean, "std": r.std, "values": list(r.values)} for k, r in m.items()}
                         for t, m in results.items()}}
    if args.json:
        import json

        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


@command("adapt", "few-shot: meta-train a tiny model on 4 folds of synthetic tasks (or load --checkpoint), "
                  "fine-tune on N shots of the held-out fold's tasks and report mean ± std over R support sets",
         arguments=_adapt_arguments)
def cmd_adapt(args: argparse.Namespace) -> int:
    try:
        run_adapt(args)
    except UsageError as exc:
        return _usage_error("adapt", exc)
    return 0


# ----------------------------------------------------------------------------- bench


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
    except UsageError as exc:
        return _usage_error("bench", exc)
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
