"""DDP on 2 CPU processes (gloo) matches one process on the full batch.

The workers are forked from a fresh interpreter running this file as a
script: forking the pytest process itself is unsafe once autograd has run
in it (its worker threads do not survive fork), and spawn would re-import
torch in every child, which is slower.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

TASKS = ["semseg", "normal", "depth_euclidean", "saliency"]
STEPS, BATCH = 2, 4


def _make_trainer(run_dir):
    from fastdense.data import SyntheticScenes
    from fastdense.engine import MultiTaskTrainer, TrainConfig
    from fastdense.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny_mtl_small", tasks=TASKS)
    train = SyntheticScenes(8, 64, seed=2, tasks=TASKS)
    val = SyntheticScenes(5, 64, seed=4, tasks=TASKS)  # odd size: ranks get unequal shares
    cfg = TrainConfig(steps=STEPS, batch_size=BATCH, lr=1e-2, warmup_steps=1, progress=False, log_every=1)
    return MultiTaskTrainer(model, TASKS, train, val, config=cfg, run_dir=run_dir, device="cpu")


def _worker(rank, out_dir):
    from fastdense.engine import distributed as fd_dist

    torch.set_num_threads(1)
    init = "file://" + os.path.join(out_dir, "rendezvous")
    assert fd_dist.init_distributed(backend="gloo", init_method=init, rank=rank, world_size=2)
    trainer = _make_trainer(os.path.join(out_dir, "run"))
    # Gradients of the first step, as DDP averaged them over the two half batches.
    first = trainer.train_step()
    trainer.fit()
    torch.save({"params": {k: v.detach() for k, v in trainer.model.state_dict().items()}, "first": first},
               os.path.join(out_dir, f"rank{rank}.pt"))
    with open(os.path.join(out_dir, f"eval{rank}.json"), "w") as f:
        json.dump(trainer.last_eval, f)
    fd_dist.cleanup()


def _run_workers(out_dir):
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(out_dir,), nprocs=2, start_method="fork", join=True)


if __name__ == "__main__":
    _run_workers(sys.argv[1])
    sys.exit(0)


def test_two_processes_on_half_batches_match_one_process_on_the_full_batch(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    evals = [json.loads((tmp_path / f"eval{r}.json").read_text()) for r in (0, 1)]

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _make_trainer(tmp_path / "single")
        first = single.train_step()
        single.fit()
    finally:
        torch.set_num_threads(old)
    ref = single.model.state_dict()
    for name, value in ref.items():
        # Both replicas hold the same parameters (DDP keeps them in step) ...
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        # ... and they are the single-process ones up to summation order.
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    # The gradient norm after DDP's all-reduce is the full-batch gradient's norm.
    assert ranks[0]["first"]["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-5)
    assert ranks[1]["first"]["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-5)
    # Each rank logs the mean of the two half-batch losses, which is the full-batch loss
    # (the losses divide by all pixels, not by each half's valid pixels).
    for r in (0, 1):
        for key, value in first.items():
            if key.startswith("loss"):
                assert ranks[r]["first"][key] == pytest.approx(value, rel=1e-5), (r, key)
    # Metrics synced over the ranks (3 + 2 validation images) equal the single-process metrics.
    assert evals[0] == evals[1]
    for task, values in single.last_eval.items():
        for key, value in values.items():
            assert evals[0][task][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, key)
    # Only rank 0 writes the run directory: one line for step 2 (fit logged it; step 1 ran
    # outside fit) and one evaluation, not two of each.
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2]
    assert [r["step"] for r in records if "eval" in r] == [2]


def test_helpers_are_no_ops_without_a_process_group():
    from fastdense.data import SyntheticScenes
    from fastdense.engine import distributed as fd_dist
    from fastdense.metrics import DepthError

    assert not fd_dist.is_distributed()
    assert (fd_dist.rank(), fd_dist.world_size(), fd_dist.is_main_process()) == (0, 1, True)
    assert fd_dist.shard([5, 6, 7]) == [5, 6, 7]
    assert fd_dist.distributed_sampler(SyntheticScenes(3, 64)) is None
    if "RANK" not in os.environ:  # not launched by torchrun: nothing to join
        assert fd_dist.init_distributed() is False
    m = DepthError()
    m.update(torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0))
    fd_dist.sync_metrics([m])
    assert m.compute()["rmse"] == pytest.approx(1.0)
    assert torch.equal(fd_dist.all_reduce_mean(torch.tensor(3.0)), torch.tensor(3.0))
