"""``fastdense adapt``: few-shot. Meta-train (or load) a tiny token matcher on four
folds of synthetic tasks, fine-tune it on N shots of the held-out fold's tasks,
and report mean ± std over R support sets."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TextIO

from fastdense.cli import _options as checks
from fastdense.cli._common import UsageError, first_line, pick_device, require_file, usage_error
from fastdense.cli._main import command

ADAPT_DEFAULTS = {"fold": 0, "shots": 4, "runs": 3, "meta_steps": 60, "adapt_steps": 10, "queries": 4,
                  "resolution": 64, "train_samples": 32, "test_samples": 16, "seed": 0}


# Options of the tiny model's protocol (tiny_fewshot, meta-trained here in run_adapt) that
# concept_fewshot has no use for: it is not meta-trained episodically (its own defaults apply).
_TINY_ONLY = ("checkpoint", "fold", "meta_steps", "queries", "train_samples", "test_samples", "run_dir")
# The diffusion few-shot models: the engine function that runs each one's protocol, and the
# options of the tiny protocol it refuses. tts_token_matcher takes them all (VTM's protocol:
# meta-training on four folds, then fine-tuning on the held-out one).
PROTOCOLS = {
    "concept_fewshot": ("fastdense.engine.fewshot_concept", "run_adapt_concept", _TINY_ONLY),
    "tts_token_matcher": ("fastdense.engine.adapt_tts", "run_adapt_tts", ()),
}


def _adapt_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults are None so that each model's protocol applies its own (ADAPT_DEFAULTS for
    # the tiny model; the diffusion models' in fastdense.engine).
    d = ADAPT_DEFAULTS
    p.add_argument("--model", default="tiny_fewshot",
                   help="tiny_fewshot (default: meta-trained here on the synthetic scenes), "
                        + ", ".join(PROTOCOLS) + " (Stable Diffusion features; tiny random networks "
                        "without --sd-dir)")
    p.add_argument("--checkpoint", help="checkpoint.pt of an earlier `fastdense adapt --run-dir` meta-training; "
                                        "without it a tiny model is meta-trained first")
    p.add_argument("--fold", type=int, help=f"held-out fold 0-4 (default {d['fold']}, or the checkpoint's)")
    p.add_argument("--shots", type=int, help=f"support images per run (default {d['shots']} for tiny_fewshot)")
    p.add_argument("--runs", type=int, help=f"support sets to average over (default {d['runs']})")
    p.add_argument("--adapt-steps", type=int,
                   help=f"fine-tuning steps per support set; 0 evaluates without fine-tuning "
                        f"(default {d['adapt_steps']} for tiny_fewshot)")
    p.add_argument("--meta-steps", type=int,
                   help=f"meta-training episodes when no --checkpoint is given (default {d['meta_steps']})")
    p.add_argument("--queries", type=int, help=f"query images per meta-training episode (default {d['queries']})")
    # The data options only apply to a fresh meta-training; a checkpoint brings its own.
    p.add_argument("--resolution", type=int,
                   help=f"image side, multiple of 4 in [64, 448] (default {d['resolution']})")
    p.add_argument("--train-samples", type=int,
                   help=f"synthetic scenes for meta-training (default {d['train_samples']})")
    p.add_argument("--test-samples", type=int,
                   help=f"other synthetic scenes the supports and queries of the held-out tasks come from "
                        f"(default {d['test_samples']})")
    p.add_argument("--data", choices=("synthetic", "taskonomy", "nyud"),
                   help="data of the diffusion models' protocol (default synthetic)")
    p.add_argument("--data-root", help="Taskonomy-tiny or NYUD folder (--data taskonomy/nyud)")
    p.add_argument("--tasks", help="comma-separated tasks of the diffusion models' protocol (default: the data's)")
    p.add_argument("--sd-dir", help="local Stable Diffusion folder (unet/, vae/, scheduler/) for the diffusion models")
    p.add_argument("--clip-dir", help="local CLIP vision folder (concept_fewshot)")
    p.add_argument("--seed", type=int, help="seed of scenes, episodes and initialisation (default 0)")
    p.add_argument("--run-dir", help="write log.jsonl and checkpoint.pt of the meta-training there")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


# What each option must be (fastdense.cli._options). The data options are checked even when
# a checkpoint brings its own (a bad flag is a mistake either way), and the checkpoint's are
# checked too, named by where they are stored; --fold is checked against the folds in run_adapt.
_DATA_SCHEMA = {"resolution": checks.resolution, "train_samples": checks.integer(1),
                "test_samples": checks.integer(1), "seed": checks.seed}
ADAPT_SCHEMA = {
    "checkpoint": checks.optional(checks.text), "fold": checks.optional(checks.integer()),
    "shots": checks.integer(1), "runs": checks.integer(1), "adapt_steps": checks.integer(0),
    "meta_steps": checks.integer(1), "queries": checks.integer(1), **_DATA_SCHEMA,
    "device": checks.device, "threads": checks.threads, "progress": checks.boolean,
    # Last, the only checks that touch the file system: both are written after the work, so a
    # bad path must fail now rather than after meta-training.
    "run_dir": checks.optional(checks.writable_dir), "json": checks.optional(checks.writable_file),
}


def _episodic_spec(ckpt: dict, path: str) -> tuple[dict, int, dict]:
    """(run spec, held-out fold, data settings) of a `fastdense adapt` checkpoint, checked."""
    spec = ckpt.get("config", {}).get("spec")
    sampler = ckpt.get("config", {}).get("sampler")
    if not isinstance(spec, dict) or not isinstance(sampler, dict) or "fold" not in sampler:
        raise UsageError(f"{path} is not a fastdense episodic checkpoint: it has no run spec and sampler settings "
                         "(config.spec, config.sampler)")
    missing = sorted({"model", "tasks", "data"} - set(spec))
    if missing or not isinstance(spec["data"], dict):
        raise UsageError(f"{path} is not a fastdense episodic checkpoint: its run spec lacks "
                         f"{missing or ['data settings']}")
    lacking = [k for k in _DATA_SCHEMA if k not in spec["data"]]
    if lacking:
        raise UsageError(f"{path} is not a fastdense episodic checkpoint: its data settings lack {lacking}")
    data = checks.check_options(spec["data"], _DATA_SCHEMA,
                                {k: f"{path}: config.spec.data.{k}" for k in _DATA_SCHEMA})
    checks.check_options(sampler, {"fold": checks.integer()}, {"fold": f"{path}: config.sampler.fold"})
    return spec, sampler["fold"], dict(data)


def run_protocol(args: argparse.Namespace, out: TextIO | None = None) -> dict:
    """The few-shot protocol of a diffusion model (PROTOCOLS), with the options the user gave."""
    import importlib

    module, function, refused = PROTOCOLS[args.model]
    given = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("model", "command", "func") and not k.startswith("_")}
    tiny = [k for k in refused if k in given]
    if tiny:
        raise UsageError(f"--{tiny[0].replace('_', '-')} is an option of the tiny_fewshot protocol, "
                         f"not of {args.model}'s")
    run = getattr(importlib.import_module(module), function)
    try:
        return run(given, out)
    except (ValueError, FileNotFoundError) as exc:  # bad settings, missing data or weights
        raise UsageError(first_line(exc)) from None


def run_adapt(args: argparse.Namespace, out: TextIO | None = None) -> dict:
    """Meta-train (or load), then fine-tune and evaluate on the held-out fold; returns the results."""
    out = out if out is not None else sys.stdout
    if getattr(args, "model", "tiny_fewshot") in PROTOCOLS:
        return run_protocol(args, out)
    if getattr(args, "model", "tiny_fewshot") != "tiny_fewshot":
        raise UsageError(f"unknown few-shot model {args.model!r}; models: tiny_fewshot, {', '.join(PROTOCOLS)}")
    extra = [k for k in ("data", "data_root", "tasks", "sd_dir", "clip_dir") if getattr(args, k, None) is not None]
    if extra:
        raise UsageError(f"--{extra[0].replace('_', '-')} is an option of the diffusion models' protocols, "
                         "not of tiny_fewshot's (synthetic scenes)")
    # Unset options take the tiny protocol's defaults (--fold stays unset: a checkpoint brings its own).
    merged = dict(vars(args))
    for key, value in ADAPT_DEFAULTS.items():
        if merged.get(key) is None and key != "fold":
            merged[key] = value
    args = argparse.Namespace(**merged)
    import torch

    from fastdense.engine import load_checkpoint
    from fastdense.engine.checkpoint import CheckpointError
    from fastdense.engine.fewshot import (SYNTHETIC_FOLDS, SYNTHETIC_TASKS, EpisodicConfig, EpisodicTrainer,
                                          loss_trend, result_cells, synthetic_sampler)
    from fastdense.models import create_model

    spec = None
    checks.check_options(vars(args), ADAPT_SCHEMA)
    if args.fold is not None and not 0 <= args.fold < len(SYNTHETIC_FOLDS):
        raise UsageError(f"--fold must be in [0, {len(SYNTHETIC_FOLDS) - 1}], got {args.fold}")
    if args.checkpoint is not None:
        require_file(args.checkpoint, "checkpoint")
        try:
            ckpt = load_checkpoint(args.checkpoint)
        except CheckpointError as exc:  # empty, not a torch file, or not a checkpoint's layout
            raise UsageError(f"{args.checkpoint} is not a fastdense episodic checkpoint: {exc.problem}") from None
        spec, saved_fold, data = _episodic_spec(ckpt, args.checkpoint)
        if args.fold is not None and args.fold != saved_fold:
            raise UsageError(f"{args.checkpoint} was meta-trained with fold {saved_fold} held out; --fold {args.fold} "
                             "would test on tasks it was trained on")
        fold = saved_fold
    else:
        fold = ADAPT_DEFAULTS["fold"] if args.fold is None else args.fold
        data = {"dataset": "synthetic", "resolution": args.resolution, "train_samples": args.train_samples,
                "test_samples": args.test_samples, "seed": args.seed}
    if not 0 <= fold < len(SYNTHETIC_FOLDS):
        raise UsageError(f"{args.checkpoint} holds out fold {fold}, not one of 0-{len(SYNTHETIC_FOLDS) - 1}")
    res = data["resolution"]
    if args.shots + 1 > data["test_samples"]:
        raise UsageError(f"--shots {args.shots} leaves no query image among {data['test_samples']} test scenes; "
                         "use fewer shots or more --test-samples")
    if args.checkpoint is None and args.shots + args.queries > data["train_samples"]:
        raise UsageError(f"--shots {args.shots} + --queries {args.queries} exceed the {data['train_samples']} "
                         "meta-training scenes; raise --train-samples")
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(int(args.threads))
    sampler = synthetic_sampler(fold=fold, shots=args.shots, queries=args.queries,
                                train_samples=data["train_samples"], test_samples=data["test_samples"],
                                resolution=res, seed=data["seed"])
    if spec is None:
        spec = {"model": "tiny_fewshot", "model_kwargs": {}, "tasks": list(SYNTHETIC_TASKS), "data": data}
    torch.manual_seed(data["seed"])
    try:
        model = create_model(spec["model"], tasks=spec["tasks"], **spec.get("model_kwargs", {}))
    except (ValueError, TypeError) as exc:  # a checkpoint's spec naming an unknown model or arguments
        raise UsageError(f"cannot build model {spec['model']!r}: {first_line(exc)}") from None
    cfg = EpisodicConfig(steps=args.meta_steps, warmup_steps=max(1, min(10, args.meta_steps // 10)),
                         adapt_steps=args.adapt_steps, seed=data["seed"], progress=args.progress)
    trainer = EpisodicTrainer(model, sampler, config=cfg, run_dir=args.run_dir, device=device, run_spec=spec)
    print(f"held-out fold {fold}: {', '.join(sampler.test_tasks)}; meta-training tasks: "
          f"{', '.join(sampler.train_tasks)}", file=out)
    if args.checkpoint is not None:
        try:
            step = trainer.resume(args.checkpoint, rng=False)
        except CheckpointError as exc:  # the weights are another model's
            raise UsageError(f"cannot load {args.checkpoint}: {exc.problem}") from None
        except (RuntimeError, KeyError, ValueError) as exc:  # e.g. an optimiser state of other parameters
            raise UsageError(f"cannot load {args.checkpoint}: {first_line(exc)}") from None
        print(f"loaded {args.checkpoint} (meta-trained for {step} episodes)", file=out)
    else:
        start = time.perf_counter()
        records = trainer.fit()
        k, head, tail = loss_trend(records)
        print(f"meta-trained {spec['model']} for {trainer.step} episodes in {time.perf_counter() - start:.1f} s "
              f"(mean episode loss: first {k} {head:.4f}, last {k} {tail:.4f})", file=out)
        path = trainer.save()
        if path is not None:
            print(f"checkpoint: {path}", file=out)
    results = trainer.evaluate(runs=args.runs, shots=args.shots, adapt_steps=args.adapt_steps)
    print(f"fine-tuned on {args.shots} shots for {args.adapt_steps} steps; mean ± std over {args.runs} support sets "
          "(normalised label units, lower is better):", file=out)
    for task, metrics in results.items():
        print(f"  {task:<20} {result_cells(metrics)}", file=out)
    summary = {"fold": fold, "shots": args.shots, "runs": args.runs, "adapt_steps": args.adapt_steps,
               "meta_steps": trainer.step,
               "tasks": {t: {k: {"mean": r.mean, "std": r.std, "values": list(r.values)} for k, r in m.items()}
                         for t, m in results.items()}}
    if args.json:
        import json

        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


@command("adapt", "few-shot: meta-train a tiny model on 4 folds of synthetic tasks (or load --checkpoint), or run "
                  "a diffusion model's protocol (--model); fine-tune on N shots and report mean ± std over R support "
                  "sets",
         arguments=_adapt_arguments)
def cmd_adapt(args: argparse.Namespace) -> int:
    try:
        run_adapt(args)
    except UsageError as exc:
        return usage_error("adapt", exc)
    return 0
