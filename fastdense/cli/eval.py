"""``fastdense eval``: the metrics of a training checkpoint on the synthetic validation scenes."""
from __future__ import annotations

import argparse
import os

from fastdense.cli._common import UsageError, pick_device, usage_error
from fastdense.cli._main import command
from fastdense.cli._metrics_table import format_metrics_table


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
                                 device=pick_device(device), run_spec=spec)
    evaluator.step = ckpt["step"]
    return evaluator.evaluate()


@command("eval", "evaluate a training checkpoint on the synthetic validation scenes and print the metrics",
         arguments=_eval_arguments)
def cmd_eval(args: argparse.Namespace) -> int:
    try:
        metrics = run_eval(args.checkpoint, args.val_samples, args.batch_size, args.device, args.run_dir)
    except UsageError as exc:
        return usage_error("eval", exc)
    print(f"checkpoint: {args.checkpoint}")
    print(format_metrics_table(metrics))
    return 0
