"""``fastdense adapt --model tts_token_matcher``: VTM's few-shot protocol for the
timestep paper's token matcher, end to end (:func:`run_adapt_tts`).

Meta-trains :class:`fastdense.models.tts_token_matcher.TTSTokenMatcher` on the
tasks of four folds, fine-tunes it on N shots of each task of the held-out
fold R times and scores the predictions with the paper's metrics
(:mod:`fastdense.engine.token_matcher` holds the trainer, the TTS callback and
the metrics). Synthetic scenes and a tiny random U-Net/VAE by default;
Taskonomy with local Stable Diffusion weights on request.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, TextIO

import torch

from fastdense.data.episodes import EpisodeSampler, RepeatedResult
from fastdense.engine.fewshot import SYNTHETIC_FOLDS, EpisodicConfig, loss_trend, result_cells, synthetic_sampler
from fastdense.engine.token_matcher import TimestepSelectionCallback, TokenMatcherTrainer

__all__ = ["TTSAdaptOptions", "run_adapt_tts", "OptionsError"]


# ============================================================================ the protocol, for the CLI
class OptionsError(ValueError):
    """A bad option of :func:`run_adapt_tts` (the CLI reports it as a usage error)."""


@dataclasses.dataclass
class TTSAdaptOptions:
    """Options of :func:`run_adapt_tts` (the CLI flag is the name with ``-``)."""

    data: str = "synthetic"              # "synthetic" (tiny random U-Net/VAE) or "taskonomy" (needs data_root, sd_dir)
    data_root: Optional[str] = None      # Taskonomy-tiny merged folder (fastdense.data.TaskonomyTiny)
    sd_dir: Optional[str] = None         # local Stable Diffusion v1.4/v2.1 diffusers folder
    fold: int = 0                        # held-out fold (TASKONOMY_FOLDS / SYNTHETIC_FOLDS index)
    tasks: Optional[Sequence[str]] = None  # held-out tasks to evaluate (None: all of the fold; "a,b" works)
    shots: int = 10                      # support images per fine-tuning run
    runs: int = 5                        # support draws R (mean ± std over them)
    adapt_steps: int = 60                # fine-tuning steps per run
    adapt_lr: float = 3e-2               # fine-tuning peak rate (VTM: 5e-3 over 20k steps; docs/models)
    meta_steps: int = 200                # meta-training episodes (no checkpoint given)
    meta_shots: int = 4                  # support images per meta-training episode (VTM: 4)
    queries: int = 4                     # query images per meta-training episode
    lr: float = 3e-4                     # meta-training peak rate (warm-up + cosine); VTM: 1e-4 for long runs
    resolution: int = 64                 # synthetic image side (multiple of the model's patch)
    train_samples: int = 64              # synthetic scenes for meta-training
    test_samples: int = 32               # other synthetic scenes for supports and queries
    eval_queries: Optional[int] = None   # query images per run (None: synthetic all others; taskonomy 100)
    timesteps: Sequence[int] = (1, 100, 200, 300)   # initial set (paper §4.1)
    tts: bool = True                     # run TTS rounds (False: the fixed set)
    tts_every: int = 50                  # meta-training steps between rounds (0: none)
    tts_adapt_every: int = 5             # fine-tuning steps between rounds (0: none)
    tts_candidates: int = 8              # draws per round (the paper's N_iter)
    tau_sim: float = 0.9                 # τ_sim
    accept_against: str = "kept"         # Alg. 1 line 13 ("kept") or never-worse ("current")
    compare_fixed: bool = False          # also fine-tune with TTS off from the same meta-training
    baseline: bool = True                # also score the trivial baseline on the same draws
    preset: Optional[str] = None         # model sizes (PRESETS); default tiny (synthetic) / vtm (taskonomy)
    model_kwargs: Optional[Dict[str, Any]] = None   # other TTSTokenMatcher arguments
    seed: int = 0
    checkpoint: Optional[str] = None     # a checkpoint.pt of an earlier run: skip meta-training
    run_dir: Optional[str] = None        # log.jsonl and checkpoint.pt go there
    json: Optional[str] = None           # write the summary there
    device: str = "auto"                 # auto | cpu | cuda
    dtype: str = "float32"               # U-Net/VAE dtype: float32 | bfloat16 | float16
    threads: int = 0                     # torch CPU threads (0: torch's default)
    progress: bool = False

    @classmethod
    def from_any(cls, options) -> "TTSAdaptOptions":
        if isinstance(options, cls):
            return options
        fields = {f.name for f in dataclasses.fields(cls)}
        if options is None:
            return cls()
        if isinstance(options, argparse.Namespace):
            # The CLI's namespace holds other commands' attributes too; unset ones keep the defaults.
            return cls(**{k: v for k, v in vars(options).items() if k in fields and v is not None})
        if isinstance(options, Mapping):
            unknown = sorted(set(options) - fields)
            if unknown:
                raise OptionsError(f"unknown option(s) {unknown}; known: {sorted(fields)}")
            return cls(**{k: v for k, v in options.items() if v is not None})
        raise TypeError(f"options must be TTSAdaptOptions, a mapping or an argparse.Namespace, got "
                        f"{type(options).__name__}")


def _check_options(o: TTSAdaptOptions) -> None:
    def positive(name, minimum=1):
        v = getattr(o, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise OptionsError(f"{name} must be an integer >= {minimum}, got {v!r}")

    if o.data not in ("synthetic", "taskonomy"):
        raise OptionsError(f"data must be 'synthetic' or 'taskonomy', got {o.data!r}")
    if o.data == "taskonomy" and (o.data_root is None or o.sd_dir is None):
        raise OptionsError("data='taskonomy' needs data_root (Taskonomy-tiny) and sd_dir (Stable Diffusion weights)")
    for name in ("shots", "runs", "meta_shots", "queries", "train_samples", "test_samples"):
        positive(name)
    for name in ("adapt_steps", "meta_steps", "tts_every", "tts_adapt_every", "threads"):
        positive(name, 0)
    positive("tts_candidates")
    if o.accept_against not in ("kept", "current"):
        raise OptionsError(f"accept_against must be 'kept' or 'current', got {o.accept_against!r}")
    if o.dtype not in ("float32", "bfloat16", "float16"):
        raise OptionsError(f"dtype must be float32, bfloat16 or float16, got {o.dtype!r}")
    if o.device not in ("auto", "cpu", "cuda"):
        raise OptionsError(f"device must be auto, cpu or cuda, got {o.device!r}")
    if o.checkpoint is not None and not os.path.isfile(o.checkpoint):
        raise OptionsError(f"checkpoint not found: {o.checkpoint}")
    if o.data == "synthetic" and o.shots + 1 > o.test_samples:
        raise OptionsError(f"shots {o.shots} leaves no query among {o.test_samples} test scenes")
    if o.data == "synthetic" and o.meta_shots + o.queries > o.train_samples:
        raise OptionsError(f"meta_shots {o.meta_shots} + queries {o.queries} exceed {o.train_samples} training scenes")


def _test_tasks(wanted, fold_tasks: Sequence[str], fold: int) -> List[str]:
    """The held-out tasks to evaluate: ``wanted`` (a sequence or "a,b") or every task of the fold."""
    if wanted is None:
        return list(fold_tasks)
    names = [t.strip() for t in wanted.split(",")] if isinstance(wanted, str) else list(wanted)
    unknown = [t for t in names if t not in fold_tasks]
    if not names or unknown:
        raise OptionsError(f"tasks must be held-out tasks of fold {fold} ({', '.join(fold_tasks)}), got {wanted!r}")
    return names


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OptionsError("device 'cuda' but no CUDA device is visible")
    return torch.device(name)


def _taskonomy_setup(o: TTSAdaptOptions):
    """Taskonomy-tiny with VTM's building splits: meta-training episodes and
    fine-tuning supports from the training buildings, queries from the test
    buildings (the first ``eval_queries`` of them, in file order)."""
    from fastdense.data.taskonomy import BUILDINGS_TEST, BUILDINGS_TRAIN, TASKONOMY_FOLDS, TaskonomyTiny

    if not 0 <= o.fold < len(TASKONOMY_FOLDS):
        raise OptionsError(f"fold must be in [0, {len(TASKONOMY_FOLDS) - 1}], got {o.fold}")
    dataset = TaskonomyTiny(o.data_root)
    building = [name.split("_", 1)[0] for name in dataset.files]
    train = [i for i, b in enumerate(building) if b in BUILDINGS_TRAIN]
    test = [i for i, b in enumerate(building) if b in BUILDINGS_TEST]
    if not train or not test:
        raise OptionsError(f"{o.data_root} has no images of VTM's {'training' if not train else 'test'} buildings")
    sampler = EpisodeSampler(dataset, fold=o.fold, shots=o.meta_shots, queries=o.queries, seed=o.seed,
                             indices=train, test_indices=test)
    n_q = 100 if o.eval_queries is None else o.eval_queries
    return sampler, {"support_pool": train, "query_indices": test[:n_q]}, "unit"


def _result_dict(results: Mapping[str, Mapping[str, RepeatedResult]]) -> Dict[str, Any]:
    return {t: {k: {"mean": r.mean, "std": r.std, "values": list(r.values)} for k, r in m.items()}
            for t, m in results.items()}


def run_adapt_tts(options=None, out: Optional[TextIO] = None) -> Dict[str, Any]:
    """VTM's few-shot protocol for the timestep paper's token matcher.

    Meta-train (or load ``checkpoint``) on the tasks of four folds, fine-tune on
    ``shots`` images of each task of the held-out ``fold``, score with the
    paper's metrics; ``runs`` support draws, mean ± std. ``options``: a
    :class:`TTSAdaptOptions`, a mapping of its fields, or the CLI's
    ``argparse.Namespace`` (attributes named like the fields; None keeps a
    default). Bad options raise :class:`OptionsError`. Prints a report to
    ``out`` (stdout) and returns the summary dict (also written to ``json``).
    """
    o = TTSAdaptOptions.from_any(options)
    _check_options(o)
    out = out if out is not None else sys.stdout
    from fastdense.models.tts_token_matcher import tts_token_matcher

    device = _device(o.device)
    if o.threads:
        torch.set_num_threads(int(o.threads))
    dtype = getattr(torch, o.dtype)
    if o.data == "synthetic":
        if not 0 <= o.fold < len(SYNTHETIC_FOLDS):
            raise OptionsError(f"fold must be in [0, {len(SYNTHETIC_FOLDS) - 1}], got {o.fold}")
        sampler = synthetic_sampler(fold=o.fold, shots=o.meta_shots, queries=o.queries,
                                    train_samples=o.train_samples, test_samples=o.test_samples,
                                    resolution=o.resolution, seed=o.seed)
        eval_kw: Dict[str, Any] = {"queries": o.eval_queries}
        label_space = "synthetic"
    else:
        sampler, eval_kw, label_space = _taskonomy_setup(o)
    tasks = list(sampler.train_tasks) + list(sampler.test_tasks)
    test_tasks = _test_tasks(o.tasks, sampler.test_tasks, o.fold)
    eval_kw["tasks"] = test_tasks
    model_kwargs = dict(o.model_kwargs or {})
    if o.data == "taskonomy":
        model_kwargs.setdefault("image_size", 224)     # VTM's crops: a 14 x 14 token grid
    spec = {"model": "tts_token_matcher", "tasks": tasks, "label_space": label_space, "preset": o.preset,
            "sd_dir": o.sd_dir, "timesteps": list(o.timesteps), "model_kwargs": model_kwargs,
            "data": {"dataset": o.data, "data_root": o.data_root, "resolution": o.resolution,
                     "train_samples": o.train_samples, "test_samples": o.test_samples, "seed": o.seed}}
    try:
        model = tts_token_matcher(tasks=tasks, timesteps=tuple(o.timesteps), sd_dir=o.sd_dir, preset=o.preset,
                                  seed=o.seed, label_space=label_space, **model_kwargs)
    except (ValueError, TypeError) as exc:
        raise OptionsError(f"cannot build tts_token_matcher: {exc}") from exc
    if dtype != torch.float32:
        model.unet.to(dtype)
        if model.vae is not None:
            model.vae.to(dtype)
    if o.data == "synthetic" and o.resolution % model.patch:
        raise OptionsError(f"resolution {o.resolution} must be a multiple of the model's patch {model.patch}")

    def callbacks():
        if not o.tts:
            return []
        return [TimestepSelectionCallback(o.tts_every, o.tts_adapt_every, max_candidates=o.tts_candidates,
                                          tau_sim=o.tau_sim, accept_against=o.accept_against, seed=o.seed)]

    cfg = EpisodicConfig(steps=max(1, o.meta_steps), lr=o.lr, warmup_steps=max(1, min(10, o.meta_steps // 10)),
                         adapt_steps=o.adapt_steps, adapt_lr=o.adapt_lr, seed=o.seed, progress=o.progress)
    trainer = TokenMatcherTrainer(model, sampler, config=cfg, callbacks=callbacks(), run_dir=o.run_dir,
                                  device=device, run_spec=spec)
    print(f"tts_token_matcher on {o.data}: held-out fold {o.fold} ({', '.join(test_tasks)}); "
          f"meta-training tasks: {', '.join(sampler.train_tasks)}", file=out)
    summary: Dict[str, Any] = {"model": "tts_token_matcher", "data": o.data, "fold": o.fold,
                               "test_tasks": test_tasks, "train_tasks": list(sampler.train_tasks),
                               "shots": o.shots, "runs": o.runs, "adapt_steps": o.adapt_steps, "seed": o.seed,
                               "tts": o.tts, "initial_timesteps": list(o.timesteps)}
    start = time.perf_counter()
    if o.checkpoint is not None:
        try:
            trainer.resume(o.checkpoint, rng=False)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise OptionsError(f"cannot load {o.checkpoint}: {str(exc).splitlines()[0]}") from exc
        print(f"loaded {o.checkpoint} (meta-trained for {trainer.step} episodes, timesteps {model.timesteps})",
              file=out)
    elif o.meta_steps > 0:
        records = trainer.fit()
        k, head, tail = loss_trend(records)
        print(f"meta-trained {trainer.step} episodes in {time.perf_counter() - start:.1f} s (mean loss first {k} "
              f"{head:.4f}, last {k} {tail:.4f}); timesteps {model.timesteps}", file=out)
        path = trainer.save()
        if path is not None:
            print(f"checkpoint: {path}", file=out)
    summary["meta_steps"] = trainer.step
    summary["meta_timesteps"] = model.timesteps
    summary["meta_time_s"] = round(time.perf_counter() - start, 2)

    t0 = time.perf_counter()
    results = trainer.evaluate(runs=o.runs, shots=o.shots, adapt_steps=o.adapt_steps, tts=o.tts, **eval_kw)
    summary["tasks"] = _result_dict(results)
    summary["adapt_timesteps"] = {t: [trainer.adapt_timesteps[(t, r)] for r in range(o.runs)]
                                  for t in test_tasks}
    summary["adapt_time_s"] = round(time.perf_counter() - t0, 2)
    rows = [("tts_token_matcher" + ("" if o.tts else " (fixed timesteps)"), results)]
    if o.compare_fixed and o.tts:
        trainer.callbacks = []
        fixed = trainer.evaluate(runs=o.runs, shots=o.shots, adapt_steps=o.adapt_steps, tts=False, **eval_kw)
        summary["fixed"] = _result_dict(fixed)
        rows.append(("same model, fixed timesteps", fixed))
    if o.baseline:
        base = trainer.evaluate_baseline(runs=o.runs, shots=o.shots, **eval_kw)
        summary["baseline"] = _result_dict(base)
        rows.append(("trivial baseline (support mean)", base))
    print(f"{o.shots}-shot fine-tuning, {o.adapt_steps} steps; mean ± std over {o.runs} support draws "
          "(mIoU higher is better; mErr and RMSE lower):", file=out)
    for label, res in rows:
        print(f"  {label}", file=out)
        for task, metrics in res.items():
            print(f"    {task:<20} {result_cells(metrics)}", file=out)
    if o.json:
        os.makedirs(os.path.dirname(os.path.abspath(o.json)), exist_ok=True)
        with open(o.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary
