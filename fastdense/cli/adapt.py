"""``fastdense adapt``: few-shot. Meta-train (or load) a tiny token matcher on four
folds of synthetic tasks, fine-tune it on N shots of the held-out fold's tasks,
and report mean ± std over R support sets."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import TextIO

from fastdense.cli._common import UsageError, pick_device, usage_error
from fastdense.cli._main import command

ADAPT_DEFAULTS = {"fold": 0, "shots": 4, "runs": 3, "meta_steps": 60, "adapt_steps": 10, "queries": 4,
                  "resolution": 64, "train_samples": 32, "test_samples": 16, "seed": 0}


def _adapt_arguments(p: argparse.ArgumentParser) -> None:
    d = ADAPT_DEFAULTS
    p.add_argument("--checkpoint", help="checkpoint.pt of an earlier `fastdense adapt --run-dir` meta-training; "
                                        "without it a tiny model is meta-trained first")
    p.add_argument("--fold", type=int, help=f"held-out fold 0-4 (default {d['fold']}, or the checkpoint's)")
    p.add_argument("--shots", type=int, default=d["shots"], help=f"support images per run (default {d['shots']})")
    p.add_argument("--runs", type=int, default=d["runs"], help=f"support sets to average over (default {d['runs']})")
    p.add_argument("--adapt-steps", type=int, default=d["adapt_steps"],
                   help=f"fine-tuning steps per support set; 0 evaluates without fine-tuning (default {d['adapt_steps']})")
    p.add_argument("--meta-steps", type=int, default=d["meta_steps"],
                   help=f"meta-training episodes when no --checkpoint is given (default {d['meta_steps']})")
    p.add_argument("--queries", type=int, default=d["queries"],
                   help=f"query images per meta-training episode (default {d['queries']})")
    # The data options only apply to a fresh meta-training; a checkpoint brings its own.
    p.add_argument("--resolution", type=int, default=d["resolution"],
                   help=f"image side, multiple of 4 in [64, 448] (default {d['resolution']})")
    p.add_argument("--train-samples", type=int, default=d["train_samples"],
                   help=f"synthetic scenes for meta-training (default {d['train_samples']})")
    p.add_argument("--test-samples", type=int, default=d["test_samples"],
                   help=f"other synthetic scenes the supports and queries of the held-out tasks come from "
                        f"(default {d['test_samples']})")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of scenes, episodes and initialisation (default 0)")
    p.add_argument("--run-dir", help="write log.jsonl and checkpoint.pt of the meta-training there")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _positive(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or value < minimum:
        raise UsageError(f"--{name} must be an integer >= {minimum}, got {value!r}")


def run_adapt(args: argparse.Namespace, out: TextIO | None = None) -> dict:
    """Meta-train (or load), then fine-tune and evaluate on the held-out fold; returns the results."""
    out = out if out is not None else sys.stdout
    import torch

    from fastdense.engine import load_checkpoint
    from fastdense.engine.fewshot import (SYNTHETIC_FOLDS, SYNTHETIC_TASKS, EpisodicConfig, EpisodicTrainer,
                                          synthetic_sampler)
    from fastdense.models import build_model

    spec = None
    if args.fold is not None and not 0 <= args.fold < len(SYNTHETIC_FOLDS):
        raise UsageError(f"--fold must be in [0, {len(SYNTHETIC_FOLDS) - 1}], got {args.fold}")
    if args.checkpoint is not None:
        if not os.path.isfile(args.checkpoint):
            raise UsageError(f"checkpoint not found: {args.checkpoint}")
        try:
            ckpt = load_checkpoint(args.checkpoint)
            spec = ckpt["config"]["spec"]
            saved_fold = int(ckpt["config"]["sampler"]["fold"])
            missing = {"model", "tasks", "data"} - set(spec)
            if missing:
                raise KeyError(f"its run spec lacks {sorted(missing)}")
            data = dict(spec["data"])
        except Exception as exc:  # not a torch file, or not written by `fastdense adapt`
            raise UsageError(f"{args.checkpoint} is not a fastdense episodic checkpoint: {str(exc).splitlines()[0]}")
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
    _positive("shots", args.shots)
    _positive("runs", args.runs)
    _positive("queries", args.queries)
    _positive("meta-steps", args.meta_steps)
    _positive("adapt-steps", args.adapt_steps, 0)
    _positive("train-samples", data["train_samples"])
    _positive("test-samples", data["test_samples"])
    res = data["resolution"]
    if not isinstance(res, int) or res % 4 or not 64 <= res <= 448:
        raise UsageError(f"--resolution must be a multiple of 4 in [64, 448], got {res!r}")
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
        model = build_model(spec["model"], spec["tasks"], **spec.get("model_kwargs", {}))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"cannot build model {spec['model']!r}: {exc}")
    cfg = EpisodicConfig(steps=args.meta_steps, warmup_steps=max(1, min(10, args.meta_steps // 10)),
                         adapt_steps=args.adapt_steps, seed=data["seed"], progress=args.progress)
    trainer = EpisodicTrainer(model, sampler, config=cfg, run_dir=args.run_dir, device=device, run_spec=spec)
    print(f"held-out fold {fold}: {', '.join(sampler.test_tasks)}; meta-training tasks: "
          f"{', '.join(sampler.train_tasks)}", file=out)
    if args.checkpoint is not None:
        try:
            step = trainer.resume(args.checkpoint, rng=False)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UsageError(f"cannot load {args.checkpoint}: {str(exc).splitlines()[0]}")
        print(f"loaded {args.checkpoint} (meta-trained for {step} episodes)", file=out)
    else:
        start = time.perf_counter()
        records = trainer.fit()
        # Episodes of different tasks have losses of different sizes, so single episodes say
        # little; the means of the first and last tenth show the trend.
        k = max(1, len(records) // 10)
        head, tail = (statistics.fmean(r["loss"] for r in part) for part in (records[:k], records[-k:]))
        print(f"meta-trained {spec['model']} for {trainer.step} episodes in {time.perf_counter() - start:.1f} s "
              f"(mean episode loss: first {k} {head:.4f}, last {k} {tail:.4f})", file=out)
        path = trainer.save()
        if path is not None:
            print(f"checkpoint: {path}", file=out)
    results = trainer.evaluate(runs=args.runs, shots=args.shots, adapt_steps=args.adapt_steps)
    print(f"fine-tuned on {args.shots} shots for {args.adapt_steps} steps; mean ± std over {args.runs} support sets "
          "(normalised label units, lower is better):", file=out)
    for task, metrics in results.items():
        cells = "  ".join(f"{k} {r.mean:.4f} ± {r.std:.4f}" for k, r in metrics.items())
        print(f"  {task:<20} {cells}", file=out)
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


@command("adapt", "few-shot: meta-train a tiny model on 4 folds of synthetic tasks (or load --checkpoint), "
                  "fine-tune on N shots of the held-out fold's tasks and report mean ± std over R support sets",
         arguments=_adapt_arguments)
def cmd_adapt(args: argparse.Namespace) -> int:
    try:
        run_adapt(args)
    except UsageError as exc:
        return usage_error("adapt", exc)
    return 0
