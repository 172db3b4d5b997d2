"""Few-shot protocol of the timestep paper's token matcher: episodic meta-training
and fine-tuning with Task-aware Timestep Selection (TTS) as a callback, and VTM's
metrics. :mod:`fastdense.engine.adapt_tts` runs the whole protocol for
``fastdense adapt --model tts_token_matcher``.

The protocol is VTM's (docs/papers.md, 'Timestep selection and consolidation';
the choices are in docs/paper-decisions.md, 'Token matcher protocol' and 'TTS
in training'):

1. meta-train on episodes of the tasks of four folds (support and query
   images of one task; VTM's hybrid loss: BCE for segmentation, L1 of the
   sigmoid otherwise) — only what :meth:`TTSTokenMatcher.meta_parameters` lists;
2. for each task of the held-out fold, R times: draw N support images,
   fine-tune the LoRA adapters and the task's biases on them (each step one
   shot is the query of the others), predict held-out query images and score
   them with the paper's metric: mIoU for segmentation, mean angle error for
   normals, VTM's "RMSE" for the rest (:func:`vtm_scores`);
3. report mean ± std over the R support draws, next to a trivial baseline
   (the support labels' mean) on the same draws.

TTS runs as :class:`TimestepSelectionCallback`: every ``every`` meta-training
steps one round of :class:`fastdense.nn.TaskAwareTimestepSelector` (Alg. 1)
on a :class:`fastdense.diffusion.TimestepFeatureCache` of the step's episode,
and every ``adapt_every`` fine-tuning steps one round on the support shots
(first half as support, second half as query). The selected set lives in the
model (a buffer, so checkpoints carry it); each round is appended to the run's
``log.jsonl``; the selector's state is saved in the checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from fastdense.data.episodes import Episode, EpisodeSampler, RepeatedResult, repeated_evaluation
from fastdense.engine import checkpoint as ckpt_mod
from fastdense.engine.fewshot import EpisodicConfig, EpisodicTrainer, _seed_of
from fastdense.engine.trainer import make_optimizer, make_scheduler
from fastdense.metrics.vtm import VTMTaskonomyError
from fastdense.nn.timestep_selection import RoundRecord, TaskAwareTimestepSelector

__all__ = ["TimestepSelectionCallback", "TokenMatcherTrainer", "vtm_scores", "metric_name",
           "support_mean_prediction", "augment_labels"]



# ============================================================================ metrics
def metric_name(task: str) -> str:
    """The paper's metric of a task: "miou" (↑), "merr" (↓) or "rmse" (↓, VTM's masked mean error)."""
    from fastdense.models.tts_token_matcher import SEGMENTATION_TASKS

    if task in SEGMENTATION_TASKS:
        return "miou"
    return "merr" if task in ("normal", "normals") else "rmse"


def vtm_scores(task: str, probs: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None
               ) -> Dict[str, float]:
    """The paper's metric of ``task`` (:func:`metric_name`, with VTM's definitions,
    :class:`fastdense.metrics.VTMTaskonomyError`) and the masked L1 error, both on
    [0, 1] labels. ``probs``/``target``: (N, C, H, W); ``mask``: (N, 1, H, W) or None.

    Segmentation: every channel a class, sigmoid > 0.2 vs target ≥ 0.5, IoU
    pooled over images, mean over channels. Normals: angle of the unit-normalised
    [0, 1]-encoded vectors, VTM's averaging (masked pixels stay in the
    denominator). Others: VTM's per-image masked mean of √((y − ŷ)²)."""
    name = metric_name(task)
    probs, target = probs.float(), target.float()
    if name == "miou":
        metric = VTMTaskonomyError("segment_semantic", num_classes=probs.shape[1])
        metric.update(probs, target)
    else:
        metric = VTMTaskonomyError("normal" if name == "merr" else task)
        metric.update(probs, target, mask)
    err = (probs - target).abs()
    if mask is not None:
        m = mask.to(err.dtype).expand_as(err)
        l1 = float((err * m).sum() / m.sum().clamp(min=1))
    else:
        l1 = float(err.mean())
    return {name: metric.compute(), "l1": l1}


def support_mean_prediction(target_shape, support_label: torch.Tensor, support_mask: Optional[torch.Tensor] = None
                            ) -> torch.Tensor:
    """The trivial baseline: every query pixel gets the support labels' mean, per channel."""
    y = support_label.float()
    if support_mask is not None:
        m = support_mask.to(y.dtype).expand_as(y)
        mean = (y * m).sum(dim=(0, 2, 3)) / m.sum(dim=(0, 2, 3)).clamp(min=1)
    else:
        mean = y.mean(dim=(0, 2, 3))
    return mean.view(1, -1, 1, 1).expand(tuple(target_shape)).clone()


# ============================================================================ task augmentation
def _minmax(y: torch.Tensor) -> torch.Tensor:
    lo, hi = y.min(), y.max()
    return y - lo if bool(hi == lo) else (y - lo) / (hi - lo)


def augment_labels(labels: torch.Tensor, generator: torch.Generator, p: float = 0.8) -> torch.Tensor:
    """VTM's unary task augmentation of one episode's labels (support and query
    stacked, (N, C, H, W) in [0, 1]): two of {jitter, polynomial}, each applied
    with probability ``p``, the same transform for every image of the episode,
    and the result min-max normalised over the episode as VTM does. It turns a
    training task into a new one, so the matcher has to read values off the
    support labels instead of recalling the task (VTM ``dataset/augmentation.py``:
    jitter with brightness and contrast in ±0.5, polynomial degree log-uniform in
    [1/3, 3]; its sigmoid and blur filters and the binary mixup are not used)."""
    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    y = labels.float()
    for kind in ("jitter", "polynomial"):
        if float(torch.rand((), generator=generator)) >= p:
            continue
        if kind == "jitter":
            y = _minmax(((1 + uniform(-0.5, 0.5)) * y + uniform(-0.5, 0.5)).clamp(0, 1))
        else:
            y = _minmax(y.clamp(min=0).pow(math.exp(uniform(math.log(1 / 3), math.log(3.0)))))
    return y


# ============================================================================ TTS callback
def _selection_round(model, selector: TaskAwareTimestepSelector, task: str, support: Mapping[str, torch.Tensor],
                     query: Mapping[str, torch.Tensor], step: Optional[int]) -> RoundRecord:
    """One round of Alg. 1 for ``model`` on one episode: a fresh feature cache of
    its images (the current U-Net, LoRA included), the loss = VTM's hybrid loss
    of the query given the support, the k leave-one-out sets in one head call.
    The model runs in eval mode (no dropout noise in the comparisons); the set
    it ends with becomes the model's."""
    s = support["image"].shape[0]
    was_training = model.training
    model.eval()
    try:
        cache = model.feature_cache(torch.cat([support["image"], query["image"]]))
        sy = model.normalize_label(task, support["label"])
        smask = model.label_mask(task, support["label"], support.get("mask"))
        qy = model.normalize_label(task, query["label"])
        qmask = model.label_mask(task, query["label"], query.get("mask"))

        def loss_fn(feats, timesteps):
            logits = model.head(task, {n: f[:s] for n, f in feats.items()}, sy,
                                {n: f[s:] for n, f in feats.items()}, smask)
            return model.loss(task, logits, qy, qmask)

        def batched_loss_fn(stacked, subsets):
            p = len(subsets)
            feats = {n: f.view(p, -1, *f.shape[1:]) for n, f in stacked.items()}   # subset-major rows
            logits = model.head(task, {n: f[:, :s] for n, f in feats.items()}, sy,
                                {n: f[:, s:] for n, f in feats.items()}, smask)
            return model.loss(task, logits, qy.unsqueeze(0), None if qmask is None else qmask.unsqueeze(0),
                              reduce_dims=(1, 2, 3, 4))

        record = selector.step(cache, loss_fn, batched_loss_fn=batched_loss_fn, step_idx=step)
        model.set_timesteps(selector.timesteps)
    finally:
        model.train(was_training)
    return record


class TimestepSelectionCallback:
    """Task-aware Timestep Selection (Alg. 1) as a callback of :class:`TokenMatcherTrainer`.

    Args:
        every: meta-training steps between rounds (0: no rounds in meta-training).
        adapt_every: fine-tuning steps between rounds (0: none while fine-tuning).
        max_candidates: draws per round (the paper's N_iter; it gives no value).
        tau_sim: similarity threshold τ_sim (paper: 0.9).
        accept_against: ``"kept"`` (Alg. 1 line 13, the default) or ``"current"``
            (never-worse); docs/paper-decisions.md, 'TTS acceptance rule'.
        max_rounds: stop meta-training rounds after this many (None: no limit).
        seed: the selectors' draws; a fine-tuning selector is seeded by
            ``(seed, task, run)``, so runs and tasks are independent and repeatable.

    The meta-training selector persists (its RNG and history are in the
    checkpoint, :meth:`state_dict`); each fine-tuning run starts a fresh
    selector from the model's current set and :attr:`adapt_history` keeps its rounds.
    """

    def __init__(self, every: int = 100, adapt_every: int = 5, *, max_candidates: int = 20, tau_sim: float = 0.9,
                 accept_against: str = "kept", max_rounds: Optional[int] = None, t_min: int = 1,
                 seed: int = 0) -> None:
        for name, v in (("every", every), ("adapt_every", adapt_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        self.every, self.adapt_every = every, adapt_every
        self.max_candidates, self.tau_sim, self.accept_against = max_candidates, tau_sim, accept_against
        self.max_rounds, self.t_min, self.seed = max_rounds, t_min, int(seed)
        self.selector: Optional[TaskAwareTimestepSelector] = None
        self._pending_state: Optional[Mapping] = None
        self._adapt: Optional[TaskAwareTimestepSelector] = None
        self._adapt_key: Optional[tuple] = None
        self.adapt_history: Dict[tuple, List[dict]] = {}

    def _new_selector(self, model, seed: int) -> TaskAwareTimestepSelector:
        ts = model.timesteps
        return TaskAwareTimestepSelector(k=len(ts), initial=ts, t_max=model.extractor.num_train_timesteps,
                                         tau_sim=self.tau_sim, n_iter=self.max_rounds,
                                         max_candidates=self.max_candidates, seed=seed,
                                         accept_against=self.accept_against, t_min=self.t_min)

    # ------------------------------------------------------------------ meta-training
    def on_meta_step(self, trainer: "TokenMatcherTrainer", batch: Mapping[str, Any]) -> Optional[RoundRecord]:
        if not self.every or trainer.step % self.every:
            return None
        model = trainer.model
        if self.selector is None:
            self.selector = self._new_selector(model, _seed_of(self.seed, "meta"))
            if self._pending_state is not None:
                self.selector.load_state_dict(self._pending_state)
                self._pending_state = None
        if self.max_rounds is not None and len(self.selector.history) >= self.max_rounds:
            return None
        record = _selection_round(model, self.selector, batch["task"], batch["support"], batch["query"],
                                  trainer.step)
        trainer._log({"event": "tts", "stage": "meta", "task": batch["task"], **record.to_dict()})
        return record

    # ------------------------------------------------------------------ fine-tuning
    def begin_adapt(self, trainer: "TokenMatcherTrainer", task: str, run: Any) -> None:
        self._adapt_key = (task, run)
        self._adapt = self._new_selector(trainer.model, _seed_of(self.seed, "adapt", task, run))
        self.adapt_history[self._adapt_key] = []

    def on_adapt_step(self, trainer: "TokenMatcherTrainer", task: str, support: Mapping[str, torch.Tensor],
                      step: int) -> Optional[RoundRecord]:
        """After fine-tuning step ``step`` (0-based): a round every ``adapt_every``
        steps on the shots, the first half as support and the rest as query."""
        n = support["image"].shape[0]
        if not self.adapt_every or self._adapt is None or (step + 1) % self.adapt_every or n < 2:
            return None
        half = (n + 1) // 2
        sup = {k: v[:half] for k, v in support.items()}
        qry = {k: v[half:] for k, v in support.items()}
        record = _selection_round(trainer.model, self._adapt, task, sup, qry, step)
        entry = {"event": "tts", "stage": "adapt", "task": task, "run": self._adapt_key[1], **record.to_dict()}
        self.adapt_history[self._adapt_key].append(entry)
        trainer._log(entry)
        return record

    def end_adapt(self, trainer: "TokenMatcherTrainer") -> None:
        self._adapt, self._adapt_key = None, None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        sel = self.selector.state_dict() if self.selector is not None else self._pending_state
        return {"every": self.every, "adapt_every": self.adapt_every, "selector": sel}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        sel = state.get("selector")
        if sel is None:
            return
        if self.selector is not None:
            self.selector.load_state_dict(sel)
        else:
            self._pending_state = sel   # applied when the selector is built (it needs the model)


# ============================================================================ trainer
class TokenMatcherTrainer(EpisodicTrainer):
    """:class:`EpisodicTrainer` for :class:`fastdense.models.TTSTokenMatcher`:
    VTM's hybrid loss with label masks, VTM's unary task augmentation in
    meta-training (``augment``), the model's meta/adapt trainable sets,
    callbacks (TTS: :class:`TimestepSelectionCallback`), fine-tuning on cached
    latents (the VAE runs once per support set) and evaluation with the
    paper's metrics."""

    def __init__(self, model, sampler: EpisodeSampler, *, config: Optional[EpisodicConfig] = None,
                 callbacks: Sequence[Any] = (), augment: bool = True, run_dir=None, device=None,
                 run_spec: Optional[Dict[str, Any]] = None) -> None:
        model.mark_trainable("meta")
        super().__init__(model, sampler, config=config, run_dir=run_dir, device=device, run_spec=run_spec)
        self.callbacks = list(callbacks)
        self.augment = bool(augment)
        self._augment_step: Optional[int] = None
        self.last_batch: Optional[Dict[str, Any]] = None
        #: (task, run) -> the timestep set each fine-tuning run ended with
        self.adapt_timesteps: Dict[tuple, List[int]] = {}

    def _callbacks(self, hook: str, *args):
        return [getattr(cb, hook)(self, *args) for cb in self.callbacks if hasattr(cb, hook)]

    # ------------------------------------------------------------------ data and loss
    def _to(self, side: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: side[k].to(self.device) for k in ("image", "label", "mask") if k in side}

    def load(self, episode: Episode) -> Dict[str, Any]:
        self.last_batch = super().load(episode)
        return self.last_batch

    def episode_loss(self, task: str, support: Mapping[str, torch.Tensor],
                     query: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """VTM's hybrid loss of the query given the support (labels normalised to [0, 1], masked);
        in meta-training with ``augment``, on the augmented labels (:func:`augment_labels`)."""
        m = self.model
        s = support["label"].shape[0]
        labels = torch.cat([m.normalize_label(task, support["label"]), m.normalize_label(task, query["label"])])
        if self._augment_step is not None:
            g = torch.Generator().manual_seed(_seed_of(self.sampler.seed, "augment", self._augment_step))
            labels = augment_labels(labels, g)
        logits = m(task, support["image"], labels[:s], query["image"],
                   m.label_mask(task, support["label"], support.get("mask")), logits=True)
        return m.loss(task, logits, labels[s:], m.label_mask(task, query["label"], query.get("mask")))

    # ------------------------------------------------------------------ meta-training
    def train_step(self) -> Dict[str, Any]:
        if self.model.lora_active:          # after a fine-tuning: back to the meta-training set
            self.model.mark_trainable("meta")
        # The augmentation of step i is a function of (sampler seed, i): a resumed run redraws it.
        self._augment_step = self.step if self.augment else None
        try:
            record = super().train_step()
        finally:
            self._augment_step = None
        rounds = [r for r in self._callbacks("on_meta_step", self.last_batch) if r is not None]
        if rounds:
            record["timesteps"] = self.model.timesteps
        return record

    # ------------------------------------------------------------------ checkpoints
    def save(self, path=None) -> Optional[Path]:
        path = path or self.checkpoint_path
        if path is None:
            return None
        config = {"episodic": self.cfg.to_dict(), "spec": self.run_spec, "sampler": self._sampler_config(),
                  "timesteps": self.model.timesteps,
                  "callbacks": [cb.state_dict() for cb in self.callbacks if hasattr(cb, "state_dict")]}
        return ckpt_mod.save_checkpoint(path, model=self.model, step=self.step, optimizer=self.optimizer,
                                        scheduler=self.scheduler, config=config)

    def resume(self, path, rng: bool = True) -> int:
        step = super().resume(path, rng=rng)
        states = ckpt_mod.load_checkpoint(path).get("config", {}).get("callbacks", [])
        for cb, state in zip([cb for cb in self.callbacks if hasattr(cb, "load_state_dict")], states):
            cb.load_state_dict(state)
        return step

    # ------------------------------------------------------------------ fine-tuning
    def adapt(self, task: str, support: Union[Mapping[str, torch.Tensor], Sequence[int]],
              steps: Optional[int] = None, lr: Optional[float] = None, *, run: Any = None,
              tts: bool = True) -> List[float]:
        """Fine-tune the LoRA adapters and ``task``'s biases on the shots of
        ``support`` (``{"image", "label"[, "mask"]}`` or dataset indices) for
        ``steps`` AdamW steps; each step one shot is the query of the others,
        cycling. The shots are VAE-encoded once. With ``tts``, the callbacks'
        fine-tuning rounds run (they may change the model's timestep set).
        In place; returns each step's loss."""
        support, n, steps, lr = self._adapt_inputs(task, support, steps, lr)
        m = self.model
        m.mark_trainable("adapt", task)
        losses: List[float] = []
        if steps == 0:
            return losses
        params = m.adaptable_parameters(task)
        # Decay would pull the LoRA weights towards 0 on a handful of images.
        opt = make_optimizer(m, lr, 0.0)
        sched = make_scheduler(opt, dataclasses.replace(self.cfg, steps=steps, warmup_steps=0))
        latents = m.encode(support["image"])
        labels = m.normalize_label(task, support["label"])
        masks = m.label_mask(task, support["label"], support.get("mask"))
        size = labels.shape[-2:]
        callbacks = self.callbacks if tts else []
        for cb in callbacks:
            if hasattr(cb, "begin_adapt"):
                cb.begin_adapt(self, task, run)
        try:
            for i in range(steps):
                m.train()
                j = i % n
                rest = [k for k in range(n) if k != j] or [j]
                noise = m.draw_noise(latents[rest + [j]])
                opt.zero_grad(set_to_none=True)
                logits = m.forward_latents(task, latents[rest], labels[rest], latents[j:j + 1], noise,
                                           None if masks is None else masks[rest], size)
                loss = m.loss(task, logits, labels[j:j + 1], None if masks is None else masks[j:j + 1])
                loss.backward()
                if self.cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                for cb in callbacks:
                    if hasattr(cb, "on_adapt_step"):
                        cb.on_adapt_step(self, task, support, i)
        finally:
            for cb in callbacks:
                if hasattr(cb, "end_adapt"):
                    cb.end_adapt(self)
        return losses

    @torch.no_grad()
    def predict(self, task: str, support: Mapping[str, torch.Tensor], query_image: torch.Tensor,
                batch_size: int = 8) -> torch.Tensor:
        """Probabilities (Q, C, H, W) for ``query_image`` given ``support``: the
        support's U-Net features once, the queries' in chunks of ``batch_size``."""
        m = self.model
        m.eval()
        sup = self._to(support)
        labels = m.normalize_label(task, sup["label"])
        mask = m.label_mask(task, sup["label"], sup.get("mask"))
        lat_s = m.encode(sup["image"])
        feats_s = m.image_features(lat_s, m.draw_noise(lat_s))
        outs = []
        for start in range(0, query_image.shape[0], batch_size):
            lat_q = m.encode(query_image[start:start + batch_size].to(self.device))
            feats_q = m.image_features(lat_q, m.draw_noise(lat_q))
            outs.append(m.head(task, feats_s, labels, feats_q, mask).sigmoid().float())
        return torch.cat(outs)

    # ------------------------------------------------------------------ evaluation
    def _eval_source(self, support_pool, query_indices):
        if support_pool is None:
            return self.sampler, query_indices
        if query_indices is None:
            raise ValueError("support_pool needs query_indices (the fixed evaluation images)")
        return list(support_pool) + [i for i in query_indices if i not in set(support_pool)], query_indices

    def evaluate(self, tasks: Optional[Sequence[str]] = None, runs: int = 5, shots: Optional[int] = None,
                 adapt_steps: Optional[int] = None, seed: Optional[int] = None, queries: Optional[int] = None,
                 query_indices: Optional[Sequence[int]] = None, *, support_pool: Optional[Sequence[int]] = None,
                 tts: bool = True) -> Dict[str, Dict[str, RepeatedResult]]:
        """For each task (default the held-out fold's), ``runs`` times: draw ``shots``
        support images, fine-tune (:meth:`adapt`, with the TTS rounds unless
        ``tts=False``), score the queries with :func:`vtm_scores`, restore the
        adapted parameters and the timestep set. Returns ``{task: {metric:
        RepeatedResult, "l1": ...}}``; :attr:`adapt_timesteps` gets each run's final set.

        Supports and queries come from the sampler's test images, or, with
        ``support_pool`` and ``query_indices``, supports from the pool and the
        fixed queries every run (VTM's Taskonomy protocol: supports from the
        training buildings, queries from the test buildings). Run r's draw
        depends only on ``(seed, r)``: tasks, models and TTS on/off are
        compared on the same supports.
        """
        tasks = list(self.sampler.test_tasks if tasks is None else tasks)
        shots = self.sampler.shots if shots is None else shots
        source, query_indices = self._eval_source(support_pool, query_indices)
        base_seed = self.sampler.seed if seed is None else seed
        m = self.model
        results: Dict[str, Dict[str, RepeatedResult]] = {}
        for task in tasks:
            m._check_task(task)

            def run(ep: Episode, task=task) -> Dict[str, float]:
                batch = self.load(Episode(task, ep.support, ep.query, ep.split, ep.index))
                snapshot = [p.detach().clone() for p in m.adaptable_parameters(task)]
                timesteps = m.timesteps
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_seed_of(base_seed, task, ep.index))
                    m.reseed_noise(_seed_of(base_seed, "noise", task, ep.index))
                    try:
                        self.adapt(task, batch["support"], steps=adapt_steps, run=ep.index, tts=tts)
                        self.adapt_timesteps[(task, ep.index)] = m.timesteps
                        probs = self.predict(task, batch["support"], batch["query"]["image"])
                    finally:
                        with torch.no_grad():
                            for p, saved in zip(m.adaptable_parameters(task), snapshot):
                                p.copy_(saved)
                        m.set_timesteps(timesteps)
                        m.mark_trainable("meta")
                query = batch["query"]
                target = m.normalize_label(task, query["label"])
                mask = m.label_mask(task, query["label"], query.get("mask"))
                return vtm_scores(task, probs, target.to(probs.device), None if mask is None else mask.to(probs.device))

            results[task] = repeated_evaluation(run, source, runs=runs, shots=shots, seed=base_seed, task=task,
                                                queries=queries, query_indices=query_indices)
        return results

    def evaluate_baseline(self, tasks: Optional[Sequence[str]] = None, runs: int = 5, shots: Optional[int] = None,
                          seed: Optional[int] = None, queries: Optional[int] = None,
                          query_indices: Optional[Sequence[int]] = None, *,
                          support_pool: Optional[Sequence[int]] = None) -> Dict[str, Dict[str, RepeatedResult]]:
        """The trivial baseline (:func:`support_mean_prediction`) on exactly the
        support/query draws :meth:`evaluate` uses with the same arguments."""
        tasks = list(self.sampler.test_tasks if tasks is None else tasks)
        shots = self.sampler.shots if shots is None else shots
        source, query_indices = self._eval_source(support_pool, query_indices)
        base_seed = self.sampler.seed if seed is None else seed
        m = self.model
        results = {}
        for task in tasks:

            def run(ep: Episode, task=task) -> Dict[str, float]:
                batch = self.load(Episode(task, ep.support, ep.query, ep.split, ep.index))
                sup, qry = batch["support"], batch["query"]
                target = m.normalize_label(task, qry["label"])
                pred = support_mean_prediction(target.shape, m.normalize_label(task, sup["label"]),
                                               m.label_mask(task, sup["label"], sup.get("mask")))
                return vtm_scores(task, pred, target, m.label_mask(task, qry["label"], qry.get("mask")))

            results[task] = repeated_evaluation(run, source, runs=runs, shots=shots, seed=base_seed, task=task,
                                                queries=queries, query_indices=query_indices)
        return results
