"""Every bad input to the command line ends in exit status 2 and one line naming the problem.

Each case runs ``fastdense.cli.main`` in-process and fails in validation, before any
training, so the whole table takes seconds; one case also runs through the real entry
point (``python -m fastdense``) to show that it behaves the same.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastdense import cli
from fastdense.engine.checkpoint import save_checkpoint
from fastdense.models import create_model

# The smallest train run there is; every train case below must fail before it starts.
TRAIN = ["train", "--model", "tiny_mtl_small", "--tasks", "saliency", "--steps", "1", "--batch-size", "2",
         "--train-samples", "2", "--val-samples", "2", "--no-progress"]
ADAPT = ["adapt", "--meta-steps", "1", "--runs", "1", "--shots", "1", "--adapt-steps", "0", "--train-samples", "4",
         "--test-samples", "3", "--queries", "1", "--no-progress"]
DEMO = ["demo", "--device", "cpu", "--train-steps", "0"]


class NotAWeight:
    """An object the weights-only unpickler refuses to rebuild."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad inputs on disk: {name: path}."""
    d = tmp_path_factory.mktemp("bad_inputs")
    paths = {name: d / name for name in ("empty.pt", "text.pt", "object.pt", "list.pt", "weights.pt",
                                         "a_file", "folder", "cfg_twice.json", "cfg_binary.json",
                                         "bad.yaml", "keys.yaml", "steps_true.yaml")}
    paths["empty.pt"].write_bytes(b"")
    paths["text.pt"].write_text("this is not a checkpoint\n")
    torch.save({"step": 1, "model": {}, "extra": NotAWeight()}, paths["object.pt"])
    torch.save([1, 2, 3], paths["list.pt"])
    # A training checkpoint whose run spec names a model for other tasks than its weights were trained on.
    spec = {"model": "tiny_mtl_small", "model_kwargs": {}, "tasks": ["semseg"],
            "data": {"dataset": "synthetic", "resolution": 64, "val_samples": 2, "val_seed": 1}}
    save_checkpoint(paths["weights.pt"], model=create_model("tiny_mtl_small", tasks=["saliency"]), step=1,
                    config={"spec": spec, "tasks": ["saliency"]})
    paths["a_file"].write_text("a file where a folder belongs\n")
    paths["folder"].mkdir()
    paths["cfg_twice.json"].write_text(json.dumps({"batch-size": 2, "batch_size": 4}))
    paths["cfg_binary.json"].write_bytes(b"\xff\xfe\x00binary")
    paths["bad.yaml"].write_text("steps: [1\nlr: 2\n")
    paths["keys.yaml"].write_text("1: 2\n")
    paths["steps_true.yaml"].write_text("steps: true\nmodel: tiny_mtl_small\n")
    return {k: str(v) for k, v in paths.items()}


def _config(tmp_path, values: dict) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    return str(path)


# (case id, argv, text the one line must contain). Placeholders: {name} is a file of the
# `files` fixture, {run} a fresh run folder, {config:<json>} a config file holding <json>.
CASES = [
    # files that are not checkpoints, or not this model's
    ("eval-empty-checkpoint", ["eval", "--checkpoint", "{empty.pt}"], "{empty.pt} is not a fastdense training "
                                                                      "checkpoint: the file is empty"),
    ("eval-text-file", ["eval", "--checkpoint", "{text.pt}"], "{text.pt} is not a fastdense training checkpoint: "
                                                              "torch cannot read it"),
    ("eval-list", ["eval", "--checkpoint", "{list.pt}"], "it holds a list, not a dict of states"),
    ("eval-folder", ["eval", "--checkpoint", "{folder}"], "checkpoint {folder} is a folder, not a file"),
    ("eval-weights-of-another-model", ["eval", "--checkpoint", "{weights.pt}"],
     "{weights.pt}: its weights do not fit TinyMTL: "),
    ("resume-text-file", [*TRAIN, "--run-dir", "{run}", "--resume", "{text.pt}"],
     "cannot resume from {text.pt}: torch cannot read it"),
    ("resume-pickled-object", [*TRAIN, "--run-dir", "{run}", "--resume", "{object.pt}"],
     "cannot resume from {object.pt}: torch cannot read it (refused by the weights-only unpickler"),
    ("resume-empty", [*TRAIN, "--run-dir", "{run}", "--resume", "{empty.pt}"],
     "cannot resume from {empty.pt}: the file is empty"),
    ("resume-weights-of-another-model", [*TRAIN, "--tasks", "semseg", "--run-dir", "{run}", "--resume", "{weights.pt}"],
     "cannot resume from {weights.pt}: its weights do not fit TinyMTL"),
    # config values of the wrong type or range
    ("config-lr-string", [*TRAIN, "--run-dir", "{run}", "--config", '{config:{"lr": "fast"}}'],
     "lr in config file {config} must be a finite number > 0, got 'fast'"),
    ("config-seed-string", [*TRAIN, "--run-dir", "{run}", "--config", '{config:{"seed": "x"}}'],
     "seed in config file {config} must be an integer in [0, 4294967295], got 'x'"),
    ("config-threads-string", [*TRAIN, "--run-dir", "{run}", "--config", '{config:{"threads": "many"}}'],
     "threads in config file {config} must be an integer >= 0"),
    ("config-device", [*TRAIN, "--run-dir", "{run}", "--config", '{config:{"device": "tpu"}}'],
     "device in config file {config} must be one of auto, cpu, cuda, got 'tpu'"),
    ("config-tasks-number", ["train", "--run-dir", "{run}", "--config", '{config:{"tasks": 5}}'],
     "tasks in config file {config} must be comma-separated names or a list of names, got 5"),
    ("config-tasks-numbers", ["train", "--run-dir", "{run}", "--config", '{config:{"tasks": [1, 2]}}'],
     "tasks in config file {config} must be comma-separated names or a list of names, got [1, 2]"),
    ("config-model-list", ["train", "--run-dir", "{run}", "--config", '{config:{"model": ["a"]}}'],
     "model in config file {config} must be a non-empty string, got ['a']"),
    ("config-clip-grad-string", [*TRAIN, "--run-dir", "{run}", "--config", '{config:{"clip_grad": "x"}}'],
     "clip_grad in config file {config} must be a finite number >= 0, got 'x'"),
    ("config-run-dir-number", [*TRAIN, "--config", '{config:{"run_dir": 5}}'],
     "run_dir in config file {config} must be a non-empty string, got 5"),
    ("config-steps-bool", ["train", "--run-dir", "{run}", "--config", '{config:{"steps": true}}'],
     "steps in config file {config} must be a positive integer, got True"),
    ("config-log-every-negative", [*TRAIN, "--run-dir", "{run}", "--config", '{config:{"log_every": -1}}'],
     "log_every in config file {config} must be an integer >= 0, got -1"),
    ("config-warmup-negative", [*TRAIN, "--run-dir", "{run}", "--config", '{config:{"warmup-steps": -1}}'],
     "warmup_steps in config file {config} must be an integer >= 0, got -1"),
    ("config-eval-every-negative", [*TRAIN, "--run-dir", "{run}", "--config", '{config:{"eval_every": -5}}'],
     "eval_every in config file {config} must be an integer >= 0, got -5"),
    ("config-progress-string", ["train", "--run-dir", "{run}", "--config", '{config:{"progress": "no"}}'],
     "progress in config file {config} must be true or false, got 'no'"),
    ("config-steps-float", ["train", "--run-dir", "{run}", "--config", '{config:{"steps": 2.5}}'],
     "steps in config file {config} must be a positive integer, got 2.5"),
    ("config-key-twice", [*TRAIN, "--run-dir", "{run}", "--config", "{cfg_twice.json}"],
     "{cfg_twice.json}: option 'batch_size' is given twice"),
    ("config-not-text", [*TRAIN, "--run-dir", "{run}", "--config", "{cfg_binary.json}"],
     "cannot read config file {cfg_binary.json}"),
    ("config-yaml-syntax", [*TRAIN, "--run-dir", "{run}", "--config", "{bad.yaml}"], "{bad.yaml}: invalid YAML: "),
    ("config-yaml-steps-bool", ["train", "--run-dir", "{run}", "--config", "{steps_true.yaml}"],
     "steps in config file {steps_true.yaml} must be a positive integer, got True"),
    ("config-yaml-number-key", [*TRAIN, "--run-dir", "{run}", "--config", "{keys.yaml}"],
     "{keys.yaml}: option names must be strings, got 1"),
    # flags
    ("train-threads-negative", [*TRAIN, "--run-dir", "{run}", "--threads", "-1"], "--threads must be an integer >= 0"),
    ("train-run-dir-is-a-file", [*TRAIN, "--run-dir", "{a_file}"],
     "--run-dir must be a folder, but {a_file} is a file"),
    ("train-run-dir-under-a-file", [*TRAIN, "--run-dir", "{a_file}/run"],
     "--run-dir must be a folder, but {a_file} (on the way to {a_file}/run) is a file"),
    ("train-lr-nan", [*TRAIN, "--run-dir", "{run}", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    ("train-seed-too-large", [*TRAIN, "--run-dir", "{run}", "--seed", str(2**40)], "--seed must be an integer in"),
    ("train-resume-folder", [*TRAIN, "--run-dir", "{run}", "--resume", "{folder}"],
     "checkpoint to resume {folder} is a folder, not a file"),
    ("eval-batch-size-zero", ["eval", "--checkpoint", "{weights.pt}", "--batch-size", "0"],
     "--batch-size must be a positive integer, got 0"),
    ("eval-val-samples-zero", ["eval", "--checkpoint", "{weights.pt}", "--val-samples", "0"],
     "--val-samples must be a positive integer, got 0"),
    ("eval-run-dir-is-a-file", ["eval", "--checkpoint", "{weights.pt}", "--run-dir", "{a_file}"],
     "--run-dir must be a folder, but {a_file} is a file"),
    ("adapt-threads-negative", [*ADAPT, "--threads", "-2"], "--threads must be an integer >= 0"),
    ("adapt-seed-negative", [*ADAPT, "--seed", "-1"], "--seed must be an integer in [0, 4294967295], got -1"),
    ("adapt-runs-zero", [*ADAPT, "--runs", "0"], "--runs must be an integer >= 1, got 0"),
    ("adapt-adapt-steps-negative", [*ADAPT, "--adapt-steps", "-1"], "--adapt-steps must be an integer >= 0, got -1"),
    ("adapt-json-is-a-folder", [*ADAPT, "--json", "{folder}"], "--json must be a file path, but {folder} is a folder"),
    ("adapt-json-under-a-file", [*ADAPT, "--json", "{a_file}/r.json"],
     "--json must be a file path in a folder, but {a_file} (on the way to {a_file}/r.json) is a file"),
    ("adapt-run-dir-is-a-file", [*ADAPT, "--run-dir", "{a_file}"],
     "--run-dir must be a folder, but {a_file} is a file"),
    ("adapt-empty-checkpoint", ["adapt", "--checkpoint", "{empty.pt}"],
     "{empty.pt} is not a fastdense episodic checkpoint: the file is empty"),
    ("adapt-text-checkpoint", ["adapt", "--checkpoint", "{text.pt}"],
     "{text.pt} is not a fastdense episodic checkpoint: torch cannot read it"),
    ("adapt-training-checkpoint", ["adapt", "--checkpoint", "{weights.pt}"],
     "{weights.pt} is not a fastdense episodic checkpoint: it has no run spec and sampler settings"),
    ("demo-time-budget-negative", [*DEMO, "--time-budget", "-1"], "--time-budget must be a finite number >= 0"),
    ("demo-time-budget-nan", [*DEMO, "--time-budget", "nan"], "--time-budget must be a finite number >= 0, got nan"),
    ("demo-threads-negative", [*DEMO, "--threads", "-1"], "--threads must be an integer >= 0"),
    ("demo-resolution", [*DEMO, "--resolution", "70"], "--resolution must be a multiple of 4 in [64, 448], got 70"),
    ("demo-run-dir-is-a-file", [*DEMO, "--run-dir", "{a_file}"], "--run-dir must be a folder, but {a_file} is a file"),
]


def _fill(text: str, files: dict, run: str, tmp_path) -> str:
    if text.startswith("{config:"):
        return _config(tmp_path, json.loads(text[len("{config:"):-1]))
    for name, path in {**files, "run": run, "config": str(tmp_path / "config.json")}.items():
        text = text.replace("{" + name + "}", path)
    return text


def assert_one_line_usage_error(rc, out: str, err: str, command: str, needle: str) -> None:
    assert "Traceback" not in out + err, err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and err.count("\n") == 1, err
    assert lines[0].startswith(f"fastdense {command}: error: "), lines[0]
    assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.mark.parametrize("argv, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_status_2(argv, needle, files, tmp_path, capsys):
    if "yaml" in needle:
        pytest.importorskip("yaml")
    run = str(tmp_path / "run")
    argv = [_fill(a, files, run, tmp_path) for a in argv]
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert_one_line_usage_error(rc, out, err, argv[0], _fill(needle, files, run, tmp_path))
    assert not os.path.exists(run), "the command wrote its run folder: it started working before failing"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only folders, so an unwritable --run-dir cannot be made")
def test_unwritable_run_dir(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc = cli.main([*TRAIN, "--run-dir", str(locked / "run")])
        out, err = capsys.readouterr()
    finally:
        locked.chmod(0o700)
    assert_one_line_usage_error(rc, out, err, "train", f"--run-dir must be a writable location, but {locked} is "
                                                       "not writable (Permission denied)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA device")
def test_demo_on_a_missing_cuda_device(capsys):
    rc = cli.main(["demo", "--device", "cuda", "--train-steps", "0"])
    out, err = capsys.readouterr()
    assert_one_line_usage_error(rc, out, err, "demo", "--device cuda but no CUDA device is visible")


def test_bench_output_that_is_a_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "conftest.py").write_text("")
    monkeypatch.setattr("fastdense.cli.bench._have_pytest_benchmark", lambda: True)
    rc = cli.main(["bench", "--bench-dir", str(tmp_path), "--output", str(tmp_path)])
    out, err = capsys.readouterr()
    assert_one_line_usage_error(rc, out, err, "bench", f"--output must be a file path, but {tmp_path} is a folder")


def test_a_good_config_still_trains_with_its_values(tmp_path, capsys):
    """The checks accept what they should: ints for floats, a task list, null clip_grad."""
    cfg = _config(tmp_path, {"model": "tiny_mtl_small", "tasks": ["saliency"], "steps": 1, "batch-size": 2,
                             "train_samples": 2, "val_samples": 2, "lr": 1, "clip_grad": None, "progress": False,
                             "weight_decay": 0, "log_every": 0, "run_dir": str(tmp_path / "run")})
    assert cli.main(["train", "--config", cfg]) == 0, capsys.readouterr().err
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 1 and ckpt["config"]["tasks"] == ["saliency"]
    assert ckpt["config"]["train"]["lr"] == 1.0 and ckpt["config"]["train"]["clip_grad"] is None


def test_real_entry_point_reports_one_line(files):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "fastdense", "eval", "--checkpoint", files["empty.pt"]],
                          capture_output=True, text=True, env=env, timeout=120)
    assert_one_line_usage_error(proc.returncode, proc.stdout, proc.stderr, "eval",
                                f"{files['empty.pt']} is not a fastdense training checkpoint: the file is empty")
