"""q_sample_multi: every backend against the reference, forward and the z0 / noise gradients."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastdense
from fastdense.ops import reference
from fastdense.ops.q_sample_multi import OP, q_sample_multi

from _backends import assert_compiled_matches_eager, backend_params, device_for

T_TRAIN = 1000


def schedule(dtype=torch.float64, device="cpu"):
    """Stable Diffusion's scaled-linear ᾱ (β from 0.00085 to 0.012 over 1000 steps)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T_TRAIN, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).to(dtype=dtype, device=device)


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple  # (B, C, h, w)
    timesteps: tuple
    layout: str = "timestep"
    shared: bool = False

    def __str__(self):
        return (f"{'x'.join(map(str, self.shape))}_t{'-'.join(map(str, self.timesteps))}_{self.layout}"
                f"{'_shared' if self.shared else ''}")


CASES = [
    Case((1, 4, 7, 5), (0,)),                                    # k = 1, t = 0
    Case((1, 4, 7, 5), (999,), "sample", shared=True),           # k = 1, last step
    Case((3, 3, 7, 5), (1, 100, 200, 300)),                      # the paper's initial set, B = 3
    Case((3, 3, 7, 5), (1, 100, 200, 300), "sample"),
    Case((3, 4, 1, 1), (5, 5, 17), shared=True),                 # 1x1 latents, repeated timestep
    Case((3, 4, 1, 1), (5, 5, 17), "sample", shared=True),
    Case((1, 3, 7, 5), (999, 0, 500, 250, 750, 3), shared=True),  # k = 6
    Case((2, 4, 7, 5), (10, 20, 30, 40, 50, 60, 70, 80), "sample"),  # k = 8
]


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    k = len(case.timesteps)
    z0 = torch.randn(case.shape, generator=g, dtype=torch.float64)
    noise = torch.randn(case.shape if case.shared else (k, *case.shape), generator=g, dtype=torch.float64)
    ts = torch.tensor(case.timesteps, dtype=torch.int64, device=device)
    return z0.to(dtype=dtype, device=device), noise.to(dtype=dtype, device=device), ts


def run(fn, z0, noise, ts, alphas, layout, grad_out=None):
    """Forward, and backward when grad_out is given; returns (out, dz0, dnoise)."""
    z0 = z0.detach().clone().requires_grad_(True)
    noise = noise.detach().clone().requires_grad_(True)
    out = fn(z0, noise, ts, alphas, layout)
    if grad_out is None:
        return out, None, None
    out.backward(grad_out)
    return out, z0.grad, noise.grad


def close(actual, expected, what, tol):
    torch.testing.assert_close(actual.cpu(), expected.to(actual.dtype).cpu(), atol=tol, rtol=tol,
                               msg=lambda m: f"{what}: {m}")


def check_against_reference(backend, case, seed=0):
    device = device_for(backend)
    z0, noise, ts = make_inputs(case, device=device, seed=seed)
    k, batch = len(case.timesteps), case.shape[0]
    grad_out = torch.randn(k * batch, *case.shape[1:], dtype=torch.float64,
                           generator=torch.Generator().manual_seed(seed + 1))
    ref, ref_dz, ref_dn = run(reference.q_sample_multi, z0.double().cpu(), noise.double().cpu(), ts.cpu(),
                              schedule(), case.layout, grad_out)
    with fastdense.ops.backend(backend):
        out, dz, dn = run(q_sample_multi, z0, noise, ts, schedule(torch.float32, device), case.layout,
                          grad_out.float().to(device))
    assert out.shape == (k * batch, *case.shape[1:]) and out.dtype == torch.float32
    close(out, ref, f"forward {case}", 1e-5)
    assert dz.shape == z0.shape and dn.shape == noise.shape
    close(dz, ref_dz, f"grad z0 {case}", 2e-5 * k)
    close(dn, ref_dn, f"grad noise {case}", 2e-5 * k)


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference_fp32(backend, case):
    check_against_reference(backend, case)


@pytest.mark.parametrize("backend", backend_params(OP))
def test_every_k_from_1_to_8(backend):
    """k = 1..8 in both layouts and both noise modes, random (possibly repeated) timesteps."""
    g = torch.Generator().manual_seed(3)
    for k in range(1, 9):
        ts = tuple(torch.randint(0, T_TRAIN, (k,), generator=g).tolist())
        for layout in ("timestep", "sample"):
            for shared in (False, True):
                check_against_reference(backend, Case((2, 3, 5, 3), ts, layout, shared), seed=k)


@pytest.mark.parametrize("backend", backend_params(OP))
def test_non_contiguous_inputs_and_int32_fp64_schedule(backend):
    """channels_last z0, a strided noise slice, int32 timesteps and a float64 ᾱ."""
    device = device_for(backend)
    z0 = torch.randn(3, 4, 7, 5, device=device).to(memory_format=torch.channels_last)
    noise = torch.randn(4, 3, 4, 7, 10, device=device)[..., ::2]
    assert not z0.is_contiguous() and not noise.is_contiguous()
    ts = torch.tensor([3, 900, 3, 41], dtype=torch.int32, device=device)
    alphas = schedule(torch.float64, device)
    expected = reference.q_sample_multi(z0, noise, ts, alphas, "sample")
    with fastdense.ops.backend(backend):
        out = q_sample_multi(z0, noise, ts, alphas, "sample")
    close(out, expected, "forward", 1e-6)


@pytest.mark.parametrize("backend", backend_params(OP))
def test_timesteps_from_the_host(backend):
    """Timesteps as a list or a CPU tensor with latents elsewhere (checked on the host, then moved)."""
    device = device_for(backend)
    z0, noise, _ = make_inputs(CASES[2], device=device)
    alphas = schedule(torch.float32, device)
    expected = reference.q_sample_multi(z0, noise, torch.tensor(CASES[2].timesteps, device=device), alphas)
    with fastdense.ops.backend(backend):
        from_list = q_sample_multi(z0, noise, list(CASES[2].timesteps), alphas)
        from_cpu = q_sample_multi(z0, noise, torch.tensor(CASES[2].timesteps), alphas)
    close(from_list, expected, "list", 1e-6)
    close(from_cpu, expected, "cpu tensor", 1e-6)


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 7, 5), (2, 4, 8, 8)], ids=["odd", "vec8"])  # N % 8 != 0 and == 0
def test_low_precision_error_within_twice_the_reference_error(backend, dtype, shape):
    """flash-attn's rule against an fp32 reference; coefficients are computed in fp32, so usually better."""
    device = device_for(backend)
    if backend == "triton" and dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the Triton interpreter has no bf16")
    case = Case(shape, (1, 100, 999, 500), "sample")
    z0, noise, ts = make_inputs(case, device=device)
    alphas = schedule(torch.float32, device)
    grad = torch.randn(4 * shape[0], *shape[1:], device=device)
    ref32 = run(reference.q_sample_multi, z0, noise, ts, alphas, case.layout, grad)
    ref_low = run(reference.q_sample_multi, z0.to(dtype), noise.to(dtype), ts, alphas, case.layout, grad.to(dtype))
    with fastdense.ops.backend(backend):
        low = run(q_sample_multi, z0.to(dtype), noise.to(dtype), ts, alphas, case.layout, grad.to(dtype))
    for name, a, r, r_low in zip(("forward", "grad z0", "grad noise"), low, ref32, ref_low):
        assert a.dtype == dtype
        err = (a.float() - r).abs().max().item()
        assert err <= 2 * (r_low.float() - r).abs().max().item() + 1e-3, name


@pytest.mark.parametrize("backend", [p for p in backend_params(OP) if p.values[0] in ("torch", "cpp")])
def test_gradcheck_float64(backend):
    alphas = schedule()
    for case in (Case((2, 3, 2, 1), (7, 500, 7)), Case((2, 3, 2, 1), (7, 500, 7), "sample", shared=True)):
        z0, noise, ts = make_inputs(case, dtype=torch.float64)

        def f(z, e):
            return q_sample_multi(z, e, ts, alphas, case.layout)

        with fastdense.ops.backend(backend):
            assert torch.autograd.gradcheck(f, (z0.requires_grad_(True), noise.requires_grad_(True)))


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("shared", [False, True], ids=["per-step", "shared"])
def test_opcheck(backend, shared):
    device = device_for(backend)
    z0 = torch.randn(3, 35, device=device, requires_grad=True)
    noise = torch.randn(1 if shared else 4, 3, 35, device=device, requires_grad=True)
    ts = torch.tensor([1, 999, 1, 400], device=device)
    args = (z0, noise, ts, schedule(torch.float32, device), True)
    with fastdense.ops.backend(backend):
        torch.library.opcheck(torch.ops.fastdense.q_sample_multi.default, args)


def test_torch_compile_fullgraph_matches_eager():
    z0, noise, ts = make_inputs(CASES[3])
    alphas = schedule(torch.float32)

    def f(z, e):
        out = q_sample_multi(z, e, ts, alphas, "sample")
        return (out * out).sum()

    assert_compiled_matches_eager(f, [z0, noise])


@pytest.mark.parametrize("backend", backend_params(OP))
def test_eager_no_grad_fast_path_equals_the_operator(backend):
    """Plain no-grad eager calls skip the torch.library wrapper; traced or differentiated ones must not."""
    import importlib
    mod = importlib.import_module("fastdense.ops.q_sample_multi")  # the module, not the function it exports

    device = device_for(backend)
    z0, noise, ts = make_inputs(CASES[3], device=device)
    alphas = schedule(torch.float32, device)
    assert mod._eager_fast_path(z0, noise)
    assert not mod._eager_fast_path(z0.requires_grad_(True), noise)
    with torch.no_grad():
        assert mod._eager_fast_path(z0, noise)
    z0 = z0.detach()
    mode = torch._subclasses.FakeTensorMode()
    fake_z0, fake_noise = mode.from_tensor(z0), mode.from_tensor(noise)
    with mode:
        assert not mod._eager_fast_path(fake_z0, fake_noise)
    with fastdense.ops.backend(backend):
        with torch.no_grad():
            fast = q_sample_multi(z0, noise, ts, alphas, "sample")
            via_op = torch.ops.fastdense.q_sample_multi(z0.reshape(3, -1), noise.reshape(4, 3, -1), ts, alphas, True)
    torch.testing.assert_close(fast, via_op.view_as(fast), atol=0, rtol=0)


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("case", [CASES[3], CASES[5]], ids=str)
def test_eager_autograd_path_equals_the_operator(backend, case):
    """Plain eager calls that need gradients run the backend under an autograd.Function
    (cheaper than the torch.library wrapper): same outputs and gradients as the operator."""
    import importlib
    mod = importlib.import_module("fastdense.ops.q_sample_multi")

    device = device_for(backend)
    z0, noise, ts = make_inputs(case, device=device)
    alphas = schedule(torch.float32, device)
    k, batch = len(case.timesteps), case.shape[0]
    grad_out = torch.randn(k * batch, *case.shape[1:], device=device)
    assert mod._eager_autograd_path(z0.requires_grad_(True), noise)
    assert not mod._eager_fast_path(z0, noise)
    with torch.no_grad():
        assert not mod._eager_autograd_path(z0, noise)
    steps = 1 if case.shared else k
    sample_major = case.layout == "sample"

    def via_op(z, e, t, a, layout):
        out = torch.ops.fastdense.q_sample_multi(z.reshape(batch, -1), e.reshape(steps, batch, -1), t, a,
                                                 sample_major)
        return out.view(k * batch, *case.shape[1:])

    with fastdense.ops.backend(backend):
        fast, fast_dz, fast_dn = run(q_sample_multi, z0, noise, ts, alphas, case.layout, grad_out)
        op, op_dz, op_dn = run(via_op, z0, noise, ts, alphas, case.layout, grad_out)
    # The public function's output is a view of what the autograd.Function returned.
    assert "EagerAutograd" in type(fast.grad_fn.next_functions[0][0]).__name__
    for got, want in ((fast, op), (fast_dz, op_dz), (fast_dn, op_dn)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_schedule_gets_no_gradient_and_z0_only_needs_no_noise_grad():
    z0, noise, ts = make_inputs(CASES[2])
    alphas = schedule(torch.float32).requires_grad_(True)
    z0.requires_grad_(True)
    q_sample_multi(z0, noise, ts, alphas).sum().backward()
    assert alphas.grad is None and noise.grad is None
    # d/dz0 of the sum is Σ_i √ᾱ_{t_i}, for every element.
    expected = schedule(torch.float32)[ts].sqrt().sum()
    torch.testing.assert_close(z0.grad, expected.expand_as(z0))


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("shape, k", [((0, 4, 3, 3), 2), ((2, 4, 3, 3), 0)], ids=["B=0", "k=0"])
def test_empty_batch_or_no_timesteps(backend, shape, k):
    device = device_for(backend)
    z0 = torch.randn(shape, device=device, requires_grad=True)
    noise = torch.randn(shape, device=device, requires_grad=True)
    ts = torch.arange(k, device=device) * 10
    with fastdense.ops.backend(backend):
        out = q_sample_multi(z0, noise, ts, schedule(torch.float32, device))
        out.sum().backward()
    assert out.shape == (k * shape[0], *shape[1:])
    assert torch.equal(z0.grad, torch.zeros_like(z0)) and torch.equal(noise.grad, torch.zeros_like(noise))


# ----------------------------------------------------------------------------- out-of-range timesteps
@pytest.mark.parametrize("bad", [-1, T_TRAIN])
def test_out_of_range_timesteps_raise_on_the_host(bad):
    z0, noise, _ = make_inputs(CASES[2])
    for ts in (torch.tensor([1, bad, 3, 4]), [1, bad, 3, 4]):
        with pytest.raises(ValueError, match=rf"timesteps must lie in \[0, len\(alphas_cumprod\)\).*{bad}"):
            q_sample_multi(z0, noise, ts, schedule(torch.float32))


@pytest.mark.parametrize("backend", [p for p in backend_params(OP) if p.values[0] == "cpp"])
def test_cpp_kernel_checks_the_range_itself(backend):
    with pytest.raises(ValueError, match=r"timesteps\[1\] = 1000"):
        torch.ops.fastdense._q_sample_multi_fwd(torch.randn(2, 3), torch.randn(1, 2, 3), torch.tensor([1, 1000]),
                                                schedule(torch.float32), False)


def test_device_kernels_write_nan_rows_for_out_of_range_timesteps():
    """What the GPU backends do with device timesteps the host does not read: stay in bounds, write NaN."""
    import importlib
    mod = importlib.import_module("fastdense.ops.q_sample_multi")
    from fastdense.ops import _q_sample_multi_torch

    # The backends' own functions, below the operator's host-side range check.
    impls = {"torch": (_q_sample_multi_torch.forward, "cpu")}
    available = {name: not impl.machine_reasons() for name, impl in fastdense.ops.implementations(OP).items()}
    if available["triton"]:
        from fastdense.kernels import q_sample_multi as kernels
        impls["triton"] = (kernels.forward, device_for("triton"))
    if available["cuda"]:
        impls["cuda"] = (mod._ext_forward, "cuda")
    for name, (fwd, device) in impls.items():
        z0, noise = torch.randn(2, 8, device=device), torch.randn(3, 2, 8, device=device)
        ts = torch.tensor([4, -3, T_TRAIN + 7], device=device)
        alphas = schedule(torch.float32, device)
        out = fwd(z0, noise, ts, alphas, False)
        assert torch.isnan(out[2:]).all(), name
        close(out[:2], reference.q_sample_multi(z0, noise[:1], ts[:1], alphas), f"valid rows {name}", 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [p for p in backend_params(OP) if p.values[0] in ("cuda", "triton", "torch")])
def test_gpu_out_of_range_device_timesteps_give_nan_rows(backend):
    z0, noise = torch.randn(2, 4, 8, 8, device="cuda"), torch.randn(2, 4, 8, 8, device="cuda")
    ts = torch.tensor([10, T_TRAIN], device="cuda")
    with fastdense.ops.backend(backend):
        out = q_sample_multi(z0, noise, ts, schedule(torch.float32, "cuda"))
    assert torch.isnan(out[2:]).all() and torch.isfinite(out[:2]).all()


# ----------------------------------------------------------------------------- bad input
def _good():
    z0, noise, ts = make_inputs(CASES[2])
    return dict(z0=z0, noise=noise, timesteps=ts, alphas_cumprod=schedule(torch.float32), layout="timestep")


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda a: a.update(noise=a["noise"][:3]), ValueError, ["noise", "(k=4, *z0.shape)", "(3, 3, 3, 7, 5)"]),
    (lambda a: a.update(noise=a["noise"][0, :2]), ValueError, ["noise", "shape of z0 (3, 3, 7, 5)"]),
    (lambda a: a.update(noise=a["noise"].double()), TypeError, ["noise", "dtype"]),
    (lambda a: a.update(z0=a["z0"].long()), TypeError, ["z0", "floating"]),
    (lambda a: a.update(timesteps=a["timesteps"].float()), TypeError, ["timesteps", "integer"]),
    (lambda a: a.update(timesteps=a["timesteps"][None]), ValueError, ["timesteps", "(k,)"]),
    (lambda a: a.update(alphas_cumprod=a["alphas_cumprod"].half()), TypeError, ["alphas_cumprod", "float32"]),
    (lambda a: a.update(alphas_cumprod=a["alphas_cumprod"][None]), ValueError, ["alphas_cumprod", "(T_train,)"]),
    (lambda a: a.update(layout="batch"), ValueError, ["layout", "'timestep'", "'sample'"]),
    (lambda a: a.update(noise=a["noise"].to("meta")), ValueError, ["noise", "device"]),
    (lambda a: a.update(alphas_cumprod=a["alphas_cumprod"].to("meta")), ValueError, ["alphas_cumprod", "device"]),
    (lambda a: a.update(timesteps=a["timesteps"].to("meta")), ValueError, ["timesteps", "device"]),
    (lambda a: a.update(z0="z0"), TypeError, ["z0", "torch.Tensor"]),
])
def test_bad_input_names_the_argument(mutate, exc, words):
    args = _good()
    mutate(args)
    with pytest.raises(exc) as info:
        q_sample_multi(**args)
    for w in words:
        assert w in str(info.value)


# ----------------------------------------------------------------------------- the definition
@pytest.mark.parametrize("layout", ["timestep", "sample"])
def test_reference_is_diffusers_add_noise(layout):
    """reference.q_sample_multi == DDPMScheduler.add_noise on the repeated batch with the per-sample timesteps."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="scaled_linear",
                                        beta_start=0.00085, beta_end=0.012)
    case = Case((3, 4, 7, 5), (1, 100, 200, 999), layout)
    z0, noise, ts = make_inputs(case)
    k, batch = len(case.timesteps), case.shape[0]
    if layout == "timestep":
        per_sample, z_rep, e_rep = ts.repeat_interleave(batch), z0.repeat(k, 1, 1, 1), noise.flatten(0, 1)
    else:
        per_sample, z_rep, e_rep = ts.repeat(batch), z0.repeat_interleave(k, 0), noise.transpose(0, 1).flatten(0, 1)
    expected = scheduler.add_noise(z_rep, e_rep, per_sample)
    ours = reference.q_sample_multi(z0, noise, ts, scheduler.alphas_cumprod, layout)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)
    # and the op, on the schedule diffusers builds
    torch.testing.assert_close(q_sample_multi(z0, noise, ts, scheduler.alphas_cumprod, layout), expected,
                               atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- shape fuzzing
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@st.composite
def cases(draw):
    k = draw(st.integers(1, 8))
    return Case(shape=(draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 9)),
                       draw(st.integers(1, 9))),
                timesteps=tuple(draw(st.lists(st.integers(0, T_TRAIN - 1), min_size=k, max_size=k))),
                layout=draw(st.sampled_from(["timestep", "sample"])), shared=draw(st.booleans()))


@pytest.mark.parametrize("backend", [p for p in backend_params(OP) if p.values[0] in ("cpp", "triton", "cuda")])
def test_fuzz_shapes_against_reference(backend):
    examples = 6 if backend == "triton" and not torch.cuda.is_available() else 30

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(case=cases())
    def check(case):
        check_against_reference(backend, case)

    check()


@pytest.mark.parametrize("layout", ["timestep", "sample"])
def test_reference_takes_zero_size_latents(layout):
    # Found by the long fuzz run: the reference's reshape(-1, ...) could not infer the k·B rows
    # of a latent with a zero-size channel dimension, and rejected an input the op accepts.
    z0, noise = torch.empty(2, 0, 3, 3), torch.empty(2, 0, 3, 3)
    ts, abar = torch.tensor([0, 1]), torch.linspace(0.99, 0.1, 50)
    want = fastdense.ops.reference.q_sample_multi(z0, noise, ts, abar, layout=layout)
    assert want.shape == (4, 0, 3, 3)
    assert fastdense.ops.q_sample_multi(z0, noise, ts, abar, layout=layout).shape == want.shape
