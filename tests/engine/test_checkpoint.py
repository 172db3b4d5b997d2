"""Checkpoints: weights-only loading, atomic writes, RNG round trip, bit-identical resume."""
import pickle
import random

import numpy as np
import pytest
import torch

from fastdense.data import SyntheticScenes
from fastdense.engine import MultiTaskTrainer, TrainConfig, load_checkpoint
from fastdense.engine import checkpoint as C
from fastdense.models import create_model

TASKS = ["semseg", "normal", "depth_euclidean", "saliency"]


def _trainer(run_dir, steps, seed_init=0):
    torch.manual_seed(seed_init)
    # Dropout in the LoRA layers makes the run consume torch's RNG, so resuming must restore it.
    model = create_model("tiny_mtl_small", tasks=TASKS, dropout=0.2)
    ds = SyntheticScenes(6, 64, seed=1, tasks=TASKS)  # 6 samples, batch 4: epochs wrap mid-batch
    cfg = TrainConfig(steps=steps, batch_size=4, lr=5e-3, warmup_steps=2, progress=False, log_every=0, seed=3)
    return MultiTaskTrainer(model, TASKS, ds, config=cfg, run_dir=run_dir, device="cpu")


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_interrupted_run_resumes_bit_identically(tmp_path):
    n, k = 7, 3
    straight = _trainer(tmp_path / "a", n)
    straight.fit()

    first = _trainer(tmp_path / "b", n)
    first.fit(until=k)
    path = first.save()
    assert first.step == k and path.is_file()
    del first
    # What another process would start with: different RNG states and a different initialisation.
    torch.manual_seed(999)
    np.random.seed(999)
    random.seed(999)
    resumed = _trainer(tmp_path / "b", n, seed_init=42)
    assert resumed.resume(path) == k
    resumed.fit()
    assert resumed.step == n
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # Optimiser moments too, and the schedule position.
    for (sa, sb) in zip(straight.optimizer.state.values(), resumed.optimizer.state.values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert straight.scheduler.last_epoch == resumed.scheduler.last_epoch == n
    assert straight.sampler.state_dict() == resumed.sampler.state_dict()


def test_resume_without_rng_restore_would_differ(tmp_path):
    """Control for the test above: the dropout masks really depend on the restored RNG."""
    first = _trainer(tmp_path / "b", 5)
    first.fit(until=2)
    ckpt = C.load_checkpoint(first.save())
    straight = _trainer(tmp_path / "a", 5)
    straight.fit()
    torch.manual_seed(999)
    other = _trainer(tmp_path / "c", 5)
    C.restore(ckpt, model=other.model, optimizer=other.optimizer, scheduler=other.scheduler, sampler=other.sampler,
              rng=False)
    other.step = 2
    other.fit()
    assert any(not torch.equal(a, b) for a, b in zip(_params(straight).values(), _params(other).values()))


def test_checkpoint_loads_weights_only_and_holds_no_objects(tmp_path):
    tr = _trainer(tmp_path, 2)
    tr.fit()
    path = tr.save()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 2 and ckpt["format_version"] == C.FORMAT_VERSION
    assert ckpt["config"]["train"]["steps"] == 2 and ckpt["config"]["tasks"] == TASKS
    assert ckpt["sampler"] == tr.sampler.state_dict()
    for name, value in tr.model.state_dict().items():
        assert torch.equal(ckpt["model"][name], value)

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                assert isinstance(k, (str, int)), k
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            assert x is None or isinstance(x, (torch.Tensor, int, float, str, bool)), type(x)

    walk(ckpt)
    assert load_checkpoint(path)["step"] == 2


def test_weights_only_load_refuses_a_pickled_object(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "obj": pickle.loads(pickle.dumps(TrainConfig()))}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(missing)


def test_rng_states_round_trip():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)
    state = C.rng_state()
    expected = (torch.rand(4), np.random.standard_normal(3), [random.random(), random.gauss(0, 1)])
    torch.manual_seed(10)
    np.random.seed(20)
    random.seed(30)
    C.set_rng_state(state)
    got = (torch.rand(4), np.random.standard_normal(3), [random.random(), random.gauss(0, 1)])
    assert torch.equal(expected[0], got[0])
    np.testing.assert_array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_atomic_save_leaves_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    C.atomic_torch_save({"step": 1}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        C.atomic_torch_save({"step": 2, "x": Unsaveable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
