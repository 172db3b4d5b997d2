"""attn_mask_aggregate: every backend against the reference, forward and the gradients of q, k, m_ca."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastdense
from fastdense.ops import _attn_mask_aggregate_torch, reference
from fastdense.ops.attn_mask_aggregate import OP, attn_mask_aggregate

from _backends import (assert_compiled_matches_eager, assert_within_twice_the_reference_error, backend_params,
                       device_for)


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    h: int
    length: int
    d: int
    n: int
    per_head: bool = False  # m_ca (B, H, L, N) instead of (B, L, N)
    head_reduce: str = "mean"
    with_lse: bool = False

    def __str__(self):
        return (f"B{self.b}H{self.h}L{self.length}d{self.d}N{self.n}-{self.head_reduce}"
                f"{'-perhead' if self.per_head else ''}{'-lse' if self.with_lse else ''}")


CASES = [
    Case(1, 1, 77, 40, 7),                                     # CLIP's 77, SD 1.x head dim 40
    Case(2, 8, 33, 64, 5, per_head=True, head_reduce="sum"),
    Case(1, 8, 129, 80, 16, head_reduce="none"),               # odd L past two tiles, d = 80
    Case(2, 3, 50, 128, 128, per_head=True, with_lse=True),    # N = 128, d = 128
    Case(1, 2, 5, 64, 1, head_reduce="none", per_head=True, with_lse=True),
    # Few heads, several row tiles: the cpp backend splits a head's rows over
    # tasks, whose shares of out, dk and a shared dm_ca are added up.
    Case(1, 1, 300, 16, 3),
    Case(1, 2, 300, 24, 6, per_head=True, head_reduce="none"),
]


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype=dtype, device=device)

    lead = (case.b, case.h, case.length)
    # std 1.5 on q: peaked softmax rows, as trained attention has.
    q = rnd(*lead, case.d, std=1.5)
    k = rnd(*lead, case.d)
    m_shape = (case.b, case.h, case.length, case.n) if case.per_head else (case.b, case.length, case.n)
    m_ca = torch.softmax(rnd(*m_shape, std=2.0), dim=-1)  # normalised over N, as the paper's M_ca
    return dict(q=q, k=k, m_ca=m_ca, scale=case.d ** -0.5)


def true_lse(q, k, scale):
    return torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * scale, dim=-1)


def run(fn, inputs, case, grad_out=None, lse=None):
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in ("q", "k", "m_ca")}
    out = fn(leaves["q"], leaves["k"], leaves["m_ca"], inputs["scale"], lse=lse, head_reduce=case.head_reduce)
    grads = {}
    if grad_out is not None:
        out.backward(grad_out)
        grads = {n: t.grad for n, t in leaves.items()}
    return out, grads


def reference_fn(q, k, m_ca, scale, lse=None, head_reduce="mean"):
    return reference.attn_mask_aggregate(q, k, m_ca, scale, head_reduce)


def close(actual, expected, what, tol):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _interpreted(backend: str) -> bool:
    return backend == "triton" and not torch.cuda.is_available()


# The Triton interpreter runs every tile op in numpy: on CPU it gets the cases
# whose grid is small; the GPU runs all of them.
INTERPRETER_CASES = {str(CASES[0]), str(CASES[3]), str(CASES[4])}


def _out_shape(case):
    return ((case.b, case.h, case.length, case.n) if case.head_reduce == "none"
            else (case.b, case.length, case.n))


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference_fp32(backend, case):
    if _interpreted(backend) and str(case) not in INTERPRETER_CASES:
        pytest.skip("too large for the Triton interpreter; runs on the GPU")
    device = device_for(backend)
    inputs = make_inputs(case, device=device)
    ref_inputs = {n: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for n, v in inputs.items()}
    grad_out = torch.randn(_out_shape(case), dtype=torch.float64)
    ref_out, ref_grads = run(reference_fn, ref_inputs, case, grad_out)
    lse = true_lse(inputs["q"], inputs["k"], inputs["scale"]).float().to(device) if case.with_lse else None

    with fastdense.ops.backend(backend):
        out, grads = run(attn_mask_aggregate, inputs, case, grad_out.float().to(device), lse=lse)

    # Each output sums L products; gradients of q/k sum L·N of them.
    tol = 2e-5 * case.length ** 0.5
    assert out.shape == _out_shape(case) and out.dtype == torch.float32
    close(out.cpu(), ref_out, "forward", tol)
    for name, g in ref_grads.items():
        assert grads[name].shape == inputs[name].shape
        close(grads[name].cpu(), g, f"grad {name}", tol * case.n ** 0.5 * 4)


@pytest.mark.parametrize("backend", backend_params(OP))
def test_given_lse_equals_computed_lse(backend):
    """SDPA's log-sum-exp passed in gives what the op's own first pass gives, forward and backward."""
    case = Case(2, 2, 37, 40, 9, head_reduce="sum")
    device = device_for(backend)
    inputs = make_inputs(case, device=device, seed=3)
    grad_out = torch.randn(_out_shape(case), device=device)
    with fastdense.ops.backend(backend):
        out_a, grads_a = run(attn_mask_aggregate, inputs, case, grad_out)
        lse = true_lse(inputs["q"], inputs["k"], inputs["scale"]).float().to(device)
        out_b, grads_b = run(attn_mask_aggregate, inputs, case, grad_out, lse=lse)
    close(out_b, out_a, "forward", 1e-5)
    for name in grads_a:
        close(grads_b[name], grads_a[name], f"grad {name}", 1e-4)


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("head_reduce", ["mean", "sum", "none"])
def test_head_reduce_modes_relate(backend, head_reduce):
    """mean = sum / H = the per-head maps averaged, with H = 8 and a per-head m_ca."""
    if _interpreted(backend) and head_reduce != "sum":
        pytest.skip("the Triton interpreter checks one mode (all run on the GPU)")
    case = Case(1, 8, 19, 64, 6, per_head=True, head_reduce=head_reduce)
    device = device_for(backend)
    inputs = make_inputs(case, device=device, seed=5)
    with fastdense.ops.backend(backend):
        out = attn_mask_aggregate(inputs["q"], inputs["k"], inputs["m_ca"], inputs["scale"], head_reduce=head_reduce)
        per_head = attn_mask_aggregate(inputs["q"], inputs["k"], inputs["m_ca"], inputs["scale"], head_reduce="none")
    expected = {"mean": per_head.mean(1), "sum": per_head.sum(1), "none": per_head}[head_reduce]
    close(out, expected, head_reduce, 1e-5)
    # Each M_sa row sums to 1, so the map's total mass over j is Σ_i m_ca[i].
    totals = per_head.sum(dim=2)
    close(totals, inputs["m_ca"].sum(dim=2), "column mass", 1e-4)


def test_torch_backend_chunks_rows(monkeypatch):
    """Several query chunks (the memory bound) give what one chunk gives."""
    case = Case(2, 3, 41, 16, 5, head_reduce="sum", per_head=True)
    inputs = make_inputs(case)
    grad_out = torch.randn(_out_shape(case))
    with fastdense.ops.backend("torch"):
        out_one, grads_one = run(attn_mask_aggregate, inputs, case, grad_out)
        monkeypatch.setattr(_attn_mask_aggregate_torch, "CHUNK_ELEMENTS", 2 * 3 * 41 * 4)  # 4 rows a chunk
        assert _attn_mask_aggregate_torch._chunk_rows(2, 3, 41) == 4
        out_many, grads_many = run(attn_mask_aggregate, inputs, case, grad_out)
    close(out_many, out_one, "forward", 1e-5)
    for name in grads_one:
        close(grads_many[name], grads_one[name], f"grad {name}", 1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_float64(backend):
    impl = fastdense.ops.implementations(OP)[backend]
    if impl.machine_reasons():
        pytest.skip(f"{backend} unavailable: " + "; ".join(impl.machine_reasons()))
    for case in (Case(1, 2, 6, 3, 4, head_reduce="mean"), Case(2, 2, 5, 4, 3, per_head=True, head_reduce="none")):
        i = make_inputs(case, dtype=torch.float64)

        def f(q, k, m_ca):
            return attn_mask_aggregate(q, k, m_ca, i["scale"], head_reduce=case.head_reduce)

        with fastdense.ops.backend(backend):
            # fast_mode: random projections of the Jacobian, a few calls instead of one per input element.
            assert torch.autograd.gradcheck(f, [i[n].clone().requires_grad_(True) for n in ("q", "k", "m_ca")],
                                            fast_mode=True)


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("with_lse", [False, True], ids=["lse-computed", "lse-given"])
def test_opcheck(backend, with_lse):
    if _interpreted(backend) and with_lse:
        pytest.skip("the Triton interpreter checks one variant (both run on the GPU)")
    device = device_for(backend)
    case = Case(1, 2, 9, 8, 3)
    i = make_inputs(case, device=device)
    lse = true_lse(i["q"], i["k"], i["scale"]).float().to(device) if with_lse else None
    args = (i["q"].requires_grad_(True), i["k"].requires_grad_(True), i["m_ca"].requires_grad_(True),
            i["scale"], lse, "mean")
    with fastdense.ops.backend(backend):
        torch.library.opcheck(torch.ops.fastdense.attn_mask_aggregate.default, args)


def test_torch_compile_fullgraph_matches_eager():
    case = Case(2, 2, 13, 8, 4, per_head=True)
    i = make_inputs(case)

    def f(q, k, m_ca):
        out = attn_mask_aggregate(q, k, m_ca, i["scale"])
        return (out * out).sum()

    assert_compiled_matches_eager(f, [i["q"], i["k"], i["m_ca"]])


def test_m_ca_in_another_dtype_is_cast_like_the_reference():
    case = Case(1, 2, 11, 8, 3)
    i = make_inputs(case)
    out = attn_mask_aggregate(i["q"], i["k"], i["m_ca"].double(), i["scale"])
    expected = reference.attn_mask_aggregate(i["q"], i["k"], i["m_ca"].double(), i["scale"])
    assert out.dtype == torch.float32
    close(out, expected, "forward", 1e-5)


def test_autocast_runs_in_the_autocast_dtype():
    case = Case(1, 2, 11, 8, 3)
    i = make_inputs(case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn_mask_aggregate(i["q"], i["k"], i["m_ca"], i["scale"])
    assert out.dtype == torch.bfloat16
    close(out.float(), reference.attn_mask_aggregate(i["q"], i["k"], i["m_ca"], i["scale"]), "autocast", 0.05)


# ----------------------------------------------------------------------------- bad input
def _good():
    return make_inputs(Case(2, 3, 7, 8, 4))


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda i: i.update(q=i["q"][0]), ValueError, ["q", "(B, H, L, d)"]),
    (lambda i: i.update(k=i["k"][..., :-1]), ValueError, ["k", "shape of q", "d=8"]),
    (lambda i: i.update(k=i["k"].double()), TypeError, ["k", "dtype"]),
    (lambda i: i.update(m_ca=i["m_ca"][:, :-1]), ValueError, ["m_ca", "(B=2, L=7, N)", "(B=2, H=3, L=7, N)"]),
    (lambda i: i.update(m_ca=i["m_ca"][:, None].expand(2, 2, 7, 4)), ValueError, ["m_ca", "H=3"]),
    (lambda i: i.update(m_ca=i["m_ca"][0, 0]), ValueError, ["m_ca"]),
    (lambda i: i.update(lse=torch.zeros(2, 3)), ValueError, ["lse", "(B=2, H=3, L=7)"]),
    (lambda i: i.update(lse=torch.zeros(2, 3, 7, dtype=torch.long)), TypeError, ["lse", "floating"]),
    (lambda i: i.update(q=i["q"].long(), k=i["k"].long()), TypeError, ["q", "floating"]),
    (lambda i: i.update(m_ca="M"), TypeError, ["m_ca", "torch.Tensor"]),
    (lambda i: i.update(scale="0.1"), TypeError, ["scale"]),
    (lambda i: i.update(scale=float("nan")), TypeError, ["scale", "finite"]),
    (lambda i: i.update(head_reduce="max"), ValueError, ["head_reduce", "'mean', 'sum' or 'none'"]),
    (lambda i: i.update(m_ca=i["m_ca"].to("meta")), ValueError, ["m_ca", "device"]),
    (lambda i: i.update(q=i["q"][:, :, :0], k=i["k"][:, :, :0], m_ca=i["m_ca"][:, :0]), ValueError, ["L >= 1"]),
])
def test_bad_input_names_the_argument(mutate, exc, words):
    i = _good()
    i["lse"], i["head_reduce"] = None, "mean"
    mutate(i)
    with pytest.raises(exc) as info:
        attn_mask_aggregate(i["q"], i["k"], i["m_ca"], i["scale"], lse=i["lse"], head_reduce=i["head_reduce"])
    for w in words:
        assert w in str(info.value)


def test_forced_backend_that_cannot_run_explains():
    i = _good()
    with fastdense.ops.backend("cpp"), pytest.raises(fastdense.ops.BackendNotSupportedError, match="cpp"):
        attn_mask_aggregate(i["q"].half(), i["k"].half(), i["m_ca"], i["scale"])


# ----------------------------------------------------------------------------- low precision (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("backend", [p for p in backend_params(OP) if p.values[0] in ("triton", "torch")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [Case(2, 8, 1024, 40, 77), Case(1, 5, 257, 64, 40, per_head=True, head_reduce="sum"),
                                  Case(1, 8, 129, 80, 128, head_reduce="none", with_lse=True),
                                  Case(1, 2, 300, 128, 20)], ids=str)
def test_low_precision_error_within_twice_the_reference_error(backend, dtype, case):
    """flash-attn's rule: error vs an fp32 reference <= 2x the error of the reference run in that dtype."""
    inputs = make_inputs(case, device="cuda")
    low = {n: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for n, v in inputs.items()}
    grad32 = torch.randn(_out_shape(case), device="cuda")
    ref32, ref32_grads = run(reference_fn, inputs, case, grad32)
    ref_low, ref_low_grads = run(reference_fn, low, case, grad32.to(dtype))
    lse = true_lse(low["q"], low["k"], low["scale"]).float() if case.with_lse else None
    with fastdense.ops.backend(backend):
        out, grads = run(attn_mask_aggregate, low, case, grad32.to(dtype), lse=lse)
    assert out.dtype == dtype

    assert_within_twice_the_reference_error((out, grads), (ref32, ref32_grads), (ref_low, ref_low_grads), 1e-3)
