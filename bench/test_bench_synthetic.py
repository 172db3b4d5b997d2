"""Throughput of ``fastdense.data.SyntheticScenes``: images generated per second.

Every sample carries all 12 tasks (the image, every label and meta), so an
image here costs what a multi-task training step consumes. Cases:

* ``single``     ``ds[i]`` for 64 consecutive indices in this process
* ``workers2``   a ``DataLoader`` with 2 worker processes (persistent, so
                 their start-up is not timed) over 256 samples, batch 32:
                 what a training loop on the 2-core CPU machines sees

``extra_info["images_per_s"]`` is the number of images divided by the median
wall time of one round. The machines are shared, and wall-clock rates move
with their load; ``single`` therefore also records ``cpu_ms_per_image``, the
process CPU time per image over all its calls (warm-up included), and its
inverse ``images_per_cpu_s``: less sensitive to other processes than wall
time, though not immune (they share the caches). ``workers2`` includes what
the DataLoader adds: collating 1.3 MB per image into shared memory and
passing it to the main process. Set ``FASTDENSE_SYNTHETIC_MIN_IPS`` to fail
a case whose wall-clock rate is below that (unset: only recorded).
"""
from __future__ import annotations

import os
import time

import pytest
import torch
from torch.utils.data import DataLoader

from fastdense.data import SyntheticScenes

CPU = torch.device("cpu")


def _check_min_rate(rate: float | None) -> None:
    floor = os.environ.get("FASTDENSE_SYNTHETIC_MIN_IPS")
    if rate is not None and floor:
        assert rate >= float(floor), f"{rate:.0f} images/s < FASTDENSE_SYNTHETIC_MIN_IPS={floor}"


@pytest.mark.parametrize("res", [128, 256])
def test_bench_synthetic_single(benchmark, measure, res):
    n = 64 if res == 128 else 16
    ds = SyntheticScenes(n, resolution=res, seed=0)
    out = []
    cpu = {"s": 0.0, "images": 0}

    def run():
        t0 = time.process_time()
        out[:] = [ds[i] for i in range(n)]
        cpu["s"] += time.process_time() - t0
        cpu["images"] += n

    benchmark.group = "synthetic"
    median_ms = measure(benchmark, run, device=CPU, dtype=torch.float32,
                        info={"suite": "synthetic", "case": "single", "resolution": res, "images": n,
                              "tasks": len(SyntheticScenes.TASKS)})
    rate = None if median_ms is None else n / (median_ms / 1e3)
    cpu_ms = 1e3 * cpu["s"] / cpu["images"]
    benchmark.extra_info.update(images_per_s=rate, cpu_ms_per_image=cpu_ms, images_per_cpu_s=1e3 / cpu_ms)
    if rate is not None:
        print(f"\nSyntheticScenes {res}x{res}, all tasks, one process: {rate:.0f} images/s "
              f"({cpu_ms:.2f} ms CPU per image: {1e3 / cpu_ms:.0f} images per CPU-second)")
    # What was timed is what a fresh dataset produces.
    fresh = SyntheticScenes(n, resolution=res, seed=0)[n - 1]
    assert len(out) == n and set(out[-1]) == set(fresh)
    for k in SyntheticScenes.TASKS:
        assert torch.equal(out[-1][k], fresh[k]), k
    _check_min_rate(rate)


def test_bench_synthetic_workers2(benchmark, measure):
    n, batch = 256, 32
    ds = SyntheticScenes(n, resolution=128, seed=0)
    # Held in a dict so that clearing it after timing releases the iterator,
    # which stops the persistent workers.
    held = {"loader": DataLoader(ds, batch_size=batch, num_workers=2, persistent_workers=True)}
    batches = []

    def run():
        batches[:] = list(held["loader"])

    benchmark.group = "synthetic"
    try:
        median_ms = measure(benchmark, run, device=CPU, dtype=torch.float32,
                            info={"suite": "synthetic", "case": "workers2", "resolution": 128, "images": n,
                                  "tasks": len(SyntheticScenes.TASKS)})
    finally:
        held.clear()
    rate = None if median_ms is None else n / (median_ms / 1e3)
    benchmark.extra_info["images_per_s"] = rate
    if rate is not None:
        print(f"\nSyntheticScenes 128x128, all tasks, DataLoader with 2 workers: {rate:.0f} images/s")
    assert len(batches) == n // batch
    last = ds[n - 1]
    for k in SyntheticScenes.TASKS:
        assert torch.equal(batches[-1][k][-1], last[k]), k
    _check_min_rate(rate)
