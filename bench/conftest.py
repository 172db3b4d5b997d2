"""Helpers shared by the pytest-benchmark suites in bench/.

Timing
    CUDA: every round is timed with a pair of CUDA events around the measured
    call, after a 256 MiB buffer is zeroed so the L2 cache (50-60 MB on
    H100/H200) holds nothing of the inputs (the method of
    ``triton.testing.do_bench``). The rounds run inside ``benchmark.pedantic``,
    so pytest-benchmark's own statistics (host wall time, which adds the
    launch and synchronisation latency) are kept too; ``extra_info["median_ms"]``
    is the device time and is what ``bench/report.py`` reads.
    CPU: ``time.perf_counter`` around each call; there is no cache flush.

Memory
    ``extra_info["memory_over_inputs_mb"]``: the peak memory one call allocates
    above what was allocated when it started (the inputs, parameters and
    anything else already alive), measured after the warm-up, on every device.
    CUDA: ``torch.cuda.max_memory_allocated`` (also kept whole, less the flush
    buffer, as ``max_memory_allocated_mb``). CPU (:func:`cpu_peak_memory_mb`):
    torch's profiler with ``profile_memory=True`` records every allocation and
    free of torch's CPU allocator during the call, and the running sum of their
    sizes in time order peaks at the figure; frees count only against blocks
    allocated during the call (the events carry no address), so it is the peak
    of what the call allocated and still held. It sees what the C++ kernels
    allocate through ATen, also inside ``at::parallel_for`` regions, because
    the kernels run those under the caller's thread-local state (the
    profiler's memory hook is thread-local: a worker thread without it is
    invisible). It does not see raw ``malloc``: small per-thread row buffers
    in the kernels (a few KB), BLAS/oneDNN workspaces, other processes (the
    DataLoader workers of the synthetic suite). The resident-set high-water
    mark was tried and rejected: glibc reuses freed heap memory, so a warm call
    barely moves it (0-10 MB for the same call). The CPU has no process-wide
    counter of allocated bytes, so ``max_memory_allocated_mb`` is None there.

Throughput
    ``extra_info`` carries the minimal bytes an implementation must move and
    the FLOPs it must do (see each suite), the achieved GB/s and TFLOP/s
    derived from ``median_ms``, and the percentage of the device's peak from
    :data:`PEAKS`. Every implementation of a case gets the same byte and FLOP
    counts, so the rates compare like the times do.
"""
from __future__ import annotations

import collections
import contextlib
import statistics
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from _cases import backend_request
from fastdense._device import device_tag, gpu_tag
from fastdense.ops import BackendNotSupportedError, _dispatch
from fastdense.testing.backends import forced

# Peak HBM bandwidth and dense bf16 tensor-core throughput from NVIDIA's
# datasheets. The H100 entry is the SXM part (HBM3); PCIe and NVL H100s have
# other bandwidths and get no entry rather than a wrong one.
PEAKS = {
    "nvidia-h100": {"bytes_per_s": 3.35e12, "bf16_flop_per_s": 989e12, "part": "H100 SXM"},
    "nvidia-h200": {"bytes_per_s": 4.8e12, "bf16_flop_per_s": 989e12, "part": "H200"},
}

L2_FLUSH_BYTES = 256 * 1024 * 1024

# Seconds spent timing one case (after warm-up); pytest's options are not
# the place for this because `make bench` passes none.
TARGET_SECONDS = {"cuda": 0.25, "cpu": 0.6}
MIN_ROUNDS = {"cuda": 10, "cpu": 3}
MAX_ROUNDS = {"cuda": 500, "cpu": 50}


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: runs torch.compile (slow to warm up; deselect with -m 'not compile')")
    json_path = config.getoption("benchmark_json", None)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)


def bench_device() -> torch.device:
    # An explicit index, so device comparisons (cuda vs cuda:0) hold.
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def bench_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def device_peak(device: torch.device) -> dict | None:
    """Peak bandwidth and bf16 compute of ``device``; None where unknown (every CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "PCIe" in name or "NVL" in name:
        return None
    return PEAKS.get(gpu_tag(name))


_flush_buffer: torch.Tensor | None = None


def cpu_memory_events(fn: Callable[[], object]) -> list[tuple[int, int, int]] | None:
    """(time ns, bytes: + allocated / - freed, thread id) of every allocation and free of torch's
    CPU allocator during one call of ``fn``, in time order; None if the profiler has no events API."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    cpu = torch.autograd.DeviceType.CPU
    return sorted(((e.start_ns(), e.nbytes(), e.start_thread_id()) for e in results.events()
                   if e.name() == "[memory]" and e.device_type() == cpu), key=lambda e: e[0])


def cpu_peak_memory_mb(fn: Callable[[], object]) -> float | None:
    """Peak MB that one call of ``fn`` allocated on torch's CPU allocator and still held
    (see the module docstring); None if the profiler has no events API."""
    events = cpu_memory_events(fn)
    if events is None:
        return None
    # Frees are negative sizes. The events carry no address, so a free counts only
    # against a block of its size allocated during the call: the allocator's size
    # table outlives a profiling session, and a block freed here that an earlier
    # session allocated would otherwise subtract from this call's figure.
    outstanding: collections.Counter = collections.Counter()
    live = peak = 0
    for _, nbytes, _ in events:
        if nbytes > 0:
            outstanding[nbytes] += 1
        elif outstanding[-nbytes] > 0:
            outstanding[-nbytes] -= 1
        else:
            continue
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def _flush_l2(device: torch.device) -> None:
    global _flush_buffer
    if _flush_buffer is None or _flush_buffer.device.index != device.index:
        _flush_buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    _flush_buffer.zero_()


def measure_call(
    benchmark,
    fn: Callable[[], object],
    *,
    device: torch.device,
    dtype: torch.dtype,
    reset: Callable[[], None] | None = None,
    bytes_moved: int | None = None,
    flops: int | None = None,
    warmup: int = 2,
    info: dict | None = None,
    first_call: bool = False,
) -> float | None:
    """Time ``fn`` inside ``benchmark.pedantic`` and fill ``benchmark.extra_info``.

    ``reset`` runs before every call, untimed (clearing ``.grad`` so backward
    does not time a gradient accumulation). Returns the median in ms, or None
    when benchmarks are disabled (then ``fn`` runs once, as a smoke test).
    ``first_call`` first times one call on its own (compilation, autotuning)
    as ``extra_info["first_call_s"]``.
    """
    extra = benchmark.extra_info
    extra.update(info or {})
    extra.update({"device": device.type, "device_name": device_tag(), "dtype": str(dtype).replace("torch.", "")})
    if first_call:
        t0 = time.perf_counter()
        if reset is not None:
            reset()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        extra["first_call_s"] = time.perf_counter() - t0
    if benchmark.disabled:
        benchmark.pedantic(lambda: (reset() if reset else None, fn()))
        return None

    cuda = device.type == "cuda"
    times_ms: list[float] = []
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def setup():
            if reset is not None:
                reset()
            _flush_l2(device)
            torch.cuda.synchronize(device)

        def target():
            start.record()
            fn()
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
    else:
        def setup():
            if reset is not None:
                reset()

        def target():
            t0 = time.perf_counter()
            fn()
            times_ms.append(1e3 * (time.perf_counter() - t0))

    # Warm-up (autotuning, torch.compile, allocator growth), then one call to size the run.
    for _ in range(warmup + 1):
        setup()
        target()
    per_call_s = max(times_ms[-1] / 1e3, 1e-6)
    kind = "cuda" if cuda else "cpu"
    rounds = int(min(MAX_ROUNDS[kind], max(MIN_ROUNDS[kind], TARGET_SECONDS[kind] / per_call_s)))

    # Peak memory of one call (see the module docstring), after the warm-up.
    peak_mb = None
    setup()
    if cuda:
        # Apart from the flush buffer that stays allocated.
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        peak_mb = (peak - L2_FLUSH_BYTES) / 2**20
        extra_mb = (peak - before) / 2**20
    else:
        extra_mb = cpu_peak_memory_mb(fn)

    times_ms.clear()
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
    median_ms = statistics.median(times_ms)
    seconds = median_ms / 1e3
    peak = device_peak(device)
    extra.update({
        "median_ms": median_ms,
        "min_ms": min(times_ms),
        "rounds": len(times_ms),
        "timer": "cuda events, L2 flushed" if cuda else "perf_counter",
        "max_memory_allocated_mb": peak_mb,
        "memory_over_inputs_mb": extra_mb,
        "memory_source": "cuda allocator peak" if cuda else "profiler memory events",
        "bytes": bytes_moved,
        "flops": flops,
        "gbps": bytes_moved / seconds / 1e9 if bytes_moved else None,
        "tflops": flops / seconds / 1e12 if flops else None,
        "peak_part": peak["part"] if peak else None,
        "pct_peak_bw": 100 * bytes_moved / seconds / peak["bytes_per_s"] if peak and bytes_moved else None,
        # The compute peak is the bf16 tensor-core figure; other dtypes get none.
        "pct_peak_flops": (100 * flops / seconds / peak["bf16_flop_per_s"]
                           if peak and flops and dtype == torch.bfloat16 else None),
    })
    return median_ms


@pytest.fixture
def measure():
    """:func:`measure_call`, as a fixture so suites need not import conftest by name."""
    return measure_call


@pytest.fixture
def use_backend(device):
    """``use_backend(op, impl, op_args, info)``: run implementation ``impl`` of a case
    on its backend for the rest of the case, and record that backend as
    ``info["backend"]`` (nothing for a baseline that does not call the op).

    ``fused-<backend>`` forces that backend, and skips the case, with the
    reasons, where it cannot run ``op_args`` here; Triton on CPU tensors is
    never benchmarked (interpreter only). ``fused`` (and ``...+fused``) runs
    automatic dispatch, whatever FASTDENSE_BACKEND says.
    """
    with contextlib.ExitStack() as stack:
        def use(op: str, impl: str, op_args: tuple, info: dict) -> None:
            runs_op, name = backend_request(impl)
            if not runs_op:
                return
            if name == "triton" and device.type == "cpu":
                pytest.skip("triton: Triton kernels on CPU tensors only run in the interpreter, "
                            "which is not benchmarked")
            try:
                stack.enter_context(forced(name, op, *op_args))
            except BackendNotSupportedError as exc:
                pytest.skip(str(exc))
            info["backend"] = name or _dispatch.select(op, device.type, *op_args).backend

        yield use


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def dtype(device) -> torch.dtype:
    return bench_dtype(device)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

