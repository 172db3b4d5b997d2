"""``fastdense train``: train a registered multi-task model on the synthetic scenes, PASCAL-Context or NYUD."""
from __future__ import annotations

import argparse
import sys
from typing import TextIO

from fastdense.cli import _options as checks
from fastdense.cli._common import UsageError, first_line, pick_device, require_file, usage_error
from fastdense.cli._config import load_config_file
from fastdense.cli._main import command
from fastdense.cli._metrics_table import format_metrics_table
from fastdense.cli._models import DATASETS, DEFAULT_TASKS

ALL_TRAIN_TASKS = DEFAULT_TASKS["synthetic"]

# Defaults of `train`; the flags default to None so that a value from --config is only
# overridden by a flag the user actually gave (defaults < config file < command line).
# tasks None: the data set's default tasks (fastdense.cli._models.DEFAULT_TASKS).
TRAIN_DEFAULTS = {
    "model": "tiny_mtl", "tasks": None, "data": "synthetic", "data_root": None, "pretrained": None,
    "model_args": None, "steps": 300, "batch_size": 16, "resolution": 64,
    "lr": 3e-3, "weight_decay": 0.01, "warmup_steps": 20, "grad_accum": 1, "clip_grad": 1.0, "eval_every": 0,
    "log_every": 10, "save_every": 0, "train_samples": 512, "val_samples": 64, "seed": 0,
    "run_dir": "runs/train", "resume": None, "device": "auto", "threads": 0, "progress": True,
}


def _train_arguments(p: argparse.ArgumentParser) -> None:
    d = TRAIN_DEFAULTS
    p.add_argument("--config", metavar="FILE",
                   help="JSON (or YAML, if PyYAML is installed) file of options; keys are the flag names "
                        "(with - or _); flags given on the command line override it")
    p.add_argument("--model", help=f"a registered multi-task model, e.g. tiny_mtl, mtlora_swin_t, tadformer_swin_t, "
                                   f"tdss_swin_t (default {d['model']}; `fastdense info` lists them)")
    p.add_argument("--model-arg", dest="model_args", action="append", metavar="KEY=VALUE",
                   help="a keyword argument of the model's constructor, e.g. shared_rank=32 (repeatable)")
    p.add_argument("--data", choices=DATASETS, help="synthetic scenes (default), PASCAL-Context or NYUD-v2")
    p.add_argument("--data-root", help="folder of the PASCAL-Context (PASCAL_MT) or NYUD (NYUD_MT) data")
    p.add_argument("--pretrained", metavar="FILE", help="backbone weights (safetensors or torch file, e.g. "
                                                        "timm's swin_tiny_patch4_window7_224) for the Swin models")
    p.add_argument("--tasks", help="comma-separated tasks (default: the data set's: "
                                   + "; ".join(f"{k}: {','.join(v)}" for k, v in DEFAULT_TASKS.items()) + ")")
    p.add_argument("--steps", type=int, help=f"optimiser steps in total (default {d['steps']})")
    p.add_argument("--batch-size", type=int, help=f"images per optimiser step (default {d['batch_size']})")
    p.add_argument("--resolution", type=int, help=f"image side, multiple of 4 in [64, 448] (default {d['resolution']})")
    p.add_argument("--lr", type=float, help=f"peak AdamW learning rate (default {d['lr']})")
    p.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d['weight_decay']})")
    p.add_argument("--warmup-steps", type=int,
                   help=f"linear warm-up steps before the cosine (default {d['warmup_steps']})")
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


# What each option must be (fastdense.cli._options); checked on the merged options, so a
# value from --config gets the same checks as a flag's and its message names the file.
TRAIN_SCHEMA = {
    "model": checks.text, "tasks": checks.optional(checks.name_list), "data": checks.choice(*DATASETS),
    "data_root": checks.optional(checks.text), "pretrained": checks.optional(checks.text),
    "steps": checks.positive, "batch_size": checks.positive,
    "resolution": checks.resolution, "lr": checks.number(above=0), "weight_decay": checks.number(0),
    "warmup_steps": checks.non_negative, "grad_accum": checks.positive,
    "clip_grad": checks.optional(checks.number(0)), "eval_every": checks.non_negative,
    "log_every": checks.non_negative, "save_every": checks.non_negative, "train_samples": checks.positive,
    "val_samples": checks.positive, "seed": checks.seed, "device": checks.device, "threads": checks.threads,
    "progress": checks.boolean, "resume": checks.optional(checks.text),
    "run_dir": checks.writable_dir,  # last: the only check that touches the file system
}


def train_options(args: argparse.Namespace) -> dict:
    """Defaults < ``--config`` file < flags, checked against :data:`TRAIN_SCHEMA`."""
    opts = dict(TRAIN_DEFAULTS)
    sources = {}
    if getattr(args, "config", None):
        from_file = load_config_file(args.config, TRAIN_DEFAULTS)
        opts.update(from_file)
        sources = {key: f"{key} in config file {args.config}" for key in from_file}
    for key in TRAIN_DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            if key == "model_args":  # --model-arg adds to (and overrides keys of) the config file's
                from fastdense.cli._models import parse_model_args

                where = sources.get(key, "model_args")
                value = {**parse_model_args(opts.get(key), where), **parse_model_args(value)}
            opts[key] = value
            sources.pop(key, None)
    return checks.check_options(opts, TRAIN_SCHEMA, sources)


def _check_run_setup(opts: dict) -> tuple[dict, list]:
    """Validate options, model, tasks and paths before any work; returns the checked options
    and the task list. (Options from :func:`train_options` are checked already; callers of
    :func:`run_train` that build the dict themselves get the same checks here.)"""
    from fastdense.cli._models import check_model, parse_model_args
    from fastdense.engine.tasks import TASKS

    opts = dict(TRAIN_DEFAULTS, **opts)
    opts = checks.check_options(opts, TRAIN_SCHEMA)
    check_model(opts["model"])
    opts["model_args"] = parse_model_args(opts["model_args"])
    data = opts["data"]
    given = opts["tasks"]  # name_list keeps the flag's comma-separated form
    tasks = [t.strip() for t in given.split(",") if t.strip()] if given else list(DEFAULT_TASKS[data])
    if len(set(tasks)) != len(tasks) or not tasks:
        raise UsageError(f"--tasks must name each task once, got {tasks}")
    unsupported = [t for t in tasks if t not in TASKS[data]]
    if unsupported:
        raise UsageError(f"unknown task(s) {unsupported} for --data {data}; its tasks: {', '.join(TASKS[data])}")
    if data != "synthetic" and not opts["data_root"]:
        raise UsageError(f"--data {data} needs --data-root DIR (the data set's folder)")
    if opts["pretrained"]:
        require_file(opts["pretrained"], "pretrained weights")
    if opts["resume"]:
        require_file(opts["resume"], "checkpoint to resume")
    return opts, tasks


def run_train(opts: dict, out: TextIO | None = None) -> dict:
    """Train as ``fastdense train`` does; returns {"metrics", "run_dir", "checkpoint", "trainer", "is_main"}."""
    out = out if out is not None else sys.stdout  # looked up per call: tests and callers redirect sys.stdout
    import torch

    from fastdense.cli._models import build_datasets, build_model, model_kwargs
    from fastdense.engine import MultiTaskTrainer, TrainConfig
    from fastdense.engine import distributed as fd_dist
    from fastdense.engine.checkpoint import CheckpointError
    from fastdense.engine.losses import MTLORA_LOSS_WEIGHTS

    opts, tasks = _check_run_setup(opts)
    device = pick_device(opts["device"])
    if opts["threads"]:
        torch.set_num_threads(int(opts["threads"]))
    fd_dist.init_distributed()
    if device.type == "cuda" and fd_dist.is_distributed():
        device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(opts["seed"])
    kwargs = model_kwargs(opts["model"], dataset=opts["data"], resolution=opts["resolution"],
                          pretrained=opts["pretrained"], model_args=opts["model_args"])
    model = build_model(opts["model"], tasks, kwargs)
    train_set, val_set, data_spec = build_datasets(
        opts["data"], tasks, resolution=opts["resolution"], data_root=opts["data_root"],
        train_samples=opts["train_samples"], val_samples=opts["val_samples"], seed=opts["seed"])
    # The papers' task weights on their data sets (MTLoRA's, which TADFormer and TDSS reuse).
    loss_weights = None if opts["data"] == "synthetic" else {t: MTLORA_LOSS_WEIGHTS[t] for t in tasks
                                                             if t in MTLORA_LOSS_WEIGHTS}
    cfg = TrainConfig(steps=opts["steps"], batch_size=opts["batch_size"], lr=opts["lr"],
                      weight_decay=opts["weight_decay"], warmup_steps=opts["warmup_steps"],
                      grad_accum=opts["grad_accum"], clip_grad=opts["clip_grad"] or None,
                      eval_every=opts["eval_every"], log_every=opts["log_every"], save_every=opts["save_every"],
                      seed=opts["seed"], progress=bool(opts["progress"]))
    # The checkpoint holds every weight: eval rebuilds the model without the pretrained file.
    spec = {"model": opts["model"], "model_kwargs": {k: v for k, v in kwargs.items() if k != "pretrained"},
            "tasks": tasks, "data": data_spec}
    try:
        trainer = MultiTaskTrainer(model, tasks, train_set, val_set, config=cfg, loss_weights=loss_weights,
                                   run_dir=opts["run_dir"], device=device, run_spec=spec, dataset=opts["data"])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if opts["resume"]:
        try:
            step = trainer.resume(opts["resume"])
        except CheckpointError as exc:  # not a checkpoint, or the weights of another model or tasks
            raise UsageError(f"cannot resume from {opts['resume']}: {exc.problem}") from None
        except (RuntimeError, KeyError, ValueError) as exc:  # e.g. an optimiser state of other parameters
            raise UsageError(f"cannot resume from {opts['resume']}: {first_line(exc)}") from None
        print(f"resumed from {opts['resume']} at step {step}", file=out)
    is_main = fd_dist.is_main_process()
    try:
        metrics = trainer.fit()
        path = trainer.save()
    finally:
        fd_dist.cleanup()
    return {"metrics": metrics, "run_dir": opts["run_dir"], "checkpoint": path, "trainer": trainer,
            "is_main": is_main}


@command("train", "train a multi-task model (synthetic scenes, PASCAL-Context, NYUD; checkpoint, log.jsonl, PNGs "
                  "in --run-dir)",
         arguments=_train_arguments)
def cmd_train(args: argparse.Namespace) -> int:
    try:
        opts = train_options(args)
        result = run_train(opts)
    except UsageError as exc:
        return usage_error("train", exc)
    if not result["is_main"]:  # under torchrun only rank 0 reports
        return 0
    print(f"trained {opts['model']} for {opts['steps']} steps; run dir: {result['run_dir']}")
    if result["checkpoint"] is not None:
        print(f"checkpoint: {result['checkpoint']}")
    print("validation metrics:")
    print(format_metrics_table(result["metrics"]))
    return 0
