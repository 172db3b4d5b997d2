"""Task-aware Timestep Selection (TTS), Alg. 1 and Eq. 2 of the TTS/TFC paper (§3.2).

A selector keeps a set of k diffusion timesteps whose U-Net features feed the
few-shot head. One selection *round* (one run of Alg. 1) is

1. **Current loss.** L_cur = L(T), the task loss with the current set T
   (Alg. 1 line 5).
2. **Leave-one-out** (Eq. 2). For every t ∈ T the loss L_t = L(T \\ {t}) of the
   head on the other k − 1 timesteps, re-running *only the head* on the
   cached features. The timestep whose removal hurts least is removed:

       t_r = argmin_t L_t                                                   (2)

   (Alg. 1 line 6 says "largest timestep-wise loss" while Eq. 2 says argmin;
   fastdense follows Eq. 2 (docs/paper-decisions.md, 'TTS removal rule'): the lowest
   leave-one-out loss marks the timestep the set misses least. Ties go to the
   smallest t.)
3. **Search** (Alg. 1 lines 7-21). Up to ``max_candidates`` (the paper's
   N_iter) candidates t_new are drawn uniformly from the integers
   ``t_min ≤ t < t_max`` that are neither in T nor already tried this round.
   A candidate is accepted iff

   * its feature at ``similarity_layer`` has cosine similarity < τ_sim to the
     feature of *every* kept timestep (line 12), and
   * L(kept ∪ {t_new}) < L_ref (line 16), where L_ref is L(kept) = L_{t_r}
     (``accept_against="kept"``, the default: Alg. 1 line 13 literally, whose
     T_i is the set after the removal) or L_cur (``accept_against="current"``,
     the stricter never-worse rule: a round never raises the loss of the set).
     docs/paper-decisions.md, 'TTS acceptance rule', compares the two.

   The first accepted candidate completes the set; if none is accepted the
   round keeps T unchanged (t_r is *not* dropped) and records that.

Similarity (line 11). For two timesteps' features a, b of shape
(B, C, h, w) at the similarity layer: each sample's feature is flattened to a
vector of C·h·w values, the cosine similarity of the two vectors is taken per
sample (eps 1e-8), and the B values are averaged:
``Sim(a, b) = mean_i cos(vec(a_i), vec(b_i))``, computed in float32. The
default similarity layer is the *last key* of the dict the feature source
returns — with the layers listed in U-Net order that is the last decoder
block, as in the paper ("from the last block of the U-Net decoder").

Feature source. ``source(timesteps) -> {layer: Tensor (B, k', C_l, h_l, w_l)}``
returns the features of the given timesteps in the given order and runs the
U-Net only for timesteps it has not cached (``fastdense.diffusion``'s
feature cache implements it). A round asks it for T once and for each
candidate once; leave-one-out and the candidate losses slice what it returned.

Loss functions, evaluated under ``torch.no_grad()`` (put the head in eval mode
first if it has dropout, or the comparisons are noisy):

* ``loss_fn(features, timesteps) -> scalar Tensor`` with ``features`` a dict
  ``{layer: (B, k', ...)}`` ordered like ``timesteps`` (a sorted list);
* optionally ``batched_loss_fn(features, subsets) -> Tensor (S,)``: the S
  leave-one-out subsets stacked along the batch dimension, subset-major
  (rows ``s·B … (s+1)·B − 1`` hold subset ``s``), one loss per subset. One
  head call then evaluates all k leave-one-out sets. Without it the k subsets
  are evaluated one by one with ``loss_fn``.

The current set is kept **sorted ascending**, so a head that is not invariant
to the order of the timestep axis always sees the timesteps in the same order.

Example: the whole pipeline (features of every timestep in one U-Net pass,
cached per timestep; a head of 1×1 projections, TFC and a linear readout
scored on the cached features). A tiny random U-Net stands in for Stable
Diffusion's so that this runs as pasted; with SD, pass ``vae=`` to
:class:`~fastdense.diffusion.MultiTimestepFeatures` and images in [−1, 1]
instead of latents::

    import torch
    import torch.nn as nn
    from diffusers import UNet2DConditionModel
    from fastdense.diffusion import MultiTimestepFeatures, TimestepFeatureCache
    from fastdense.nn import TaskAwareTimestepSelector, TimestepFeatureConsolidation

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    extractor = MultiTimestepFeatures(unet)            # layers: up_blocks.0, up_blocks.1
    latents, labels = torch.randn(2, 4, 16, 16), torch.rand(2, 3, 16, 16)
    cache = TimestepFeatureCache(extractor, latents)   # the selector's feature source

    class Head(nn.Module):
        def __init__(self, dim=32):
            super().__init__()
            self.proj = nn.ModuleList([nn.Conv2d(64, dim, 1), nn.Conv2d(32, dim, 1)])
            self.label = nn.Conv2d(3, dim, 1)
            self.tfc = TimestepFeatureConsolidation(dim, heads=4, lora_dropout=0.0)
            self.readout = nn.Linear(dim, 3)

        def forward(self, feats, labels):              # per-sample loss
            n, k = feats["up_blocks.1"].shape[:2]
            x = sum(p(f.flatten(0, 1)) for p, f in zip(self.proj, feats.values()))
            key, _ = self.tfc(self.label(labels), x.unflatten(0, (n, k)))   # Eq. 3
            target = labels.flatten(2).transpose(1, 2)
            return (self.readout(key) - target).square().mean(dim=(1, 2))

    head = Head().eval()

    def loss_fn(feats, timesteps):
        return head(feats, labels).mean()

    def batched_loss_fn(feats, subsets):               # the k leave-one-out sets in one call
        s = len(subsets)
        return head(feats, labels.repeat(s, 1, 1, 1)).view(s, -1).mean(1)

    selector = TaskAwareTimestepSelector(k=4, initial=(1, 100, 200, 300), seed=0)
    selector.select(cache, loss_fn, n_iter=2, batched_loss_fn=batched_loss_fn)
    print(selector.summary())                          # every draw, its similarities and loss
    extractor.set_timesteps(selector.timesteps)        # train on with the selected set

In a training loop, call ``selector.maybe_step(step, cache, loss_fn, every=N)``
after each step instead of ``select``.
"""
from __future__ import annotations

import dataclasses
import json
import random
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = ["TaskAwareTimestepSelector", "RoundRecord", "CandidateRecord", "feature_similarity",
           "stack_subsets"]

Features = dict[str, torch.Tensor]
FeatureSource = Callable[[Sequence[int]], Mapping[str, torch.Tensor]]
LossFn = Callable[[Features, list[int]], torch.Tensor]
BatchedLossFn = Callable[[Features, list[list[int]]], torch.Tensor]

ACCEPT_AGAINST = ("kept", "current")


# ----------------------------------------------------------------------------- helpers
def feature_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the batch of the per-sample cosine similarity of flattened features.

    ``a`` and ``b``: (B, ...) features of one timestep each (any trailing shape).
    """
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(f"features to compare must share a shape (B, ...), got {tuple(a.shape)} and {tuple(b.shape)}")
    cos = F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1, eps=1e-8)
    return float(cos.mean())


def stack_subsets(features: Mapping[str, torch.Tensor], subsets: Sequence[Sequence[int]]) -> Features:
    """Stack subsets of the timestep axis along the batch axis, subset-major.

    ``features[layer]`` is (B, k, ...); ``subsets`` are equally long lists of
    positions on the k axis. Returns ``{layer: (S·B, k', ...)}`` where rows
    ``s·B … (s+1)·B − 1`` are ``features[layer][:, subsets[s]]``.
    """
    lengths = {len(s) for s in subsets}
    if len(lengths) != 1:
        raise ValueError(f"subsets must be non-empty and equally long, got lengths {sorted(lengths)}")
    out = {}
    for name, f in features.items():
        idx = torch.tensor([list(s) for s in subsets], device=f.device)            # (S, k')
        picked = f[:, idx]                                                          # (B, S, k', ...)
        out[name] = picked.transpose(0, 1).reshape(len(subsets) * f.shape[0], *picked.shape[2:])
    return out


def _take(features: Mapping[str, torch.Tensor], positions: Sequence[int]) -> Features:
    return {name: f[:, list(positions)] for name, f in features.items()}


def _to_float(value, what: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must return a scalar loss, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must return a scalar Tensor or a number, got {type(value).__name__}")
    if value != value:  # NaN would make every comparison of Alg. 1 false, silently
        raise ValueError(f"{what} returned NaN")
    return float(value)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


# ----------------------------------------------------------------------------- history
@dataclasses.dataclass
class CandidateRecord:
    """One drawn candidate. ``reason``: 'accepted', 'similar' (some similarity
    ≥ τ_sim; its loss was not evaluated) or 'loss' (loss ≥ the reference)."""

    timestep: int
    similarities: dict[int, float]   # kept timestep -> Sim(f_new, f_kept)
    loss: float | None
    reason: str

    @property
    def accepted(self) -> bool:
        return self.reason == "accepted"

    @property
    def max_similarity(self) -> float:
        return max(self.similarities.values()) if self.similarities else float("-inf")


@dataclasses.dataclass
class RoundRecord:
    """What one selection round saw and did."""

    round: int
    step: int | None                 # training step of maybe_step, else None
    before: list[int]
    loss_before: float               # L(T)
    leave_one_out: dict[int, float]  # t -> L(T \ {t})
    removed: int                     # argmin of leave_one_out (Eq. 2)
    reference_loss: float            # what a candidate's loss must beat
    candidates: list[CandidateRecord]
    after: list[int]
    loss_after: float
    unet_calls: int | None           # source.unet_calls spent in this round, when the source counts

    @property
    def changed(self) -> bool:
        return self.after != self.before

    @property
    def added(self) -> int | None:
        return next((c.timestep for c in self.candidates if c.accepted), None)

    def to_dict(self) -> dict:
        """Plain, JSON-serialisable dict (int keys become strings, as json would make them)."""
        d = dataclasses.asdict(self)
        d["leave_one_out"] = {str(t): v for t, v in self.leave_one_out.items()}
        for c in d["candidates"]:
            c["similarities"] = {str(t): v for t, v in c["similarities"].items()}
        d["added"] = self.added
        return d

    def summary(self) -> str:
        where = f" (step {self.step})" if self.step is not None else ""
        loo = ", ".join(f"{t}: {_fmt(v)}" for t, v in self.leave_one_out.items())
        lines = [f"round {self.round}{where}: {self.before} loss {_fmt(self.loss_before)}",
                 f"  leave-one-out losses {{{loo}}} -> remove {self.removed}; "
                 f"candidates must beat {_fmt(self.reference_loss)}"]
        for c in self.candidates:
            sims = ", ".join(f"{t}: {s:.3f}" for t, s in c.similarities.items())
            lines.append(f"  t={c.timestep:<5d} max sim {c.max_similarity:.3f} loss {_fmt(c.loss):<8} "
                         f"{c.reason}  (sim {{{sims}}})")
        if self.changed:
            lines.append(f"  -> {self.after} loss {_fmt(self.loss_after)}")
        else:
            lines.append(f"  -> no candidate accepted in {len(self.candidates)} draws; kept {self.after}")
        if self.unet_calls is not None:
            lines.append(f"  U-Net calls this round: {self.unet_calls}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- selector
class TaskAwareTimestepSelector:
    """Task-aware Timestep Selection (Alg. 1, Eq. 2); see the module docstring.

    Args:
        k: number of timesteps kept (≥ 2, leave-one-out needs a non-empty rest).
        initial: the k initial timesteps (paper: {1, 100, 200, 300}).
        t_max: candidates are drawn from ``t_min ≤ t < t_max``; the default
            1000 with ``t_min=1`` gives 1 … 999, the valid non-zero timesteps
            of a 1000-step DDPM schedule (the paper's U(1, t_max)).
        tau_sim: similarity threshold τ_sim; a candidate must be below it
            against every kept timestep.
        n_iter: selection rounds run by :meth:`select`; :meth:`maybe_step`
            stops after this many rounds (``None``: no limit).
        max_candidates: candidates drawn per round before giving up (the
            paper's N_iter of Alg. 1 line 7).
        seed: seeds the selector's own ``random.Random`` — selection never
            touches the global RNGs and is reproducible.
        similarity_layer: feature layer for the similarity test; default the
            source's last layer (the last decoder block).
        accept_against: what a candidate's loss must be lower than: 'kept'
            (L(T \\ {t_r}), Alg. 1 line 13; the default) or 'current' (L(T);
            a round never raises the loss).
        t_min: smallest timestep that may be drawn.
    """

    def __init__(self, k: int = 4, initial: Sequence[int] = (1, 100, 200, 300), t_max: int = 1000,
                 tau_sim: float = 0.9, n_iter: int | None = 10, max_candidates: int = 20, seed: int = 0,
                 similarity_layer: str | None = None, *, accept_against: str = "kept", t_min: int = 1) -> None:
        for name, v in (("k", k), ("t_max", t_max), ("max_candidates", max_candidates)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if k < 2:
            raise ValueError(f"k must be at least 2 (leave-one-out needs k - 1 >= 1 timesteps), got {k}")
        if isinstance(t_min, bool) or not isinstance(t_min, int) or not 0 <= t_min < t_max:
            raise ValueError(f"t_min must be an int in [0, t_max={t_max}), got {t_min!r}")
        if n_iter is not None and (isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0):
            raise ValueError(f"n_iter must be a non-negative int or None, got {n_iter!r}")
        if isinstance(tau_sim, bool) or not isinstance(tau_sim, (int, float)):
            raise ValueError(f"tau_sim must be a number, got {tau_sim!r}")
        if accept_against not in ACCEPT_AGAINST:
            raise ValueError(f"accept_against must be one of {ACCEPT_AGAINST}, got {accept_against!r}")
        initial = list(initial)
        if len(initial) != k:
            raise ValueError(f"initial must hold k={k} timesteps, got {len(initial)}: {initial}")
        for t in initial:
            if isinstance(t, bool) or not isinstance(t, int) or not t_min <= t < t_max:
                raise ValueError(f"initial timesteps must be ints in [{t_min}, {t_max}), got {t!r}")
        if len(set(initial)) != k:
            raise ValueError(f"initial timesteps must be distinct (Alg. 1: t_i != t_j), got {initial}")
        if t_max - t_min <= k:
            raise ValueError(f"the range [{t_min}, {t_max}) leaves no timestep to draw beyond the k={k} kept")
        self.k = k
        self.t_min, self.t_max = t_min, t_max
        self.tau_sim = float(tau_sim)
        self.n_iter = n_iter
        self.max_candidates = max_candidates
        self.seed = seed
        self.similarity_layer = similarity_layer
        self.accept_against = accept_against
        self._timesteps = sorted(initial)
        self._rng = random.Random(seed)
        self.history: list[RoundRecord] = []

    # ------------------------------------------------------------------ state
    @property
    def timesteps(self) -> list[int]:
        """The current set, sorted ascending (a copy)."""
        return list(self._timesteps)

    def state_dict(self) -> dict:
        """Set, RNG state and history as plain data, for checkpoints."""
        return {"timesteps": self.timesteps, "rng_state": self._rng.getstate(),
                "history": [r.to_dict() for r in self.history]}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the set and the RNG (the history is kept as plain dicts only
        in the checkpoint; restored selectors start a fresh history list)."""
        ts = sorted(int(t) for t in state["timesteps"])
        if len(ts) != self.k:
            raise ValueError(f"state has {len(ts)} timesteps, this selector keeps k={self.k}")
        self._timesteps = ts
        rng_state = state["rng_state"]
        # json turns the state tuple into lists; random.setstate wants tuples.
        self._rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))
        self.history = []

    # ------------------------------------------------------------------ feature access
    @staticmethod
    def _fetch(source: FeatureSource, timesteps: list[int]) -> Features:
        feats = source(list(timesteps))
        if not isinstance(feats, Mapping) or not feats:
            raise TypeError(f"source must return a non-empty dict {{layer: Tensor (B, k, ...)}}, "
                            f"got {type(feats).__name__}")
        batch = None
        for name, f in feats.items():
            if not isinstance(f, torch.Tensor) or f.dim() < 2 or f.shape[1] != len(timesteps):
                shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise ValueError(f"source returned {shape} for layer {name!r}; expected (B, {len(timesteps)}, ...) "
                                 f"for timesteps {list(timesteps)}")
            if batch is not None and f.shape[0] != batch:
                raise ValueError(f"source returned layers with different batch sizes ({batch} and {f.shape[0]})")
            batch = f.shape[0]
        return dict(feats)

    def _sim_layer(self, feats: Features) -> str:
        if self.similarity_layer is None:
            return next(reversed(feats))
        if self.similarity_layer not in feats:
            raise ValueError(f"similarity_layer {self.similarity_layer!r} is not among the source's layers "
                             f"{list(feats)}")
        return self.similarity_layer

    # ------------------------------------------------------------------ losses
    @staticmethod
    def _loss(loss_fn: LossFn, feats: Features, timesteps: list[int]) -> float:
        return _to_float(loss_fn(feats, list(timesteps)), "loss_fn")

    def _leave_one_out(self, loss_fn: LossFn, batched_loss_fn: BatchedLossFn | None, feats: Features,
                       current: list[int]) -> list[float]:
        positions = [[j for j in range(len(current)) if j != i] for i in range(len(current))]
        subsets = [[current[j] for j in p] for p in positions]
        if batched_loss_fn is None:
            return [self._loss(loss_fn, _take(feats, p), s) for p, s in zip(positions, subsets)]
        losses = batched_loss_fn(stack_subsets(feats, positions), subsets)
        if not isinstance(losses, torch.Tensor) or losses.shape != (len(subsets),):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"batched_loss_fn must return a Tensor of shape ({len(subsets)},), one loss per "
                             f"subset, got {shape}")
        return [_to_float(v, "batched_loss_fn") for v in losses.detach().cpu().tolist()]

    # ------------------------------------------------------------------ sampling
    def _draw(self, excluded: set[int]) -> int | None:
        if self.t_max - self.t_min - len(excluded) <= 0:
            return None
        while True:  # rejection sampling: |excluded| is tiny next to the range
            t = self._rng.randrange(self.t_min, self.t_max)
            if t not in excluded:
                return t

    # ------------------------------------------------------------------ one round
    @torch.no_grad()
    def step(self, source: FeatureSource, loss_fn: LossFn, *, batched_loss_fn: BatchedLossFn | None = None,
             step_idx: int | None = None) -> RoundRecord:
        """Run one selection round (Alg. 1) and return its record (also appended to ``history``)."""
        calls0 = getattr(source, "unet_calls", None)
        current = self.timesteps
        feats = self._fetch(source, current)
        loss_cur = self._loss(loss_fn, feats, current)

        loo = self._leave_one_out(loss_fn, batched_loss_fn, feats, current)
        r = min(range(len(current)), key=lambda i: loo[i])            # Eq. 2; ties -> smallest t
        removed = current[r]
        kept = [t for t in current if t != removed]
        reference = loss_cur if self.accept_against == "current" else loo[r]

        per_t = {t: {name: f[:, i:i + 1] for name, f in feats.items()} for i, t in enumerate(current)}
        layer = self._sim_layer(feats)
        excluded = set(current)
        candidates: list[CandidateRecord] = []
        after, loss_after = current, loss_cur
        for _ in range(self.max_candidates):
            t_new = self._draw(excluded)
            if t_new is None:
                break
            excluded.add(t_new)
            f_new = self._fetch(source, [t_new])
            if set(f_new) != set(feats):
                raise ValueError(f"source returned layers {list(f_new)} for {t_new} but {list(feats)} before")
            per_t[t_new] = f_new
            sims = {t: feature_similarity(f_new[layer][:, 0], per_t[t][layer][:, 0]) for t in kept}
            if any(s >= self.tau_sim for s in sims.values()):                   # Alg. 1 line 12
                candidates.append(CandidateRecord(t_new, sims, None, "similar"))
                continue
            trial = sorted(kept + [t_new])
            trial_feats = {name: torch.cat([per_t[t][name] for t in trial], dim=1) for name in feats}
            loss_new = self._loss(loss_fn, trial_feats, trial)
            if loss_new < reference:                                             # Alg. 1 line 16
                candidates.append(CandidateRecord(t_new, sims, loss_new, "accepted"))
                after, loss_after = trial, loss_new
                break
            candidates.append(CandidateRecord(t_new, sims, loss_new, "loss"))

        self._timesteps = list(after)
        calls1 = getattr(source, "unet_calls", None)
        record = RoundRecord(
            round=len(self.history), step=step_idx, before=current, loss_before=loss_cur,
            leave_one_out=dict(zip(current, loo)), removed=removed, reference_loss=reference,
            candidates=candidates, after=list(after), loss_after=loss_after,
            unet_calls=(calls1 - calls0) if isinstance(calls0, int) and isinstance(calls1, int) else None)
        self.history.append(record)
        return record

    # ------------------------------------------------------------------ drivers
    def select(self, source: FeatureSource, loss_fn: LossFn, n_iter: int | None = None, *,
               batched_loss_fn: BatchedLossFn | None = None) -> list[int]:
        """Standalone search: ``n_iter`` rounds (default: the constructor's); returns the final set."""
        n = self.n_iter if n_iter is None else n_iter
        if n is None or isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"select needs a non-negative int n_iter, got {n!r}")
        for _ in range(n):
            self.step(source, loss_fn, batched_loss_fn=batched_loss_fn)
        return self.timesteps

    def maybe_step(self, step_idx: int, source: FeatureSource, loss_fn: LossFn, every: int = 100, *,
                   batched_loss_fn: BatchedLossFn | None = None) -> RoundRecord | None:
        """Training-loop callback: with a 0-based ``step_idx``, run a round after
        every ``every`` completed steps (``(step_idx + 1) % every == 0``) until
        ``n_iter`` rounds have run. Returns the round's record, or None."""
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if (step_idx + 1) % every or (self.n_iter is not None and len(self.history) >= self.n_iter):
            return None
        return self.step(source, loss_fn, batched_loss_fn=batched_loss_fn, step_idx=step_idx)

    # ------------------------------------------------------------------ reporting
    def summary(self) -> str:
        head = (f"TaskAwareTimestepSelector(k={self.k}, tau_sim={self.tau_sim:g}, range=[{self.t_min}, {self.t_max}), "
                f"max_candidates={self.max_candidates}, seed={self.seed}): {len(self.history)} round(s), "
                f"current {self.timesteps}")
        return "\n".join([head, *(r.summary() for r in self.history)])

    def history_dicts(self) -> list[dict]:
        return [r.to_dict() for r in self.history]

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.history_dicts(), **kwargs)

    def plot(self, ax=None):
        """The set after each round (dots) and rejected candidates (crosses) over
        rounds; needs matplotlib, which fastdense does not depend on."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("TaskAwareTimestepSelector.plot needs matplotlib (pip install matplotlib)") from e
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3))
        for rec in self.history:
            ax.scatter([rec.round] * len(rec.after), rec.after, c="tab:blue", s=18)
            rejected = [c.timestep for c in rec.candidates if not c.accepted]
            ax.scatter([rec.round] * len(rejected), rejected, c="tab:gray", marker="x", s=12)
        ax.set_xlabel("round")
        ax.set_ylabel("timestep")
        ax.set_title("Task-aware timestep selection")
        return ax

    def __repr__(self) -> str:
        return (f"TaskAwareTimestepSelector(k={self.k}, timesteps={self.timesteps}, tau_sim={self.tau_sim:g}, "
                f"rounds={len(self.history)})")
