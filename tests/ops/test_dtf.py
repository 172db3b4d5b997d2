"""ta_lora_dtf and dynamic_task_filter: every backend against the reference, forward and every gradient."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fastdense
from fastdense import _triton
from fastdense.ops import reference
from fastdense.ops.dtf import OP, OP_DTF, dynamic_task_filter, ta_lora_dtf

from _backends import assert_compiled_matches_eager, backend_params, device_for


@dataclasses.dataclass(frozen=True)
class Case:
    tasks: int
    batch: int
    hw: tuple
    c: int
    cout: int
    r: int
    window: int = 0
    filter: str = "dynamic"
    shared_f: bool = False     # one input f (B, N, C) read by every task
    shared_base: bool = False  # one base output (B, N, C_out) for every task
    bias: bool = True          # phi_bias / fn_mean (dynamic) or static_bias (static)
    k: int = 3

    def __str__(self):
        flags = "".join(f for f, on in (("-sf", self.shared_f), ("-sb", self.shared_base), ("-nob", not self.bias))
                        if on)
        return (f"T{self.tasks}B{self.batch}_{self.hw[0]}x{self.hw[1]}w{self.window}_C{self.c}-{self.cout}"
                f"_r{self.r}k{self.k}_{self.filter}{flags}")


CASES = [
    Case(1, 2, (7, 9), 12, 10, 4),                                    # odd map, T = 1
    Case(3, 1, (14, 14), 16, 8, 16, window=7),                        # 7x7 windows, H, W multiples of 7
    Case(2, 2, (9, 10), 8, 6, 4, window=7),                           # clipped windows
    Case(5, 1, (7, 9), 8, 6, 4, shared_f=True, shared_base=True),     # T = 5, one shared input
    Case(4, 1, (5, 6), 70, 12, 64, shared_base=True, bias=False),     # r = 64, no phi bias / mean
    Case(2, 2, (7, 9), 8, 6, 4, filter="static"),
    Case(3, 1, (9, 10), 8, 6, 4, window=7, filter="static", shared_f=True, bias=False),
    Case(2, 1, (14, 14), 8, 6, 16, window=7, filter="static", shared_base=True),
    Case(2, 1, (6, 7), 8, 6, 4, k=5),                                 # 5x5 filter
]


# The Triton interpreter runs every tile op in numpy: on CPU it gets a subset
# covering windows (clipped), T = 5 with a shared input, r = 64 and the static filter.
INTERPRETER_CASES = {CASES[2], CASES[3], CASES[4], CASES[7]}


def _skip_in_interpreter(backend, keep: bool) -> None:
    if backend == "triton" and _triton.interpreting() and not keep:
        pytest.skip("Triton interpreter: covered by a subset of the cases (all run on a GPU)")


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype=dtype, device=device)

    n = case.hw[0] * case.hw[1]
    kk = case.k * case.k
    t, b, r = case.tasks, case.batch, case.r
    d = dict(
        f=rnd(b, n, case.c) if case.shared_f else rnd(t, b, n, case.c),
        base_out=rnd(b, n, case.cout) if case.shared_base else rnd(t, b, n, case.cout),
        lora_a=rnd(r, case.c, std=case.c ** -0.5),
        lora_b=rnd(case.cout, r, std=r ** -0.5),
    )
    if case.filter == "dynamic":
        d.update(phi_weight=rnd(r * kk, r, std=r ** -0.5), phi_bias=rnd(r * kk, std=0.5) if case.bias else None,
                 fn_std=rnd(r * kk, std=0.5), fn_mean=rnd(r * kk, std=0.5) if case.bias else None)
    else:
        d.update(static_weight=rnd(t, r, case.k, case.k, std=0.5), static_bias=rnd(t, r) if case.bias else None)
    return d


SCALE = 0.75


def reference_fn(case: Case, d: dict) -> torch.Tensor:
    """The reference written like the equations; the per-task static case composes static_task_filter."""
    t = case.tasks
    f = d["f"].expand(t, *d["f"].shape) if case.shared_f else d["f"]
    base = d["base_out"].expand(t, *d["base_out"].shape) if case.shared_base else d["base_out"]
    if case.filter == "dynamic" and case.k == 3:
        return reference.ta_lora_dtf(f, base, d["lora_a"], d["lora_b"], SCALE, case.hw, d["phi_weight"],
                                     d["phi_bias"], d["fn_std"], d["fn_mean"], case.window)
    if case.filter == "dynamic":  # reference.ta_lora_dtf is written for k = 3; compose its DTF for other k
        h = (f @ d["lora_a"].t()).reshape(t * case.batch, -1, case.r)
        filtered, _ = reference.dynamic_task_filter(h, case.hw, d["phi_weight"], d["phi_bias"], d["fn_std"],
                                                    d["fn_mean"], case.window, kernel_size=case.k)
        return base + SCALE * filtered.reshape(*f.shape[:-1], case.r) @ d["lora_b"].t()
    outs = []
    for i in range(t):
        h = f[i] @ d["lora_a"].t()
        bias = None if d["static_bias"] is None else d["static_bias"][i]
        filtered = reference.static_task_filter(h, case.hw, d["static_weight"][i], bias, case.window)
        outs.append(base[i] + SCALE * filtered @ d["lora_b"].t())
    return torch.stack(outs)


def fused_fn(case: Case, d: dict) -> torch.Tensor:
    common = dict(window=case.window, num_tasks=case.tasks)
    if case.filter == "dynamic":
        return ta_lora_dtf(d["f"], d["base_out"], d["lora_a"], d["lora_b"], SCALE, case.hw, d["phi_weight"],
                           d["phi_bias"], d["fn_std"], d["fn_mean"], **common)
    return ta_lora_dtf(d["f"], d["base_out"], d["lora_a"], d["lora_b"], SCALE, case.hw, filter="static",
                       static_weight=d["static_weight"], static_bias=d["static_bias"], **common)


def run(fn, case, inputs, grad_out=None):
    leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    out = fn(case, leaves)
    grads = {}
    if grad_out is not None:
        out.backward(grad_out)
        grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return out, grads


def close(actual, expected, what, tol):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _tol(case: Case) -> float:
    # fp32 against a float64 reference: the error grows with the reductions
    # (C in the down-projection, r in the up-projection and φ, the map in GAP / dθ).
    n = case.hw[0] * case.hw[1]
    return 2e-5 * max(case.c, case.r, n ** 0.5) ** 0.5 * 4


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference_fp32(backend, case):
    _skip_in_interpreter(backend, case in INTERPRETER_CASES)
    device = device_for(backend)
    inputs = make_inputs(case, device=device)
    ref_inputs = {k: (v.double().cpu() if v is not None else None) for k, v in inputs.items()}
    ref_out, _ = run(reference_fn, case, ref_inputs)
    grad_out = torch.randn(ref_out.shape, dtype=torch.float64)
    ref_out, ref_grads = run(reference_fn, case, ref_inputs, grad_out)

    with fastdense.ops.backend(backend):
        out, grads = run(fused_fn, case, inputs, grad_out.float().to(device))

    tol = _tol(case)
    assert out.shape == (case.tasks, case.batch, case.hw[0] * case.hw[1], case.cout)
    close(out.cpu(), ref_out, "forward", tol)
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        scale = max(1.0, g.abs().max().item())
        close(grads[name].cpu() / scale, g / scale, f"grad {name}", tol * 4)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_float64(backend):
    impl = fastdense.ops.implementations(OP)[backend]
    if impl.machine_reasons():
        pytest.skip(f"{backend} unavailable: " + "; ".join(impl.machine_reasons()))
    for case in (Case(2, 1, (4, 5), 3, 2, 2, window=3), Case(2, 1, (3, 4), 3, 2, 2, filter="static", shared_f=True)):
        d = make_inputs(case, dtype=torch.float64)
        names = [k for k, v in d.items() if v is not None]

        def f(*tensors):
            return fused_fn(case, dict(d, **dict(zip(names, tensors))))

        with fastdense.ops.backend(backend):
            assert torch.autograd.gradcheck(f, [d[k].clone().requires_grad_(True) for k in names], fast_mode=True)


# ----------------------------------------------------------------------------- the DTF alone
DTF_CASES = [((7, 9), 0, 4, 2), ((14, 14), 7, 16, 1), ((9, 10), 7, 4, 3), ((5, 6), 0, 64, 1)]


@pytest.mark.parametrize("backend", backend_params(OP_DTF))
@pytest.mark.parametrize("hw,window,r,s", DTF_CASES, ids=lambda v: str(v))
def test_dynamic_task_filter_matches_reference(backend, hw, window, r, s):
    _skip_in_interpreter(backend, (hw, window) == ((9, 10), 7))
    device = device_for(backend)
    g = torch.Generator().manual_seed(1)
    n, kk = hw[0] * hw[1], 9
    raw = dict(h=torch.randn(s, n, r, generator=g, dtype=torch.float64),
               phi_weight=torch.randn(r * kk, r, generator=g, dtype=torch.float64) * r ** -0.5,
               phi_bias=torch.randn(r * kk, generator=g, dtype=torch.float64) * 0.5,
               fn_std=torch.randn(r * kk, generator=g, dtype=torch.float64) * 0.5,
               fn_mean=torch.randn(r * kk, generator=g, dtype=torch.float64) * 0.5)
    ref = {k: v.clone().requires_grad_(True) for k, v in raw.items()}
    ours = {k: v.float().to(device).requires_grad_(True) for k, v in raw.items()}
    ref_out, ref_theta = reference.dynamic_task_filter(ref["h"], hw, ref["phi_weight"], ref["phi_bias"],
                                                       ref["fn_std"], ref["fn_mean"], window)
    with fastdense.ops.backend(backend):
        out, theta = dynamic_task_filter(ours["h"], hw, ours["phi_weight"], ours["phi_bias"], ours["fn_std"],
                                         ours["fn_mean"], window, return_theta=True)
    tol = 1e-4
    close(out.cpu(), ref_out.detach(), "out", tol)
    close(theta.cpu(), ref_theta.detach(), "theta", tol)
    # A loss reaching θ directly too, so the op's θ output is differentiable.
    g_out = torch.randn(out.shape, dtype=torch.float64)
    g_theta = torch.randn(theta.shape, dtype=torch.float64)
    ((ref_out * g_out).sum() + (ref_theta * g_theta).sum()).backward()
    ((out * g_out.float().to(device)).sum() + (theta * g_theta.float().to(device)).sum()).backward()
    for k in raw:
        scale = max(1.0, ref[k].grad.abs().max().item())
        close(ours[k].grad.cpu() / scale, ref[k].grad / scale, f"grad {k}", tol * 4)


def test_dynamic_filter_is_the_grouped_conv_trick():
    """θ ⊛ h on the whole map is TADFormer's F.conv2d(x.reshape(1, B·r, H, W), θ, groups=B·r)."""
    b, r, hw = 3, 4, (7, 9)
    h = torch.randn(b, hw[0] * hw[1], r, dtype=torch.float64)
    pw, pb = torch.randn(r * 9, r, dtype=torch.float64), torch.randn(r * 9, dtype=torch.float64)
    std, mean = torch.randn(r * 9, dtype=torch.float64), torch.randn(r * 9, dtype=torch.float64)
    out, theta = dynamic_task_filter(h, hw, pw, pb, std, mean, return_theta=True)
    x = h.transpose(1, 2).reshape(1, b * r, *hw)
    expected = F.conv2d(x, theta.reshape(b * r, 1, 3, 3), padding=1, groups=b * r)
    torch.testing.assert_close(out, expected.reshape(b, r, -1).transpose(1, 2), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- opcheck, compile
def _opcheck_device(backend):
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("filt", ["dynamic", "static"])
def test_opcheck(backend, filt):
    _skip_in_interpreter(backend, filt == "dynamic")
    case = Case(2, 1, (5, 6), 6, 5, 4, window=4, filter=filt, shared_base=True)
    d = make_inputs(case, device=_opcheck_device(backend))
    for v in d.values():
        if v is not None:
            v.requires_grad_(True)
    f4 = d["f"]
    base = d["base_out"].unsqueeze(0)
    args = (f4, base, d["lora_a"], d["lora_b"], SCALE, list(case.hw), case.window, case.tasks, 3,
            d.get("phi_weight"), d.get("phi_bias"), d.get("fn_std"), d.get("fn_mean"),
            d.get("static_weight"), d.get("static_bias"))
    with fastdense.ops.backend(backend):
        torch.library.opcheck(torch.ops.fastdense.ta_lora_dtf.default, args)


@pytest.mark.parametrize("backend", backend_params(OP_DTF))
def test_opcheck_dynamic_task_filter(backend):
    device = _opcheck_device(backend)
    r = 4
    args = (torch.randn(2, 30, r, device=device, requires_grad=True), [5, 6], 4, 3,
            torch.randn(r * 9, r, device=device, requires_grad=True), torch.randn(r * 9, device=device),
            torch.randn(r * 9, device=device, requires_grad=True), None)
    with fastdense.ops.backend(backend):
        torch.library.opcheck(torch.ops.fastdense.dynamic_task_filter.default, args)


def test_torch_compile_fullgraph_matches_eager():
    case = Case(3, 1, (7, 9), 8, 6, 4, window=7)
    d = make_inputs(case)
    names = ["f", "lora_a", "lora_b", "phi_weight", "fn_std"]

    def loss(*tensors):
        out = fused_fn(case, dict(d, **dict(zip(names, tensors))))
        return (out * out).sum()

    assert_compiled_matches_eager(loss, [d[k] for k in names])


def test_shared_input_dynamic_gives_equal_task_updates():
    """With one input for all tasks the (task-shared) DTF gives every task the same update."""
    case = Case(3, 2, (7, 9), 8, 6, 4, shared_f=True)
    d = make_inputs(case)
    out = fused_fn(case, d)
    updates = out - d["base_out"]
    torch.testing.assert_close(updates[1], updates[0])
    torch.testing.assert_close(updates[2], updates[0])


# ----------------------------------------------------------------------------- bad input
def _good():
    case = CASES[2]
    return case, make_inputs(case)


@pytest.mark.parametrize("change,error,match", [
    (dict(lora_a=torch.randn(4, 9)), ValueError, "lora_a must have shape"),
    (dict(lora_b=torch.randn(6, 5)), ValueError, "lora_b must have shape"),
    (dict(phi_weight=torch.randn(30, 4)), ValueError, "phi_weight"),
    (dict(fn_std=torch.randn(35)), ValueError, "fn_std must have shape"),
    (dict(base_out=torch.randn(3, 2, 90, 6)), ValueError, "base_out must have shape"),
    (dict(f=torch.randn(2, 2, 90, 8, dtype=torch.float64)), TypeError, "dtype"),
    (dict(f=torch.randn(2, 2, 90, 8).int()), TypeError, "floating"),
    (dict(hw=(9, 9)), ValueError, "hw"),
    (dict(window=-1), ValueError, "window"),
])
def test_bad_input_names_the_argument(change, error, match):
    case, d = _good()
    d = dict(d)
    hw = change.pop("hw", case.hw) if "hw" in change else case.hw
    window = change.pop("window", case.window) if "window" in change else case.window
    d.update(change)
    with pytest.raises(error, match=match):
        ta_lora_dtf(d["f"], d["base_out"], d["lora_a"], d["lora_b"], SCALE, hw, d["phi_weight"], d["phi_bias"],
                    d["fn_std"], d["fn_mean"], window)


def test_bad_filter_arguments():
    case, d = _good()
    with pytest.raises(ValueError, match="filter must be one of"):
        ta_lora_dtf(d["f"], d["base_out"], d["lora_a"], d["lora_b"], SCALE, case.hw, filter="conv")
    with pytest.raises(ValueError, match="static_weight must have shape"):
        ta_lora_dtf(d["f"], d["base_out"], d["lora_a"], d["lora_b"], SCALE, case.hw, filter="static",
                    static_weight=torch.randn(3, 4, 3, 3))
    with pytest.raises(ValueError, match="num_tasks is required"):
        ta_lora_dtf(d["f"][0], d["base_out"][0], d["lora_a"], d["lora_b"], SCALE, case.hw, d["phi_weight"],
                    None, d["fn_std"], None)
    # a num_tasks that disagrees with f names f, the argument whose task axis it contradicts
    with pytest.raises(ValueError, match=r"num_tasks=7 but f has T = \d+ tasks"):
        ta_lora_dtf(d["f"], d["base_out"], d["lora_a"], d["lora_b"], SCALE, case.hw, d["phi_weight"],
                    None, d["fn_std"], None, num_tasks=7)
    with pytest.raises(ValueError, match="h must have shape"):
        dynamic_task_filter(torch.randn(90, 4), case.hw, d["phi_weight"], None, d["fn_std"], None)
