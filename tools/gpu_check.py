#!/usr/bin/env python3
"""One prepared GPU campaign for fastdense: build, test, sanitize and benchmark in one command.

    make gpu-check                       # = python tools/gpu_check.py, results in $GPU_CHECK_OUT
    python tools/gpu_check.py --list     # the plan: steps, limits, lanes, benchmark selection
    python tools/gpu_check.py --dry-run  # the CPU-side steps only (what a machine without a GPU does anyway)

Made for the lent GPU machines (H100/H200, 16 cores, the CUDA torch and Triton
installed, no network), which are lent for minutes: the campaign fits a time
budget (``GPU_CHECK_BUDGET_S``, default 450 s), gives every step a limit, skips
what no longer fits as "out of time", and always writes its summary. Output in
``GPU_CHECK_OUT`` (default build/gpu-check/): SUMMARY.md, summary.json,
junit.xml, bench.json, logs.txt, logs.tar.gz. Exit status 1 when any step
failed (skips are not failures), 2 when interrupted. docs/gpu-check.md says
what each step checks and how to run it through the device tool.

Environment: GPU_CHECK_OUT, GPU_CHECK_BUDGET_S, GPU_CHECK_STEPS (comma-separated
optional steps to run; the set-up steps always run), GPU_CHECK_PARALLEL
(auto/1/0: the tests and the sanitizer side by side), GPU_CHECK_WHEELS (a folder
of wheels to install first, default .whl).
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

from _gpu_check import steps, summary  # noqa: E402
from _gpu_check.runner import Budget, Campaign, Processes, Step  # noqa: E402

BUDGET_S = 450.0       # 7.5 minutes: the campaign, summary included, inside 8
RESERVE_S = 10.0       # kept back from the steps for the final summary and the log tarball
BENCH_RESERVE_S = 90.0  # with parallel lanes, kept back from them for the benchmarks that follow

# The benchmark subset: (what, bench file, -k expression over that file's test ids). The ids are
# "<test>[<case>-<impl>-<mode>]" with the GPU cases of bench/_cases.py and each suite; update the
# expressions here when the suites rename their cases. Baselines for the ratios: bench/report.py.
BENCH = [
    ("Swin-T stage-1 fc1 multi-task LoRA (T = 4)", "bench/test_bench_lora.py",
     "test_mt_lora_linear and s1-112x112-C96-fc1 and not compiled and not peft and not fused-cpp"),
    ("attention-mask aggregation, SD 1.x L = 4096", "bench/test_bench_attn_mask_aggregate.py",
     "test_attn_mask_aggregate and sd1-64x64-B2-H8-L4096-d40-N77 and not compiled and not sdpa "
     "and not fused-cpp and not fused-cuda"),
    ("DTF TA-LoRA, Swin-T stage-1 proj (7x7 windows), r = 32", "bench/test_bench_dtf.py",
     "test_ta_lora_dtf and s1-112x112-C96-proj-r32 and not compiled and not fused-cpp"),
    ("TDSS skill-gated transform, Swin-T stage 1", "bench/test_bench_skill_gated_transform.py",
     "test_skill_gated_transform and s1-112x112-C96 and not compiled and not fused-cpp and not fused-cuda"),
    ("q_sample_multi, k = 4 timesteps, B = 8 SD latents", "bench/test_bench_q_sample_multi.py",
     "test_q_sample_multi and B8-4x64x64-k4-per-step and not compiled and not fused-cpp"),
    ("diffusion features at k = 4 timesteps, B = 1: batched vs per-timestep U-Net", "bench/test_bench_timesteps.py",
     "test_timesteps_features and B1 and not compiled and not cudagraph and (sequential-unet or batched)"),
]

# compute-sanitizer runs of tools/gpu_sanitize.py: tool -> (script arguments, environment).
# Without torch's caching allocator memcheck and initcheck see each tensor's own bounds.
# memcheck autotunes afresh, so every autotune config of every Triton kernel runs under it;
# racecheck and initcheck reuse the configs sanitize-check chose (Triton's autotuning cache)
# and spend their time on those. racecheck: the kernels that use shared memory (the CUDA
# LoRA forward and backward, the DTF's dθ and GAP reductions; Triton's tiles); q_sample_multi uses none.
NO_CACHE = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
TUNED = {"TRITON_CACHE_AUTOTUNING": "1"}
SANITIZER = {
    "memcheck": ([], NO_CACHE),
    "racecheck": (["--ops", "lora,dtf,attn_mask_aggregate,skill_gated_transform", "--dtypes", "fp32,bf16"], TUNED),
    "initcheck": (["--dtypes", "fp32,bf16"], {**NO_CACHE, **TUNED}),
}

SETUP = ["environment", "build", "install", "info"]
# Side by side when the machine has the cores for it; the benchmarks always run alone, after them.
LANES = [["tests-gpu", "tests-ops", "tests-kernels"], ["sanitize-check", "memcheck", "racecheck", "initcheck"]]
# One after another: by value, what the CPU machines cannot check first.
ORDER = ["tests-gpu", "tests-ops", "sanitize-check", "memcheck", "racecheck", "initcheck", "bench", "tests-kernels"]


def plan(ctx: steps.Context, inject_failure: bool = False) -> list[Step]:
    def step(name, title, cap, least, action, **kw):
        return Step(name, title, cap, least, partial(action, ctx), **kw)

    setup = [
        step("environment", "versions, device, nvidia-smi, carried wheels", 60, 10, steps.environment, gpu=False,
             setup=True),
        step("build", "fastdense._C with CUDA kernels: the prebuilt .so, else compiled here", 330, 20, steps.build,
             setup=True),
        step("install", "fastdense installed without recompiling", 90, 15, steps.install, setup=True),
        step("info", "python -m fastdense info: CUDA kernels and every GPU backend", 45, 10, steps.info, gpu=False,
             setup=True),
    ]
    if inject_failure:
        setup.insert(1, step("injected-failure", "a failing step (--inject-failure)", 20, 1, steps.injected_failure,
                             gpu=False, setup=True))
    rest = [
        step("tests-gpu", "pytest -m gpu (every gpu-marked test, cuda backends included)", 150, 30,
             steps.pytest_step(["tests", "-m", "gpu"], parallel=True)),
        step("tests-ops", "tests/ops on the triton backend and the rest of -k 'cuda or triton'", 210, 30,
             steps.pytest_step(["tests/ops", "-m", "not gpu", "-k", "cuda or triton"], parallel=True)),
        step("tests-kernels", "tests/kernels: sm_90 compiles with this machine's Triton", 120, 40,
             steps.pytest_step(["tests/kernels"], parallel=False, per_test_s=600)),
        step("sanitize-check", "tools/gpu_sanitize.py: every op right, no sanitizer (warms Triton's cache)", 60, 20,
             steps.sanitize_check),
        *(step(tool, f"compute-sanitizer --tool {tool} over tools/gpu_sanitize.py {' '.join(args)}".strip(), cap, 40,
               steps.sanitizer_step(tool, args, env))
          for (tool, (args, env)), cap in zip(SANITIZER.items(), (120, 90, 90))),
        step("bench", "benchmark subset, pytest-benchmark JSON, speed-ups over the baselines", 120, 45,
             steps.bench_step(BENCH)),
    ]
    return setup + rest


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def print_plan(steps_: list[Step]) -> None:
    lane_of = {name: f"lane {i + 1}" for i, lane in enumerate(LANES) for name in lane}
    print(f"budget {BUDGET_S:.0f} s (GPU_CHECK_BUDGET_S), {RESERVE_S:.0f} s kept for the summary; "
          f"with parallel lanes {BENCH_RESERVE_S:.0f} s kept for the benchmarks\n")
    print(f"{'step':<16} {'limit':>6} {'min':>5}  {'when':<9} what")
    for s in steps_:
        when = "set-up" if s.setup else lane_of.get(s.name, "after")
        print(f"{s.name:<16} {s.cap_s:>5.0f}s {s.min_s:>4.0f}s  {when:<9} {s.title}")
    print(f"\nsequential order after the set-up: {', '.join(ORDER)}\n\nbenchmarks:")
    for label, path, expr in BENCH:
        print(f"  {label}\n    {path} -k \"{expr}\"")


def check_bench(python: str = sys.executable) -> int:
    """Collect (never run) the BENCH selection as a GPU machine would, and say what each entry matches."""
    files = list(dict.fromkeys(f for _, f, _ in BENCH))
    expr = " or ".join(f"({e})" for _, _, e in BENCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(TOOLS), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([python, "-m", "pytest", *files, "-p", "_gpu_check.pretend_gpu", "-p", "no:cacheprovider",
                           "--collect-only", "-q", "-rs", "-k", expr], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    ids = [line for line in proc.stdout.splitlines() if "::" in line and not line.startswith("SKIPPED")]
    bad = 0
    for label, path, _ in BENCH:
        matched = [i for i in ids if i.startswith(path + "::")]
        skipped = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED") and path in line]
        state = f"{len(matched)} benchmarks" if matched else ("skipped: " + skipped[0] if skipped else "NOTHING")
        bad += not matched and not skipped
        print(f"{label}\n    {path}: {state}")
        for i in matched:
            print(f"      {i.split('::', 1)[1]}")
    if proc.returncode not in (0, 5):
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return 1
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="output folder (default $GPU_CHECK_OUT, else build/gpu-check)")
    parser.add_argument("--dry-run", action="store_true", help="run only what needs no GPU; change nothing")
    parser.add_argument("--steps", default=os.environ.get("GPU_CHECK_STEPS"),
                        help="comma-separated optional steps to run ('none': only the set-up); default all")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--check-bench", action="store_true",
                        help="collect the benchmark selection as a GPU machine would (no GPU needed) and exit")
    parser.add_argument("--inject-failure", action="store_true", help=argparse.SUPPRESS)  # the campaign's tests
    args = parser.parse_args(argv)

    out = Path(args.out or os.environ.get("GPU_CHECK_OUT") or REPO / "build" / "gpu-check").resolve()
    budget = Budget(float(os.environ.get("GPU_CHECK_BUDGET_S") or BUDGET_S), RESERVE_S)
    processes = Processes()
    wheels = Path(os.environ.get("GPU_CHECK_WHEELS") or REPO / ".whl")
    ctx = steps.Context(repo=REPO, out=out, work=Path(tempfile.gettempdir()), python=sys.executable,
                        env={**os.environ, "PYTHONUNBUFFERED": "1"}, processes=processes, dry_run=args.dry_run,
                        wheels=wheels if wheels.is_absolute() else REPO / wheels)
    all_steps = plan(ctx, args.inject_failure)
    if args.list:
        print_plan(all_steps)
        return 0
    if args.check_bench:
        return check_bench()
    optional = [s.name for s in all_steps if not s.setup]
    if args.steps is None or args.steps.strip() in ("", "all"):
        chosen = set(optional)
    else:
        chosen = {s.strip() for s in args.steps.split(",") if s.strip() and s.strip() != "none"}
        unknown = chosen - set(optional)
        if unknown:
            parser.error(f"unknown steps {sorted(unknown)}; optional steps: {', '.join(optional)}")

    ctx.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    for name in summary.OUTPUTS:  # an earlier run's results must not pass for this one's
        (out / name).unlink(missing_ok=True)
    meta = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "budget_s": budget.total_s, "elapsed_s": 0.0, "mode": "set-up", "probe": {},
            "steps_selected": sorted(chosen)}

    def gate(step: Step) -> str | None:
        if not step.setup and step.name not in chosen:
            return "not selected (GPU_CHECK_STEPS / --steps)"
        if step.gpu and not ctx.gpu:
            if ctx.dry_run:
                why = "dry run: needs the GPU"
            elif not ctx.probe:
                why = "the environment step could not read the machine"
            else:
                why = "no CUDA device here (torch.cuda.is_available() is False)"
            return why + (f"; on a GPU it would {steps.build_plan(ctx)}" if step.name == "build" else "")
        return None

    def write(final: bool = False) -> str:
        meta["elapsed_s"] = budget.elapsed()
        meta["probe"] = ctx.probe
        return summary.write(out, ctx.work, meta, list(campaign.items.values()), ctx.failing, ctx.junit,
                             final=final, interrupted=processes.interrupted)

    campaign = Campaign(all_steps, budget, processes, gate, write)

    def on_signal(signum, frame):
        print(f"gpu-check: signal {signum}: stopping the running steps and writing the summary", flush=True)
        processes.interrupt()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    print(f"gpu-check: budget {budget.total_s:.0f} s, results in {out}", flush=True)
    for s in all_steps:
        if s.setup:
            campaign.run_step(s.name)
    mode = os.environ.get("GPU_CHECK_PARALLEL", "auto")
    parallel = mode == "1" or (mode == "auto" and ctx.cores >= 8)
    if parallel:
        meta["mode"] = "parallel lanes (tests | sanitizer), then the benchmarks"
        bench_runs = ctx.gpu and "bench" in chosen
        campaign.run_lanes(LANES, until=budget.deadline - (BENCH_RESERVE_S if bench_runs else 0.0))
        campaign.run_step("bench")
    else:
        meta["mode"] = "sequential"
        for name in ORDER:
            campaign.run_step(name)
    if ctx.workers > 1:
        meta["mode"] += f"; pytest-xdist {ctx.workers} workers for the test steps"
    sm90 = REPO / "build" / "sm90_compile.md"
    if campaign.items["tests-kernels"].status in ("pass", "fail") and sm90.exists():
        shutil.copy2(sm90, ctx.work / sm90.name)
    print(write(final=True), flush=True)
    print(f"gpu-check: results in {out}", flush=True)
    for scratch in (ctx.work, ctx.site):  # its logs are in logs.tar.gz
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    items = campaign.items.values()
    if any(i.status == "fail" for i in items):
        return 1
    return 2 if processes.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
