"""``fastdense eval``: the metrics of a training checkpoint on the synthetic validation scenes."""
from __future__ import annotations

import argparse

from fastdense.cli import _options as checks
from fastdense.cli._common import UsageError, first_line, pick_device, require_file, usage_error
from fastdense.cli._main import command
from fastdense.cli._metrics_table import format_metrics_table


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `fastdense train`")
    p.add_argument("--val-samples", type=int, help="number of validation scenes (default: as in training)")
    p.add_argument("--batch-size", type=int, default=16, help="images per evaluation batch (default 16)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--run-dir", help="if given, a prediction PNG is written there")


EVAL_SCHEMA = {"checkpoint": checks.text, "val_samples": checks.optional(checks.positive),
               "batch_size": checks.positive, "device": checks.device,
               "run_dir": checks.optional(checks.writable_dir)}

# What `fastdense train` stores under config.spec.data, as the checks of its own options.
_DATA_SCHEMA = {"resolution": checks.resolution, "val_samples": checks.positive, "val_seed": checks.integer(0)}


def _training_spec(ckpt: dict, path: str) -> dict:
    """The run spec of a `fastdense train` checkpoint, checked, or UsageError naming the file."""
    spec = ckpt.get("config", {}).get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), dict):
        raise UsageError(f"{path} is not a fastdense training checkpoint: it has no run spec with data settings "
                         "(config.spec.data)")
    missing = [k for k in ("model", "tasks") if k not in spec] + [k for k in _DATA_SCHEMA if k not in spec["data"]]
    if missing:
        raise UsageError(f"{path} is not a fastdense training checkpoint: its run spec lacks {missing}")
    checks.check_options(spec["data"], _DATA_SCHEMA, {k: f"{path}: config.spec.data.{k}" for k in _DATA_SCHEMA})
    if not isinstance(spec["model"], str) or not isinstance(spec["tasks"], list) \
            or not isinstance(spec.get("model_kwargs", {}), dict):
        raise UsageError(f"{path} is not a fastdense training checkpoint: its run spec's model, tasks or "
                         "model_kwargs has the wrong type")
    return spec


def run_eval(checkpoint: str, val_samples: int | None = None, batch_size: int = 16, device: str = "auto",
             run_dir: str | None = None) -> dict:
    from fastdense.data import SyntheticScenes
    from fastdense.engine import MultiTaskTrainer, TrainConfig, load_checkpoint, restore
    from fastdense.engine.checkpoint import CheckpointError
    from fastdense.models import build_model

    checks.check_options({"checkpoint": checkpoint, "val_samples": val_samples, "batch_size": batch_size,
                          "device": device, "run_dir": run_dir}, EVAL_SCHEMA)
    require_file(checkpoint, "checkpoint")
    try:
        ckpt = load_checkpoint(checkpoint)
    except CheckpointError as exc:  # empty, not a torch file, or not a checkpoint's layout
        raise UsageError(f"{checkpoint} is not a fastdense training checkpoint: {exc.problem}") from None
    spec = _training_spec(ckpt, checkpoint)
    tasks = list(spec["tasks"])
    try:
        model = build_model(spec["model"], tasks, **spec.get("model_kwargs", {}))
    except (ValueError, TypeError) as exc:  # unknown model or task, or arguments the model does not take
        raise UsageError(f"{checkpoint}: cannot build model {spec['model']!r} of its run spec: "
                         f"{first_line(exc)}") from None
    try:
        restore(ckpt, model=model, rng=False)
    except CheckpointError as exc:  # the weights are another model's
        raise UsageError(f"{checkpoint}: {exc} (model {spec['model']!r}, tasks {tasks} of its run spec)") from None
    data = spec["data"]
    n = val_samples if val_samples is not None else data["val_samples"]
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
