"""skill_gated_transform (TDSS TDSA): every backend against the reference, forward and every gradient."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastdense
from fastdense.ops import reference
from fastdense.ops.skill_gated_transform import OP, skill_gated_transform

from _backends import (assert_compiled_matches_eager, assert_within_twice_the_reference_error, backend_params,
                       device_for)

NAMES = ("x", "w_down", "w_up", "skills", "w_gamma", "w_beta")


@dataclasses.dataclass(frozen=True)
class Case:
    lead: tuple  # leading dims of x
    c: int
    r: int
    m: int
    t: int

    def __str__(self):
        return f"{'x'.join(map(str, self.lead))}xC{self.c}_R{self.r}_M{self.m}_T{self.t}"


CASES = [
    Case((7,), 13, 4, 5, 1),            # 2-D x, odd rows and width, T = 1
    Case((2, 5), 16, 16, 10, 3),        # 3-D x (B, L, C), TDSS's M = 10
    Case((1, 3, 5), 12, 4, 20, 5),      # 4-D x, M = 20, T = 5
    Case((3, 7), 24, 64, 10, 2),        # R = 64 > C
    Case((2, 9), 8, 16, 5, 4),          # T = 4, M = 5
    Case((1, 37), 40, 4, 10, 4),        # more rows than one tile, odd count
]


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype=dtype, device=device)

    # Gate weights large enough that the softmaxes are far from uniform, so a
    # wrong softmax gradient cannot hide behind symmetric gates.
    return dict(
        x=rnd(*case.lead, case.c),
        w_down=rnd(case.c, case.r, std=case.c ** -0.5),
        w_up=rnd(case.r, case.c, std=case.r ** -0.5),
        skills=rnd(case.m, case.r),
        w_gamma=rnd(case.t, case.r, case.m, std=2 * case.r ** -0.5),
        w_beta=rnd(case.t, case.r, case.m, std=2 * case.r ** -0.5),
    )


def run(fn, inputs, grad_out=None):
    """Forward (and backward with grad_out); returns output and {name: grad}."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    out = fn(*(leaves[k] for k in NAMES))
    grads = {}
    if grad_out is not None:
        out.backward(grad_out)
        grads = {k: v.grad for k, v in leaves.items()}
    return out, grads


def close(actual, expected, what, tol):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def check_against_reference(backend, case, seed=0):
    device = device_for(backend)
    inputs = make_inputs(case, device=device, seed=seed)
    ref_inputs = {k: v.double().cpu() for k, v in inputs.items()}
    grad_out = torch.randn(case.t, *case.lead, case.c, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(seed + 1))
    ref_out, ref_grads = run(reference.skill_gated_transform, ref_inputs, grad_out)

    with fastdense.ops.backend(backend):
        out, grads = run(skill_gated_transform, inputs, grad_out.float().to(device))

    tol = 2e-5 * max(case.c, case.r) ** 0.5 * case.t ** 0.5
    assert out.shape == (case.t, *case.lead, case.c)
    close(out.cpu(), ref_out, f"forward {case}", tol)
    for name in NAMES:
        # Parameter gradients reduce over all rows (and tasks).
        g_tol = tol * 4 * (1 if name == "x" else max(1, ref_inputs["x"].numel() // case.c) ** 0.5)
        close(grads[name].cpu(), ref_grads[name], f"grad {name} {case}", g_tol)


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference_fp32(backend, case):
    check_against_reference(backend, case)


@pytest.mark.parametrize("backend", [p for p in backend_params(OP) if p.values[0] != "triton"])
@pytest.mark.parametrize("t", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("m", [5, 10, 20])
@pytest.mark.parametrize("r", [4, 16, 64])
def test_tasks_skills_ranks_grid(backend, t, m, r):
    """T = 1…5 × M ∈ {5, 10, 20} × R ∈ {4, 16, 64} on the fast backends."""
    check_against_reference(backend, Case((2, 11), 24, r, m, t), seed=t + 7 * m + r)


@pytest.mark.parametrize("backend", [p for p in backend_params(OP) if p.values[0] != "triton"])
@pytest.mark.parametrize("lead", [(3, 347), (3, 701)], ids=["whole-gemms", "row-tiled"])
def test_many_row_tiles(backend, lead):
    """Enough rows for several row tiles / thread chunks, the last one partial. The cpp
    kernels run the W_d/W_u GEMMs over all rows up to T·N = 4096 (2·1041 here) and
    everything in row tiles above (2·2103)."""
    check_against_reference(backend, Case(lead, 8, 4, 5, 2), seed=3)


@pytest.mark.parametrize("backend", [p for p in backend_params(OP) if p.values[0] == "triton"])
@pytest.mark.parametrize("t, m, r", [(1, 5, 4), (2, 20, 64), (5, 10, 16), (3, 20, 4)], ids=str)
def test_tasks_skills_ranks_triton(backend, t, m, r):
    """The interpreter is slow: a few corners of the T × M × R grid."""
    check_against_reference(backend, Case((19,), 24, r, m, t), seed=t + 7 * m + r)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_float64(backend):
    impl = fastdense.ops.implementations(OP)[backend]
    if impl.machine_reasons():
        pytest.skip(f"{backend} unavailable: " + "; ".join(impl.machine_reasons()))
    case = Case((2, 3), 5, 4, 3, 2)
    i = make_inputs(case, dtype=torch.float64)

    def f(*tensors):
        return skill_gated_transform(*tensors)

    with fastdense.ops.backend(backend):
        assert torch.autograd.gradcheck(f, [i[k].requires_grad_(True) for k in NAMES])


@pytest.mark.parametrize("backend", backend_params(OP))
def test_opcheck(backend):
    device = device_for(backend)
    case = Case((6,), 8, 4, 5, 2)
    i = make_inputs(case, device=device)
    args = tuple(i[k].requires_grad_(True) for k in NAMES)
    with fastdense.ops.backend(backend):
        torch.library.opcheck(torch.ops.fastdense.skill_gated_transform.default, args)


@pytest.mark.parametrize("backend", backend_params(OP))
def test_only_requested_gradients(backend):
    """A frozen x (TDSS reads the frozen backbone's features) gets no gradient; the rest do."""
    case = CASES[1]
    device = device_for(backend)
    i = make_inputs(case, device=device)
    params = {k: i[k].requires_grad_(True) for k in NAMES[1:]}
    with fastdense.ops.backend(backend):
        out = skill_gated_transform(i["x"], *params.values())
        out.square().sum().backward()
    assert i["x"].grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())


def test_torch_compile_fullgraph_matches_eager():
    case = Case((2, 5), 16, 4, 10, 3)
    i = make_inputs(case)

    def f(*tensors):
        out = skill_gated_transform(*tensors)
        return (out * out).sum()

    assert_compiled_matches_eager(f, [i[k] for k in NAMES])


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
def test_empty_rows(backend, lead):
    case = Case(lead, 6, 4, 5, 3)
    device = device_for(backend)
    inputs = make_inputs(case, device=device)
    grad_out = torch.ones(case.t, *lead, case.c, device=device)
    with fastdense.ops.backend(backend):
        out, grads = run(skill_gated_transform, inputs, grad_out)
    assert out.shape == (case.t, *lead, case.c)
    assert grads["x"].shape == inputs["x"].shape
    for name in NAMES[1:]:
        close(grads[name], torch.zeros_like(inputs[name]), f"grad {name}", 0)


def test_autocast_runs_in_the_autocast_dtype():
    case = CASES[1]
    i = make_inputs(case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.nn.functional.linear(i["x"], torch.eye(case.c))  # bf16 under autocast
        assert x.dtype == torch.bfloat16
        out = skill_gated_transform(x, *(i[k] for k in NAMES[1:]))
    assert out.dtype == torch.bfloat16
    expected = reference.skill_gated_transform(*(i[k] for k in NAMES))
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("backend", [p for p in backend_params(OP) if p.values[0] in ("cpp", "torch")])
def test_bfloat16_on_cpu_close_to_fp32(backend):
    """bf16 error no larger than twice the reference's own bf16 error (+ a floor)."""
    case = CASES[4]
    i = make_inputs(case)
    low = {k: v.bfloat16() for k, v in i.items()}
    grad32 = torch.randn(case.t, *case.lead, case.c)
    ref32, ref32_grads = run(reference.skill_gated_transform, i, grad32)
    ref_low, ref_low_grads = run(reference.skill_gated_transform, low, grad32.bfloat16())
    with fastdense.ops.backend(backend):
        out, grads = run(skill_gated_transform, low, grad32.bfloat16())
    assert out.dtype == torch.bfloat16

    assert_within_twice_the_reference_error((out, grads), (ref32, ref32_grads), (ref_low, ref_low_grads), 1e-2)


# ----------------------------------------------------------------------------- bad input
def _good():
    return make_inputs(CASES[1])


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda i: i.update(w_down=i["w_down"][:-1]), ValueError, ["w_down", "(C=16, R)"]),
    (lambda i: i.update(w_up=i["w_up"][:, :-1]), ValueError, ["w_up", "(R=16, C=16)"]),
    (lambda i: i.update(skills=i["skills"][:, :-1]), ValueError, ["skills", "(M, R=16)"]),
    (lambda i: i.update(w_gamma=i["w_gamma"][:, :, :-1]), ValueError, ["w_gamma", "(T, R=16, M=10)"]),
    (lambda i: i.update(w_gamma=i["w_gamma"][:0]), ValueError, ["w_gamma", "T >= 1"]),
    (lambda i: i.update(w_beta=i["w_beta"][:-1]), ValueError, ["w_beta", "(T=3, R=16, M=10)"]),
    (lambda i: i.update(skills=i["skills"].double()), TypeError, ["skills", "dtype"]),
    (lambda i: i.update(x=i["x"].long()), TypeError, ["x", "floating"]),
    (lambda i: i.update(w_up="W"), TypeError, ["w_up", "torch.Tensor"]),
    (lambda i: i.update(w_beta=i["w_beta"].to("meta")), ValueError, ["w_beta", "device"]),
    (lambda i: i.update(x=torch.tensor(1.0)), ValueError, ["x", "(..., C)"]),
])
def test_bad_input_names_the_argument(mutate, exc, words):
    i = _good()
    mutate(i)
    with pytest.raises(exc) as info:
        skill_gated_transform(*(i[k] for k in NAMES))
    for w in words:
        assert w in str(info.value)


def test_forced_backend_refuses_with_reasons():
    i = make_inputs(CASES[0], dtype=torch.float64)
    with fastdense.ops.backend("triton"), pytest.raises(fastdense.ops.BackendNotSupportedError, match="float64"):
        skill_gated_transform(*(i[k] for k in NAMES))


# ----------------------------------------------------------------------------- low precision (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("backend", [p for p in backend_params(OP) if p.values[0] in ("triton", "torch")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [Case((2, 97), 96, 24, 10, 4), Case((3, 49), 768, 192, 10, 4),
                                  Case((1, 33), 40, 64, 20, 5)], ids=str)
def test_low_precision_error_within_twice_the_reference_error(backend, dtype, case):
    """flash-attn's rule: error vs an fp32 reference <= 2x the error of the reference run in that dtype."""
    inputs = make_inputs(case, device="cuda")
    low = {k: v.to(dtype) for k, v in inputs.items()}
    grad32 = torch.randn(case.t, *case.lead, case.c, device="cuda")
    ref32, ref32_grads = run(reference.skill_gated_transform, inputs, grad32)
    ref_low, ref_low_grads = run(reference.skill_gated_transform, low, grad32.to(dtype))
    with fastdense.ops.backend(backend):
        out, grads = run(skill_gated_transform, low, grad32.to(dtype))

    assert_within_twice_the_reference_error((out, grads), (ref32, ref32_grads), (ref_low, ref_low_grads), 1e-3)
