"""Multi-task training loop: AdamW, warm-up + cosine schedule, gradient
accumulation and clipping, bf16 autocast on CUDA, periodic evaluation with
fastdense.metrics, JSON-lines logs, prediction PNGs and resumable checkpoints.

Data order is owned by :class:`ResumableSampler` rather than a DataLoader:
its whole state is two integers, so a checkpoint can store it and a resumed
run draws exactly the batches the uninterrupted run would have drawn.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import zlib
import struct
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from fastdense._progress import ProgressBar
from fastdense.engine import checkpoint as ckpt_mod
from fastdense.engine import distributed as fd_dist
from fastdense.engine import losses as L
from fastdense.engine.tasks import dataset_of, task_spec


# ----------------------------------------------------------------------------- configuration
@dataclasses.dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8           # global batch per optimiser step (split over ranks under DDP)
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05    # the cosine decays to lr * min_lr_ratio
    grad_accum: int = 1           # micro-batches per optimiser step; batch_size must divide by it
    clip_grad: Optional[float] = 1.0
    eval_every: int = 0           # 0: evaluate only at the end
    log_every: int = 10
    save_every: int = 0           # 0: save only at the end
    seed: int = 0
    amp: bool = True              # bf16 autocast, used on CUDA only
    progress: bool = True

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier of optimiser step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup`` (the first step already gets a
    non-zero LR), then a half cosine from 1 at ``step = warmup`` down to
    ``min_ratio`` at ``step = total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases, norms and 1-D parameters get no weight decay."""
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def make_scheduler(optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    # functools.partial would be pickled into the state dict; a plain function is stored as None
    # by LambdaLR.state_dict(), which keeps the checkpoint weights-only loadable.
    def lr_lambda(step: int) -> float:
        return warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


# ----------------------------------------------------------------------------- data
class ResumableSampler:
    """Endless shuffled index stream: a fresh permutation of ``range(n)`` per epoch,
    seeded by ``(seed, epoch)``. State: epoch and position within it."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        if n < 1:
            raise ValueError("the dataset is empty")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> List[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self, k: int) -> List[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            take = min(k - len(out), self.n - self.pos)
            out.extend(self._perm[self.pos:self.pos + take])
            self.pos += take
        return out

    def state_dict(self) -> Dict[str, int]:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state["n"] != self.n:
            raise ValueError(f"sampler state is for a dataset of {state['n']} samples, this one has {self.n}")
        self.seed, self.epoch, self.pos = int(state["seed"]), int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation()


def collate(samples: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> Dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in keys}


# ----------------------------------------------------------------------------- PNG output
def write_png(path, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG using only zlib (no Pillow dependency)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))  # filter type 0 on every row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    tmp = str(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


# Colours of SyntheticScenes' semseg classes: sky, floor, wall, sphere, box, cylinder.
_PALETTE = np.array([[0, 0, 0], [128, 96, 64], [160, 160, 200], [220, 60, 60], [60, 180, 75], [60, 100, 220]],
                    dtype=np.uint8)


def _to_rgb(kind: Optional[str], x: torch.Tensor, depth_max: float = 1.0) -> np.ndarray:
    """One map (image, label or prediction) of one sample -> (H, W, 3) uint8; ``kind`` is the
    task's prediction kind (fastdense.engine.tasks.TaskSpec.prediction), None for the image."""
    x = x.detach().float().cpu()
    if kind is None:  # the input image, (3, H, W); ImageNet-normalised inputs are shown rescaled
        if x.min() < 0 or x.max() > 1:
            x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-6)
        a = x.permute(1, 2, 0).numpy()
    elif kind == "argmax":  # class ids; 255 (ignore) wraps into the palette
        ids = x.long().remainder(len(_PALETTE)).reshape(x.shape[-2], x.shape[-1]).numpy()
        return _PALETTE[ids]
    elif kind == "unit":
        a = ((x + 1) / 2 * (x.norm(dim=0, keepdim=True) > 0)).permute(1, 2, 0).numpy()
    elif kind in ("clamp0", "identity"):  # depth
        a = np.repeat((x.reshape(-1, *x.shape[-2:])[0] / max(depth_max, 1e-6)).numpy()[..., None], 3, axis=2)
    else:  # probabilities (saliency, edges)
        a = np.repeat(x.reshape(x.shape[-2], x.shape[-1]).numpy()[..., None], 3, axis=2)
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def prediction_grid(batch: Mapping[str, torch.Tensor], preds: Mapping[str, torch.Tensor], tasks: Sequence[str],
                    max_rows: int = 4, pad: int = 2, dataset: Optional[str] = None) -> np.ndarray:
    """Rows: samples. Columns: input, then ground truth and prediction of each task."""
    rows = []
    n = min(max_rows, batch["image"].shape[0])
    kinds = {t: task_spec(t, dataset if dataset is not None else dataset_of(tasks)).prediction for t in tasks}
    for i in range(n):
        cells = [_to_rgb(None, batch["image"][i])]
        for t in tasks:
            valid = batch[t][i][batch[t][i] != L.IGNORE_INDEX]
            depth = kinds[t] in ("clamp0", "identity") and valid.numel() > 0
            dmax = float(valid.max()) if depth else 1.0
            cells += [_to_rgb(kinds[t], batch[t][i], dmax), _to_rgb(kinds[t], preds[t][i], dmax)]
        h = cells[0].shape[0]
        sep = np.full((h, pad, 3), 255, np.uint8)
        rows.append(np.concatenate(sum(([c, sep] for c in cells), [])[:-1], axis=1))
    sep = np.full((pad, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate(sum(([r, sep] for r in rows), [])[:-1], axis=0)


# ----------------------------------------------------------------------------- progress
def training_bar(total: int, initial: int, enabled: bool) -> ProgressBar:
    """The training bar on stderr: tqdm on a terminal when installed; into a pipe, a plain
    line every few seconds and the last one, with the last loss."""
    return ProgressBar(total, stream=sys.stderr, initial=initial, enabled=enabled, done_label=None, use_tqdm=True)


# ----------------------------------------------------------------------------- trainer
class MultiTaskTrainer:
    """Train ``model`` (``forward(image) -> {task: output}``) on ``train_set`` items
    (dicts with ``image`` and one entry per task, as SyntheticScenes returns).

    ``run_dir`` receives ``log.jsonl`` (one JSON object per logged step or
    evaluation), ``checkpoint.pt`` (plus ``checkpoint_step<N>.pt`` every
    ``save_every`` steps) and ``predictions_step<N>.png``. Under DDP
    (after :func:`fastdense.engine.distributed.init_distributed`) each rank
    trains on its slice of every global batch and only rank 0 writes files.
    ``run_spec`` (primitives: model name and arguments, data set settings) is
    stored in checkpoints so that ``fastdense eval`` can rebuild model and data.
    ``dataset`` ("synthetic", "pascal", "nyud"; None: the first that has every
    task) picks each task's loss, prediction and metric from
    :data:`fastdense.engine.tasks.TASKS`.
    """

    def __init__(self, model: nn.Module, tasks: Sequence[str], train_set: Dataset, val_set: Optional[Dataset] = None,
                 *, config: Optional[TrainConfig] = None, loss_weights: Optional[Mapping[str, float]] = None,
                 run_dir=None, device=None, run_spec: Optional[Dict[str, Any]] = None,
                 dataset: Optional[str] = None) -> None:
        self.cfg = config or TrainConfig()
        if self.cfg.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.cfg.grad_accum < 1 or self.cfg.batch_size % (self.cfg.grad_accum * fd_dist.world_size()):
            raise ValueError(f"batch_size {self.cfg.batch_size} must be divisible by grad_accum "
                             f"{self.cfg.grad_accum} x world size {fd_dist.world_size()}")
        self.tasks = list(tasks)
        self.dataset = dataset if dataset is not None else dataset_of(self.tasks)
        for t in self.tasks:
            task_spec(t, self.dataset)  # a task the data set does not have fails here, not mid-training
        unknown = [t for t in (loss_weights or {}) if t not in self.tasks]
        if unknown:
            raise ValueError(f"loss_weights name task(s) {unknown} that are not trained ({self.tasks})")
        self.loss_weights = dict(loss_weights or {})
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device)
        self.train_set, self.val_set = train_set, val_set
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.run_spec = dict(run_spec or {})
        self.optimizer = make_optimizer(self.model, self.cfg.lr, self.cfg.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, self.cfg)
        self.sampler = ResumableSampler(len(train_set), seed=self.cfg.seed)
        self.step = 0
        self.ddp_model = self.model
        if fd_dist.world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # A model whose trainable parameters are not all used in every step (TADFormer's
            # prompt norms of the non-final blocks) says so; DDP must then look for them.
            self.ddp_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                 find_unused_parameters=bool(getattr(model, "ddp_find_unused_parameters", False)))
        self.last_eval: Dict[str, Dict[str, float]] = {}
        self._keys = ["image", *self.tasks]

    # ------------------------------------------------------------------ helpers
    @property
    def is_main(self) -> bool:
        return fd_dist.is_main_process()

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and self.cfg.amp)

    def _batch(self, indices: Sequence[int], dataset: Dataset) -> Dict[str, torch.Tensor]:
        b = collate([dataset[i] for i in indices], self._keys)
        return {k: v.to(self.device, non_blocking=True) for k, v in b.items()}

    def _log(self, record: Dict[str, Any]) -> None:
        if self.run_dir is None or not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Optional[Path]:
        return None if self.run_dir is None else self.run_dir / "checkpoint.pt"

    def save(self, path=None) -> Optional[Path]:
        path = path or self.checkpoint_path
        if path is None or not self.is_main:
            return None
        return ckpt_mod.save_checkpoint(path, model=self.model, step=self.step, optimizer=self.optimizer,
                                        scheduler=self.scheduler, sampler=self.sampler,
                                        config={"train": self.cfg.to_dict(), "spec": self.run_spec,
                                                "tasks": self.tasks, "loss_weights": self.loss_weights},
                                        metrics=self.last_eval)

    def resume(self, path) -> int:
        ckpt = ckpt_mod.load_checkpoint(path, map_location=self.device)
        self.step = ckpt_mod.restore(ckpt, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                     sampler=self.sampler)
        return self.step

    # ------------------------------------------------------------------ training
    def train_step(self) -> Dict[str, float]:
        """One optimiser step over one global batch (``grad_accum`` micro-batches)."""
        cfg = self.cfg
        self.ddp_model.train()
        indices = fd_dist.shard(self.sampler.next(cfg.batch_size))
        micro = len(indices) // cfg.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        sums: Dict[str, float] = {t: 0.0 for t in self.tasks}
        total = 0.0
        for m in range(cfg.grad_accum):
            batch = self._batch(indices[m * micro:(m + 1) * micro], self.train_set)
            last = m == cfg.grad_accum - 1
            # Without no_sync DDP would all-reduce after every micro-batch instead of once per step.
            sync = (self.ddp_model.no_sync() if (not last and self.ddp_model is not self.model)
                    else contextlib.nullcontext())
            with sync:
                with self._autocast():
                    outputs = self.ddp_model(batch["image"])
                losses = L.task_losses(outputs, batch, self.dataset)
                loss = L.total_loss(losses, self.loss_weights) / cfg.grad_accum
                loss.backward()
            total += float(loss.detach())
            for t, l in losses.items():
                sums[t] += float(l.detach()) / cfg.grad_accum
        if fd_dist.world_size() > 1:
            # Log the global batch's losses, not rank 0's share (the mean of equal shares is the
            # full-batch value because the losses divide by all pixels).
            stats = fd_dist.all_reduce_mean(torch.tensor([total, *sums.values()], dtype=torch.float64,
                                                         device=self.device)).tolist()
            total, sums = stats[0], dict(zip(sums, stats[1:]))
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.clip_grad:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"loss": total, **{f"loss_{t}": v for t, v in sums.items()}, "lr": lr, "grad_norm": grad_norm}

    def fit(self, until: Optional[int] = None) -> Dict[str, Dict[str, float]]:
        """Train from the current step to ``until`` (default ``config.steps``); returns the last evaluation."""
        cfg = self.cfg
        until = cfg.steps if until is None else min(until, cfg.steps)
        bar = training_bar(cfg.steps, self.step, cfg.progress and self.is_main)
        start = time.perf_counter()
        try:
            while self.step < until:
                record = self.train_step()
                bar.step(f"loss {record['loss']:.4f}")
                if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == until):
                    self._log({"step": self.step, "time_s": round(time.perf_counter() - start, 3), **record})
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self.evaluate()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.run_dir is not None:
                    # A file per step, plus the rolling checkpoint.pt: an earlier state stays available
                    # to resume from (or to restart a diverged run from).
                    self.save(self.run_dir / f"checkpoint_step{self.step}.pt")
                    self.save()
        finally:
            bar.close()
        if self.step >= cfg.steps and self.val_set is not None:
            self.evaluate()
        return self.last_eval

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, dataset: Optional[Dataset] = None, batch_size: Optional[int] = None,
                 save_png: bool = True) -> Dict[str, Dict[str, float]]:
        """Metrics per task on ``dataset`` (default the validation set), pooled over ranks."""
        dataset = dataset if dataset is not None else self.val_set
        if dataset is None:
            raise ValueError("no dataset to evaluate on")
        self.model.eval()
        metrics = {t: L.make_metric(t, self.dataset) for t in self.tasks}
        bs = batch_size or max(1, self.cfg.batch_size)
        indices = fd_dist.shard(range(len(dataset)))
        first = None
        for s in range(0, len(indices), bs):
            batch = self._batch(indices[s:s + bs], dataset)
            with self._autocast():
                outputs = self.model(batch["image"])
            preds = {t: L.predict(t, outputs[t], self.dataset) for t in self.tasks}
            for t in self.tasks:
                metrics[t].update(preds[t], batch[t])
            if first is None:
                first = (batch, preds)
        fd_dist.sync_metrics(metrics.values())
        result = {t: L.summarize(t, m.compute(), self.dataset) for t, m in metrics.items()}
        self.last_eval = result
        self._log({"step": self.step, "eval": result})
        if save_png and first is not None and self.run_dir is not None and self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_png(self.run_dir / f"predictions_step{self.step}.png", prediction_grid(first[0], first[1], self.tasks,
                                                                                    dataset=self.dataset))
        return result


# ----------------------------------------------------------------------------- trivial baseline
@torch.no_grad()
def constant_baseline(train_set: Dataset, tasks: Sequence[str], num_samples: int = 64,
                      dataset: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The best input-independent prediction per task, from the first ``num_samples`` training items
    (over valid pixels): the majority class (class maps), the mean unit normal, the mean depth, the
    mean probability (saliency, edges). ``dataset`` as in :class:`MultiTaskTrainer`."""
    dataset = dataset if dataset is not None else dataset_of(tasks)
    n = min(num_samples, len(train_set))
    items = [train_set[i] for i in range(n)]
    const: Dict[str, torch.Tensor] = {}
    for t in tasks:
        kind = task_spec(t, dataset).prediction
        y = torch.stack([it[t] for it in items])
        if kind == "argmax":
            y = y[y != L.IGNORE_INDEX]
            const[t] = torch.bincount(y.flatten()).argmax()
        elif kind == "unit":
            v = y.transpose(0, 1).reshape(y.shape[1], -1).float()
            v = v[:, (v.norm(dim=0) > 0) & (v != L.IGNORE_INDEX).all(dim=0)]
            const[t] = torch.nn.functional.normalize(v.mean(1), dim=0)
        elif kind in ("clamp0", "identity"):
            const[t] = y[y > 0].float().mean()  # depth: 0 marks a pixel without a measurement
        else:
            const[t] = y[y != L.IGNORE_INDEX].float().mean()
    return const


@torch.no_grad()
def evaluate_constant(const: Mapping[str, torch.Tensor], dataset: Dataset, tasks: Sequence[str],
                      batch_size: int = 16, dataset_name: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """Metrics of predicting ``const`` everywhere on ``dataset`` (``dataset_name`` as in
    :class:`MultiTaskTrainer`)."""
    name = dataset_name if dataset_name is not None else dataset_of(tasks)
    metrics = {t: L.make_metric(t, name) for t in tasks}
    for s in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(s, min(len(dataset), s + batch_size))], list(tasks))
        for t in tasks:
            y = batch[t]
            kind = task_spec(t, name).prediction
            if kind == "argmax":
                pred = torch.full_like(y, int(const[t]))
            elif kind == "unit":
                pred = const[t].view(1, -1, 1, 1).expand(y.shape[0], -1, *y.shape[2:]).contiguous()
            else:
                pred = torch.full(y.shape, float(const[t]), dtype=torch.float32)
            metrics[t].update(pred, y)
    return {t: L.summarize(t, m.compute(), name) for t, m in metrics.items()}


def beats(result: Mapping[str, Mapping[str, float]], baseline: Mapping[str, Mapping[str, float]]) -> Dict[str, bool]:
    """Per task: is the primary metric of ``result`` strictly better than ``baseline``'s?"""
    out = {}
    for t in result:
        key, higher = L.PRIMARY[t]
        a, b = result[t][key], baseline[t][key]
        out[t] = bool(a > b) if higher else bool(a < b)
    return out
