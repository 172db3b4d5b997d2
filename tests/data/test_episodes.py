"""Fold-based episode sampling and repeated (multi-support-set) evaluation."""
import math

import numpy as np
import pytest
import torch

from fastdense.data.episodes import (Episode, EpisodeSampler, RepeatedResult, collate_episode,
                                     repeated_evaluation)
from fastdense.data.taskonomy import TASKONOMY_FOLDS, TASKONOMY_TASKS

# The synthetic scenes' task names: "semseg" for segment_semantic, plus two
# tasks that are in no Taskonomy fold.
SYNTH_TASKS = ("semseg", "normal", "depth_euclidean", "depth_zbuffer", "edge_texture", "edge_occlusion",
               "keypoints2d", "keypoints3d", "reshading", "principal_curvature", "saliency", "parts")


class DictDataset(torch.utils.data.Dataset):
    """Items are dicts of tensors; values encode the index so loads can be checked."""

    def __init__(self, n, tasks=("semseg", "normal", "reshading"), with_tasks_attr=True):
        self.n = n
        if with_tasks_attr:
            self.tasks = tasks
        self._tasks = tasks

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        s = {"image": torch.full((3, 4, 4), float(i))}
        for t in self._tasks:
            s[t] = torch.full((1, 4, 4), float(i) + 0.5)
        s["mask"] = {"reshading": torch.full((1, 4, 4), i % 2 == 0)}
        s["meta"] = {"index": torch.tensor(i)}
        return s


def test_fold_split_matches_vtm_pairs():
    for fold, test in enumerate(TASKONOMY_FOLDS):
        s = EpisodeSampler(TASKONOMY_TASKS, fold=fold, num_samples=30)
        assert s.test_tasks == test
        assert set(s.train_tasks) == set(TASKONOMY_TASKS) - set(test) and len(s.train_tasks) == 8
        assert s.unused_tasks == ()
    s = EpisodeSampler(TASKONOMY_TASKS, fold=0, num_samples=30)
    assert s.test_tasks == ("reshading", "principal_curvature")
    assert s.train_tasks[:2] == ("keypoints2d", "keypoints3d")
    with pytest.raises(ValueError, match=r"fold must be an int in \[0, 4\]"):
        EpisodeSampler(TASKONOMY_TASKS, fold=5, num_samples=30)


def test_aliases_and_unused_tasks_for_synthetic_names():
    s = EpisodeSampler(SYNTH_TASKS, fold=4, num_samples=30)
    assert s.test_tasks == ("semseg", "normal")
    assert s.unused_tasks == ("saliency", "parts")
    assert "saliency" not in s.train_tasks and "semseg" not in s.train_tasks
    # Every train episode uses a train task, every test episode a test task.
    assert {s.episode(i).task for i in range(60)} == set(s.train_tasks)
    assert {s.episode(i, "test").task for i in range(30)} == {"semseg", "normal"}
    assert s.episode(0, "test", task="segment_semantic").task == "semseg"
    with pytest.raises(ValueError, match="not among the source's tasks"):
        EpisodeSampler(("semseg", "normal"), num_samples=30)
    with pytest.raises(ValueError, match="not a test task of fold 4"):
        s.episode(0, "test", task="reshading")


def test_episodes_deterministic_and_seed_dependent():
    a = EpisodeSampler(TASKONOMY_TASKS, shots=5, queries=3, seed=11, num_samples=50, num_episodes=20)
    b = EpisodeSampler(TASKONOMY_TASKS, shots=5, queries=3, seed=11, num_samples=50, num_episodes=20)
    c = EpisodeSampler(TASKONOMY_TASKS, shots=5, queries=3, seed=12, num_samples=50, num_episodes=20)
    ea, eb, ec = list(a), list(b), list(c)
    assert ea == eb and len(ea) == len(a) == 20
    assert [e.support for e in ea] != [e.support for e in ec]
    # Random access gives the same episode as iteration, in any order.
    assert a.episode(13) == ea[13] and a.episode(2) == ea[2]
    assert ea[3] == Episode(ea[3].task, ea[3].support, ea[3].query, "train", 3)
    # Fixing the task does not change the images.
    e = a.episode(4, "test", task="principal_curvature")
    assert e.task == "principal_curvature" and e.support == a.episode(4, "test").support


def test_support_and_query_disjoint_and_in_pool():
    pool = list(range(100, 140))
    test_pool = list(range(0, 25))
    s = EpisodeSampler(TASKONOMY_TASKS, shots=10, queries=6, seed=0, indices=pool, test_indices=test_pool)
    for i in range(40):
        e = s.episode(i)
        assert len(e.support) == 10 and len(e.query) == 6
        assert len(set(e.support)) == 10 and not set(e.support) & set(e.query)
        assert set(e.support) | set(e.query) <= set(pool)
        t = s.episode(i, "test")
        assert set(t.support) | set(t.query) <= set(test_pool) and not set(t.support) & set(t.query)
    # queries=None: the query set is the whole rest of the pool.
    full = EpisodeSampler(TASKONOMY_TASKS, shots=4, queries=None, num_samples=12).episode(0)
    assert sorted(full.support + full.query) == list(range(12)) and len(full.query) == 8
    # Every index gets drawn eventually: sampling is not stuck on a subset.
    seen = set()
    for i in range(30):
        seen |= set(s.episode(i).support)
    assert seen == set(pool)
    with pytest.raises(ValueError, match="cannot hold 10 support"):
        EpisodeSampler(TASKONOMY_TASKS, shots=10, queries=6, num_samples=15).episode(0)


def test_sampler_from_dataset_and_collate():
    ds = DictDataset(20)
    s = EpisodeSampler(ds, folds=(("semseg",), ("normal", "reshading")), fold=1, shots=3, queries=2, seed=5)
    assert s.test_tasks == ("normal", "reshading") and s.train_tasks == ("semseg",)
    e = s.episode(0, "test", task="reshading")
    batch = s.load(e)
    assert batch["task"] == "reshading"
    assert batch["support"]["image"].shape == (3, 3, 4, 4) and batch["query"]["label"].shape == (2, 1, 4, 4)
    assert batch["support"]["indices"].tolist() == list(e.support)
    assert batch["support"]["label"][:, 0, 0, 0].tolist() == [i + 0.5 for i in e.support]
    assert batch["query"]["image"][:, 0, 0, 0].tolist() == [float(i) for i in e.query]
    assert batch["support"]["mask"][:, 0, 0, 0].tolist() == [i % 2 == 0 for i in e.support]
    assert "mask" not in collate_episode(ds, s.episode(0, "train"))["support"]  # semseg has no mask
    # Tasks inferred from item keys when the dataset has no .tasks.
    s2 = EpisodeSampler(DictDataset(20, with_tasks_attr=False), folds=(("semseg",), ("normal",)), fold=0)
    assert s2.available_tasks == ("semseg", "normal", "reshading") and s2.unused_tasks == ("reshading",)
    with pytest.raises(ValueError, match="pass the dataset"):
        EpisodeSampler(TASKONOMY_TASKS, num_samples=20).load(Episode("normal", (0,), (1,), "train", 0))


def test_repeated_evaluation_mean_std():
    def support_mean(ep):
        return float(np.mean(ep.support))

    r = repeated_evaluation(support_mean, 40, runs=7, shots=5, seed=3)
    assert isinstance(r, RepeatedResult) and r.runs == 7 and len(set(r.supports)) == 7
    vals = [float(np.mean(s)) for s in r.supports]
    assert r.values == tuple(vals)
    assert r.mean == pytest.approx(np.mean(vals), abs=1e-12)
    assert r.std == pytest.approx(np.std(vals), abs=1e-12)  # population std by default
    r1 = repeated_evaluation(support_mean, 40, runs=7, shots=5, seed=3, ddof=1)
    assert r1.std == pytest.approx(np.std(vals, ddof=1), abs=1e-12) and r1.supports == r.supports
    assert str(r) == f"{r.mean:.4g} ± {r.std:.4g} (n=7)"
    # Known values: a constant evaluation has std 0; two runs of 1 and 3 -> 2 ± 1.
    assert repeated_evaluation(lambda ep: 0.25, 10, runs=4, shots=2).std == 0.0
    it = iter([1.0, 3.0])
    two = repeated_evaluation(lambda ep: next(it), 10, runs=2, shots=2)
    assert (two.mean, two.std) == (2.0, 1.0)
    assert math.isnan(repeated_evaluation(lambda ep: 1.0, 10, runs=1, shots=2, ddof=1).std)


def test_repeated_evaluation_pools_queries_and_dicts():
    ds = DictDataset(30)
    seen = []

    def evaluate(ep):
        seen.append(ep)
        assert not set(ep.support) & set(ep.query)
        return {"err": torch.tensor(float(len(ep.query))), "first": ep.support[0]}

    out = repeated_evaluation(evaluate, ds, runs=3, shots=4, seed=1, task="normal")
    assert set(out) == {"err", "first"}
    assert out["err"].values == (26.0, 26.0, 26.0) and out["err"].std == 0.0
    assert out["first"].values == tuple(float(ep.support[0]) for ep in seen)
    assert all(ep.task == "normal" and ep.split == "eval" for ep in seen)
    assert [ep.index for ep in seen] == [0, 1, 2]
    # Same seed -> same support sets, whatever the evaluation (paired comparisons).
    again = repeated_evaluation(lambda ep: 0.0, range(30), runs=3, shots=4, seed=1)
    assert again.supports == out["err"].supports
    # A fixed query set: queried every run, never in a support set.
    fixed = list(range(10))
    r = repeated_evaluation(lambda ep: float(sum(ep.query)), 30, runs=5, shots=6, query_indices=fixed)
    assert all(not set(s) & set(fixed) for s in r.supports) and r.values == (45.0,) * 5
    # A sampler as the source: its test pool and its seed.
    sampler = EpisodeSampler(TASKONOMY_TASKS, seed=9, indices=range(50), test_indices=range(50, 70))
    rs = repeated_evaluation(lambda ep: 0.0, sampler, runs=3, shots=5)
    assert all(set(s) <= set(range(50, 70)) for s in rs.supports)
    assert rs.supports == repeated_evaluation(lambda ep: 0.0, list(range(50, 70)), runs=3, shots=5, seed=9).supports
    with pytest.raises(TypeError, match="expected a number"):
        repeated_evaluation(lambda ep: "x", 10, runs=2, shots=2)
    with pytest.raises(ValueError, match="runs must be a positive int"):
        repeated_evaluation(lambda ep: 0.0, 10, runs=0)
