"""Episodes for fold-based few-shot dense prediction, and repeated evaluation.

Few-shot dense prediction (VTM and the papers built on it) splits the tasks
into folds: a model is meta-trained on the tasks of all folds but one and
tested on the held-out fold's tasks, from a handful of labelled support
images per episode. Test numbers vary a lot with the support set, so they are
reported as mean +- std over several support draws.

* :class:`EpisodeSampler` draws episodes: a task, ``shots`` support indices
  and ``queries`` query indices, disjoint, a pure function of
  ``(seed, split, episode index)``.
* :func:`repeated_evaluation` runs an evaluation over ``runs`` support sets
  and returns the mean and standard deviation.

Both work with any map-style dataset whose items are dicts of tensors (the
PASCAL, NYUD, Taskonomy and synthetic loaders of this package), or with plain
task names and sample counts.
"""
from __future__ import annotations

import hashlib
import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from .taskonomy import TASKONOMY_FOLDS

#: Names that denote the same task in different loaders (Taskonomy/VTM use
#: the first of each group, the synthetic scenes and PASCAL the others), so
#: the Taskonomy folds apply to any of them.
TASK_ALIASES = (("segment_semantic", "semseg"), ("normal", "normals"))

_NOT_TASKS = frozenset({"image", "meta", "mask"})
_ALL = object()  # "queries: every remaining index"


def _generator(seed: int, *key) -> torch.Generator:
    # A hash of the whole key, so that neighbouring seeds or episode indices
    # give unrelated streams and the result never depends on call order.
    digest = hashlib.sha256(":".join(str(k) for k in (seed, *key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class Episode:
    """One episode: ``task`` (None when the caller decides), disjoint
    ``support`` and ``query`` dataset indices, the ``split`` ("train" for
    meta-training, "test" for the held-out fold, "eval" for
    :func:`repeated_evaluation`) and the episode ``index``."""

    task: Optional[str]
    support: tuple
    query: tuple
    split: str
    index: int


def _dataset_tasks(dataset) -> tuple:
    tasks = getattr(dataset, "tasks", None)
    if tasks is not None:
        return tuple(tasks)
    if len(dataset) == 0:
        raise ValueError("cannot infer the tasks of an empty dataset; pass task names")
    sample = dataset[0]
    if not isinstance(sample, Mapping):
        raise TypeError(f"dataset items must be dicts of tensors, got {type(sample).__name__}")
    return tuple(k for k in sample if k not in _NOT_TASKS)


def _resolve(name: str, available: Sequence[str]) -> Optional[str]:
    if name in available:
        return name
    for group in TASK_ALIASES:
        if name in group:
            for alt in group:
                if alt in available:
                    return alt
    return None


def _pool(indices, n: Optional[int], what: str) -> tuple:
    if indices is None:
        if n is None:
            raise ValueError(f"give {what} (dataset indices) or num_samples")
        return tuple(range(n))
    pool = tuple(int(i) for i in indices)
    if len(set(pool)) != len(pool):
        raise ValueError(f"{what} holds duplicate indices")
    return pool


def _draw(pool: Sequence[int], shots: int, queries, g: torch.Generator, exclude=()) -> tuple:
    excluded = set(exclude)
    cand = [i for i in pool if i not in excluded]
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    need = shots + (1 if queries is _ALL else queries)
    if len(cand) < need:
        q = "at least 1" if queries is _ALL else str(queries)
        raise ValueError(f"{len(cand)} candidate images cannot hold {shots} support + {q} query images")
    perm = torch.randperm(len(cand), generator=g).tolist()
    support = tuple(cand[j] for j in perm[:shots])
    rest = perm[shots:] if queries is _ALL else perm[shots:shots + queries]
    return support, tuple(cand[j] for j in rest)


class EpisodeSampler:
    """Fold-based episode sampler for few-shot dense prediction.

    Args:
        source: a dataset whose items are dicts (its tasks are
            ``dataset.tasks``, else the keys of item 0 other than image, meta
            and mask), or a sequence of task names (then give ``num_samples``
            or ``indices``).
        folds: task groups, one per fold (default :data:`TASKONOMY_FOLDS`,
            VTM's 5 pairs). Names are matched to the source's tasks exactly
            or through :data:`TASK_ALIASES` (``semseg`` for
            ``segment_semantic``, ``normals`` for ``normal``).
        fold: the held-out fold: its tasks are :attr:`test_tasks`, the
            tasks of every other fold :attr:`train_tasks`. Tasks in no fold
            (e.g. the synthetic scenes' saliency) are in neither, listed in
            :attr:`unused_tasks`.
        shots: support images per episode.
        queries: query images per episode (default 10: as many as support
            images, as VTM's training batches have; None: all images not in
            the support).
        seed: episodes are a function of ``(seed, split, episode index)``.
        num_episodes: episodes per pass of ``iter(sampler)`` (train split).
        indices: dataset indices to draw meta-training episodes from
            (default all); test_indices: those of test episodes (default the
            same). VTM draws them from different buildings.
        num_samples: dataset size when ``source`` is task names.

    Every fold task must exist in the source (ValueError listing the source's
    tasks otherwise).
    """

    def __init__(self, source, folds: Optional[Sequence[Sequence[str]]] = None, fold: int = 0,
                 shots: int = 10, queries: Optional[int] = 10, seed: int = 0, num_episodes: int = 1000,
                 indices: Optional[Sequence[int]] = None, test_indices: Optional[Sequence[int]] = None,
                 num_samples: Optional[int] = None) -> None:
        if isinstance(source, str):
            raise TypeError("source must be a dataset or a sequence of task names, not a single string")
        if _is_name_list(source):
            self.dataset = None
            available = tuple(source)
        elif hasattr(source, "__getitem__") and hasattr(source, "__len__"):
            self.dataset = source
            available = _dataset_tasks(source)
            if num_samples is None:
                num_samples = len(source)
        else:
            raise TypeError(f"source must be a dataset or a list/tuple of task names, got {type(source).__name__}")
        self.available_tasks = available
        self.folds = tuple(tuple(f) for f in (TASKONOMY_FOLDS if folds is None else folds))
        if not self.folds or any(len(f) == 0 for f in self.folds):
            raise ValueError("folds must be a non-empty sequence of non-empty task groups")
        try:
            fold_i = operator.index(fold)
        except TypeError:
            fold_i = -1
        if not 0 <= fold_i < len(self.folds):
            raise ValueError(f"fold must be an int in [0, {len(self.folds) - 1}], got {fold!r}")
        fold = fold_i
        resolved = []
        for group in self.folds:
            names = []
            for name in group:
                r = _resolve(name, available)
                if r is None:
                    raise ValueError(f"fold task {name!r} is not among the source's tasks {list(available)}")
                names.append(r)
            resolved.append(tuple(names))
        flat = [t for g in resolved for t in g]
        if len(set(flat)) != len(flat):
            raise ValueError(f"a task appears in more than one fold: {resolved}")
        self.fold = fold
        self.fold_tasks = tuple(resolved)
        self.test_tasks = resolved[fold]
        self.train_tasks = tuple(t for i, g in enumerate(resolved) if i != fold for t in g)
        self.unused_tasks = tuple(t for t in available if t not in flat)
        if not isinstance(shots, int) or shots < 1:
            raise ValueError(f"shots must be a positive int, got {shots!r}")
        if queries is not None and (not isinstance(queries, int) or queries < 1):
            raise ValueError(f"queries must be a positive int or None, got {queries!r}")
        self.shots, self.queries = shots, queries
        self.seed, self.num_episodes = int(seed), int(num_episodes)
        self.indices = _pool(indices, num_samples, "indices")
        self.test_indices = self.indices if test_indices is None else _pool(test_indices, None, "test_indices")

    def episode(self, index: int, split: str = "train", task: Optional[str] = None,
                shots: Optional[int] = None, queries: Optional[int] = None) -> Episode:
        """Episode ``index`` of ``split`` ("train": a train task, images from
        ``indices``; "test": a test task, images from ``test_indices``).

        ``task`` fixes the task (it must belong to the split), otherwise it is
        drawn uniformly. ``shots``/``queries`` override the sampler's; the
        support set does not depend on the task, so the episodes of the two
        test tasks of a fold share their images.
        """
        if split == "train":
            tasks, pool = self.train_tasks, self.indices
        elif split == "test":
            tasks, pool = self.test_tasks, self.test_indices
        else:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not tasks:
            raise ValueError(f"no {split} tasks (folds {self.fold_tasks}, held-out fold {self.fold})")
        g = _generator(self.seed, split, int(index))
        # The image draw comes first and does not see the task, so fixing the
        # task does not change which images an episode uses.
        shots = self.shots if shots is None else shots
        q = self.queries if queries is None else queries
        support, query = _draw(pool, shots, _ALL if q is None else q, g)
        t_draw = int(torch.randint(0, len(tasks), (), generator=g))
        if task is None:
            task = tasks[t_draw]
        else:
            r = _resolve(task, tasks)
            if r is None:
                raise ValueError(f"task {task!r} is not a {split} task of fold {self.fold}; "
                                 f"{split} tasks: {list(tasks)}")
            task = r
        return Episode(task, support, query, split, int(index))

    def __iter__(self):
        for i in range(self.num_episodes):
            yield self.episode(i, "train")

    def __len__(self) -> int:
        return self.num_episodes

    def load(self, episode: Episode, dataset=None) -> dict:
        """Stack the episode's samples: see :func:`collate_episode`."""
        dataset = self.dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("this sampler was built from task names; pass the dataset")
        return collate_episode(dataset, episode)

    def __repr__(self) -> str:
        return (f"EpisodeSampler(fold={self.fold}, test_tasks={list(self.test_tasks)}, "
                f"train_tasks={list(self.train_tasks)}, shots={self.shots}, queries={self.queries}, seed={self.seed})")


def _is_name_list(x) -> bool:
    # Only real lists/tuples: iterating a dataset to check would load its items.
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, str) for t in x)


def collate_episode(dataset, episode: Episode) -> dict:
    """``{"task", "support": {...}, "query": {...}}`` where each side holds
    ``image`` (N, 3, H, W), ``label`` (N, ...) the episode task's label, and
    ``mask`` (N, ...) when the dataset provides per-task masks. The support
    and query images must share a size (a fixed-size transform does that)."""
    if episode.task is None:
        raise ValueError("the episode has no task; set one to load its labels")

    def side(indices):
        items = [dataset[i] for i in indices]
        if episode.task not in items[0]:
            raise KeyError(f"dataset items have no {episode.task!r}; keys: {sorted(items[0])}")
        out = {"image": torch.stack([s["image"] for s in items]),
               "label": torch.stack([s[episode.task] for s in items]),
               "indices": torch.tensor(indices, dtype=torch.int64)}
        masks = [s.get("mask", {}).get(episode.task) if isinstance(s.get("mask"), Mapping) else None for s in items]
        if all(m is not None for m in masks):
            out["mask"] = torch.stack(masks)
        return out

    return {"task": episode.task, "support": side(episode.support), "query": side(episode.query)}


@dataclass(frozen=True)
class RepeatedResult:
    """Mean and standard deviation of one metric over repeated support draws."""

    mean: float
    std: float
    values: tuple
    ddof: int = 0
    supports: tuple = field(default=(), repr=False)

    @property
    def runs(self) -> int:
        return len(self.values)

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.std:.4g} (n={self.runs})"


def _mean_std(values: Sequence[float], ddof: int) -> tuple:
    n = len(values)
    mean = math.fsum(values) / n
    if n - ddof <= 0:
        return mean, float("nan")
    var = math.fsum((v - mean) ** 2 for v in values) / (n - ddof)
    return mean, math.sqrt(var)


def _to_float(x, what: str) -> float:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{what} returned a tensor of shape {tuple(x.shape)}; expected a scalar")
        return float(x.item())
    try:
        return float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{what} returned {type(x).__name__}; expected a number or a dict of numbers") from None


def repeated_evaluation(evaluate_fn: Callable[[Episode], Union[float, Mapping[str, float]]], source, runs: int = 5,
                        shots: int = 10, seed: Optional[int] = None, task: Optional[str] = None,
                        queries: Optional[int] = None, query_indices: Optional[Sequence[int]] = None,
                        ddof: int = 0):
    """Evaluate with ``runs`` different support sets; mean +- std over them.

    Args:
        evaluate_fn: called once per run with an :class:`Episode` (split
            ``"eval"``, index = run) and returns a number (or a 0-d tensor) or
            a dict of numbers.
        source: where the images come from: an :class:`EpisodeSampler` (its
            ``test_indices``; its seed when ``seed`` is None), a dataset (all
            its indices), an int n (indices ``0..n-1``) or a sequence of indices.
        runs: number of support sets.
        shots: support images per run.
        seed: run r's support set is a function of ``(seed, r)`` only (default
            0) -- the same for every task and every model evaluated with the
            same seed, so comparisons are paired.
        task: recorded in the episodes (evaluate_fn may use it).
        queries: query images per run (None: every image of the pool not in
            that run's support).
        query_indices: a fixed evaluation set instead: every run queries
            exactly these images, and supports are drawn from the rest of
            the pool.
        ddof: delta degrees of freedom of the std (0: population std, numpy's
            default and the usual "±" of the few-shot tables; 1: sample std).

    Returns a :class:`RepeatedResult` (``mean``, ``std``, ``values``,
    ``supports``), or a dict of them when evaluate_fn returns dicts.
    """
    if not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be a positive int, got {runs!r}")
    if isinstance(source, EpisodeSampler):
        pool = source.test_indices
        seed = source.seed if seed is None else seed
    elif isinstance(source, int) and not isinstance(source, bool):
        pool = tuple(range(source))
    elif hasattr(source, "__getitem__") and hasattr(source, "__len__") and not _is_int_list(source):
        pool = tuple(range(len(source)))
    else:
        pool = _pool(source, None, "source indices")
    seed = 0 if seed is None else int(seed)
    fixed = None if query_indices is None else tuple(int(i) for i in query_indices)
    if fixed is not None and queries is not None:
        raise ValueError("give queries or query_indices, not both")
    episodes = []
    for r in range(runs):
        g = _generator(seed, "eval", r)
        if fixed is not None:
            support, _ = _draw(pool, shots, 0, g, exclude=fixed)
            query = fixed
        else:
            support, query = _draw(pool, shots, _ALL if queries is None else queries, g)
        episodes.append(Episode(task, support, query, "eval", r))
    results = [evaluate_fn(ep) for ep in episodes]
    supports = tuple(ep.support for ep in episodes)
    if all(isinstance(x, Mapping) for x in results):
        keys = list(results[0])
        if any(list(x) != keys for x in results):
            raise ValueError("evaluate_fn returned dicts with different keys across runs")
        out = {}
        for k in keys:
            vals = tuple(_to_float(x[k], f"evaluate_fn[{k!r}]") for x in results)
            m, s = _mean_std(vals, ddof)
            out[k] = RepeatedResult(m, s, vals, ddof, supports)
        return out
    vals = tuple(_to_float(x, "evaluate_fn") for x in results)
    m, s = _mean_std(vals, ddof)
    return RepeatedResult(m, s, vals, ddof, supports)


def _is_int_list(x) -> bool:
    return isinstance(x, (list, tuple, range)) and all(isinstance(i, int) for i in x)


__all__ = ["EpisodeSampler", "Episode", "RepeatedResult", "repeated_evaluation", "collate_episode",
           "TASK_ALIASES"]
