"""Episodic meta-training, few-shot fine-tuning and repeated evaluation.

The protocol is VTM's: the tasks are split into folds of pairs; a model is
meta-trained on episodes of the tasks of all folds but one (each step: one
task, a support set and a query set, loss on the query given the support),
then for each held-out task it is fine-tuned on N labelled shots (only the
task's own bias parameters and the LoRA adapters move) and tested on other
images of that task. Results vary a lot with the shots drawn, so they are
reported as mean +- std over R support sets
(:func:`fastdense.data.episodes.repeated_evaluation`).

Optimiser (AdamW with no decay on 1-D parameters), warm-up + cosine schedule,
progress bar and checkpoint files are those of the multi-task trainer
(:mod:`fastdense.engine.trainer`, :mod:`fastdense.engine.checkpoint`).
Meta-training episodes are a pure function of ``(sampler seed, step)``, so the
trainer's whole data state is its step and a resumed run draws exactly the
episodes the uninterrupted run would have drawn.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdense.data.episodes import Episode, EpisodeSampler, RepeatedResult, collate_episode, repeated_evaluation
from fastdense.engine import checkpoint as ckpt_mod
from fastdense.engine.trainer import make_optimizer, make_scheduler, training_bar

#: The synthetic scenes' version of Taskonomy's five folds (VTM's task pairs):
#: the scenes have no 1-channel semantic segmentation, so saliency (the
#: object/not-object mask) stands in for segment_semantic.
SYNTHETIC_FOLDS = (
    ("reshading", "principal_curvature"),
    ("keypoints2d", "keypoints3d"),
    ("edge_texture", "edge_occlusion"),
    ("depth_euclidean", "depth_zbuffer"),
    ("saliency", "normal"),
)
SYNTHETIC_TASKS = tuple(t for pair in SYNTHETIC_FOLDS for t in pair)


@dataclasses.dataclass
class EpisodicConfig:
    steps: int = 200              # meta-training episodes, one optimiser step each
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 10
    min_lr_ratio: float = 0.05    # the cosine decays to lr * min_lr_ratio
    clip_grad: Optional[float] = 1.0
    adapt_steps: int = 20         # fine-tuning steps on the N shots of a new task
    adapt_lr: float = 5e-3        # peak LR of fine-tuning (cosine to adapt_lr * min_lr_ratio, no warm-up)
    log_every: int = 10
    seed: int = 0
    progress: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _seed_of(*key) -> int:
    digest = hashlib.sha256(":".join(str(k) for k in key).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def loss_trend(records: Sequence[Mapping[str, Any]]) -> tuple[int, float, float]:
    """(k, mean loss of the first k, of the last k records), k a tenth of them: episodes of
    different tasks have losses of different sizes, so single episodes say little."""
    k = max(1, len(records) // 10)
    head, tail = (statistics.fmean(r["loss"] for r in part) for part in (records[:k], records[-k:]))
    return k, head, tail


def result_cells(metrics: Mapping[str, RepeatedResult]) -> str:
    """One task's repeated-evaluation results as "metric mean ± std" cells of a report line."""
    return "  ".join(f"{k} {r.mean:.4f} ± {r.std:.4f}" for k, r in metrics.items())


class EpisodicTrainer:
    """Meta-train ``model`` (a :class:`~fastdense.models.TinyFewShot`-like module:
    ``forward(task, support_image, support_label, query_image)``, ``normalize_label``,
    ``adaptable_parameters``) on the training folds of ``sampler``.

    ``sampler`` must have been built from a dataset (its items are loaded with
    :func:`~fastdense.data.episodes.collate_episode`). ``run_dir`` receives
    ``log.jsonl`` and ``checkpoint.pt``. ``run_spec`` (primitives) is stored
    in checkpoints so that a command can rebuild model and data.
    """

    def __init__(self, model: nn.Module, sampler: EpisodeSampler, *, config: Optional[EpisodicConfig] = None,
                 run_dir=None, device=None, run_spec: Optional[Dict[str, Any]] = None) -> None:
        self.cfg = config or EpisodicConfig()
        if self.cfg.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.cfg.adapt_steps < 0:
            raise ValueError("adapt_steps must be >= 0")
        if sampler.dataset is None:
            raise ValueError("the sampler was built from task names; build it from a dataset")
        missing = [t for t in (*sampler.train_tasks, *sampler.test_tasks) if t not in getattr(model, "tasks", ())]
        if missing:
            raise ValueError(f"the model has no parameters for task(s) {missing}; build it with every fold task")
        self.sampler = sampler
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.run_spec = dict(run_spec or {})
        self.optimizer = make_optimizer(self.model, self.cfg.lr, self.cfg.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, self.cfg)
        self.step = 0
        self.history: List[Dict[str, Any]] = []   # one record per meta-training step of this process

    # ------------------------------------------------------------------ helpers
    def _log(self, record: Dict[str, Any]) -> None:
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _to(self, side: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: side[k].to(self.device) for k in ("image", "label")}

    def load(self, episode: Episode) -> Dict[str, Any]:
        """The episode's support and query images and labels, on the trainer's device."""
        ep = collate_episode(self.sampler.dataset, episode)
        return {"task": ep["task"], "support": self._to(ep["support"]), "query": self._to(ep["query"])}

    def episode_loss(self, task: str, support: Mapping[str, torch.Tensor],
                     query: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean L1 between the prediction for ``query`` given ``support`` and the query labels,
        in normalised label units (so that metre-valued and [0, 1] tasks weigh alike)."""
        m = self.model
        pred = m(task, support["image"], m.normalize_label(task, support["label"]), query["image"])
        target = m.normalize_label(task, query["label"])[:, :pred.shape[1]]
        return F.l1_loss(pred.float(), target)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Optional[Path]:
        return None if self.run_dir is None else self.run_dir / "checkpoint.pt"

    def _sampler_config(self) -> Dict[str, Any]:
        s = self.sampler
        return {"folds": [list(f) for f in s.fold_tasks], "fold": s.fold, "shots": s.shots, "queries": s.queries,
                "seed": s.seed, "train_tasks": list(s.train_tasks), "test_tasks": list(s.test_tasks)}

    def save(self, path=None) -> Optional[Path]:
        path = path or self.checkpoint_path
        if path is None:
            return None
        return ckpt_mod.save_checkpoint(path, model=self.model, step=self.step, optimizer=self.optimizer,
                                        scheduler=self.scheduler,
                                        config={"episodic": self.cfg.to_dict(), "spec": self.run_spec,
                                                "sampler": self._sampler_config()})

    def resume(self, path, rng: bool = True) -> int:
        """Continue from a checkpoint of the same model, folds and held-out fold."""
        ckpt = ckpt_mod.load_checkpoint(path, map_location=self.device)
        saved = ckpt.get("config", {}).get("sampler")
        if saved is None:
            raise ValueError(f"{path} is not an episodic-training checkpoint")
        mine = self._sampler_config()
        for key in ("folds", "fold", "seed"):
            if saved[key] != mine[key]:
                # Another held-out fold would mean the "new" tasks were meta-trained on.
                raise ValueError(f"{path} was meta-trained with {key}={saved[key]!r}, this trainer has {mine[key]!r}")
        self.step = ckpt_mod.restore(ckpt, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                     rng=rng)
        return self.step

    # ------------------------------------------------------------------ meta-training
    def train_step(self) -> Dict[str, Any]:
        """One optimiser step on training episode ``step`` (a task of the training folds)."""
        cfg = self.cfg
        self.model.train()
        batch = self.load(self.sampler.episode(self.step, "train"))
        self.optimizer.zero_grad(set_to_none=True)
        # Dropout draws from the global RNG: seed it from (sampler seed, step) so that a run is
        # reproducible under its seed and a resumed run redraws the same masks; the caller's
        # RNG state is restored afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_of(self.sampler.seed, "meta-step", self.step))
            loss = self.episode_loss(batch["task"], batch["support"], batch["query"])
            loss.backward()
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if cfg.clip_grad:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params])))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        record = {"step": self.step, "task": batch["task"], "loss": float(loss.detach()), "lr": lr,
                  "grad_norm": grad_norm}
        self.history.append(record)
        return record

    def fit(self, until: Optional[int] = None) -> List[Dict[str, Any]]:
        """Meta-train from the current step to ``until`` (default ``config.steps``); returns this call's records."""
        cfg = self.cfg
        until = cfg.steps if until is None else min(until, cfg.steps)
        bar = training_bar(cfg.steps, self.step, cfg.progress)
        start, first = time.perf_counter(), len(self.history)
        try:
            while self.step < until:
                record = self.train_step()
                bar.step(f"loss {record['loss']:.4f}")
                if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == until):
                    self._log({**record, "time_s": round(time.perf_counter() - start, 3)})
        finally:
            bar.close()
        return self.history[first:]

    # ------------------------------------------------------------------ few-shot adaptation
    @contextlib.contextmanager
    def _only_trainable(self, params: Sequence[nn.Parameter]):
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        chosen = {id(p) for p in params}
        try:
            for p, _ in flags:
                p.requires_grad_(id(p) in chosen)
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def _adapt_inputs(self, task: str, support, steps: Optional[int], lr: Optional[float]):
        """What :meth:`adapt` works on: the support batch on the device (from dataset indices
        or a mapping), its size, and the step count and rate (the config's when None)."""
        steps = self.cfg.adapt_steps if steps is None else int(steps)
        lr = self.cfg.adapt_lr if lr is None else float(lr)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if not isinstance(support, Mapping):
            idx = tuple(int(i) for i in support)
            support = self.load(Episode(task, idx, idx[:1], "eval", 0))["support"]
        else:
            support = self._to(support)
        n = support["image"].shape[0]
        if n < 1:
            raise ValueError("the support set is empty")
        return support, n, steps, lr

    def adapt(self, task: str, support: Union[Mapping[str, torch.Tensor], Sequence[int]],
              steps: Optional[int] = None, lr: Optional[float] = None) -> List[float]:
        """Fine-tune ``model.adaptable_parameters(task)`` (the task's biases and the LoRA
        adapters) on the N shots of ``support`` for ``steps`` AdamW steps; every other
        parameter is left bit-identical. In place; returns the loss of each step.

        ``support``: ``{"image": (N,3,H,W), "label": (N,C,H,W)}``, or dataset indices
        of the sampler's dataset. Each step uses one shot as the query and the other
        N - 1 as the support, cycling through the shots (with one shot it is its own
        support): the model is trained exactly for the "predict from the others" job.
        """
        support, n, steps, lr = self._adapt_inputs(task, support, steps, lr)
        params = self.model.adaptable_parameters(task)
        losses: List[float] = []
        if steps == 0:
            return losses
        self.model.train()
        with self._only_trainable(params):
            # Decay would pull the meta-trained LoRA weights towards 0 on a handful of images.
            opt = make_optimizer(self.model, lr, 0.0)
            sched = make_scheduler(opt, dataclasses.replace(self.cfg, steps=steps, warmup_steps=0))
            for i in range(steps):
                j = i % n
                rest = [k for k in range(n) if k != j] or [j]
                sup = {k: v[rest] for k, v in support.items()}
                qry = {k: v[j:j + 1] for k, v in support.items()}
                opt.zero_grad(set_to_none=True)
                loss = self.episode_loss(task, sup, qry)
                loss.backward()
                if self.cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
        return losses

    @torch.no_grad()
    def predict(self, task: str, support: Mapping[str, torch.Tensor], query_image: torch.Tensor,
                batch_size: int = 8) -> torch.Tensor:
        """Normalised predictions for ``query_image`` given ``support``, in chunks of ``batch_size``."""
        self.model.eval()
        m = self.model
        sup_label = m.normalize_label(task, support["label"].to(self.device))
        sup_image = support["image"].to(self.device)
        outs = [m(task, sup_image, sup_label, query_image[s:s + batch_size].to(self.device))
                for s in range(0, query_image.shape[0], batch_size)]
        return torch.cat(outs)

    def evaluate(self, tasks: Optional[Sequence[str]] = None, runs: int = 5, shots: Optional[int] = None,
                 adapt_steps: Optional[int] = None, seed: Optional[int] = None, queries: Optional[int] = None,
                 query_indices: Optional[Sequence[int]] = None) -> Dict[str, Dict[str, RepeatedResult]]:
        """For each task (default the held-out fold's): ``runs`` times, draw ``shots`` support
        images from the sampler's test images, fine-tune on them (:meth:`adapt`), score the
        query images, and restore the weights. Returns ``{task: {"l1": ..., "rmse": ...}}``
        of :class:`~fastdense.data.episodes.RepeatedResult` (mean, std, per-run values);
        errors are in normalised label units, lower is better.

        Run r's support set depends only on ``(seed, r)`` (default the sampler's seed),
        so different tasks and checkpoints are compared on the same draws.
        """
        tasks = list(self.sampler.test_tasks if tasks is None else tasks)
        shots = self.sampler.shots if shots is None else shots
        unknown = [t for t in tasks if t not in self.model.tasks]
        if unknown:
            raise ValueError(f"the model has no parameters for task(s) {unknown}")
        results: Dict[str, Dict[str, RepeatedResult]] = {}
        for task in tasks:

            def run(ep: Episode, task=task) -> Dict[str, float]:
                batch = self.load(Episode(task, ep.support, ep.query, ep.split, ep.index))
                snapshot = [p.detach().clone() for p in self.model.adaptable_parameters(task)]
                # Seeded per (task, run) and isolated from the caller's RNG: results do not depend
                # on what ran before (LoRA dropout, if any, is the only randomness of adapt).
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_seed_of(self.sampler.seed if seed is None else seed, task, ep.index))
                    try:
                        self.adapt(task, batch["support"], steps=adapt_steps)
                        pred = self.predict(task, batch["support"], batch["query"]["image"]).float()
                    finally:
                        with torch.no_grad():
                            for p, saved in zip(self.model.adaptable_parameters(task), snapshot):
                                p.copy_(saved)
                target = self.model.normalize_label(task, batch["query"]["label"])[:, :pred.shape[1]]
                err = pred - target
                return {"l1": float(err.abs().mean()), "rmse": math.sqrt(float(err.pow(2).mean()))}

            results[task] = repeated_evaluation(run, self.sampler, runs=runs, shots=shots, seed=seed, task=task,
                                                queries=queries, query_indices=query_indices)
        return results


def synthetic_sampler(fold: int = 0, shots: int = 4, queries: int = 4, train_samples: int = 64,
                      test_samples: int = 24, resolution: int = 64, seed: int = 0,
                      tasks: Sequence[str] = SYNTHETIC_TASKS, folds=SYNTHETIC_FOLDS) -> EpisodeSampler:
    """An :class:`EpisodeSampler` over :class:`~fastdense.data.SyntheticScenes` with
    :data:`SYNTHETIC_FOLDS`: meta-training episodes come from the first
    ``train_samples`` scenes and test episodes from the next ``test_samples``
    (different scenes, as VTM tests on other buildings)."""
    from fastdense.data import SyntheticScenes

    dataset = SyntheticScenes(train_samples + test_samples, resolution, seed=seed, tasks=list(tasks))
    return EpisodeSampler(dataset, folds=folds, fold=fold, shots=shots, queries=queries, seed=seed,
                          indices=range(train_samples), test_indices=range(train_samples, train_samples + test_samples))


__all__ = ["EpisodicConfig", "EpisodicTrainer", "SYNTHETIC_FOLDS", "SYNTHETIC_TASKS", "synthetic_sampler"]
