"""Property-based tests of every op on every backend available here (see _fuzz.py).

A fixed seed and ``FASTDENSE_FUZZ_EXAMPLES`` cases per op, backend and kind
(12 by default, to keep ``make test`` short); ``FASTDENSE_FUZZ_EXAMPLES=1000
FASTDENSE_FUZZ_REPORT=1 pytest tests/ops/test_fuzz.py`` runs a long campaign
that counts the outcomes instead of stopping at the first failure and prints
the table at the end of the run.
"""
from __future__ import annotations

import collections
import os

import _fuzz
import pytest
import torch
from _backends import device_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastdense

REPORT = os.environ.get("FASTDENSE_FUZZ_REPORT") == "1"
COUNTS: dict = collections.defaultdict(collections.Counter)
FIRST: dict = {}
CANDIDATE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

SETTINGS = settings(max_examples=_fuzz.examples(), deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def _params():
    out = []
    for op in _fuzz.SPECS:
        for name, impl in fastdense.ops.implementations(op).items():
            if impl.machine_reasons():
                continue  # not runnable on this machine (tests/ops/test_<op>.py reports why)
            out.append(pytest.param(op, name, id=f"{op}-{name}"))
    return out


def _dtypes(op, backend):
    impl = fastdense.ops.implementations(op)[backend]
    dtypes = [d for d in CANDIDATE_DTYPES if impl.dtypes is None or d in impl.dtypes]
    if backend == "triton" and device_for(backend) == "cpu":
        dtypes = [d for d in dtypes if d != torch.bfloat16]  # the interpreter has no bf16
    return dtypes


def _record(op, backend, kind, outcome, detail, case):
    COUNTS[(op, backend, kind)][outcome] += 1
    key = (op, backend, outcome)
    if outcome not in ("ok", "clean_error", "unsupported") and key not in FIRST:
        FIRST[key] = f"{detail} [{case.describe()}]"
    if not REPORT:
        assert outcome in ("ok", "clean_error", "unsupported"), f"{outcome}: {detail}\n  case: {case.describe()}"


@pytest.mark.parametrize("op, backend", _params())
def test_valid_inputs_match_the_reference(op, backend):
    device = device_for(backend)
    dtypes = _dtypes(op, backend)

    @SETTINGS
    @given(data=st.data())
    def run(data):
        case = data.draw(_fuzz.SPECS[op](specials=True), label="case")
        dtype = data.draw(st.sampled_from(dtypes), label="dtype")
        if dtype not in (torch.float32, torch.float64):
            case = data.draw(_fuzz.SPECS[op](specials=False), label="finite case")
        outcome, detail = _fuzz.run_case(case, backend, dtype, device)
        _record(op, backend, "valid", outcome, f"{detail} (in {dtype})", case)

    run()


@pytest.mark.parametrize("op, backend", _params())
def test_invalid_inputs_raise_errors_that_name_the_argument(op, backend):
    device = device_for(backend)
    dtype = torch.float32 if torch.float32 in _dtypes(op, backend) else _dtypes(op, backend)[0]

    @SETTINGS
    @given(data=st.data())
    def run(data):
        case = data.draw(_fuzz.SPECS[op](specials=False), label="case")
        case.kwargs = _fuzz._as(case.kwargs, dtype, device)
        names = [k for k, v in case.kwargs.items() if isinstance(v, torch.Tensor) and k not in _fuzz.NOT_BROKEN]
        arg = data.draw(st.sampled_from(names), label="broken argument")
        case.kwargs = _fuzz.break_argument(data.draw, case.kwargs, arg)
        outcome, detail = _fuzz.run_invalid(case, arg, backend)
        _record(op, backend, "invalid", outcome, detail, case)

    run()


def report_lines() -> list[str]:
    """The outcome table of this run (printed by tests/ops/conftest.py when FASTDENSE_FUZZ_REPORT=1)."""
    if not COUNTS:
        return []
    head = f"{'op':24} {'backend':8} {'kind':8} " + " ".join(f"{o:>10}" for o in _fuzz.OUTCOMES)
    lines = [head]
    for (op, backend, kind), c in sorted(COUNTS.items()):
        lines.append(f"{op:24} {backend:8} {kind:8} " + " ".join(f"{c[o]:>10}" for o in _fuzz.OUTCOMES))
    lines += [f"first {o} of {op}/{b}: {d}" for (op, b, o), d in sorted(FIRST.items())]
    return lines
