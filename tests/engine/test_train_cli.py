"""`fastdense train` / `eval` end to end, their errors, and the demo's training part."""
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from fastdense import cli
from fastdense.cli.demo import DEMO_STEPS_ENV

TINY = ["--steps", "3", "--batch-size", "2", "--train-samples", "4", "--val-samples", "3", "--threads", "1",
        "--no-progress", "--log-every", "1", "--model", "tiny_mtl_small"]


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fastdense", *args], capture_output=True, text=True, env=env,
                          timeout=240)


def _table(text):
    """{(task, metric): value} from a metrics table."""
    return {(m.group(1), m.group(2)): float(m.group(3))
            for m in re.finditer(r"^  (\w+)\s+([\w.]+)(?: \*)?\s+(-?[\d.]+|nan)", text, re.M)}


def test_train_then_eval_end_to_end(tmp_path):
    run = tmp_path / "run"
    proc = _run("train", *TINY, "--run-dir", str(run), "--tasks", "semseg,depth_euclidean")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"run dir: {run}" in proc.stdout
    ckpt_path = run / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["step"] == 3 and ckpt["config"]["tasks"] == ["semseg", "depth_euclidean"]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert (run / "predictions_step3.png").read_bytes()[:4] == b"\x89PNG"
    train_table = _table(proc.stdout)
    # The printed table is the evaluation stored in the checkpoint.
    for (task, key), value in train_table.items():
        assert value == pytest.approx(ckpt["metrics"][task][key], abs=5e-5)

    ev = _run("eval", "--checkpoint", str(ckpt_path))
    assert ev.returncode == 0, ev.stdout + ev.stderr
    eval_table = _table(ev.stdout)
    assert set(eval_table) == set(train_table) and ("semseg", "miou") in eval_table
    for k, value in train_table.items():
        assert eval_table[k] == pytest.approx(value, abs=1e-4), k


def test_resume_from_the_cli_is_bit_identical_to_the_uninterrupted_run(tmp_path, capsys):
    straight = tmp_path / "straight"
    assert cli.main(["train", *TINY, "--steps", "4", "--save-every", "2", "--run-dir", str(straight),
                     "--tasks", "saliency"]) == 0
    assert torch.load(straight / "checkpoint_step2.pt", weights_only=True)["step"] == 2
    resumed = tmp_path / "resumed"
    capsys.readouterr()
    assert cli.main(["train", *TINY, "--steps", "4", "--run-dir", str(resumed), "--tasks", "saliency",
                     "--resume", str(straight / "checkpoint_step2.pt")]) == 0
    assert f"resumed from {straight / 'checkpoint_step2.pt'} at step 2" in capsys.readouterr().out
    a = torch.load(resumed / "checkpoint.pt", weights_only=True)
    b = torch.load(straight / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for name in b["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    steps = [json.loads(line)["step"] for line in (resumed / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [3, 4]


def test_config_file_is_overridden_by_flags(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"steps": 2, "batch-size": 2, "tasks": ["saliency"], "train_samples": 4,
                               "val_samples": 2, "model": "tiny_mtl_small", "progress": False, "threads": 1}))
    assert cli.main(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "a")]) == 0
    assert torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert cli.main(["train", "--config", str(cfg), "--steps", "1", "--run-dir", str(tmp_path / "b")]) == 0
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 1 and ck["config"]["tasks"] == ["saliency"] and ck["config"]["train"]["batch_size"] == 2


def test_yaml_config_when_pyyaml_is_installed(tmp_path):
    pytest.importorskip("yaml")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("steps: 1\nbatch_size: 2\ntasks: [depth_euclidean]\ntrain_samples: 2\nval_samples: 2\n"
                   "model: tiny_mtl_small\nprogress: false\n")
    assert cli.main(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "y")]) == 0
    assert torch.load(tmp_path / "y" / "checkpoint.pt", weights_only=True)["config"]["tasks"] == ["depth_euclidean"]


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "swin"], "unknown model 'swin'; models `fastdense train` can train: "),
    (["train", "--tasks", "semseg,edges"], "unknown task(s) ['edges']"),
    (["train", "--resolution", "70"], "--resolution must be a multiple of 4 in [64, 448], got 70"),
    (["train", "--steps", "0"], "--steps must be a positive integer, got 0"),
    (["train", "--resume", "/no/such/ckpt.pt"], "checkpoint to resume not found: /no/such/ckpt.pt"),
    (["train", "--config", "/no/such/cfg.json"], "config file not found: /no/such/cfg.json"),
    (["eval", "--checkpoint", "/no/such/model.pt"], "checkpoint not found: /no/such/model.pt"),
])
def test_bad_inputs_fail_with_exit_code_2_and_a_clear_message(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"fastdense {argv[0]}: error: ")


def test_bad_config_contents(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stepz": 3}))
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "unknown option(s) ['stepz']" in capsys.readouterr().err
    bad.write_text("{not json")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "invalid JSON" in capsys.readouterr().err


def test_eval_rejects_a_file_that_is_not_a_training_checkpoint(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, path)
    assert cli.main(["eval", "--checkpoint", str(path)]) == 2
    assert f"{path} is not a fastdense training checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("name, flag", [("train", "--resume"), ("eval", "--checkpoint"), ("demo", "--train-steps")])
def test_help_of_each_subcommand(name, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    assert flag in capsys.readouterr().out


def test_top_level_help_lists_train_and_eval():
    text = cli.build_parser().format_help()
    assert "train" in text and "eval" in text


def test_demo_training_passes_and_writes_pngs(tmp_path):
    out = io.StringIO()
    rc = cli.run_demo_training(40, run_dir=str(tmp_path), batch_size=8, threads=1, val_samples=16, out=out)
    text = out.getvalue()
    assert rc == 0, text
    assert "demo training: OK (beats the trivial baseline on all 4 tasks)" in text
    assert f"run dir (log.jsonl, checkpoint.pt, prediction PNGs): {tmp_path}" in text
    assert "metrics on 16 held-out scenes" in text
    rows = re.findall(r"^  (\w+)\s+(\S+) \*\s+([\d.]+)\s+([\d.]+)\s+(yes|no)$", text, re.M)
    assert {r[0] for r in rows} == {"semseg", "normal", "depth_euclidean", "saliency"}
    for _task, key, model, base, better in rows:
        lower = key in ("mean", "rmse")
        assert better == "yes" and (float(model) < float(base) if lower else float(model) > float(base))
    assert (tmp_path / "predictions_step40.png").is_file()


def test_demo_training_fails_loudly_when_it_does_not_beat_the_baseline(tmp_path):
    out = io.StringIO()
    rc = cli.run_demo_training(1, run_dir=str(tmp_path), batch_size=2, threads=1, val_samples=8, out=out)
    assert rc == 1
    assert re.search(r"^demo training: FAIL: the trained model does not beat the trivial baseline on \w+",
                     out.getvalue(), re.M)


def test_training_bar_into_a_pipe_writes_plain_lines(tmp_path, capsys):
    """stderr is not a terminal here (as in CI or `make demo 2>&1 | tee log`): no carriage-return
    redraws, not even through tqdm; the last line carries the final loss."""
    argv = [a for a in TINY if a != "--no-progress"]
    assert cli.main(["train", *argv, "--run-dir", str(tmp_path), "--tasks", "saliency"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.search(r"^\[#{30}\] 3/3 loss \d+\.\d{4}$", err, re.M), err


def test_resume_with_other_tasks_is_a_usage_error(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *TINY, "--steps", "1", "--run-dir", str(run), "--tasks", "saliency"]) == 0
    ckpt = str(run / "checkpoint.pt")
    assert cli.main(["train", *TINY, "--run-dir", str(tmp_path / "b"), "--tasks", "semseg", "--resume", ckpt]) == 2
    assert f"fastdense train: error: cannot resume from {ckpt}" in capsys.readouterr().err


@pytest.mark.parametrize("env, argv, message", [
    ("abc", [], "FASTDENSE_DEMO_STEPS='abc' is not an integer"),
    (None, ["--train-steps", "-1"], "--train-steps must be >= 0, got -1"),
])
def test_demo_rejects_bad_step_counts(env, argv, message, monkeypatch, capsys):
    if env is None:
        monkeypatch.delenv(DEMO_STEPS_ENV, raising=False)
    else:
        monkeypatch.setenv(DEMO_STEPS_ENV, env)
    assert cli.main(["demo", *argv]) == 2
    assert message in capsys.readouterr().err


def test_demo_exits_non_zero_when_its_training_loses_to_the_baseline(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTDENSE_BACKEND", "torch")
    text = io.StringIO()
    rc = cli.run_demo(device="cpu", time_budget=0.0, out=text,
                      training={"steps": 1, "run_dir": str(tmp_path), "threads": 1, "val_samples": 8})
    out = text.getvalue()
    assert rc == 1, out
    assert re.search(r"^  torch\s+PASS", out, re.M)  # the op part passed; the training part failed
    assert "demo training: FAIL" in out
    assert out.rstrip().endswith("demo: FAIL (training did not beat the trivial baseline)")


# A Swin backbone small enough for the CPU tests: 4 stages of one block, 4x4 windows.
TINY_SWIN = ["--model-arg", "embed_dim=16", "--model-arg", "depths=1,1,1,1", "--model-arg", "num_heads=1,1,2,2",
             "--model-arg", "window_size=4", "--model-arg", "train_base=true"]


def test_train_a_registered_swin_model_with_model_args_then_eval(tmp_path, capsys):
    run = tmp_path / "mtlora"
    args = ["train", *TINY, "--model", "mtlora_swin_t", *TINY_SWIN, "--model-arg", "shared_rank=4",
            "--tasks", "semseg,normal", "--run-dir", str(run)]
    assert cli.main(args) == 0, capsys.readouterr().err
    train_table = _table(capsys.readouterr().out)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    spec = ckpt["config"]["spec"]
    assert spec["model"] == "mtlora_swin_t" and spec["model_kwargs"]["shared_rank"] == 4
    assert spec["model_kwargs"]["depths"] == [1, 1, 1, 1] or spec["model_kwargs"]["depths"] == (1, 1, 1, 1)
    assert cli.main(["eval", "--checkpoint", str(run / "checkpoint.pt")]) == 0
    eval_table = _table(capsys.readouterr().out)
    for key, value in train_table.items():
        assert eval_table[key] == pytest.approx(value, abs=1e-4), key


def test_model_args_from_a_config_file_merge_with_the_flags(tmp_path, capsys, monkeypatch):
    from fastdense.cli import train as train_cmd

    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": "mtlora_swin_t", "model_args": {"shared_rank": 8, "embed_dim": 16}}))
    parser = cli.build_parser()
    opts = train_cmd.train_options(parser.parse_args(["train", "--config", str(cfg), "--model-arg", "shared_rank=2",
                                                      "--model-arg", "depths=1,1,1,1"]))
    assert opts["model_args"] == {"shared_rank": 2, "embed_dim": 16, "depths": (1, 1, 1, 1)}


@pytest.mark.parametrize("extra, words", [
    (["--model", "swin_t"], "unknown model 'swin_t'; models `fastdense train` can train: "),
    (["--model", "tiny_fewshot"], "mtlora_swin_t"),
    (["--model-arg", "rank"], "--model-arg takes key=value"),
    (["--model-arg", "dim=oops", "--model", "tiny_mtl_small"], "model 'tiny_mtl_small'"),
    (["--data", "pascal"], "--data pascal needs --data-root"),
    (["--data", "nyud", "--tasks", "saliency"], "unknown task(s) ['saliency'] for --data nyud"),
    (["--pretrained", "no/such/weights.safetensors", "--model", "mtlora_swin_t"], "no/such/weights.safetensors"),
    (["--pretrained", "README.md"], "takes no pretrained backbone weights"),
])
def test_model_and_data_options_fail_with_one_line(tmp_path, capsys, extra, words):
    code = cli.main(["train", *TINY, "--run-dir", str(tmp_path / "r"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err


# The other two multi-task PEFT models through the same command line (tiny settings: the
# models' own tests check that they learn; here the command trains, saves and evaluates them).
SWIN_BODY = ["--model-arg", "embed_dim=16", "--model-arg", "depths=1,1,1,1", "--model-arg", "num_heads=1,1,2,2",
             "--model-arg", "window_size=4"]


@pytest.mark.parametrize("model, extra", [
    ("tadformer_swin_t", ["--model-arg", "rank=4", "--model-arg", "filter=dynamic"]),
    ("tdss_swin_t", ["--model-arg", "tsai_dim=8", "--model-arg", "tsai_heads=1", "--model-arg", "synergy_layers=1"]),
])
def test_train_then_eval_tadformer_and_tdss(tmp_path, capsys, model, extra):
    run = tmp_path / model
    args = ["train", *TINY, "--model", model, *SWIN_BODY, *extra, "--tasks", "semseg,depth_euclidean",
            "--run-dir", str(run)]
    assert cli.main(args) == 0, capsys.readouterr().err
    train_table = _table(capsys.readouterr().out)
    spec = torch.load(run / "checkpoint.pt", weights_only=True)["config"]["spec"]
    assert spec["model"] == model
    assert cli.main(["eval", "--checkpoint", str(run / "checkpoint.pt")]) == 0
    eval_table = _table(capsys.readouterr().out)
    for key, value in train_table.items():
        assert eval_table[key] == pytest.approx(value, abs=1e-4), key
