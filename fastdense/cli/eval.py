"""``fastdense eval``: the metrics of a training checkpoint on its validation data (and Δm on PASCAL-Context)."""
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
    p.add_argument("--data", choices=("synthetic", "pascal", "nyud"),
                   help="the data set the checkpoint was trained on (checked; default: the checkpoint's)")
    p.add_argument("--data-root", help="the data set's folder, if it moved since training (PASCAL-Context, NYUD)")


EVAL_SCHEMA = {"checkpoint": checks.text, "val_samples": checks.optional(checks.positive),
               "batch_size": checks.positive, "device": checks.device,
               "run_dir": checks.optional(checks.writable_dir), "data_root": checks.optional(checks.text),
               "data": checks.optional(checks.text)}

# What `fastdense train` stores under config.spec.data, as the checks of its own options
# (the synthetic scenes also store their validation seed, the real data sets their folder).
_DATA_SCHEMA = {"resolution": checks.resolution, "val_samples": checks.positive}
_DATA_SCHEMA_OF = {"synthetic": {"val_seed": checks.integer(0)}, "pascal": {"data_root": checks.text},
                   "nyud": {"data_root": checks.text}}


def _training_spec(ckpt: dict, path: str) -> dict:
    """The run spec of a `fastdense train` checkpoint, checked, or UsageError naming the file."""
    spec = ckpt.get("config", {}).get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), dict):
        raise UsageError(f"{path} is not a fastdense training checkpoint: it has no run spec with data settings "
                         "(config.spec.data)")
    dataset = spec["data"].get("dataset", "synthetic")
    if dataset not in _DATA_SCHEMA_OF:
        raise UsageError(f"{path}: config.spec.data.dataset must be one of {', '.join(_DATA_SCHEMA_OF)}, "
                         f"got {dataset!r}")
    schema = {**_DATA_SCHEMA, **_DATA_SCHEMA_OF[dataset]}
    missing = [k for k in ("model", "tasks") if k not in spec] + [k for k in schema if k not in spec["data"]]
    if missing:
        raise UsageError(f"{path} is not a fastdense training checkpoint: its run spec lacks {missing}")
    checks.check_options(spec["data"], schema, {k: f"{path}: config.spec.data.{k}" for k in schema})
    if not isinstance(spec["model"], str) or not isinstance(spec["tasks"], list) \
            or not isinstance(spec.get("model_kwargs", {}), dict):
        raise UsageError(f"{path} is not a fastdense training checkpoint: its run spec's model, tasks or "
                         "model_kwargs has the wrong type")
    return spec


def run_eval(checkpoint: str, val_samples: int | None = None, batch_size: int = 16, device: str = "auto",
             run_dir: str | None = None, data_root: str | None = None, data: str | None = None) -> dict:
    from fastdense.cli._models import real_dataset
    from fastdense.data import SyntheticScenes
    from fastdense.engine import MultiTaskTrainer, TrainConfig, load_checkpoint, restore
    from fastdense.engine.checkpoint import CheckpointError
    from fastdense.models import create_model

    checks.check_options({"checkpoint": checkpoint, "val_samples": val_samples, "batch_size": batch_size,
                          "device": device, "run_dir": run_dir, "data_root": data_root, "data": data}, EVAL_SCHEMA)
    require_file(checkpoint, "checkpoint")
    try:
        ckpt = load_checkpoint(checkpoint)
    except CheckpointError as exc:  # empty, not a torch file, or not a checkpoint's layout
        raise UsageError(f"{checkpoint} is not a fastdense training checkpoint: {exc.problem}") from None
    spec = _training_spec(ckpt, checkpoint)
    tasks = list(spec["tasks"])
    try:
        model = create_model(spec["model"], tasks=tasks, **spec.get("model_kwargs", {}))
    except (ValueError, TypeError) as exc:  # unknown model or task, or arguments the model does not take
        raise UsageError(f"{checkpoint}: cannot build model {spec['model']!r} of its run spec: "
                         f"{first_line(exc)}") from None
    try:
        restore(ckpt, model=model, rng=False)
    except CheckpointError as exc:  # the weights are another model's
        raise UsageError(f"{checkpoint}: {exc} (model {spec['model']!r}, tasks {tasks} of its run spec)") from None
    dataset = spec["data"].get("dataset", "synthetic")
    if data is not None and data != dataset:
        raise UsageError(f"--data {data}: {checkpoint} was trained on {dataset}")
    data = spec["data"]
    if dataset == "synthetic":
        n = val_samples if val_samples is not None else data["val_samples"]
        val_set = SyntheticScenes(n, data["resolution"], seed=data["val_seed"], tasks=tasks)
    else:
        val_set = real_dataset(dataset, data_root or data["data_root"], "val", tasks, data["resolution"])
        if val_samples is not None:
            from torch.utils.data import Subset

            val_set = Subset(val_set, range(min(val_samples, len(val_set))))
    cfg = TrainConfig(steps=max(1, ckpt["step"]), batch_size=batch_size, progress=False)
    evaluator = MultiTaskTrainer(model, tasks, val_set, val_set, config=cfg, run_dir=run_dir,
                                 device=pick_device(device), run_spec=spec, dataset=dataset)
    evaluator.step = ckpt["step"]
    return evaluator.evaluate()


def pascal_delta_m(metrics: dict) -> float | None:
    """Δm (%) against the single-task Swin-T baselines of the MTLoRA/TADFormer tables, when the
    run has PASCAL-Context's four tasks (docs/papers.md, 'Single-task baselines and delta-m')."""
    from fastdense.metrics.multitask import PASCAL_LOWER_IS_BETTER, PASCAL_SWIN_T_SINGLE_TASK, delta_m

    names = {"semseg": ("semseg", "miou", 100.0), "human_parts": ("parts", "miou", 100.0),
             "sal": ("sal", "miou", 100.0), "normals": ("normals", "mean", 1.0)}
    if not all(t in metrics for t in names):
        return None
    multi = {key: metrics[t][metric] * scale for t, (key, metric, scale) in names.items()}
    return delta_m(multi, PASCAL_SWIN_T_SINGLE_TASK, PASCAL_LOWER_IS_BETTER)


@command("eval", "evaluate a training checkpoint on its validation data and print the metrics (+ Δm on PASCAL)",
         arguments=_eval_arguments)
def cmd_eval(args: argparse.Namespace) -> int:
    try:
        metrics = run_eval(args.checkpoint, args.val_samples, args.batch_size, args.device, args.run_dir,
                           args.data_root, args.data)
    except UsageError as exc:
        return usage_error("eval", exc)
    print(f"checkpoint: {args.checkpoint}")
    print(format_metrics_table(metrics))
    dm = pascal_delta_m(metrics)
    if dm is not None:
        print(f"delta_m vs the single-task Swin-T baselines: {dm:+.2f}%")
    return 0
