"""The demo's training part: the tiny multi-task model on the synthetic scenes,
which must beat the trivial constant baseline on every task."""
from __future__ import annotations

import sys
import tempfile
import time
from typing import TextIO

from fastdense.cli._metrics_table import format_metrics_table
from fastdense.cli.train import TRAIN_DEFAULTS, run_train


def run_demo_training(steps: int, run_dir: str | None = None, resolution: int = 64, batch_size: int = 16,
                      threads: int = 0, device: str = "cpu", val_samples: int = 64,
                      out: TextIO | None = None) -> int:
    """Train the tiny model on the synthetic scenes and compare it with the constant baseline.

    Returns 0 when the model beats the baseline on every task's primary metric, else 1.
    """
    import torch

    from fastdense.engine import beats, constant_baseline, evaluate_constant

    out = out if out is not None else sys.stdout
    run_dir = run_dir or tempfile.mkdtemp(prefix="fastdense-demo-")
    opts = dict(TRAIN_DEFAULTS, steps=steps, run_dir=run_dir, resolution=resolution, batch_size=batch_size,
                threads=threads, device=device, val_samples=val_samples,
                warmup_steps=min(TRAIN_DEFAULTS["warmup_steps"], max(1, steps // 10)),
                log_every=max(1, min(10, steps // 10)))
    print("", file=out)
    print(f"demo training: {opts['model']} on {opts['train_samples']} synthetic scenes at {resolution}x{resolution}, "
          f"{steps} steps of batch {batch_size}, tasks {opts['tasks']}", file=out)
    out.flush()
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
