"""Episodic meta-training, few-shot adaptation and evaluation, and the `adapt` / `bench` commands."""
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from fastdense import cli
from fastdense.data.episodes import RepeatedResult
from fastdense.engine import load_checkpoint
from fastdense.engine.fewshot import SYNTHETIC_TASKS, EpisodicConfig, EpisodicTrainer, synthetic_sampler
from fastdense.models import TinyFewShot, create_model, list_models
from fastdense.nn import lora_parameters


@pytest.fixture(scope="module")
def sampler():
    # Fold 3 holds out the two depths; 12 meta-training scenes, 6 test scenes.
    return synthetic_sampler(fold=3, shots=2, queries=2, train_samples=12, test_samples=6, seed=0)


def _trainer(sampler, steps=20, run_dir=None, seed=0, **cfg):
    torch.manual_seed(seed)
    model = create_model("tiny_fewshot", tasks=SYNTHETIC_TASKS)
    config = EpisodicConfig(steps=steps, warmup_steps=3, adapt_steps=3, **cfg)
    return EpisodicTrainer(model, sampler, config=config, run_dir=run_dir, device="cpu")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_registry_and_shapes():
    assert "tiny_fewshot" in list_models(kind="fewshot") and "tiny_fewshot" not in list_models(kind="multitask")
    with pytest.raises(ValueError, match="unknown model 'vtm_large'"):
        create_model("vtm_large", tasks=["normal"])
    model = create_model("tiny_fewshot", tasks=["normal", "depth_euclidean", "principal_curvature"])
    assert isinstance(model, TinyFewShot)
    sup, qry = torch.rand(2, 3, 64, 64), torch.rand(3, 3, 64, 64)
    for task, channels in (("normal", 3), ("depth_euclidean", 1), ("principal_curvature", 2)):
        label = model.normalize_label(task, torch.rand(2, channels, 64, 64))
        assert label.shape == (2, 3, 64, 64)
        assert model(task, sup, label, qry).shape == (3, channels, 64, 64)
    # Depth labels are divided by 10 m so that every task's values are of order 1.
    raw = torch.full((1, 1, 4, 4), 7.0)
    norm = model.normalize_label("depth_euclidean", raw)
    assert torch.equal(norm[:, 0], torch.full((1, 4, 4), 0.7)) and not norm[:, 1:].any()
    with pytest.raises(ValueError, match="unknown few-shot task"):
        create_model("tiny_fewshot", tasks=["semseg"])
    with pytest.raises(ValueError, match="not one of this model's tasks"):
        model.task_parameters("reshading")


def test_folds_and_held_out_tasks_never_meta_trained(sampler):
    assert sampler.test_tasks == ("depth_euclidean", "depth_zbuffer")
    assert set(sampler.train_tasks) == set(SYNTHETIC_TASKS) - {"depth_euclidean", "depth_zbuffer"}
    trainer = _trainer(sampler, steps=12)
    before = _state(trainer.model)
    records = trainer.fit()
    assert [r["step"] for r in records] == list(range(1, 13))
    seen = {r["task"] for r in records}
    assert seen <= set(sampler.train_tasks) and len(seen) >= 3
    # Held-out tasks are not in any of the first 500 training episodes either ...
    assert not {sampler.episode(i, "train").task for i in range(500)} & set(sampler.test_tasks)
    # ... and their bias parameters never received a gradient: still exactly zero.
    after = trainer.model.state_dict()
    for task in sampler.test_tasks:
        for kind in ("encoder_bias", "label_bias", "output_bias"):
            key = f"{kind}.{task}"
            assert torch.equal(after[key], before[key]) and not after[key].any(), key
    assert all(after[f"output_bias.{t}"].abs().sum() > 0 for t in seen)
    # Meta-training episodes only use the meta-training scenes (indices 0-11).
    for i in range(200):
        ep = sampler.episode(i, "train")
        assert max(ep.support + ep.query) < 12


def test_meta_training_reduces_loss_on_fixed_episodes(sampler):
    trainer = _trainer(sampler, steps=50)
    probe = [trainer.load(sampler.episode(10_000 + i, "train")) for i in range(6)]

    @torch.no_grad()
    def probe_loss():
        trainer.model.eval()
        return sum(float(trainer.episode_loss(b["task"], b["support"], b["query"])) for b in probe) / len(probe)

    start = probe_loss()
    trainer.fit()
    end = probe_loss()
    assert end < 0.9 * start, (start, end)


def test_adapt_changes_only_task_biases_and_lora(sampler):
    trainer = _trainer(sampler, steps=5)
    trainer.fit()
    task = "depth_zbuffer"
    before = _state(trainer.model)
    requires = {n: p.requires_grad for n, p in trainer.model.named_parameters()}
    losses = trainer.adapt(task, sampler.test_indices[:2], steps=4)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    lora_ids = {id(p) for p in lora_parameters(trainer.model)}
    allowed = {f"{k}.{task}" for k in ("encoder_bias", "label_bias", "output_bias")}
    changed = set()
    for name, p in trainer.model.named_parameters():
        if torch.equal(p.detach(), before[name]):
            continue
        changed.add(name)
        assert name in allowed or id(p) in lora_ids, f"{name} changed during adaptation"
    assert allowed <= changed  # the task's own biases did move
    assert any("lora_" in n for n in changed)
    for name, buf in trainer.model.named_buffers():
        assert torch.equal(buf, before[name])
    # requires_grad flags are restored after adaptation.
    assert {n: p.requires_grad for n, p in trainer.model.named_parameters()} == requires


def test_evaluate_mean_std_runs_and_determinism(sampler):
    trainer = _trainer(sampler, steps=5)
    trainer.fit()
    weights = _state(trainer.model)
    res = trainer.evaluate(runs=3, shots=2, adapt_steps=2, seed=7)
    assert list(res) == list(sampler.test_tasks)
    for _task, metrics in res.items():
        assert set(metrics) == {"l1", "rmse"}
        for r in metrics.values():
            assert isinstance(r, RepeatedResult) and r.runs == 3
            vals = torch.tensor(r.values, dtype=torch.float64)
            assert r.mean == pytest.approx(float(vals.mean()), rel=1e-12)
            assert r.std == pytest.approx(float(vals.std(unbiased=False)), rel=1e-9)
            assert r.std > 0  # different support sets give different errors
        assert len(set(metrics["l1"].supports)) == 3 and all(len(s) == 2 for s in metrics["l1"].supports)
    # The model is restored after every run, and the same seed gives the same numbers.
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    again = trainer.evaluate(runs=3, shots=2, adapt_steps=2, seed=7)
    assert {t: m["l1"].values for t, m in again.items()} == {t: m["l1"].values for t, m in res.items()}
    other = trainer.evaluate(runs=3, shots=2, adapt_steps=2, seed=8)
    assert other["depth_zbuffer"]["l1"].values != res["depth_zbuffer"]["l1"].values
    # Fine-tuning is what the evaluation measures: without it the errors differ.
    frozen = trainer.evaluate(runs=3, shots=2, adapt_steps=0, seed=7)
    assert frozen["depth_zbuffer"]["l1"].values != res["depth_zbuffer"]["l1"].values


def test_checkpoint_round_trip_and_exact_resume(sampler, tmp_path):
    full = _trainer(sampler, steps=8)
    full.fit()

    first = _trainer(sampler, steps=8, run_dir=tmp_path / "a")
    first.fit(until=5)
    path = first.save()
    ckpt = torch.load(path, weights_only=True)  # weights-only loadable
    assert ckpt["step"] == 5 and ckpt["config"]["sampler"]["fold"] == 3
    assert ckpt["config"]["sampler"]["test_tasks"] == ["depth_euclidean", "depth_zbuffer"]

    resumed = _trainer(sampler, steps=8, seed=123)  # other initial weights: all must come from the file
    assert resumed.resume(path) == 5
    assert all(torch.equal(v, first.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())
    resumed.fit()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert resumed.scheduler.get_last_lr() == full.scheduler.get_last_lr()

    other_fold = synthetic_sampler(fold=1, shots=2, queries=2, train_samples=12, test_samples=6, seed=0)
    torch.manual_seed(0)
    wrong = EpisodicTrainer(create_model("tiny_fewshot", tasks=SYNTHETIC_TASKS), other_fold,
                            config=EpisodicConfig(steps=8), device="cpu")
    with pytest.raises(ValueError, match="fold"):
        wrong.resume(path)
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert log and all(r["task"] in sampler.train_tasks for r in log)


def _run(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fastdense", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


TINY_ADAPT = ["--meta-steps", "10", "--runs", "2", "--shots", "2", "--adapt-steps", "2", "--train-samples", "6",
              "--test-samples", "5", "--queries", "2", "--threads", "1", "--no-progress"]


def test_cli_adapt_end_to_end(tmp_path):
    out = _run("adapt", "--fold", "4", *TINY_ADAPT, "--run-dir", str(tmp_path / "run"),
               "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    assert "held-out fold 4: saliency, normal" in out.stdout
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["fold"] == 4 and summary["runs"] == 2 and summary["meta_steps"] == 10
    assert set(summary["tasks"]) == {"saliency", "normal"}
    for _task, metrics in summary["tasks"].items():
        r = metrics["l1"]
        assert len(r["values"]) == 2 and r["mean"] == pytest.approx(sum(r["values"]) / 2)
        assert f"l1 {r['mean']:.4f} ± {r['std']:.4f}" in out.stdout
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["step"] == 10 and ckpt["config"]["sampler"]["fold"] == 4

    # In-process from the checkpoint: same scenes, same support draws, same numbers.
    args = cli.build_parser().parse_args(["adapt", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"),
                                          "--runs", "2", "--shots", "2", "--adapt-steps", "2", "--no-progress"])
    again = cli.run_adapt(args, out=io.StringIO())
    assert again["tasks"] == summary["tasks"]


@pytest.mark.parametrize("argv, message", [
    (["--fold", "5"], "--fold must be in [0, 4]"),
    (["--shots", "0"], "--shots must be an integer >= 1"),
    (["--shots", "5", "--test-samples", "5"], "leaves no query image"),
    (["--checkpoint", "/nonexistent/ckpt.pt"], "checkpoint not found"),
    (["--resolution", "66"], "--resolution must be a multiple of 4"),
])
def test_cli_adapt_errors(argv, message, capsys):
    assert cli.main(["adapt", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_adapt_rejects_foreign_and_mismatched_checkpoints(tmp_path, capsys):
    bad = tmp_path / "not_a_checkpoint.pt"
    torch.save({"step": 1}, bad)
    assert cli.main(["adapt", "--checkpoint", str(bad)]) == 2
    assert "is not a fastdense episodic checkpoint" in capsys.readouterr().err
    sampler = synthetic_sampler(fold=2, shots=2, queries=2, train_samples=6, test_samples=5)
    trainer = _trainer(sampler, steps=1, run_dir=tmp_path)
    trainer.run_spec = {"model": "tiny_fewshot", "model_kwargs": {}, "tasks": list(SYNTHETIC_TASKS),
                        "data": {"dataset": "synthetic", "resolution": 64, "train_samples": 6, "test_samples": 5,
                                 "seed": 0}}
    path = trainer.save()
    assert cli.main(["adapt", "--checkpoint", str(path), "--fold", "0"]) == 2
    assert "would test on tasks it was trained on" in capsys.readouterr().err


def test_cli_bench_help_and_missing_plugin(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    assert "-k EXPRESSION" in capsys.readouterr().out
    monkeypatch.setattr("fastdense.cli.bench._have_pytest_benchmark", lambda: False)
    assert cli.main(["bench"]) == 2
    assert "pip install pytest-benchmark" in capsys.readouterr().err


def test_cli_bench_empty_selection_keeps_results(tmp_path):
    pytest.importorskip("pytest_benchmark")
    target = tmp_path / "results.json"
    target.write_text('{"earlier": true}')
    out = _run("bench", "-k", "no_such_benchmark_xyz", "--output", str(target))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "no benchmarks matched -k 'no_such_benchmark_xyz'" in out.stderr
    assert json.loads(target.read_text()) == {"earlier": True}  # not clobbered by an empty run
    assert sorted(os.listdir(tmp_path)) == ["results.json"]      # no temporary file left behind


def test_cli_adapt_runs_the_concept_model_protocol(capsys, tmp_path, one_torch_thread):
    """`adapt --model concept_fewshot` runs fastdense.engine.fewshot_concept on tiny random networks."""
    out_json = tmp_path / "concept.json"
    code = cli.main(["adapt", "--model", "concept_fewshot", "--tasks", "depth_zbuffer", "--shots", "2", "--runs", "1",
                     "--adapt-steps", "2", "--json", str(out_json), "--no-progress"])
    text = capsys.readouterr()
    assert code == 0, text.err
    result = json.loads(out_json.read_text())
    assert result["model"] == "concept_fewshot" and list(result["tasks"]) == ["depth_zbuffer"]
    assert "depth_zbuffer" in text.out


def test_cli_adapt_runs_the_token_matcher_protocol(capsys, tmp_path, one_torch_thread):
    """`adapt --model tts_token_matcher` runs VTM's protocol with TTS (fastdense.engine.adapt_tts):
    meta-training on four folds, fine-tuning on the held-out one; the tiny protocol's options
    (--fold, --meta-steps, --run-dir, ...) are its own too."""
    out_json = tmp_path / "tts.json"
    code = cli.main(["adapt", "--model", "tts_token_matcher", "--fold", "4", "--tasks", "normal", "--shots", "2",
                     "--runs", "1", "--adapt-steps", "1", "--meta-steps", "2", "--queries", "1",
                     "--train-samples", "6", "--test-samples", "4", "--run-dir", str(tmp_path / "run"),
                     "--json", str(out_json), "--no-progress"])
    text = capsys.readouterr()
    assert code == 0, text.err
    result = json.loads(out_json.read_text())
    assert result["test_tasks"] == ["normal"] and result["meta_steps"] == 2 and len(result["meta_timesteps"]) == 4
    assert set(result["tasks"]["normal"]) == {"merr", "l1"}
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert "normal" in text.out


@pytest.mark.parametrize("argv, words", [
    (["adapt", "--model", "concept_fewshot", "--meta-steps", "3"], "--meta-steps is an option of the tiny_fewshot"),
    (["adapt", "--data", "taskonomy"], "--data is an option of the diffusion models' protocols"),
    (["adapt", "--model", "vtm_large"], "unknown few-shot model 'vtm_large'"),
    (["adapt", "--model", "concept_fewshot", "--data", "taskonomy"], "needs local weights"),
    (["adapt", "--model", "tts_token_matcher", "--data", "taskonomy"], "needs data_root"),
    (["adapt", "--model", "tts_token_matcher", "--shots", "0"], "shots must be an integer >= 1"),
])
def test_cli_adapt_model_options_fail_with_one_line(capsys, argv, words):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
