"""The CPU memory figure of the benchmarks (bench/conftest.py: cpu_peak_memory_mb)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import fastdense
from fastdense.ops import BackendNotSupportedError

BENCH = Path(__file__).resolve().parents[1] / "bench"
MB = 2**20


@pytest.fixture(scope="module")
def conftest():
    # bench/ is not a package; its conftest imports its sibling _cases.
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_conftest", BENCH / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_peak_of_what_the_call_holds(conftest):
    def overlapping():
        a = torch.ones(MB // 4)          # 1 MB
        b = torch.ones(2 * MB // 4)      # 2 MB while a is alive
        return a.sum() + b.sum()

    def sequential():
        for n in (1, 3, 2):              # each freed before the next: the largest counts
            torch.ones(n * MB // 4).sum()

    assert conftest.cpu_peak_memory_mb(overlapping) == pytest.approx(3.0, abs=0.01)
    assert conftest.cpu_peak_memory_mb(sequential) == pytest.approx(3.0, abs=0.01)


def test_blocks_from_before_the_call_do_not_count(conftest):
    held = [torch.ones(4 * MB // 4)]
    # A first profiled call allocates a block it leaves alive; freed outside any profiling,
    # its entry stays in the allocator's size table.
    conftest.cpu_peak_memory_mb(lambda: held.append(torch.ones(MB // 4)))
    del held[1]

    def call():
        held.clear()                     # frees 4 MB allocated before the call
        torch.ones(MB // 4).sum()

    assert conftest.cpu_peak_memory_mb(call) == pytest.approx(1.0, abs=0.01)


def _skill_args(rows: int):
    g = torch.Generator().manual_seed(0)
    c, r, m, t = 64, 16, 10, 4
    return (torch.randn(rows, c, generator=g), torch.randn(c, r, generator=g), torch.randn(r, c, generator=g),
            torch.randn(m, r, generator=g), torch.randn(t, r, m, generator=g), torch.randn(t, r, m, generator=g))


def _attn_args():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 2, 512, 32, generator=g).unbind(0)
    return q, k, torch.softmax(torch.randn(1, 512, 16, generator=g), -1), 32 ** -0.5


@pytest.mark.parametrize("op", ["skill_gated_transform", "attn_mask_aggregate"])
def test_cpp_kernels_allocations_on_worker_threads_are_seen(conftest, op):
    """The kernels allocate per-thread tile buffers inside at::parallel_for. The profiler's
    memory hook is thread-local: unless a kernel hands the pool's threads the caller's state,
    what they allocate is invisible. With two threads, both allocate; counted are the bytes
    allocated on each thread (how much of them overlaps in time, the peak, depends on
    scheduling, which a loaded CI machine does not keep steady)."""
    if op == "skill_gated_transform":  # 8192 rows of W_u's GEMM: the row-tiled schedule, 8 tiles
        args, fn = _skill_args(2048), fastdense.ops.skill_gated_transform
    else:
        args, fn = _attn_args(), fastdense.ops.attn_mask_aggregate
    threads = torch.get_num_threads()
    try:
        with fastdense.ops.backend("cpp"):
            torch.set_num_threads(2)
            fn(*args)  # warm-up
            events = conftest.cpu_memory_events(lambda: fn(*args))
    except BackendNotSupportedError as exc:
        pytest.skip(str(exc))
    finally:
        torch.set_num_threads(threads)
    allocated: dict[int, int] = {}
    for _, nbytes, thread in events:
        allocated[thread] = allocated.get(thread, 0) + max(nbytes, 0)
    assert len(allocated) == 2, allocated
    # Each thread's tiles: ~0.3 MB (skill, 256 rows of 336 numbers), ~0.3 MB (attn, 128 x 512 scores).
    assert min(allocated.values()) > 0.2 * MB, allocated
