"""tools/gpu_check.py (``make gpu-check``) and tools/gpu_sanitize.py, without a GPU.

The campaign runs on a lent GPU machine for minutes at a time, where nothing
can be fixed between steps: what can go wrong without a GPU is tested here --
the dry run (its CPU-side steps, the GPU steps skipped with reasons, the files
the device tool brings back), the exit status, the time budget, stopping a
command, and the readers of what the GPU steps write (JUnit XML,
compute-sanitizer reports, pytest-benchmark JSON, ``fastdense info``).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))

from _gpu_check import results, steps  # noqa: E402
from _gpu_check.runner import Processes  # noqa: E402

GPU_STEPS = ("build", "install", "tests-gpu", "tests-ops", "tests-kernels", "sanitize-check", "memcheck", "racecheck",
             "initcheck", "bench")


def run_campaign(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, Path, dict]:
    out = tmp_path / "out"
    no_wheels = tmp_path / "no-wheels"  # the checkout's own .whl (if any) is for the GPU machine
    no_wheels.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, str(TOOLS / "gpu_check.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "GPU_CHECK_OUT": str(out), "GPU_CHECK_WHEELS": str(no_wheels), **env})
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return proc, out, summary


@pytest.mark.slow
def test_dry_run_writes_the_summary_skips_gpu_steps_and_fails_on_a_failing_step(tmp_path):
    proc, out, summary = run_campaign(tmp_path, "--dry-run", "--inject-failure")
    items = {i["name"]: i for i in summary["items"]}

    assert proc.returncode == 1, proc.stdout + proc.stderr  # the injected step, and only it, failed
    assert [n for n, i in items.items() if i["status"] == "fail"] == ["injected-failure"]
    assert summary["result"] == "FAIL" and summary["final"] is True
    assert items["environment"]["status"] == "pass" and items["info"]["status"] == "pass"
    assert summary["probe"]["torch"] == torch.__version__
    for name in GPU_STEPS:
        assert items[name]["status"] == "skip" and "dry run" in items[name]["reason"], items[name]
    # What the device tool brings back: at most 8 plain files, no folders.
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files) and len(files) <= 8
    assert {"SUMMARY.md", "summary.json", "logs.txt", "logs.tar.gz"} <= set(files)
    page = (out / "SUMMARY.md").read_text()
    assert page.startswith("# fastdense GPU check: FAIL")
    assert "| memcheck | skip |" in page and "| injected-failure | fail |" in page
    assert "CUDA kernels" in (out / "logs.txt").read_text()  # fastdense info's output


def test_out_of_budget_skips_every_step_and_still_writes_the_summary(tmp_path):
    t0 = time.monotonic()
    proc, out, summary = run_campaign(tmp_path, GPU_CHECK_BUDGET_S="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # skips are not failures
    assert time.monotonic() - t0 < 60
    assert summary["result"] == "PASS"
    assert all(i["status"] == "skip" for i in summary["items"])
    assert "out of time" in summary["items"][0]["reason"]
    assert (out / "SUMMARY.md").exists()


@pytest.mark.slow
def test_bench_selection_matches_what_a_gpu_machine_would_run():
    # The suites' case ids get renamed; the selection in tools/gpu_check.py must follow them.
    proc = subprocess.run([sys.executable, str(TOOLS / "gpu_check.py"), "--check-bench"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "NOTHING" not in proc.stdout and "s1-112x112-C96-fc1-fused-fwd" in proc.stdout


def test_unknown_step_names_are_refused(tmp_path):
    proc, _, _ = run_campaign(tmp_path, "--steps", "memcheck,nonsense")
    assert proc.returncode == 2 and "nonsense" in proc.stderr


def test_a_command_over_its_time_is_stopped_with_its_process_group(tmp_path):
    # The child starts a grandchild in its group; both must be gone when run() returns.
    script = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
              "time.sleep(60)']); print(p.pid, flush=True); time.sleep(60)")
    t0 = time.monotonic()
    outcome = Processes().run([sys.executable, "-c", script], log=tmp_path / "log", timeout=2, env=dict(os.environ),
                              cwd=tmp_path)
    assert outcome.timed_out and time.monotonic() - t0 < 15
    grandchild = int((tmp_path / "log").read_text().splitlines()[1])
    time.sleep(0.2)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    """Running, not a zombie (a container's init may never reap the orphan)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------- readers
JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.ops.test_lora" name="test_a[cuda]" time="0.1"/>
<testcase classname="tests.ops.test_lora" name="test_b[triton]" time="0.1">
  <failure message="AssertionError: forward: 3.0 > 1e-3">trace</failure></testcase>
<testcase classname="tests.ops.test_dtf.TestX" name="test_c" time="0.1"><error message="RuntimeError: boom"/></testcase>
<testcase classname="tests.test_metrics" name="test_d" time="0.0">
  <skipped type="pytest.skip" message="needs timm">skip</skipped></testcase>
</testsuite></testsuites>"""


def test_junit_counts_failing_tests_and_skip_reasons(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(JUNIT)
    counts = results.read_junit(path)
    assert (counts.passed, counts.failed, counts.skipped) == (1, 2, 1)
    assert counts.failures == [("tests/ops/test_lora.py::test_b[triton]", "AssertionError: forward: 3.0 > 1e-3"),
                               ("tests/ops/test_dtf.py::TestX::test_c", "RuntimeError: boom")]
    assert counts.skip_reasons == {"needs timm": 1}
    assert results.read_junit(tmp_path / "missing.xml") is None

    results.merge_junit({"tests-gpu": path, "tests-ops": path, "gone": tmp_path / "gone.xml"}, tmp_path / "m.xml")
    merged = results.read_junit(tmp_path / "m.xml")
    assert merged.failed == 4 and "tests-ops" in (tmp_path / "m.xml").read_text()


MEMCHECK = """========= COMPUTE-SANITIZER
gpu_sanitize: 66 checks on NVIDIA H200
========= Invalid __global__ read of size 4 bytes
=========     at fastdense::cuda::dtheta_kernel<float, 3>(const float *)+0x2a0 in /repo/csrc/cuda/dtf.cu:131
=========     by thread (3,0,0) in block (0,0,0)
=========     Address 0x7f00 is out of bounds
=========
========= Invalid __global__ write of size 2 bytes
=========     at void at::native::vectorized_elementwise_kernel<4>(int)+0x90
=========     by thread (0,0,0) in block (0,0,0)
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame: fastdense::cuda::lora_backward(at::Tensor) in /repo/fastdense/_C.so
=========
gpu_sanitize: 65 passed, 1 failed, 0 refused of 66 checks in 80.0 s
========= ERROR SUMMARY: 2 errors
"""


def test_sanitizer_reports_are_counted_and_attributed():
    rep = results.read_sanitizer(MEMCHECK)
    assert rep.refused is None and rep.errors == 2 and (rep.ours, rep.others) == (1, 1)
    assert rep.messages[0].startswith("Invalid __global__ read of size 4 bytes at fastdense::cuda::dtheta_kernel")
    assert results.read_sanitize_script(MEMCHECK)["failed"] == 1

    race = ("========= Error: Race reported between Write access at _bwd_kernel+0x10 in /r/kernels/lora.py:200\n"
            "=========     and Read access at _bwd_kernel+0x40 in /r/kernels/lora.py:210 [4 hazards]\n"
            "========= Warning: Race reported between Write access at conv_kernel in /r/csrc/cuda/dtf.cu:90\n"
            "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n========= ERROR SUMMARY: 1 error\n")
    rep = results.read_sanitizer(race)
    assert rep.hazards == (1, 1) and (rep.ours, rep.warnings) == (1, 1) and rep.errors == 1

    # Stopped halfway: the checks so far still count, and a wrong one still fails.
    partial = "PASS    [1/66] mt_lora_linear cuda fp32 a: ok\nFAIL    [2/66] mt_lora_linear cuda bf16 b: forward ...\n"
    assert results.read_sanitize_script(partial) == {"passed": 1, "failed": 1, "refused": 0, "checks": 66,
                                                     "failing": ["mt_lora_linear cuda bf16 b: forward ..."],
                                                     "finished": False}
    assert results.read_sanitize_script("gpu_sanitize: no CUDA device; nothing checked") is None

    refused = "========= Error: Device not supported\n========= Error: Target application returned an error\n"
    assert "Device not supported" in results.read_sanitizer(refused).refused
    assert results.read_sanitizer("killed before the summary").errors is None


def _bench_row(suite, impl, mode, ms, **info):
    return {"name": f"test[{impl}-{mode}]", "fullname": f"bench/test_bench_{suite}.py::test[{impl}-{mode}]",
            "extra_info": {"suite": suite, "impl": impl, "mode": mode, "median_ms": ms, **info}}


def test_bench_ratios_use_bench_report_baselines(tmp_path):
    swin = {"stage": 1, "layer": "fc1", "in_features": 96, "out_features": 384, "batch": 8, "tokens": 112 * 112}
    doc = {"benchmarks": [_bench_row("lora", "mtlora-loop", "fwd", 3.0, **swin),
                          _bench_row("lora", "fused", "fwd", 1.0, backend="cuda", **swin),
                          _bench_row("lora", "fused-torch", "fwd", 6.0, backend="torch", **swin),
                          _bench_row("q_sample_multi", "fused", "fwd", 0.5, batch=8, latent=[4, 64, 64], k=4,
                                     noise="per-step")]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    ratios, error = results.bench_ratios(path)
    assert error is None
    got = {(r.suite, r.impl): r.speedup for r in ratios}
    assert got[("lora", "fused")] == pytest.approx(3.0) and got[("lora", "fused-torch")] == pytest.approx(0.5)
    assert ("lora", "mtlora-loop") not in got  # the baseline itself
    assert got[("q_sample_multi", "fused")] is None  # its baseline was not run
    assert results.bench_ratios(tmp_path / "none.json")[1].startswith("no benchmark JSON")


def test_info_reader_reads_fastdense_info_as_printed_here():
    from fastdense.cli.info import print_info

    buf = io.StringIO()
    print_info(buf)
    kernels, ops = steps.read_info(buf.getvalue())
    assert kernels is False  # the CPU build
    assert {"mt_lora_linear", "ta_lora_dtf", "attn_mask_aggregate", "q_sample_multi"} <= set(ops)
    assert set(ops["mt_lora_linear"]) >= {"cuda", "triton", "torch"}
    assert ops["mt_lora_linear"]["torch"] == "available"


# ----------------------------------------------------------------------------- tools/gpu_sanitize.py
def test_sanitize_checks_catch_a_wrong_result_and_pass_a_right_one():
    import gpu_sanitize

    case = next(c for c in gpu_sanitize.CASES if c.op == "q_sample_multi")
    assert gpu_sanitize.check(case, "torch", torch.float32, device="cpu")[0] == "pass"
    off = type(case)(case.family, case.op, "off by a little", case.make, case.grads,
                     lambda **kw: case.fused(**kw) * 1.001, case.reference)
    status, text = gpu_sanitize.check(off, "torch", torch.float32, device="cpu")
    assert status == "fail" and "forward" in text
    refused = gpu_sanitize.check(case, "cuda", torch.float32, device="cpu")
    assert refused[0] == "refused"


def test_sanitize_plan_covers_every_gpu_backend_of_every_op():
    import gpu_sanitize

    from fastdense.ops import _dispatch

    class Args:
        ops, backends, dtypes = "", "cuda,triton", "fp32,bf16,fp16"

    plan = {(case.op, backend) for case, backend, _ in gpu_sanitize.selected(Args)}
    for op in _dispatch.machine_report():
        for backend in ("cuda", "triton"):
            if backend in _dispatch.implementations(op):
                assert (op, backend) in plan, (op, backend)
