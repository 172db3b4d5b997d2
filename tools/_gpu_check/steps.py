"""What each step of the GPU campaign does; tools/gpu_check.py puts them in order with their limits.

Each action takes ``(ctx, item, timeout_s)``, runs its commands through
``ctx.processes`` with the log at ``item.log``, and sets the item's status:
pass, fail (something is wrong with fastdense or the machine), or skip (with
the reason: nothing to run it on, an optional tool or package missing, out of
time).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from _gpu_check import results
from _gpu_check.runner import Item, Outcome, Processes

# Packages whose versions the environment step records.
PACKAGES = ("torch", "triton", "numpy", "pytest", "pytest-xdist", "pytest-timeout", "pytest-benchmark", "hypothesis",
            "diffusers", "transformers", "huggingface-hub", "timm", "peft", "safetensors", "setuptools", "pip",
            "ninja", "pybind11")

PYTEST_EXIT = {2: "interrupted", 3: "internal error", 4: "usage error", 5: "no tests collected"}


@dataclasses.dataclass
class Context:
    repo: Path
    out: Path
    work: Path
    python: str
    env: dict
    processes: Processes
    dry_run: bool = False
    wheels: Path | None = None
    probe: dict = dataclasses.field(default_factory=dict)
    gpu: bool = False
    carried: list[str] = dataclasses.field(default_factory=list)   # "name version" of the wheels installed
    site: Path | None = None    # where they were installed
    sanitizer: str | None = None
    sanitizer_refused: str | None = None
    workers: int = 0            # pytest-xdist workers (0: none)
    has_timeout: bool = False   # pytest-timeout is installed
    junit: dict = dataclasses.field(default_factory=dict)           # step name -> its JUnit file
    failing: dict = dataclasses.field(default_factory=dict)         # step name -> [(test id, message)]

    def log(self, item: Item) -> Path:
        item.log = self.work / f"{item.name}.log"
        return item.log

    def run(self, item: Item, cmd, timeout: float, env: dict | None = None, cwd: Path | None = None) -> Outcome:
        return self.processes.run(cmd, log=self.log(item), timeout=timeout, env=env or self.env, cwd=cwd or self.repo)

    @property
    def cores(self) -> int:
        return int(self.probe.get("cores") or os.cpu_count() or 1)


def _log_text(item: Item) -> str:
    try:
        return item.log.read_text(errors="replace") if item.log else ""
    except OSError:
        return ""


def _last_line(text: str, pattern: str = r"\S") -> str:
    lines = [ln.strip() for ln in text.splitlines() if re.search(pattern, ln) and not ln.startswith("[exit ")]
    return lines[-1][:240] if lines else ""


def _stopped(item: Item, seconds: float, cap: float, partial: str) -> None:
    """A step stopped at its time limit with no failure found by then: incomplete, not failed
    (a slow machine or sanitizer is no fault of fastdense's; a hung test fails by its own timeout)."""
    where = "the budget's end" if item.data.get("cut_by_budget") else f"its {cap:.0f} s limit"
    item.set("skip", f"incomplete: stopped at {where} after {seconds:.0f} s{partial}")


# ----------------------------------------------------------------------------- environment
PROBE = r"""
import importlib.metadata as md, json, os, platform, sys, sysconfig
info = {"python": platform.python_version(), "executable": sys.executable, "cores": os.cpu_count(),
        "pytag": "cp%d%d" % sys.version_info[:2], "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX")}
packages = {}
for name in sys.argv[1:]:
    try:
        packages[name] = md.version(name)
    except Exception:
        packages[name] = None
info["packages"] = packages
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(device_name=p.name, capability=list(torch.cuda.get_device_capability(0)),
                    sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    device_count=torch.cuda.device_count())
except Exception as exc:
    info.update(torch_error=f"{type(exc).__name__}: {exc}", cuda_available=False)
try:
    import triton
    info["triton"] = triton.__version__
except Exception as exc:
    info["triton_error"] = f"{type(exc).__name__}: {exc}"
try:
    from fastdense._device import device_tag
    info["device_tag"] = device_tag()
except Exception as exc:
    info["device_tag_error"] = f"{type(exc).__name__}: {exc}"
print("GPU_CHECK_PROBE " + json.dumps(info))
"""


def find_sanitizer(env: dict) -> str | None:
    candidates = [shutil.which("compute-sanitizer", path=env.get("PATH"))]
    for home in (env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "compute-sanitizer"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def environment(ctx: Context, item: Item, timeout: float) -> None:
    """Versions, the device, nvidia-smi; the carried wheels installed into a temporary site folder."""
    problems = []
    wheels = sorted(ctx.wheels.glob("*.whl")) if ctx.wheels and ctx.wheels.is_dir() else []
    if wheels:
        site = ctx.site = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
        out = ctx.run(item, [ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                             "--no-cache-dir", "--upgrade", "--target", site, *wheels], min(timeout / 2, 120))
        if out.rc == 0:
            ctx.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), ctx.env.get("PYTHONPATH")) if p)
            ctx.carried = [" ".join(w.name.split("-")[:2]) for w in wheels]
        else:
            problems.append(f"installing the carried wheels failed (exit {out.rc}): {_last_line(out.output_tail)}")
    probe_env = {**ctx.env, "FASTDENSE_NO_EXT": "1"}  # the extension is not in place yet
    out = ctx.run(item, [ctx.python, "-c", PROBE, *PACKAGES], min(timeout / 2, 90), env=probe_env)
    found = re.findall(r"^GPU_CHECK_PROBE (.*)$", _log_text(item), flags=re.M)
    if out.rc != 0 or not found:
        problems.append(f"could not read python/torch (exit {out.rc}): {_last_line(out.output_tail)}")
    else:
        ctx.probe = json.loads(found[-1])
    ctx.gpu = bool(ctx.probe.get("cuda_available")) and not ctx.dry_run
    smi = shutil.which("nvidia-smi", path=ctx.env.get("PATH"))
    if smi:
        ctx.run(item, [smi], 20)
        ctx.run(item, [smi, "--query-gpu=name,driver_version,memory.total,pstate,clocks.sm,clocks.max.sm,"
                            "temperature.gpu,power.draw,power.limit", "--format=csv"], 20)
        drivers = re.findall(r"Driver Version: (\S+)", _log_text(item))
        if drivers:
            ctx.probe["driver"] = drivers[-1]
    ctx.sanitizer = find_sanitizer(ctx.env)
    if ctx.sanitizer:
        ctx.run(item, [ctx.sanitizer, "--version"], 20)
        versions = re.findall(r"Version (\S+)", _log_text(item))
        ctx.probe["compute_sanitizer"] = versions[-1] if versions else "found"
    packages = ctx.probe.get("packages", {})
    ctx.has_timeout = bool(packages.get("pytest-timeout"))
    # GPU correctness tests in parallel processes share the one GPU safely (each has its own
    # context and memory); half the cores leaves room for Triton's and ptxas's compiles.
    ctx.workers = min(8, ctx.cores // 2) if packages.get("pytest-xdist") and ctx.cores >= 4 else 0
    p = ctx.probe
    device = (f"{p['device_name']} (sm_{''.join(map(str, p['capability']))}, {p['sm_count']} SMs, "
              f"{p['memory_gib']} GiB)" if p.get("device_name") else "no CUDA device")
    item.details = [
        f"Python {p.get('python', '?')}, torch {p.get('torch', p.get('torch_error', '?'))} "
        f"(CUDA {p.get('torch_cuda')}), triton {p.get('triton', p.get('triton_error', '?'))}, {ctx.cores} cores",
        f"device: {device}, {'driver ' + p['driver'] if p.get('driver') else 'no nvidia-smi'}, "
        f"tag {p.get('device_tag', '?')}",
        "packages: " + ", ".join(f"{k} {v}" for k, v in packages.items() if v)
        + ("; missing: " + ", ".join(k for k, v in packages.items() if not v) if any(not v for v in packages.values())
           else ""),
        f"carried wheels: {', '.join(ctx.carried) if ctx.carried else 'none'}; compute-sanitizer: "
        f"{p.get('compute_sanitizer', 'not found')}",
    ]
    item.data["probe"] = ctx.probe
    if problems:
        item.set("fail", "; ".join(problems))
    else:
        item.set("pass", f"{device}; torch {p.get('torch')}, triton {p.get('triton', 'missing')}")


# ----------------------------------------------------------------------------- build and install
CHECK_EXT = r"""
import json, sys
import torch
from fastdense import _ext
print("GPU_CHECK_EXT " + json.dumps({"loaded": _ext.available(), "error": _ext.load_error,
                                     "cuda_kernels": _ext.has_cuda_kernels()}))
sys.exit(0 if _ext.has_cuda_kernels() else 1)
"""


def prebuilt(ctx: Context) -> Path | None:
    """build/cuda-cp3XX/fastdense/_C<EXT_SUFFIX> for the Python that runs the campaign (``make cuda-build``)."""
    tag, suffix = ctx.probe.get("pytag"), ctx.probe.get("ext_suffix")
    if not tag or not suffix:
        return None
    path = ctx.repo / "build" / f"cuda-{tag}" / "fastdense" / f"_C{suffix}"
    return path if path.is_file() else None


def build_plan(ctx: Context) -> str:
    """What the build step does (or would do) here, in words."""
    found = prebuilt(ctx)
    if found:
        return f"copy the prebuilt {found.relative_to(ctx.repo)}"
    cap = ctx.probe.get("capability")
    arch = f"{cap[0]}.{cap[1]}" if cap else "<the GPU's>"
    others = sorted(str(p.relative_to(ctx.repo)) for p in ctx.repo.glob("build/cuda-cp*/fastdense/_C*.so"))
    return (f"compile with FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST={arch} MAX_JOBS={ctx.cores} (no prebuilt .so for "
            f"{ctx.probe.get('pytag', 'this Python')}; under build/: {', '.join(others) or 'none'})")


def _check_ext(ctx: Context, item: Item, timeout: float) -> tuple[bool, str]:
    out = ctx.run(item, [ctx.python, "-c", CHECK_EXT], timeout)
    found = re.findall(r"^GPU_CHECK_EXT (.*)$", _log_text(item), flags=re.M)
    if not found:
        return False, f"checking it failed (exit {out.rc}): {_last_line(out.output_tail)}"
    info = json.loads(found[-1])
    if info["cuda_kernels"]:
        return True, "loads, CUDA kernels yes"
    return False, f"loaded {info['loaded']}, CUDA kernels no ({info['error'] or 'built without CUDA'})"


def build(ctx: Context, item: Item, timeout: float) -> None:
    """The prebuilt fastdense._C when it matches this Python and loads; else compiled here for this GPU."""
    suffix = ctx.probe["ext_suffix"]
    target = ctx.repo / "fastdense" / f"_C{suffix}"
    found = prebuilt(ctx)
    note = ""
    if found:
        shutil.copy2(found, target)
        ok, text = _check_ext(ctx, item, min(timeout, 60))
        if ok:
            item.set("pass", f"copied the prebuilt {found.relative_to(ctx.repo)}: {text}")
            return
        note = f"the prebuilt {found.relative_to(ctx.repo)} did not work ({text}); "
        target.unlink(missing_ok=True)
    nvcc = shutil.which("nvcc", path=ctx.env.get("PATH"))
    cuda_home = ctx.env.get("CUDA_HOME") or (str(Path(nvcc).resolve().parents[1]) if nvcc else None)
    if not nvcc and not (cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists()):
        item.set("fail", note + "no prebuilt .so and no nvcc to compile one")
        return
    cap = ctx.probe["capability"]
    env = {**ctx.env, "FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": f"{cap[0]}.{cap[1]}", "MAX_JOBS": str(ctx.cores)}
    if cuda_home:
        env["CUDA_HOME"] = cuda_home
    left = timeout - 30
    out = ctx.run(item, [ctx.python, "setup.py", "build_ext", "--inplace"], left, env=env)
    if out.timed_out or out.rc != 0:
        item.set("fail", note + (f"compiling stopped at its {left:.0f} s limit" if out.timed_out else
                                 f"compiling failed (exit {out.rc}): {_last_line(out.output_tail, 'rror')}"))
        return
    ok, text = _check_ext(ctx, item, 30)
    item.set("pass" if ok else "fail",
             note + f"compiled for sm_{cap[0]}{cap[1]} with {ctx.cores} jobs in {out.seconds:.0f} s: {text}")


CHECK_INSTALL = r"""
import fastdense, fastdense.kernels, fastdense._ext as e
print("GPU_CHECK_INSTALL", fastdense.__file__, fastdense.kernels.__file__, e.available())
"""


def install(ctx: Context, item: Item, timeout: float) -> None:
    """fastdense importable from anywhere without recompiling: pip's editable install, else PYTHONPATH."""
    env = {**ctx.env, "FASTDENSE_NO_EXT": "1"}  # keeps setup.py from compiling; not set when running
    out = ctx.run(item, [ctx.python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                         "-e", "."], min(timeout - 20, 120), env=env)
    how = "pip editable install (FASTDENSE_NO_EXT=1)"
    if out.rc != 0:
        # No pip or setuptools: the source tree, with fastdense.kernels (the kernels/ folder) linked in.
        link = ctx.repo / "fastdense" / "kernels"
        if not link.exists():
            link.symlink_to(Path("..") / "kernels")
        ctx.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ctx.repo), ctx.env.get("PYTHONPATH")) if p)
        how = f"PYTHONPATH and a fastdense/kernels link (pip failed, exit {out.rc})"
    check = ctx.run(item, [ctx.python, "-c", CHECK_INSTALL], 30, cwd=Path(tempfile.gettempdir()))
    found = re.findall(r"^GPU_CHECK_INSTALL (\S+) (\S+) (\S+)$", _log_text(item), flags=re.M)
    if check.rc != 0 or not found:
        item.set("fail", f"{how}, but fastdense does not import from outside the checkout: "
                         f"{_last_line(check.output_tail)}")
    elif not found[-1][0].startswith(str(ctx.repo)):
        item.set("fail", f"{how}, but another fastdense is imported: {found[-1][0]}")
    else:
        item.set("pass", how)


# ----------------------------------------------------------------------------- fastdense info
def read_info(text: str) -> tuple[bool | None, dict[str, dict[str, str]]]:
    """(CUDA kernels yes/no, {op: {backend: "available" or the reasons}}) from ``fastdense info``'s output."""
    m = re.search(r"^\s*CUDA kernels\s+(yes|no)\s*$", text, flags=re.M)
    kernels = None if m is None else m.group(1) == "yes"
    ops: dict[str, dict[str, str]] = {}
    op = None
    for line in text.splitlines():
        head = re.match(r"^  (\w+)$", line)
        if head:
            op = head.group(1)
            ops[op] = {}
            continue
        row = re.match(r"^    (cuda|triton|cpp|torch)\s+(available|unavailable: .*)$", line)
        if row and op:
            ops[op][row.group(1)] = row.group(2)
    return kernels, ops


def info(ctx: Context, item: Item, timeout: float) -> None:
    """``python -m fastdense info``: on a GPU it must list CUDA kernels and every cuda/triton backend available."""
    out = ctx.run(item, [ctx.python, "-m", "fastdense", "info"], timeout)
    if out.rc != 0:
        item.set("fail", f"exit {out.rc}: {_last_line(out.output_tail)}")
        return
    kernels, ops = read_info(_log_text(item))
    if kernels is None or not ops:
        item.set("fail", "could not read the 'CUDA kernels' line and the backends from its output")
        return
    gpu_backends = {op: {b: s for b, s in rows.items() if b in ("cuda", "triton")} for op, rows in ops.items()}
    item.data["backends"] = gpu_backends
    missing = [f"{op} {b}: {s}" for op, rows in gpu_backends.items() for b, s in rows.items() if s != "available"]
    counts = {b: sum(1 for rows in gpu_backends.values() if rows.get(b) == "available") for b in ("cuda", "triton")}
    summary = (f"CUDA kernels {'yes' if kernels else 'no'}; cuda backend available for {counts['cuda']} ops, "
               f"triton for {counts['triton']} of {len(ops)}")
    if not ctx.gpu:
        item.set("pass", summary + " (no GPU here: not required)")
    elif not kernels or missing:
        item.details = missing[:12]
        item.set("fail", summary + ("" if kernels else "; fastdense._C has no CUDA kernels")
                 + (f"; {len(missing)} GPU backends unavailable" if missing else ""))
    else:
        item.set("pass", summary)


# ----------------------------------------------------------------------------- pytest
def pytest_cmd(ctx: Context, item: Item, args: list, *, parallel: bool, per_test_s: int) -> list:
    junit = ctx.work / f"junit-{item.name}.xml"
    ctx.junit[item.name] = junit
    cmd = [ctx.python, "-m", "pytest", *args, "-p", "no:cacheprovider", "-q", "--tb=short", "-rfE",
           f"--junitxml={junit}", "-o", f"junit_suite_name={item.name}"]
    if parallel and ctx.workers > 1:
        cmd += ["-n", str(ctx.workers), "--dist", "load"]
    if ctx.has_timeout:
        # With workers, a test stuck in a kernel takes its worker down and xdist carries on
        # with a fresh one ("thread"); alone, "signal" interrupts the test and keeps the run.
        method = "thread" if parallel and ctx.workers > 1 else "signal"
        cmd += [f"--timeout={per_test_s}", f"--timeout-method={method}"]
    return cmd


def pytest_env(ctx: Context, parallel: bool) -> dict:
    env = {k: v for k, v in ctx.env.items() if k != "TRITON_INTERPRET"}  # a GPU runs the real kernels
    if parallel and ctx.workers > 1:
        env.setdefault("OMP_NUM_THREADS", "2")  # the CPU references of many workers on 16 cores
    return env


def finish_pytest(ctx: Context, item: Item, out: Outcome, cap: float) -> results.TestCounts | None:
    counts = results.read_junit(ctx.junit[item.name])
    if counts is not None:
        item.data["tests"] = {"passed": counts.passed, "failed": counts.failed, "skipped": counts.skipped}
        item.data["skip_reasons"] = counts.skip_reasons.most_common(8)
        ctx.failing[item.name] = counts.failures
    line = counts.line() if counts else "no JUnit XML written"
    if out.timed_out:
        if counts and counts.failed:
            item.set("fail", f"{counts.failed} failed; stopped at its time limit ({line} by then)")
        else:
            _stopped(item, out.seconds, cap, f" ({line} by then)")
    elif out.rc == 0:
        item.set("pass", line)
    elif out.rc == 1 and counts is not None:
        item.set("fail", line)
    else:
        meaning = PYTEST_EXIT.get(out.rc, "crashed" if out.rc is None or out.rc < 0 else "error")
        item.set("fail", f"pytest exit {out.rc} ({meaning}): {line}; {_last_line(out.output_tail)}")
    return counts


def pytest_step(args: list, *, parallel: bool, per_test_s: int = 300):
    def action(ctx: Context, item: Item, timeout: float) -> None:
        paths = [a for a in args if a.startswith("tests")]
        if paths and not any((ctx.repo / a).exists() for a in paths):
            item.set("skip", f"{', '.join(paths)} not in this checkout")
            return
        cmd = pytest_cmd(ctx, item, args, parallel=parallel, per_test_s=per_test_s)
        finish_pytest(ctx, item, ctx.run(item, cmd, timeout, env=pytest_env(ctx, parallel)), timeout)
        if ctx.workers > 1 and parallel:
            item.details.append(f"pytest-xdist, {ctx.workers} workers")
    return action


# ----------------------------------------------------------------------------- sanitizer
def _script_result(item: Item, text: str) -> dict | None:
    script = results.read_sanitize_script(text)
    item.data["checks"] = script
    if script is not None:
        item.details += [f"wrong result: {line}" for line in script["failing"][:8]]
    return script


def _checks_line(script: dict | None) -> str:
    if script is None:
        return "no check ran"
    done = script["passed"] + script["failed"] + script["refused"]
    return (f"{script['passed']} of {script['checks']} checks right, {script['failed']} wrong, "
            f"{script['refused']} refused" + ("" if script["finished"] else f" ({done} done)"))


def sanitize_check(ctx: Context, item: Item, timeout: float) -> None:
    """tools/gpu_sanitize.py without a sanitizer: every op's results, and Triton's cache warmed for the runs after."""
    # Autotuning results go to Triton's cache, for the sanitizer runs that read them (see gpu_check.SANITIZER).
    env = {**pytest_env(ctx, False), "TRITON_CACHE_AUTOTUNING": "1"}
    out = ctx.run(item, [ctx.python, "tools/gpu_sanitize.py"], timeout, env=env)
    script = _script_result(item, _log_text(item))
    line = _checks_line(script)
    if script is not None and script["failed"]:
        item.set("fail", line)
    elif out.timed_out:
        _stopped(item, out.seconds, timeout, f" ({line})")
    elif script is None or not script["finished"]:
        item.set("fail", f"the script stopped (exit {out.rc}) with {line}: {_last_line(out.output_tail)}")
    elif out.rc == 0:
        item.set("pass", line)
    else:
        item.set("fail", f"{line} (exit {out.rc}{': no check could run' if out.rc == 4 else ''})")


SANITIZER_EXIT = 86  # compute-sanitizer's exit status when it found errors (--error-exitcode)


def sanitizer_step(tool: str, script_args: list, extra_env: dict):
    def action(ctx: Context, item: Item, timeout: float) -> None:
        if ctx.sanitizer is None:
            item.set("skip", "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
            return
        if ctx.sanitizer_refused:
            item.set("skip", f"compute-sanitizer refused this machine in an earlier run: {ctx.sanitizer_refused}")
            return
        # API calls that return an error are torch's business (it probes, retries, raises); a kernel
        # launch of ours that fails raises in the script and fails its check.
        cmd = [ctx.sanitizer, "--tool", tool, "--error-exitcode", str(SANITIZER_EXIT), "--print-limit", "100",
               "--report-api-errors", "no", ctx.python, "tools/gpu_sanitize.py", *script_args]
        out = ctx.run(item, cmd, timeout, env={**pytest_env(ctx, False), **extra_env})
        text = _log_text(item)
        rep = results.read_sanitizer(text)
        if rep.refused:
            ctx.sanitizer_refused = rep.refused
            item.set("skip", f"compute-sanitizer refused the device (a gVisor machine?): {rep.refused}")
            return
        item.data["sanitizer"] = dataclasses.asdict(rep)
        item.details += [f"report: {m}" for m in rep.messages[:6]]
        script = _script_result(item, text)
        found = (f"{rep.errors if rep.errors is not None else 'no'} errors reported ({rep.ours} in fastdense "
                 f"kernels, {rep.others} elsewhere)")
        if rep.hazards:
            found += f", racecheck hazards: {rep.hazards[0]} errors, {rep.hazards[1]} warnings"
        bad = []
        if script is not None and script["failed"]:
            bad.append(f"{script['failed']} checks computed wrong results")
        if tool == "memcheck" and (rep.errors or rep.ours or rep.others):
            bad.append("memory errors")
        if tool == "racecheck" and ((rep.hazards and rep.hazards[0]) or (rep.hazards is None and rep.ours)):
            bad.append("shared-memory races")
        if tool == "initcheck" and rep.ours:
            bad.append("uninitialized reads in fastdense kernels")
        if not out.timed_out:
            if script is None or not script["finished"]:
                bad.append(f"the script stopped (exit {out.rc}): {_last_line(out.output_tail)}")
            elif rep.errors is None and out.rc not in (0, SANITIZER_EXIT):
                bad.append(f"no ERROR SUMMARY (exit {out.rc})")
        text = f"{found}; {_checks_line(script)}"
        if bad:
            item.set("fail", f"{text} -- {'; '.join(bad)}")
        elif out.timed_out:
            _stopped(item, out.seconds, timeout, f" ({text} by then)")
        else:
            item.set("pass", text)
    return action


# ----------------------------------------------------------------------------- benchmarks
def bench_step(selection: list[tuple[str, str, str]], per_test_s: int = 240):
    def action(ctx: Context, item: Item, timeout: float) -> None:
        if not ctx.probe.get("packages", {}).get("pytest-benchmark"):
            item.set("skip", "pytest-benchmark is not installed")
            return
        chosen = [(label, f, expr) for label, f, expr in selection if (ctx.repo / f).is_file()]
        gone = [f for _, f, _ in selection if not (ctx.repo / f).is_file()]
        if gone:
            item.details.append(f"bench files not found (renamed? update BENCH in tools/gpu_check.py): {gone}")
        if not chosen:
            item.set("skip", "none of the selected bench files exists")
            return
        files = list(dict.fromkeys(f for _, f, _ in chosen))
        expr = " or ".join(f"({e})" for _, _, e in chosen)
        bench_json = ctx.out / "bench.json"
        bench_json.unlink(missing_ok=True)
        cmd = pytest_cmd(ctx, item, [*files, "-k", expr, f"--benchmark-json={bench_json}"], parallel=False,
                         per_test_s=per_test_s)
        out = ctx.run(item, cmd, timeout, env=pytest_env(ctx, False))
        counts = finish_pytest(ctx, item, out, timeout)
        ratios, error = results.bench_ratios(bench_json)
        item.data["ratios"] = [{**dataclasses.asdict(r), "speedup": r.speedup} for r in ratios]
        if error and item.status == "pass":
            item.details.append(error)
        if counts is not None:
            ran = {tid.split("::")[0] for tid, _ in counts.failures}
            junit_text = ctx.junit[item.name].read_text(errors="replace") if ctx.junit[item.name].exists() else ""
            for label, f, _ in chosen:
                module = f.replace("/", ".").removesuffix(".py")
                if module not in junit_text and f not in ran:
                    item.details.append(f"'{label}' matched no benchmark in {f} (ids renamed? update BENCH)")
        slower = [r for r in ratios if r.speedup is not None and r.speedup < 1.0]
        if slower and item.status == "pass":
            item.reason += f"; {len(slower)} of {len(ratios)} implementations slower than their baseline"
    return action


def injected_failure(ctx: Context, item: Item, timeout: float) -> None:
    """A step that fails on purpose (--inject-failure), for the campaign's own tests."""
    out = ctx.run(item, [ctx.python, "-c", "raise SystemExit(3)"], timeout)
    item.set("fail" if out.rc != 0 else "pass", f"injected failure: exit {out.rc}")
