"""The campaign's output folder: SUMMARY.md (one page), summary.json, junit.xml, logs.txt, logs.tar.gz.

bench.json is written there by pytest-benchmark itself. Six files, none in a
subfolder, so all of them come back from the device tool (at most 8 files,
16 MiB each). Everything but the tarball is rewritten after every step, so a
campaign killed from outside still leaves a summary of what it finished.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

from _gpu_check import results
from _gpu_check.runner import Item

OUTPUTS = ("SUMMARY.md", "summary.json", "junit.xml", "bench.json", "logs.txt", "logs.tar.gz")
LOG_HEAD, LOG_TAIL = 16_000, 48_000   # characters of each step's log kept in logs.txt
TARBALL_LIMIT = 15 * 2**20            # the device tool brings back files up to 16 MiB
MAX_FAILING = 25                      # failing tests listed on the page (all of them are in summary.json)


def overall(items: list[Item], final: bool, interrupted: bool) -> str:
    if any(i.status == "fail" for i in items):
        return "FAIL"
    if interrupted:
        return "INTERRUPTED"
    return "PASS" if final else "RUNNING"


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def device_line(probe: dict) -> str:
    if not probe:
        return "unknown (the environment step did not run or failed)"
    if probe.get("device_name"):
        cap = "".join(map(str, probe.get("capability", [])))
        dev = (f"{probe['device_name']} (`{probe.get('device_tag', '?')}`, sm_{cap}, {probe.get('sm_count')} SMs, "
               f"{probe.get('memory_gib')} GiB), driver {probe.get('driver', '?')}")
    else:
        dev = f"no CUDA device (`{probe.get('device_tag', '?')}`)"
    return (f"{dev}; Python {probe.get('python')}, torch {probe.get('torch')} (CUDA {probe.get('torch_cuda')}), "
            f"triton {probe.get('triton', 'missing')}, {probe.get('cores')} cores")


def render_markdown(meta: dict, items: list[Item], failing: dict, result: str) -> str:
    lines = [f"# fastdense GPU check: {result}", "",
             f"- device: {device_line(meta.get('probe', {}))}",
             f"- run: {meta['started']}, commit {meta['commit']}, {meta['elapsed_s']:.0f} s of a "
             f"{meta['budget_s']:.0f} s budget, {meta['mode']}"]
    incomplete = [i.name for i in items if i.status == "skip" and i.reason.startswith("incomplete")]
    if incomplete:
        lines.append(f"- incomplete (stopped at a time limit, partial results below): {', '.join(incomplete)}")
    lines += ["",
              "| step | status | time | result |", "|---|---|---:|---|"]
    for item in items:
        lines.append(f"| {item.name} | {item.status} | {_fmt_s(item.seconds) if item.seconds else '–'} | "
                     f"{_cell(item.reason)} |")
    notes = [(i.name, d) for i in items for d in i.details]
    if notes:
        lines += ["", "## Details", ""] + [f"- {name}: {_cell(d)}" for name, d in notes]

    all_failing = [(step, tid, msg) for step, fails in failing.items() for tid, msg in fails]
    if all_failing:
        lines += ["", f"## Failing tests ({len(all_failing)})", ""]
        lines += [f"- [{step}] `{tid}`: {_cell(msg)}" for step, tid, msg in all_failing[:MAX_FAILING]]
        if len(all_failing) > MAX_FAILING:
            lines.append(f"- ... {len(all_failing) - MAX_FAILING} more in summary.json and junit.xml")

    sanitizer = [i for i in items if "sanitizer" in i.data or i.name == "sanitize-check"]
    if any(i.status != "skip" for i in sanitizer):
        lines += ["", "## Sanitizer", "", "| run | status | errors | in fastdense kernels | elsewhere | "
                  "racecheck hazards (errors/warnings) | checks right/wrong/refused |",
                  "|---|---|---:|---:|---:|---|---|"]
        for i in sanitizer:
            rep = i.data.get("sanitizer") or {}
            chk = i.data.get("checks") or {}
            hz = rep.get("hazards")
            lines.append(f"| {i.name} | {i.status} | {rep.get('errors', '–') if rep else '–'} | "
                         f"{rep.get('ours', '–')} | {rep.get('others', '–')} | {f'{hz[0]}/{hz[1]}' if hz else '–'} | "
                         + (f"{chk['passed']}/{chk['failed']}/{chk['refused']} |" if chk else "– |"))

    bench = next((i for i in items if i.name == "bench"), None)
    ratios = bench.data.get("ratios") if bench else None
    if ratios:
        lines += ["", "## Benchmarks", "",
                  "Speed-up = the baseline's median time / the implementation's (CUDA events, L2 flushed; "
                  "bench/report.py's baselines). **<1.00×** is slower than the baseline.", "",
                  "| suite | mode | case | impl | backend | median | baseline | speed-up |",
                  "|---|---|---|---|---|---:|---|---:|"]
        for r in ratios:
            sp = r.get("speedup")
            speed = "–" if sp is None else (f"**{sp:.2f}×**" if sp < 1.0 else f"{sp:.2f}×")
            lines.append(f"| {r['suite']} | {r['mode']} | {_cell(r['case'])} | {r['impl']} | {r['backend'] or '–'} | "
                         f"{r['ms']:.3f} ms | {r['baseline'] or '–'} | {speed} |")

    reasons: dict[str, int] = {}
    for i in items:
        for reason, n in i.data.get("skip_reasons", []):
            reasons[reason] = reasons.get(reason, 0) + n
    if reasons:
        lines += ["", "## Skipped tests (most frequent reasons)", ""]
        lines += [f"- {n} × {_cell(reason)}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:8]]
    return "\n".join(lines) + "\n"


def _log_excerpt(path: Path | None) -> str:
    if path is None or not path.exists():
        return "(no log)\n"
    text = path.read_text(errors="replace")
    if len(text) <= LOG_HEAD + LOG_TAIL:
        return text
    cut = len(text) - LOG_HEAD - LOG_TAIL
    return f"{text[:LOG_HEAD]}\n[... {cut} characters cut; the whole log is in logs.tar.gz ...]\n{text[-LOG_TAIL:]}"


def write(out: Path, work: Path, meta: dict, items: list[Item], failing: dict, junit: dict, *, final: bool,
          interrupted: bool = False) -> str:
    result = overall(items, final, interrupted)
    md = render_markdown(meta, items, failing, result)
    (out / "SUMMARY.md").write_text(md)
    doc = {**meta, "result": result, "final": final,
           "items": [{"name": i.name, "title": i.title, "status": i.status, "reason": i.reason,
                      "seconds": round(i.seconds, 1), "details": i.details, "data": i.data,
                      "log": i.log.name if i.log else None} for i in items],
           "failing_tests": {step: [{"test": t, "message": m} for t, m in fails] for step, fails in failing.items()}}
    (out / "summary.json").write_text(json.dumps(doc, indent=1, default=str))
    with open(out / "logs.txt", "w") as f:
        for i in items:
            if i.log is None:
                continue
            f.write(f"\n{'=' * 20} {i.name}: {i.status} ({_fmt_s(i.seconds)}) {i.reason}\n")
            f.write(_log_excerpt(i.log))
    existing = {name: path for name, path in junit.items() if path.exists()}
    if existing:
        results.merge_junit(existing, out / "junit.xml")
    if final:
        _tarball(out / "logs.tar.gz", work)
    return md


def _tarball(path: Path, work: Path) -> None:
    """Every log and JUnit file, whole; files that would push it over the size limit are left out."""
    total = 0
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(work.rglob("*")):
            if not f.is_file():
                continue
            size = f.stat().st_size
            if total + size > 4 * TARBALL_LIMIT:  # text compresses ~4x or better
                continue
            total += size
            tar.add(f, arcname=f"gpu-check/{f.relative_to(work)}")
