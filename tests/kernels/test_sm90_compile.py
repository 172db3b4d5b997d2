"""Every Triton kernel compiles for Hopper (sm_90) at what a GPU would launch, with no register spill.

No GPU is needed: ``triton.compile`` builds PTX and a cubin for
``GPUTarget("cuda", 90, 32)`` on any machine, and the ``cuobjdump`` bundled
with Triton reads the cubin's registers, stack (spill) bytes and static shared
memory; Triton's metadata gives the dynamic shared memory.

What is compiled comes from the kernel modules themselves: each family's
``compile_specs(...)`` runs its real host launchers on ``meta`` tensors of a
problem size and returns one spec per (launch, autotune config the GPU
autotuner could pick), with the block sizes, constexpr branches and argument
specialisations (ints equal to 1, multiples of 16) of that call
(fastdense/kernels/_launch.py). The cases:

* benchmark shapes (the bench/ suites' GPU shapes): Swin-T at 448² (tokens
  112²/56²/28²/14², C = 96/192/384/768; LoRA ranks shared 64 + 4 tasks x 4;
  DTF r = 16/64, k = 3, 7x7 windows and the whole map; TDSS R = C/4, M = 10,
  T = 4), SD attention aggregation (L = 4096/1024/256, d = 40/64/128, 80 with
  FASTDENSE_SM90_ALL=1; N = 77/40), q_sample at 4x64x64 latents, k = 4, B = 1/2/8 -- every gradient
  asked for; bf16 at every autotune config, fp16 and fp32 (TF32 dots) at one
  shape per family (see _benchmark_cases). Every spec must compile and fit in
  shared memory; bf16 and fp16 specs must not spill. fp32 spills are reported
  in the table, not failed: the benchmarks and the GPU campaign run bf16, and
  fp32 tiles take twice the registers (the autotuners keep only their smallest
  configs for fp32 inputs);
* every other constexpr branch (bias off, per-task inputs, gradient subsets,
  per-head maps, given lse, k = 5/7, shared maps, ...) and the largest shapes
  the ops accept on the Triton backend (d = N = 256), in bf16 at the first
  config of each kernel: these must compile and fit in shared memory; their
  spills are reported, not failed.

FASTDENSE_SM90_ALL=1 compiles the full product instead (every shape x dtype x
config, fp32 with ieee dots too): ~1,000 specs, for a machine with time.
Identical specs are compiled once; compilation runs in a pool of two processes
started without TRITON_INTERPRET (the suite's conftest sets it for the other
tests). The table (kernel, config, registers, spill bytes, shared memory) is
printed and written to build/sm90_compile.md.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import importlib.util
import io
import multiprocessing
import os
import pathlib
import re
import subprocess
import tempfile
import time

import pytest

from fastdense.ops.skill_gated_transform import TRITON_MAX_RANK as SKILL_TRITON_MAX_RANK

FAMILIES = ("lora", "dtf", "attn_mask_aggregate", "skill_gated_transform", "q_sample_multi")
# sm_90: 228 KB of shared memory per SM, at most 227 KB for one block (opt-in).
SMEM_LIMIT = 227 * 1024
WORKERS = 2
REPORT = pathlib.Path(__file__).resolve().parents[2] / "build" / "sm90_compile.md"

# (name, torch dtype, torch.float32 matmul precision): fp32 dots are ieee
# unless TF32 is allowed, which the launchers read from torch at call time.
BF16, FP16, FP32, FP32_TF32 = DTYPES = (("bf16", "bfloat16", "highest"), ("fp16", "float16", "highest"),
                                       ("fp32", "float32", "highest"), ("fp32-tf32", "float32", "high"))
# Spills fail the test in these dtypes; fp32's are reported (see the module docstring).
SPILL_CHECKED = ("bf16", "fp16")
EVERYTHING = os.environ.get("FASTDENSE_SM90_ALL") == "1"

SWIN_T_448 = ((112, 96), (56, 192), (28, 384), (14, 768))  # (tokens per side, channels) per stage
SWIN_BATCH = 8
LORA_RANKS = (64, 4, 4, 4, 4)
TASKS = 4
SD_ATTN = tuple((length, d, n) for length in (4096, 1024, 256) for d in (40, 64, 80, 128) for n in (77, 40))


# ----------------------------------------------------------------------------- cases
def _benchmark_cases():
    """(family, kwargs, [(dtype, every config?), ...]) at the benchmark shapes, every gradient asked for.

    bf16 (the dtype the benchmarks run on the GPU) at every shape and every
    autotune config; fp16 and fp32 with TF32 dots at one shape per family and
    the first config the autotuner keeps for each kernel (the pointer types and
    the conversions compile; fp16's registers follow bf16's). Attention head
    dims 40 and 128 are compiled at N = 77 (BLOCK_C = 128), which holds more per
    thread than N = 40 (BLOCK_C = 64) under the same configs, d = 64 at both;
    DTF at r = 16 and 64 (r = 32 lies between). FASTDENSE_SM90_ALL=1 compiles every shape in every
    dtype, fp32 with ieee dots too, at every config.
    """
    def plan(representative: bool):
        if EVERYTHING:
            return [(dtype, True) for dtype in DTYPES]
        return [(BF16, True)] + ([(FP16, False), (FP32_TF32, False)] if representative else [])

    for stage, (side, c) in enumerate(SWIN_T_448, start=1):
        rows = SWIN_BATCH * side * side
        for cout in (c, 4 * c):  # attention projection (7x7 windows), fc1 (whole map)
            yield "lora", dict(rows=rows, in_features=c, out_features=cout, ranks=LORA_RANKS, bias=True,
                               shared_in_tasks=True), plan(stage == 2 and cout == 4 * c)
            for r in ((16, 32, 64) if EVERYTHING else (16, 64)):
                yield "dtf", dict(side=side, window=7 if cout == c else 0, samples=TASKS * SWIN_BATCH, rank=r,
                                  tasks=TASKS, out_features=cout), plan(stage == 2 and cout == c and r == 64)
        # Ranks above the Triton backend's limit never reach these kernels (Swin-T stage 4, R = 192,
        # runs the torch backend: fastdense/ops/skill_gated_transform.py says why).
        if c // 4 <= SKILL_TRITON_MAX_RANK:
            yield "skill_gated_transform", dict(rows=rows, channels=c, rank=c // 4, skills=10, tasks=TASKS), \
                plan(stage == 3)
    for length, d, n in SD_ATTN:
        # By default d = 80 is left out: it shares BLOCK_D = 128 with d = 128 and
        # the masked head dim with d = 40; and d = 40/80/128 run at N = 77 only.
        if not EVERYTHING and (d == 80 or (n == 40 and d != 64)):
            continue
        yield "attn_mask_aggregate", dict(batch=2, heads=8 if d != 64 else 5, length=length, head_dim=d,
                                          concepts=n), plan(d == 40 and n == 77)
    for batch in (1, 2, 8):
        for shared in (False, True):
            yield "q_sample_multi", dict(batch=batch, numel=4 * 64 * 64, steps=4, shared_noise=shared), \
                plan(batch == 2)


def _branch_cases():
    """(family, kwargs) for the other constexpr branches and the largest accepted shapes.

    Compiled in bf16 at the first autotune config of each kernel (that the
    branch compiles at all, and fits in shared memory).
    """
    base = dict(rows=8 * 56 * 56, in_features=192, out_features=768, ranks=LORA_RANKS)
    yield "lora", dict(base, bias=False, shared_in_tasks=False)
    yield "lora", dict(base, task_inputs=True, needs=(True, False, False, True, True, False, True))
    yield "lora", dict(base, needs=(False, True, False, False, False, False, False))  # grad_base only
    yield "lora", dict(base, needs=(False, False, False, True, False, False, False), forward_pass=False)
    yield "lora", dict(base, ranks=(128, 16, 16), forward_pass=False)  # wide ranks: several rank chunks
    for k in (5, 7):  # the tap loops unroll k² times: the conv and the filter gradient
        yield "dtf", dict(side=56, window=7, samples=32, rank=64, tasks=TASKS, out_features=192, kernel_size=k,
                          phases=("dwconv_dh_pooled", "dwconv_dtheta"))
    yield "dtf", dict(side=56, window=0, samples=SWIN_BATCH, rank=32, tasks=TASKS, out_features=768, shared=True,
                      phases=("conv_up_add",))
    yield "dtf", dict(side=56, window=7, samples=TASKS * SWIN_BATCH, rank=32, tasks=TASKS, out_features=192,
                      static_bias=True, phases=("conv_up_add",))
    attn = dict(batch=2, heads=8, length=1024, head_dim=40, concepts=77)
    yield "attn_mask_aggregate", dict(attn, shared_map=False, head_reduce="none")
    yield "attn_mask_aggregate", dict(attn, head_reduce="sum", given_lse=True)
    yield "attn_mask_aggregate", dict(attn, needs=(True, False, False), forward_pass=False)
    yield "attn_mask_aggregate", dict(attn, needs=(False, True, True), forward_pass=False)
    yield "attn_mask_aggregate", dict(attn, head_dim=256, concepts=256)  # TRITON_MAX_D, TRITON_MAX_N
    yield "skill_gated_transform", dict(rows=8 * 28 * 28, channels=384, rank=96, skills=10, tasks=TASKS,
                                        needs=(True, False, False, False, False, False), forward_pass=False)
    yield "skill_gated_transform", dict(rows=8 * 28 * 28, channels=384, rank=96, skills=10, tasks=TASKS,
                                        needs=(False, True, True, True, True, True), forward_pass=False)
    for needs in ((True, False), (False, True)):
        yield "q_sample_multi", dict(batch=2, numel=4 * 64 * 64, steps=4, sample_major=True, needs=needs)
        yield "q_sample_multi", dict(batch=2, numel=4 * 64 * 64, steps=4, shared_noise=True, needs=needs,
                                     forward_pass=False)


# ----------------------------------------------------------------------------- worker side
def _init_worker() -> None:
    # The compiler, not the interpreter: set before the worker imports triton.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated (silences a warning)


def _case_specs(family: str, kwargs: dict, dtype: tuple) -> list[tuple]:
    """Picklable records of ``family.compile_specs(**kwargs)`` in ``dtype``."""
    import torch

    module = importlib.import_module(f"fastdense.kernels.{family}")
    kwargs = dict(kwargs)
    torch_dtype = getattr(torch, dtype[1])
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(dtype[2])
    try:
        if family == "dtf":
            from fastdense.ops._dtf_phases import geometry

            side = kwargs.pop("side")
            specs = module.compile_specs(geometry((side, side), kwargs.pop("window")), kwargs.pop("samples"),
                                         kwargs.pop("rank"), torch_dtype, **kwargs)
        else:
            specs = module.compile_specs(dtype=torch_dtype, **kwargs)
    finally:
        torch.set_float32_matmul_precision(precision)
    return [(family, s.fn.__name__, s.signature, s.constexprs, tuple(sorted(s.divisible)), s.num_warps,
             s.num_stages, f"{dtype[0]} {s.case}", s.kernel, s.config) for s in specs]


def _family_kernels(family: str) -> list[str]:
    """Names of the @triton.jit kernels (``*_kernel``) a family module defines."""
    module = importlib.import_module(f"fastdense.kernels.{family}")
    return sorted(name for name in vars(module) if name.endswith("_kernel"))


_RESOURCES = re.compile(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _compile(record: tuple) -> dict:
    """Compile one spec for sm_90; registers, spill stack, shared memory and ptxas' spill lines."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastdense.kernels._launch import Spec

    family, name, signature, constexprs, divisible, warps, stages = record[:7]
    fn = getattr(importlib.import_module(f"fastdense.kernels.{family}"), name)
    while not isinstance(fn, triton.runtime.JITFunction):  # the jit function under an autotuner
        fn = fn.fn
    fn, full_sig, constexprs, attrs = Spec(fn, signature, constexprs, frozenset(divisible), warps, stages).source()
    out = dict(error=None, regs=None, stack=None, smem=None, spill_log=[], seconds=0.0)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v output (printed by Triton when it runs ptxas)
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn=fn, signature=full_sig, constexprs=constexprs, attrs=attrs),
                                    target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": warps, "num_stages": stages})
    except Exception as exc:  # a compile error is a result to report
        out["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
        out["seconds"] = time.perf_counter() - start
        return out
    out["seconds"] = time.perf_counter() - start
    out["spill_log"] = [line.strip() for line in log.getvalue().splitlines()
                        if "spill" in line and not re.search(r"\b0 bytes spill stores, 0 bytes spill loads", line)]
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "kernel.cubin"
        path.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)], capture_output=True,
                               text=True, check=True).stdout
    match = _RESOURCES.search(usage)
    if match is None:
        out["error"] = f"cuobjdump gave no resource line: {usage!r}"
        return out
    out["regs"] = int(match.group(2))
    out["stack"] = int(match.group(3)) + int(match.group(5))
    # Triton's shared memory is dynamic (metadata) on top of the cubin's static part.
    out["smem"] = int(match.group(4)) + int(kernel.metadata.shared)
    return out


# ----------------------------------------------------------------------------- driver
def _skip_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not importable"
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for tool in ("ptxas", "cuobjdump"):
        if not (bin_dir / tool).exists():
            return f"triton's NVIDIA backend has no bundled {tool} ({bin_dir})"
    return None


def _selected(family: str) -> bool:
    # FASTDENSE_SM90_FAMILIES=lora,dtf narrows a run while working on kernels.
    wanted = os.environ.get("FASTDENSE_SM90_FAMILIES")
    return not wanted or family in wanted.split(",")


def _first_config(records: list[tuple]) -> list[tuple]:
    """The first spec of each kernel (its first autotune config) per distinct constexpr branch."""
    seen, out = set(), []
    for record in records:
        branch = (record[1], tuple((k, v) for k, v in record[3] if not k.startswith("BLOCK")))
        if branch not in seen:
            seen.add(branch)
            out.append(record)
    return out


def _collect(pool) -> tuple[dict, dict]:
    """({spec key: {record, cases, benchmark, spill_checked}}, {family: kernel names})."""
    jobs = []
    for family, kwargs, plan in _benchmark_cases():
        for dtype, every_config in plan:
            if _selected(family):
                jobs.append((True, every_config, dtype, pool.submit(_case_specs, family, kwargs, dtype)))
    for family, kwargs in _branch_cases():
        if _selected(family):
            jobs.append((False, EVERYTHING, BF16, pool.submit(_case_specs, family, kwargs, BF16)))
    specs: dict = {}
    for benchmark, every_config, dtype, job in jobs:
        records = job.result()
        if not every_config:
            records = _first_config(records)
        for record in records:
            key = record[:7]
            entry = specs.setdefault(key, dict(record=record, cases=[], benchmark=False, spill_checked=False))
            entry["cases"].append(record[7])
            entry["benchmark"] |= benchmark
            entry["spill_checked"] |= benchmark and dtype[0] in SPILL_CHECKED
    kernels = {f: pool.submit(_family_kernels, f) for f in FAMILIES if _selected(f)}
    return specs, {f: job.result() for f, job in kernels.items()}


def _table(rows: list[dict]) -> str:
    lines = ["| kernel | config | benchmark shape | regs | spill B | smem B | s | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = "checked" if r["spill_checked"] else ("reported" if r["benchmark"] else "no")
        lines.append(f"| {r['kernel']} | {r['config']} | {shape} | {r['regs']} | "
                     f"{r['stack']} | {r['smem']} | {r['seconds']:.1f} | {(r['error'] or '')[:80]} |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def compiled():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=context, initializer=_init_worker) as pool:
        specs, kernels = _collect(pool)
        # Longest first: the two workers finish together.
        order = sorted(specs.values(), key=lambda e: (e["record"][0] != "attn_mask_aggregate", e["record"][1]))
        futures = [(entry, pool.submit(_compile, entry["record"])) for entry in order]
        rows = []
        for entry, future in futures:
            record = entry["record"]
            rows.append(dict(future.result(), family=record[0], kernel=record[8], config=record[9],
                             benchmark=entry["benchmark"], spill_checked=entry["spill_checked"],
                             cases=entry["cases"]))
    rows.sort(key=lambda r: (r["kernel"], not r["benchmark"], r["config"]))
    table = _table(rows)
    elapsed = time.perf_counter() - start
    count = sum(len(names) for names in kernels.values())
    summary = f"{len(rows)} specs of {count} kernels compiled for sm_90 in {elapsed:.0f} s"
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(f"# sm_90 compile report\n\n{summary}\n\n{table}\n")
    print(f"\n{summary} (table: {REPORT})\n{table}")
    return rows, kernels


def _problems(rows, family, check) -> list[str]:
    return [f"{r['kernel']} [{r['config']}] ({r['cases'][0]}): {check(r)}" for r in rows
            if r["family"] == family and check(r)]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_kernel_compiles_for_sm90(compiled, family):
    if not _selected(family):
        pytest.skip("not in FASTDENSE_SM90_FAMILIES")
    rows, kernels = compiled
    built = {r["kernel"].split(".", 1)[1] for r in rows if r["family"] == family}
    assert set(kernels[family]) <= built, f"kernels never compiled: {sorted(set(kernels[family]) - built)}"
    errors = _problems(rows, family, lambda r: r["error"])
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_memory_fits_sm90(compiled, family):
    if not _selected(family):
        pytest.skip("not in FASTDENSE_SM90_FAMILIES")
    rows, _ = compiled
    over = _problems(rows, family, lambda r: r["smem"] is not None and r["smem"] > SMEM_LIMIT
                     and f"{r['smem']} B of shared memory > {SMEM_LIMIT}")
    assert not over, "\n".join(over)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_register_spill_at_benchmark_shapes(compiled, family):
    if not _selected(family):
        pytest.skip("not in FASTDENSE_SM90_FAMILIES")
    rows, _ = compiled

    def spill(r):
        if not r["spill_checked"] or not (r["stack"] or r["spill_log"]):
            return None
        return f"{r['stack']} B/thread of stack (spill), {r['regs']} registers {'; '.join(r['spill_log'])}"

    spills = _problems(rows, family, spill)
    assert not spills, "\n".join(spills)
