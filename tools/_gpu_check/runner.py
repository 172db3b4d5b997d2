"""Steps as items with a status, run one after another or in parallel lanes, inside one time budget.

Every command runs in its own process group, so a step that overruns its time
is stopped whole (pytest-xdist workers, compute-sanitizer and its target too):
first SIGINT, which lets pytest write its JUnit XML and pytest-benchmark its
JSON for what finished, then SIGTERM, then SIGKILL. The time a step may take
is its own cap or what is left of the budget (minus that stopping time),
whichever is less; a step that cannot get its minimum is skipped as "out of
time", so the campaign always ends, and writes its summary, inside the budget.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

# How long a stopped command gets for each signal before the next, harder one.
STOP_WAITS = ((signal.SIGINT, 12.0), (signal.SIGTERM, 4.0), (signal.SIGKILL, 2.0))
STOP_S = sum(wait for _, wait in STOP_WAITS)


@dataclasses.dataclass
class Item:
    """One line of the summary: a step, its status and why."""

    name: str
    title: str
    status: str = "pending"  # pending, running, pass, fail, skip
    reason: str = ""         # why it failed or was skipped; for a pass, a one-line result
    seconds: float = 0.0
    details: list[str] = dataclasses.field(default_factory=list)  # more lines for the summary
    data: dict = dataclasses.field(default_factory=dict)          # machine-readable results
    log: Path | None = None

    def set(self, status: str, reason: str = "") -> None:
        assert status in ("pass", "fail", "skip"), status
        self.status, self.reason = status, reason


@dataclasses.dataclass
class Outcome:
    rc: int | None
    seconds: float
    timed_out: bool = False
    output_tail: str = ""


class Budget:
    """Seconds left before the campaign's deadline, which keeps ``reserve_s`` for the final summary."""

    def __init__(self, total_s: float, reserve_s: float, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.start = clock()
        self.total_s = total_s
        self.deadline = self.start + total_s - reserve_s

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self, until: float | None = None) -> float:
        return min(self.deadline, until if until is not None else self.deadline) - self.clock()


class Processes:
    """Runs commands in their own process groups and stops them, all of them on an interrupt."""

    def __init__(self):
        self._active: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.interrupted = False

    def run(self, cmd: Sequence[str], *, log: Path, timeout: float, env: dict, cwd: Path) -> Outcome:
        t0 = time.monotonic()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(str(c) for c in cmd)}\n")
            f.flush()
            if self.interrupted:
                return Outcome(None, 0.0)
            try:
                proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=cwd, env=env, start_new_session=True)
            except OSError as exc:
                f.write(f"[could not start: {exc}]\n")
                return Outcome(None, time.monotonic() - t0, output_tail=str(exc))
            with self._lock:
                self._active.add(proc)
            timed_out = False
            try:
                proc.wait(timeout=max(timeout, 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
                f.write(f"\n[stopping: over its {timeout:.0f} s]\n")
                f.flush()
                self.stop(proc)
            finally:
                self._reap(proc)
                with self._lock:
                    self._active.discard(proc)
            seconds = time.monotonic() - t0
            stopped = " (stopped at its time limit)" if timed_out else ""
            f.write(f"\n[exit {proc.returncode} after {seconds:.1f} s{stopped}]\n")
        return Outcome(proc.returncode, seconds, timed_out, tail(log))

    @staticmethod
    def stop(proc: subprocess.Popen) -> None:
        for sig, wait in STOP_WAITS:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    @staticmethod
    def _reap(proc: subprocess.Popen) -> None:
        """Whatever the command left running in its group (a stray worker) goes with it."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def interrupt(self) -> None:
        self.interrupted = True
        with self._lock:
            active = list(self._active)
        for proc in active:
            threading.Thread(target=self.stop, args=(proc,), daemon=True).start()


def tail(path: Path, chars: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chars))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


@dataclasses.dataclass
class Step:
    name: str
    title: str
    cap_s: float          # the most this step may take
    min_s: float          # skipped as "out of time" when less is left
    action: Callable      # action(item, timeout_s): runs the step and sets the item's status
    gpu: bool = True      # needs a CUDA device (skipped, with the reason, without one)
    setup: bool = False   # a prerequisite of the GPU steps: always run, never deselected


class Campaign:
    """Runs the plan's steps into items; ``gate(step)`` gives a reason to skip a step, or None."""

    def __init__(self, steps: Sequence[Step], budget: Budget, processes: Processes,
                 gate: Callable[[Step], str | None], on_change: Callable[[], None]):
        self.steps = {s.name: s for s in steps}
        self.items = {s.name: Item(s.name, s.title) for s in steps}
        self.budget = budget
        self.processes = processes
        self.gate = gate
        self.on_change = on_change
        self.lock = threading.RLock()

    def changed(self) -> None:
        with self.lock:
            try:
                self.on_change()
            except Exception:  # the summary is best effort while steps run; the final one reports
                traceback.print_exc()

    def run_step(self, name: str, until: float | None = None) -> Item:
        step, item = self.steps[name], self.items[name]
        reason = "interrupted" if self.processes.interrupted else self.gate(step)
        if reason:
            item.set("skip", reason)
            self.changed()
            return item
        left = self.budget.left(until) - STOP_S
        if left < step.min_s:
            item.set("skip", f"out of time: {max(left, 0):.0f} s left of the budget, the step needs at least "
                             f"{step.min_s:.0f} s")
            self.changed()
            return item
        timeout = min(step.cap_s, left)
        item.status = "running"
        item.data["timeout_s"] = round(timeout)
        item.data["cut_by_budget"] = timeout < step.cap_s
        self.changed()
        print(f"gpu-check: {name} (at most {timeout:.0f} s) ...", flush=True)
        t0 = time.monotonic()
        try:
            step.action(item, timeout)
        except Exception as exc:
            item.set("fail", f"the step itself raised {type(exc).__name__}: {exc}")
            if item.log is not None:
                with open(item.log, "a") as f:
                    traceback.print_exc(file=f)
            traceback.print_exc()
        item.seconds = time.monotonic() - t0
        if item.status == "running":
            item.set("fail", "the step set no result")
        if self.processes.interrupted and item.status != "pass":
            item.set("skip", f"interrupted from outside ({item.reason})")  # the exit status still says so
        print(f"gpu-check: {name}: {item.status} ({item.seconds:.1f} s) {item.reason}", flush=True)
        self.changed()
        return item

    def run_lanes(self, lanes: Sequence[Sequence[str]], until: float) -> None:
        """Each lane's steps in order, the lanes side by side, all ending by ``until``."""
        lanes = [lane for lane in lanes if lane]
        if len(lanes) == 1:
            for name in lanes[0]:
                self.run_step(name, until)
            return
        threads = [threading.Thread(target=lambda lane=lane: [self.run_step(n, until) for n in lane], daemon=True)
                   for lane in lanes]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)  # wakes for signals
