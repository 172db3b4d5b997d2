"""The ``fastdense`` command: info, device-name and demo, run as a user runs them."""
import dataclasses
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdense import cli
from fastdense._device import cpu_tag, gpu_tag
from fastdense._progress import ProgressBar
from fastdense.ops import _dispatch


def _user_env() -> dict:
    # tests/conftest.py sets TRITON_INTERPRET=1 for the suite; a user's shell
    # does not, and the demo must show triton as unavailable on CPU then.
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("FASTDENSE_BACKEND", None)
    return env


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastdense", *args], capture_output=True, text=True,
                          env=_user_env(), timeout=300)


@pytest.fixture(scope="module")
def info_proc() -> subprocess.CompletedProcess:
    return _run("info")


@pytest.fixture
def user_report(monkeypatch):
    """machine_report() as the subprocess (no TRITON_INTERPRET) sees it."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FASTDENSE_BACKEND", raising=False)
    return _dispatch.machine_report()


def _backend_lines(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^    (cuda|triton|cpp|torch)\s+(.+)$", text, re.M)}


def _first_available(report_op: dict, device_type: str) -> str:
    return next(name for name in _dispatch.PRIORITY[device_type] if name in report_op and not report_op[name])


def test_info_lists_every_op_and_backend_with_reasons(info_proc, user_report):
    proc = info_proc
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"^torch\s+" + re.escape(torch.__version__) + "$", out, re.M)
    assert re.search(r"^triton\s+(\d+\.\d+|not installed)", out, re.M)
    assert re.search(r"^fastdense\._C\s+(loaded \(.+\)|not loaded: .+)$", out, re.M)
    assert re.search(r"^  CUDA kernels\s+(yes|no)$", out, re.M)
    assert re.search(r"^threads\s+ATen .*intra-op \d+", out, re.M)
    for op, backends in user_report.items():
        section = out.split(f"\n  {op}\n", 1)[1]
        lines = _backend_lines(section)
        for name, reasons in backends.items():
            if reasons:
                assert lines[name] == "unavailable: " + "; ".join(reasons)
            else:
                assert lines[name] == "available"
        if torch.cuda.is_available():
            cuda_pick = _first_available(backends, "cuda")
        else:
            cuda_pick = re.escape("n/a (no CUDA device)")
        assert re.search(rf"auto\s+CPU tensors -> {_first_available(backends, 'cpu')}; "
                         rf"CUDA tensors -> {cuda_pick}", section)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_info_explains_why_gpu_backends_are_unavailable_on_cpu(info_proc):
    lines = _backend_lines(info_proc.stdout)
    assert lines["triton"].startswith("unavailable: ") and "no CUDA device" in lines["triton"]
    assert lines["cuda"].startswith("unavailable: ") and "no CUDA device" in lines["cuda"]
    assert lines["torch"] == "available"


def test_device_name_is_a_short_file_name():
    proc = _run("device-name")
    assert proc.returncode == 0, proc.stderr
    tag = proc.stdout.strip()
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", tag), tag
    assert len(tag) <= 48
    if torch.cuda.is_available():
        assert tag == gpu_tag(torch.cuda.get_device_name(0))
    else:
        assert tag.startswith("cpu-") and tag.endswith(f"-{os.cpu_count()}c")


def test_console_script_is_the_same_command():
    script = Path(sys.executable).with_name("fastdense")
    if not script.exists():
        pytest.skip(f"no console script at {script} (fastdense not pip-installed into this environment)")
    proc = subprocess.run([str(script), "device-name"], capture_output=True, text=True, env=_user_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == _run("device-name").stdout


@pytest.mark.parametrize("name, tag", [
    ("NVIDIA H100 80GB HBM3", "nvidia-h100"),
    ("NVIDIA H200", "nvidia-h200"),
    ("NVIDIA H100 PCIe", "nvidia-h100"),
    ("NVIDIA A100-SXM4-80GB", "nvidia-a100"),
    ("Tesla V100-SXM2-16GB", "nvidia-v100"),
    ("NVIDIA GeForce RTX 4090", "nvidia-rtx-4090"),
    ("AMD Instinct MI300X", "amd-mi300x"),
])
def test_gpu_tag(name, tag):
    assert gpu_tag(name) == tag


@pytest.mark.parametrize("model, tag", [
    ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "cpu-intel-xeon-platinum-8481c"),
    ("Intel(R) Xeon(R) Processor @ 2.80GHz", "cpu-intel-xeon"),
    ("AMD EPYC 7B13 64-Core Processor", "cpu-amd-epyc-7b13"),
])
def test_cpu_tag(model, tag):
    assert cpu_tag(model) == f"{tag}-{os.cpu_count() or 1}c"


def test_demo_checks_every_available_backend_and_times_them(user_report):
    proc = _run("demo")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "ops and backends" in out  # demo starts with info
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    expected_run = []
    for name, reasons in user_report["mt_lora_linear"].items():
        if reasons:
            # Unavailable on the machine: skipped with the same reasons info prints.
            assert re.search(rf"^  {name}\s+skipped: " + re.escape("; ".join(reasons)), out, re.M), name
        elif name in _dispatch.PRIORITY[device_type]:
            expected_run.append(name)
    assert expected_run, "at least the torch backend runs everywhere"
    for name in expected_run:
        m = re.search(rf"^  {name}\s+PASS\s+max abs error vs float64 reference: forward (\S+) \(tol (\S+)\)", out, re.M)
        assert m, f"no PASS line for {name}:\n{out}"
        assert float(m.group(1)) <= float(m.group(2))
        row = re.search(rf"^  fused \[{name}\]\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+([\d.]+)x$", out, re.M)
        assert row and float(row.group(1)) > 0 and float(row.group(2)) > 0, out
    assert re.search(r"^  mtlora-loop \(eager\)\s+[\d.]+\s+[\d.]+\s+1\.00x\s+1\.00x$", out, re.M)
    assert "FAIL" not in out
    for op in ("attn_mask_aggregate", "ta_lora_dtf", "skill_gated_transform", "q_sample_multi"):
        for name, reasons in user_report[op].items():
            if name in _dispatch.PRIORITY[device_type] and not reasons:
                assert re.search(rf"^    {op}\s+{name}\s+PASS  worst of forward and \d+ gradients: "
                                 rf"\S+ (\S+) \(tol (\S+)\)",
                                 out, re.M), f"no PASS line for {op} {name}:\n{out}"
    assert re.search(rf"demo: PASS \({len(expected_run)} backend\(s\) match the reference; other ops: \d+ op-backend "
                     r"pairs match\)$", out.rstrip())


def test_demo_fails_when_a_backend_is_wrong(monkeypatch):
    """The exit code is the check: a backend off by 1e-3 must turn the demo red."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FASTDENSE_BACKEND", raising=False)
    impls = _dispatch.implementations("mt_lora_linear")
    good = impls["torch"]

    def off_by_a_bit(*args):
        out, h = good.forward(*args)
        return out + 1e-3, h

    monkeypatch.setitem(impls, "torch", dataclasses.replace(good, forward=off_by_a_bit))
    text = io.StringIO()
    rc = cli.run_demo(device="cpu", time_budget=0.0, out=text)
    assert rc != 0
    assert re.search(r"^  torch\s+FAIL", text.getvalue(), re.M)
    assert "demo: FAIL" in text.getvalue()


@pytest.mark.parametrize("op", ["attn_mask_aggregate", "q_sample_multi"])
def test_demo_fails_when_another_ops_backend_is_wrong(monkeypatch, op):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTDENSE_BACKEND", "torch")
    impls = _dispatch.implementations(op)
    good = impls["torch"]

    def off_by_a_bit(*args):
        out = good.forward(*args)
        return (out[0] + 1e-3, *out[1:]) if isinstance(out, tuple) else out + 1e-3

    monkeypatch.setitem(impls, "torch", dataclasses.replace(good, forward=off_by_a_bit))
    text = io.StringIO()
    assert cli.run_demo(device="cpu", time_budget=0.0, out=text) == 1
    assert re.search(rf"^    {op}\s+torch\s+FAIL", text.getvalue(), re.M), text.getvalue()
    assert "demo: FAIL (1 backend(s) failed the check)" in text.getvalue()


def test_demo_runs_only_the_backend_forced_by_the_environment(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTDENSE_BACKEND", "torch")
    text = io.StringIO()
    assert cli.run_demo(device="cpu", time_budget=0.0, out=text) == 0
    out = text.getvalue()
    assert re.search(r"^  torch\s+PASS", out, re.M)
    assert re.search(r"^  cpp\s+skipped: not selected \(FASTDENSE_BACKEND=torch\)$", out, re.M)
    assert "fused [cpp]" not in out and "fused [torch]" in out


def test_demo_fails_when_the_forced_backend_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTDENSE_BACKEND", "cuda")
    if not _dispatch.implementations("mt_lora_linear")["cuda"].machine_reasons() and torch.cuda.is_available():
        pytest.skip("cuda can run here; this checks a machine where it cannot")
    text = io.StringIO()
    assert cli.run_demo(device="cpu", time_budget=0.0, out=text) == 1
    assert "demo: FAIL: the forced backend 'cuda' cannot run on cpu float32" in text.getvalue()


def test_no_command_prints_help_and_fails():
    proc = _run()
    assert proc.returncode == 2
    for name in ("info", "device-name", "demo"):
        assert name in proc.stdout


def test_progress_bar_writes_once_into_a_pipe():
    stream = io.StringIO()
    bar = ProgressBar(4, width=8, stream=stream)
    for _ in range(3):
        bar.step("working")
    assert stream.getvalue() == ""
    bar.step("last")
    assert stream.getvalue() == "[########] 4/4 done\n"
    assert ProgressBar(4, width=8).render() == "[........] 0/4"


class _Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_bar_into_a_pipe_writes_a_plain_line_every_interval():
    stream, clock = io.StringIO(), _Clock()
    bar = ProgressBar(10, width=10, stream=stream, interval=5.0, done_label=None, clock=clock)
    for step in range(1, 11):
        clock.now = 2.0 * step  # a step every 2 s: a line each time 5 s have passed (6, 12, 18 s), then the last
        bar.step(f"loss {step}")
    bar.close()
    assert stream.getvalue() == ("[###.......] 3/10 loss 3\n"
                                 "[######....] 6/10 loss 6\n"
                                 "[#########.] 9/10 loss 9\n"
                                 "[##########] 10/10 loss 10\n")
    assert "\r" not in stream.getvalue()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_redraws_in_place():
    stream = _Terminal()
    bar = ProgressBar(3, width=3, stream=stream)
    for label in ("a", "b", "c"):
        bar.step(label)
    assert stream.getvalue() == "\r\033[K[#..] 1/3 a\r\033[K[##.] 2/3 b\r\033[K[###] 3/3 c\n"
    bar.close()  # the line is already ended
    assert stream.getvalue().endswith("3/3 c\n")

    stopped = _Terminal()
    bar = ProgressBar(3, width=3, stream=stopped, initial=1)  # resumed at step 1, stopped before the end
    bar.step("b")
    bar.close()
    assert stopped.getvalue() == "\r\033[K[##.] 2/3 b\n"


def test_disabled_progress_bar_writes_nothing():
    stream = _Terminal()
    bar = ProgressBar(2, stream=stream, enabled=False)
    bar.step()
    bar.step()
    bar.close()
    assert stream.getvalue() == "" and bar.done == 2
