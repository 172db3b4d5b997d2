"""mt_lora_linear: every backend against the reference, forward and every gradient."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastdense
from fastdense.ops import reference
from fastdense.ops.lora import OP, mt_lora_linear, lora_linear

from _backends import (assert_compiled_matches_eager, assert_within_twice_the_reference_error, backend_params,
                       device_for)

GRAD_ARGS = ("x", "weight", "bias", "lora_a", "lora_b", "x_lora", "x_tasks")


@dataclasses.dataclass(frozen=True)
class Case:
    lead: tuple  # leading dims of x
    k: int
    n: int
    ranks: tuple
    shared_in_tasks: bool = False
    x_lora: bool = False
    x_tasks: bool = False
    bias: bool = True

    def __str__(self):
        flags = "".join(f for f, on in (("v2", self.shared_in_tasks), ("+xl", self.x_lora),
                                         ("+xt", self.x_tasks), ("-b", not self.bias)) if on)
        return f"{'x'.join(map(str, self.lead))}x{self.k}->{self.n}_r{'-'.join(map(str, self.ranks))}{flags}"


CASES = [
    Case((1, 7), 13, 11, (1,)),                       # single LoRA, rank 1, odd everything
    Case((7,), 13, 11, (64,), bias=False),            # single LoRA, rank 64 > K
    Case((2, 5), 13, 11, (3, 1, 5)),                  # T = 2, ranks differ
    Case((2, 5), 13, 11, (3, 1, 5), shared_in_tasks=True, x_lora=True),
    Case((3, 3), 16, 24, (64, 4, 4, 4, 4)),           # MTLoRA's config: shared 64, task 4, T = 4
    Case((1, 9), 13, 11, (8, 4, 2, 4, 1, 3), shared_in_tasks=True),   # T = 5
    Case((2, 3), 13, 11, (4, 2, 3), x_tasks=True),
    Case((2, 3), 13, 11, (4, 2, 3), x_tasks=True, x_lora=True, shared_in_tasks=True, bias=False),
]


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype=dtype, device=device)

    r = sum(case.ranks)
    t = len(case.ranks) - 1
    return dict(
        x=rnd(*case.lead, case.k),
        weight=rnd(case.n, case.k, std=case.k ** -0.5),
        bias=rnd(case.n) if case.bias else None,
        lora_a=rnd(r, case.k, std=case.k ** -0.5),
        lora_b=rnd(case.n, r, std=0.5),
        x_lora=rnd(*case.lead, case.k) if case.x_lora else None,
        x_tasks=rnd(t, *case.lead, case.k) if case.x_tasks else None,
    )


def scales_for(case: Case):
    return [0.5 + 0.75 * i for i in range(len(case.ranks))]


def run(fn, inputs, case, grad_out=None):
    """Forward (and backward with grad_out); returns output and {name: grad}."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    out = fn(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"],
             list(case.ranks), scales_for(case), shared_in_tasks=case.shared_in_tasks,
             x_lora=leaves["x_lora"], x_tasks=leaves["x_tasks"])
    grads = {}
    if grad_out is not None:
        out.backward(grad_out)
        grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return out, grads


def reference_fn(x, weight, bias, lora_a, lora_b, ranks, scales, *, shared_in_tasks, x_lora, x_tasks):
    return reference.mt_lora_linear(x, weight, bias, lora_a, lora_b, ranks, scales, shared_in_tasks, x_lora, x_tasks)


def close(actual, expected, what, tol):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference_fp32(backend, case):
    device = device_for(backend)
    inputs = make_inputs(case, device=device)
    ref_inputs = {k: (v.double().cpu() if v is not None else None) for k, v in inputs.items()}
    ref_out, _ = run(reference_fn, ref_inputs, case)
    grad_out = torch.randn(ref_out.shape, dtype=torch.float64)
    ref_out, ref_grads = run(reference_fn, ref_inputs, case, grad_out)

    with fastdense.ops.backend(backend):
        out, grads = run(mt_lora_linear, inputs, case, grad_out.float().to(device))

    tol = 2e-5 * max(case.k, max(case.ranks)) ** 0.5 * len(case.ranks)
    assert out.shape == (len(case.ranks), *case.lead, case.n)
    close(out.cpu(), ref_out, "forward", tol)
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        close(grads[name].cpu(), g, f"grad {name}", tol * 4)


@pytest.mark.parametrize("backend", backend_params(OP))
def test_frozen_base_gets_no_gradient(backend):
    """The usual PEFT set-up: only the LoRA factors train; backends must not return base grads."""
    case = CASES[4]
    inputs = make_inputs(case, device=device_for(backend))
    w = inputs["weight"]
    a = inputs["lora_a"].requires_grad_(True)
    with fastdense.ops.backend(backend):
        out = mt_lora_linear(inputs["x"], w, inputs["bias"], a, inputs["lora_b"], list(case.ranks), scales_for(case))
        out.sum().backward()
    assert w.grad is None and a.grad is not None and a.grad.abs().sum() > 0


def test_single_lora_is_the_shared_output():
    case = CASES[0]
    i = make_inputs(case)
    y = lora_linear(i["x"], i["weight"], i["bias"], i["lora_a"], i["lora_b"], 0.5)
    expected = (torch.nn.functional.linear(i["x"], i["weight"], i["bias"])
                + 0.5 * i["x"] @ i["lora_a"].t() @ i["lora_b"].t())
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_float64(backend):
    if backend == "cpp" and fastdense.ops.implementations(OP)["cpp"].machine_reasons():
        pytest.skip("cpp backend unavailable: " + "; ".join(fastdense.ops.implementations(OP)["cpp"].machine_reasons()))
    for case in (Case((2, 3), 5, 4, (2, 1, 3), shared_in_tasks=True, x_lora=True),
                 Case((2, 3), 5, 4, (2, 1, 3), x_tasks=True)):
        i = make_inputs(case, dtype=torch.float64)
        names = [k for k, v in i.items() if v is not None]

        def f(*tensors):
            kw = dict(i, **dict(zip(names, tensors)))
            return mt_lora_linear(kw["x"], kw["weight"], kw["bias"], kw["lora_a"], kw["lora_b"], list(case.ranks),
                                  scales_for(case), shared_in_tasks=case.shared_in_tasks,
                                  x_lora=kw["x_lora"], x_tasks=kw["x_tasks"])

        with fastdense.ops.backend(backend):
            assert torch.autograd.gradcheck(f, [i[k].requires_grad_(True) for k in names])


@pytest.mark.parametrize("backend", backend_params(OP))
def test_opcheck(backend):
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        device = "cuda"
    elif backend == "triton":
        device = "cpu"
    else:
        device = "cpu"
    case = Case((6,), 8, 5, (2, 1, 3), shared_in_tasks=True, x_lora=True)
    i = make_inputs(case, device=device)
    for k in ("x", "lora_a", "lora_b", "x_lora"):
        i[k].requires_grad_(True)
    args = (i["x"], i["weight"], i["bias"], i["lora_a"], i["lora_b"], list(case.ranks), scales_for(case), True,
            i["x_lora"], None)
    with fastdense.ops.backend(backend):
        torch.library.opcheck(torch.ops.fastdense.mt_lora_linear.default, args)


def test_torch_compile_fullgraph_matches_eager():
    case = Case((2, 5), 16, 12, (4, 2, 2), shared_in_tasks=True)
    i = make_inputs(case)

    def f(x, a, b):
        out = mt_lora_linear(x, i["weight"], i["bias"], a, b, list(case.ranks), scales_for(case),
                             shared_in_tasks=True)
        return (out * out).sum()

    assert_compiled_matches_eager(f, [i["x"], i["lora_a"], i["lora_b"]])


# ----------------------------------------------------------------------------- bad input
def _good():
    case = CASES[2]
    i = make_inputs(case)
    return i, list(case.ranks), scales_for(case)


def _call(i, ranks, scales, **kw):
    return mt_lora_linear(i["x"], i["weight"], i["bias"], i["lora_a"], i["lora_b"], ranks, scales, **kw)


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda i, r, s: i.update(weight=i["weight"][:, :-1]), ValueError, ["weight", "(N, K=13)"]),
    (lambda i, r, s: i.update(bias=i["bias"][:-1]), ValueError, ["bias", "(N=11,)"]),
    (lambda i, r, s: i.update(lora_a=i["lora_a"][:-1]), ValueError, ["lora_a", "sum(ranks)=9"]),
    (lambda i, r, s: i.update(lora_b=i["lora_b"].t()), ValueError, ["lora_b", "(N=11, sum(ranks)=9)"]),
    (lambda i, r, s: r.__setitem__(1, 0), ValueError, ["ranks"]),
    (lambda i, r, s: s.pop(), ValueError, ["scales"]),
    (lambda i, r, s: i.update(lora_a=i["lora_a"].double()), TypeError, ["lora_a", "dtype"]),
    (lambda i, r, s: i.update(x=i["x"].long()), TypeError, ["x", "floating"]),
    (lambda i, r, s: i.update(weight="W"), TypeError, ["weight", "torch.Tensor"]),
    (lambda i, r, s: i.update(lora_b=i["lora_b"].to("meta")), ValueError, ["lora_b", "device"]),
])
def test_bad_input_names_the_argument(mutate, exc, words):
    i, ranks, scales = _good()
    mutate(i, ranks, scales)
    with pytest.raises(exc) as info:
        _call(i, ranks, scales)
    for w in words:
        assert w in str(info.value)


def test_bad_task_inputs():
    i, ranks, scales = _good()
    with pytest.raises(ValueError, match=r"x_tasks must have shape \(T=2"):
        _call(i, ranks, scales, x_tasks=i["x"][None])
    with pytest.raises(ValueError, match="x_lora must have the shape of x"):
        _call(i, ranks, scales, x_lora=i["x"][..., :-1])


# ----------------------------------------------------------------------------- shape fuzzing
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@st.composite
def cases(draw):
    n_tasks = draw(st.integers(0, 4))
    return Case(
        lead=tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=2))),
        k=draw(st.integers(1, 20)),
        n=draw(st.integers(1, 20)),
        ranks=tuple(draw(st.lists(st.integers(1, 9), min_size=n_tasks + 1, max_size=n_tasks + 1))),
        shared_in_tasks=draw(st.booleans()),
        x_lora=draw(st.booleans()),
        x_tasks=n_tasks > 0 and draw(st.booleans()),
        bias=draw(st.booleans()),
    )


@pytest.mark.parametrize("backend", [p for p in backend_params(OP) if p.values[0] in ("cpp", "triton")])
def test_fuzz_shapes_against_reference(backend):
    examples = 8 if backend == "triton" and not torch.cuda.is_available() else 40

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(case=cases())
    def check(case):
        device = device_for(backend)
        inputs = make_inputs(case, device=device)
        ref_inputs = {k: (v.double().cpu() if v is not None else None) for k, v in inputs.items()}
        grad_out = torch.randn(len(case.ranks), *case.lead, case.n, dtype=torch.float64)
        ref_out, ref_grads = run(reference_fn, ref_inputs, case, grad_out)
        with fastdense.ops.backend(backend):
            out, grads = run(mt_lora_linear, inputs, case, grad_out.float().to(device))
        tol = 1e-4 * len(case.ranks)
        close(out.cpu(), ref_out, f"forward {case}", tol)
        for name, g in ref_grads.items():
            close(grads[name].cpu(), g, f"grad {name} {case}", 4 * tol)

    check()


# ----------------------------------------------------------------------------- low precision (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("backend", [p for p in backend_params(OP) if p.values[0] in ("cuda", "triton", "torch")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [Case((2, 97), 96, 384, (64, 4, 4, 4, 4)),
                                  Case((3, 49), 192, 192, (64, 4, 4, 4, 4), shared_in_tasks=True, x_lora=True),
                                  Case((1, 33), 40, 72, (16, 8, 1), x_tasks=True)], ids=str)
def test_low_precision_error_within_twice_the_reference_error(backend, dtype, case):
    """flash-attn's rule: error vs an fp32 reference <= 2x the error of the reference run in that dtype."""
    inputs = make_inputs(case, device="cuda")
    low = {k: (v.to(dtype) if v is not None else None) for k, v in inputs.items()}
    grad32 = torch.randn(len(case.ranks), *case.lead, case.n, device="cuda")
    ref32, ref32_grads = run(reference_fn, inputs, case, grad32)
    ref_low, ref_low_grads = run(reference_fn, low, case, grad32.to(dtype))
    with fastdense.ops.backend(backend):
        out, grads = run(mt_lora_linear, low, case, grad32.to(dtype))

    assert_within_twice_the_reference_error((out, grads), (ref32, ref32_grads), (ref_low, ref_low_grads), 1e-3)


def test_autocast_runs_in_the_autocast_dtype():
    """A fp32 layer fed by another autocast layer (bf16 activation) must not raise."""
    case = CASES[2]
    i = make_inputs(case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.nn.functional.linear(i["x"], torch.eye(case.k))  # bf16 under autocast
        assert x.dtype == torch.bfloat16
        out = mt_lora_linear(x, i["weight"], i["bias"], i["lora_a"], i["lora_b"], list(case.ranks), scales_for(case))
    assert out.dtype == torch.bfloat16
    expected = reference.mt_lora_linear(i["x"], i["weight"], i["bias"], i["lora_a"], i["lora_b"],
                                        list(case.ranks), scales_for(case))
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("lead, ranks", [((0,), (3, 1)), ((2, 0), (2,)), ((3,), (2,))], ids=str)
def test_empty_and_task_free_inputs(backend, lead, ranks):
    """M = 0 rows, and x_tasks given with T = 0 tasks (a single LoRA)."""
    case = Case(lead, 5, 4, ranks, x_tasks=True)
    inputs = make_inputs(case, device=device_for(backend))
    with fastdense.ops.backend(backend):
        out, grads = run(mt_lora_linear, inputs, case, torch.ones(len(ranks), *lead, 4, device=device_for(backend)))
    ref_out, ref_grads = run(reference_fn, inputs, case, torch.ones(len(ranks), *lead, 4, device=device_for(backend)))
    assert out.shape == (len(ranks), *lead, 4)
    close(out, ref_out, "forward", 1e-5)
    for name, g in ref_grads.items():
        if g is None:  # the reference never reads x_tasks when T = 0
            g = torch.zeros_like(inputs[name])
        close(grads[name], g, f"grad {name}", 1e-5)
