"""Reading what the steps wrote: JUnit XML, compute-sanitizer reports, pytest-benchmark JSON.

Pure functions of files and text, so tests/test_gpu_check.py checks them on
made-up inputs without a GPU.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- JUnit XML
@dataclasses.dataclass
class TestCounts:
    passed: int = 0
    failed: int = 0   # failures and errors
    skipped: int = 0
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (test id, first line of the message)
    skip_reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.skipped

    def line(self) -> str:
        return f"{self.passed} passed, {self.failed} failed, {self.skipped} skipped"


def _test_id(case: ET.Element) -> str:
    """``tests/ops/test_lora.py::test_x[param]`` from JUnit's classname (dotted module path) and name."""
    classname, name = case.get("classname", ""), case.get("name", "")
    parts = classname.split(".")
    # pytest writes "tests.ops.test_lora" (or "...test_lora.TestClass"): the module is the last test_* part.
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].startswith("test"):
            module = "/".join(parts[:i + 1]) + ".py"
            rest = parts[i + 1:]
            return "::".join([module, *rest, name])
    return f"{classname}::{name}" if classname else name


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


def read_junit(path: Path) -> TestCounts | None:
    """Counts, failing tests and skip reasons of one JUnit XML file; None if it is missing or unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = TestCounts()
    for case in root.iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            counts.failed += 1
            message = bad.get("message") or _first_line(bad.text)
            counts.failures.append((_test_id(case), _first_line(message)))
        elif skip is not None:
            counts.skipped += 1
            reason = skip.get("message") or _first_line(skip.text)
            counts.skip_reasons[re.sub(r"^Skipped: ", "", reason)[:200]] += 1
        else:
            counts.passed += 1
    return counts


def merge_junit(parts: dict[str, Path], out: Path) -> None:
    """One ``<testsuites>`` file of the named JUnit files that exist (each suite named after its step)."""
    merged = ET.Element("testsuites")
    for name, path in parts.items():
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError):
            continue
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for suite in suites:
            suite.set("name", name)
            merged.append(suite)
    ET.ElementTree(merged).write(out, encoding="utf-8", xml_declaration=True)


# ----------------------------------------------------------------------------- compute-sanitizer
# What compute-sanitizer prints when it cannot work on this machine (gVisor's GPU
# proxy answers "Device not supported"), as opposed to errors it found.
REFUSAL_PATTERNS = (
    "Device not supported",
    "Unable to find injection library",
)
# An error block belongs to fastdense when it names fastdense's code: the CUDA
# sources (built with -lineinfo), the namespace, or a Triton kernel's source file.
OURS = re.compile(r"fastdense|csrc/cuda/|/kernels/\w+\.py")


@dataclasses.dataclass
class SanitizerReport:
    refused: str | None = None  # why the tool could not run, if it could not
    errors: int | None = None   # its ERROR SUMMARY; None when it printed none (killed, crashed)
    ours: int = 0               # error blocks naming fastdense's kernels
    others: int = 0             # error blocks elsewhere (torch, libraries)
    warnings: int = 0           # blocks the tool calls warnings (racecheck's benign-looking hazards)
    hazards: tuple[int, int] | None = None  # racecheck: (errors, warnings)
    messages: list[str] = dataclasses.field(default_factory=list)  # distinct first lines, for the summary


def _blocks(text: str) -> list[list[str]]:
    """compute-sanitizer's reports: a ``========= Header`` line and its ``=========     detail`` lines.

    The host backtrace of a report is left out: a torch kernel launched from
    fastdense's host code would otherwise pass for one of fastdense's kernels.
    """
    blocks: list[list[str]] = []
    current: list[str] | None = None
    in_host_frames = False
    for line in text.splitlines():
        m = re.match(r"^========= ?(\s*)(.*)$", line)
        if not m or not m.group(2):
            continue
        indent, body = m.groups()
        if indent:  # a detail line of the current report
            if body.startswith(("Saved host backtrace", "Host Frame")):
                in_host_frames = True
            if current is not None and not in_host_frames:
                current.append(body)
            continue
        in_host_frames = False
        if re.match(r"(COMPUTE-SANITIZER|ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY|Target application)", body):
            current = None  # bookkeeping, not a report
            continue
        current = [body]
        blocks.append(current)
    return blocks


def read_sanitizer(text: str) -> SanitizerReport:
    report = SanitizerReport()
    for pattern in REFUSAL_PATTERNS:
        if pattern in text:
            line = next((ln for ln in text.splitlines() if pattern in ln), pattern)
            report.refused = line.strip("= ").strip()[:300]
            return report
    summaries = re.findall(r"ERROR SUMMARY: (\d+) errors?", text)
    if summaries:
        report.errors = sum(int(n) for n in summaries)
    races = re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    if races:
        report.hazards = (sum(int(e) for e, _ in races), sum(int(w) for _, w in races))
    seen: set[str] = set()
    for block in _blocks(text):
        if block[0].startswith("Warning"):
            report.warnings += 1
        elif OURS.search("\n".join(block)):
            report.ours += 1
        else:
            report.others += 1
        head = block[0]
        where = next((ln for ln in block[1:] if ln.startswith("at ") or " in " in ln), "")
        message = f"{head} {where}".strip()[:240]
        if message not in seen and len(report.messages) < 8:
            seen.add(message)
            report.messages.append(message)
    return report


def read_sanitize_script(text: str) -> dict | None:
    """What tools/gpu_sanitize.py printed: {"passed", "failed", "refused", "checks", "failing", "finished"}
    from its per-check lines (so a run stopped halfway still counts), its last line when it got there;
    None when it checked nothing."""
    marks = re.findall(r"^(PASS|FAIL|REFUSED)\s+\[\d+/(\d+)\] (.*)$", text, flags=re.M)
    final = re.findall(r"gpu_sanitize: (\d+) passed, (\d+) failed, (\d+) refused of (\d+) checks", text)
    if not marks and not final:
        return None
    failing = [line for status, _, line in marks if status == "FAIL"]
    if final:
        passed, failed, refused, checks = map(int, final[-1])
    else:
        passed = sum(1 for status, _, _ in marks if status == "PASS")
        failed, refused = len(failing), sum(1 for status, _, _ in marks if status == "REFUSED")
        checks = int(marks[-1][1])
    return {"passed": passed, "failed": failed, "refused": refused, "checks": checks, "failing": failing[:20],
            "finished": bool(final)}


# ----------------------------------------------------------------------------- benchmarks
def load_bench_report():
    """bench/report.py as a module (bench/ is not a package)."""
    name = "fastdense_bench_report"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@dataclasses.dataclass
class Ratio:
    suite: str
    mode: str
    case: str
    impl: str
    backend: str
    ms: float
    baseline: str | None
    baseline_ms: float | None

    @property
    def speedup(self) -> float | None:
        """Baseline time over this implementation's time, as bench/report.py prints it."""
        if self.baseline_ms is None or not self.ms:
            return None
        return self.baseline_ms / self.ms


def bench_ratios(path: Path) -> tuple[list[Ratio], str | None]:
    """Every implementation that is not its case's baseline, with its speed-up over the
    baseline bench/report.py names for the suite; and an error text if the file or
    report.py could not be read (the ratios are then empty)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return [], f"no benchmark JSON ({type(exc).__name__}: {exc})"
    try:
        report = load_bench_report()
        rows = report.load_data(data, str(path))["rows"]
    except Exception as exc:  # bench/report.py changed under us: say so rather than fail the campaign
        return [], f"bench/report.py could not read the JSON ({type(exc).__name__}: {exc})"
    by_suite: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        by_suite[row["_suite"]].append(row)
    out: list[Ratio] = []
    for suite, suite_rows in by_suite.items():
        spec = report.suite_spec(suite)
        keys = report.generic_case_keys(suite_rows)

        def case_of(row, spec=spec, keys=keys):
            if spec.case is not None:
                try:
                    return spec.case(row)
                except KeyError:
                    pass
            return report.generic_case(row, keys)

        present = list(dict.fromkeys(report.impl_of(r) for r in suite_rows))
        by_case: dict[tuple, dict] = collections.defaultdict(dict)
        for row in suite_rows:
            by_case[(str(row.get("mode", "")), case_of(row))][report.impl_of(row)] = row
        for (mode, case), impls in by_case.items():
            for impl, row in impls.items():
                base_name = spec.baseline(impl, present)
                if base_name == impl:
                    continue
                base = impls.get(base_name) if base_name else None
                out.append(Ratio(suite, mode, case, impl, str(row.get("backend", "")), row["median_ms"], base_name,
                                 base["median_ms"] if base else None))
    return out, None
