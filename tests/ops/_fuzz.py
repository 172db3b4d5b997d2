"""Property-based fuzzing of the public ops: valid inputs must match the reference, invalid ones must be named.

For every op a *spec* draws, with hypothesis, the arguments of the public
function:

* valid inputs with awkward layouts -- contiguous, transposed storage, a
  stride-2 slice of a larger tensor, a stride-0 expansion, channels-last --,
  zero-size batch dimensions, every dtype the backend supports, and (in
  fp32/fp64) a few NaN/Inf entries in the activations. The backend's output
  and gradients must equal the float64 reference within the documented
  tolerance, and be non-finite exactly where the reference is.
  Parameters (weights, filters, schedules) stay finite: a non-finite parameter
  is a broken model, and where it meets a conv's zero padding the dense
  reference gives 0·NaN = NaN while a kernel that skips the padding taps gives
  a number -- both are IEEE-correct readings of "zero padding".
* invalid inputs: one argument of a valid case broken (a wrong size, an extra or
  missing dimension, an integer or mismatched dtype, a non-tensor). The op must
  raise ValueError or TypeError whose message names that argument.

:func:`run_case` classifies one drawn case into :data:`OUTCOMES` instead of
asserting, so a long run (``FASTDENSE_FUZZ_EXAMPLES``, ``FASTDENSE_FUZZ_REPORT=1``)
can count every kind of failure; the pytest entry (test_fuzz.py) asserts that a
case is ``ok`` or ``clean_error``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable

import torch
from hypothesis import strategies as st

import fastdense
from fastdense.ops import reference

OUTCOMES = ("ok", "clean_error", "unsupported", "invalid_accepted", "error_names_nothing", "wrong_result", "crash")
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "channels_last")


def examples() -> int:
    return int(os.environ.get("FASTDENSE_FUZZ_EXAMPLES", "12"))


# ----------------------------------------------------------------------------- tensors with awkward layouts
def layout_tensor(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` (contiguous) re-laid-out without changing a single value."""
    if layout == "transposed" and values.dim() >= 2:
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced" and values.dim() >= 1:
        big = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype)
        big[..., ::2] = values
        return big[..., ::2]
    if layout == "channels_last" and values.dim() == 4:
        return values.contiguous(memory_format=torch.channels_last)
    return values


@dataclasses.dataclass
class TensorDraw:
    """How one tensor argument is drawn."""

    shape: tuple
    expandable: bool = True  # a stride-0 expansion is allowed (values constant along a dim)
    special: bool = False    # NaN/Inf may be planted (activations only, see the module docstring)
    scale: float = 1.0


def draw_tensor(draw, spec: TensorDraw, dtype: torch.dtype, specials: bool) -> torch.Tensor:
    layout = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    shape = tuple(spec.shape)
    expand_dim = None
    if layout == "expanded" and spec.expandable:
        dims = [i for i, s in enumerate(shape) if s > 1]
        if dims:
            expand_dim = draw(st.sampled_from(dims))
    base_shape = shape if expand_dim is None else tuple(1 if i == expand_dim else s for i, s in enumerate(shape))
    values = torch.randn(base_shape, generator=g, dtype=torch.float64) * spec.scale
    if specials and spec.special and values.numel() and draw(st.integers(0, 5)) == 0:
        flat = values.view(-1)
        for _ in range(draw(st.integers(1, 2))):
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    values = values.to(dtype)
    if expand_dim is not None:
        return values.expand(shape)
    return layout_tensor(values, layout)


# ----------------------------------------------------------------------------- a drawn case
@dataclasses.dataclass
class Case:
    """The public function's arguments; ``diff`` names the tensors that get gradients."""

    kwargs: dict
    diff: tuple
    call: Callable[..., Any]             # the public function
    ref: Callable[..., torch.Tensor]     # the reference on the same kwargs (float64 copies)
    out: Callable[[Any], torch.Tensor] = lambda y: y  # the differentiable output of call's result

    def describe(self) -> str:
        def one(v):
            if isinstance(v, torch.Tensor):
                flags = "".join(f"+{name}" for name, test in (("nan", torch.isnan), ("inf", torch.isinf))
                                if v.is_floating_point() and test(v).any())
                return f"{tuple(v.shape)}/{str(v.dtype)[6:]}/{tuple(v.stride())}{flags}"
            return repr(v)
        return ", ".join(f"{k}={one(v)}" for k, v in self.kwargs.items())


# A diffusion schedule keeps its own (fp32/fp64) dtype whatever the data's.
KEEP_DTYPE = {"alphas_cumprod"}


def _as(kwargs: dict, dtype: torch.dtype, device: str) -> dict:
    def one(k, v):
        if not isinstance(v, torch.Tensor):
            return v
        to = dtype if (v.is_floating_point() and k not in KEEP_DTYPE) else v.dtype
        return v.to(dtype=to, device=device)
    return {k: one(k, v) for k, v in kwargs.items()}


def _leaves(kwargs: dict, diff) -> dict:
    out = dict(kwargs)
    for k in diff:
        if isinstance(out.get(k), torch.Tensor):
            out[k] = out[k].detach().clone().requires_grad_(True)
    return out


def _forward_backward(fn, out_fn, kwargs, diff, grad_seed: int):
    leaves = _leaves(kwargs, diff)
    y = out_fn(fn(**leaves))
    names = [k for k in diff if isinstance(leaves.get(k), torch.Tensor)]
    if not names or y.numel() == 0:
        return y.detach(), {}
    g = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype).to(y.device)
    grads = torch.autograd.grad(y, [leaves[k] for k in names], grad_out, allow_unused=True)
    return y.detach(), {k: (torch.zeros_like(leaves[k]) if gr is None else gr) for k, gr in zip(names, grads)}


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-7, torch.float32: 2e-4}.get(dtype, 0.0)


def _floor(dtype: torch.dtype) -> float:
    # The 2x rule needs a floor: on tiny cases the low-precision reference can be exact by luck.
    return 4 * torch.finfo(dtype).eps


def _same_specials(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Non-finite exactly where the reference is non-finite.

    NaN and ±inf are one class: the same inf-carrying sums taken in another
    (equally valid) order give inf - inf = NaN in one and inf in the other.
    """
    return bool(torch.equal(torch.isfinite(a), torch.isfinite(b)))


def _close(got: torch.Tensor, want64: torch.Tensor, low_ref: torch.Tensor | None, dtype) -> str | None:
    """None when ``got`` matches the float64 ``want64``, else why not."""
    got = got.detach().to("cpu", torch.float64)
    want64 = want64.detach().to("cpu", torch.float64)
    if got.shape != want64.shape:
        return f"shape {tuple(got.shape)} != {tuple(want64.shape)}"
    if dtype in (torch.float32, torch.float64) and not _same_specials(got, want64):
        bad = torch.isfinite(got) != torch.isfinite(want64)
        i = tuple(bad.nonzero()[0].tolist())
        return f"NaN/Inf positions differ from the reference, e.g. at {i}: {got[i].item()} vs {want64[i].item()}"
    finite = torch.isfinite(want64)
    if not finite.any():
        return None
    mag = max(1.0, want64[finite].abs().max().item())
    if dtype in (torch.float16, torch.bfloat16):
        low = low_ref.detach().to("cpu", torch.float64)
        if (~torch.isfinite(got) & torch.isfinite(low)).any():
            return "non-finite where the reference in the same dtype is finite"
        both = finite & torch.isfinite(low) & torch.isfinite(got)
        if not both.any():
            return None
        ref_err = (low[both] - want64[both]).abs().max().item()
        err = (got[both] - want64[both]).abs().max().item()
        limit = 2 * ref_err + _floor(dtype) * mag
    else:
        err = (got[finite] - want64[finite]).abs().max().item()
        limit = _tolerance(dtype) * mag
    return None if err <= limit else f"max error {err:.3g} > {limit:.3g}"


def run_case(case: Case, backend: str, dtype: torch.dtype, device: str) -> tuple[str, str]:
    """Run one valid case on ``backend``; returns (outcome, detail)."""
    kwargs = _as(case.kwargs, dtype, device)
    try:
        with fastdense.ops.backend(backend):
            got, got_grads = _forward_backward(case.call, case.out, kwargs, case.diff, 1)
    except fastdense.ops.BackendNotSupportedError as exc:
        return "unsupported", str(exc)
    except Exception as exc:  # a valid input must not raise
        return "crash", f"{type(exc).__name__}: {exc}"
    k64 = _as(case.kwargs, torch.float64, "cpu")
    try:
        want, want_grads = _forward_backward(case.ref, lambda y: y, k64, case.diff, 1)
    except Exception as exc:  # the ground truth itself fails on a valid input
        return "crash", f"reference: {type(exc).__name__}: {exc}"
    low, low_grads = None, {}
    if dtype in (torch.float16, torch.bfloat16):
        low, low_grads = _forward_backward(case.ref, lambda y: y, _as(case.kwargs, dtype, "cpu"), case.diff, 1)
    why = _close(got, want, low, dtype)
    if why:
        return "wrong_result", f"output: {why}"
    for name, wg in want_grads.items():
        why = _close(got_grads[name], wg, low_grads.get(name), dtype)
        if why:
            return "wrong_result", f"grad {name}: {why}"
    return "ok", ""


def run_invalid(case: Case, arg: str, backend: str) -> tuple[str, str]:
    """Run a case whose ``arg`` was broken; returns (outcome, detail)."""
    try:
        with fastdense.ops.backend(backend):
            case.out(case.call(**case.kwargs))
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        if re.search(rf"\b{re.escape(arg)}\b", msg):
            return "clean_error", msg
        return "error_names_nothing", f"{type(exc).__name__} not naming {arg!r}: {msg}"
    except fastdense.ops.BackendNotSupportedError as exc:
        return "unsupported", str(exc)
    except Exception as exc:
        return "crash", f"{type(exc).__name__}: {exc}"
    # Accepted: fine only if the input was not invalid after all (the reference takes it too).
    try:
        case.ref(**_as(case.kwargs, torch.float64, "cpu"))
    except Exception:
        return "invalid_accepted", f"{arg} broken but accepted"
    return "ok", "still valid"


# ----------------------------------------------------------------------------- breaking one argument
def break_argument(draw, kwargs: dict, arg: str) -> dict:
    """A copy of ``kwargs`` with ``arg`` made invalid in one way."""
    out = dict(kwargs)
    v = kwargs[arg]
    ways = ["not_a_tensor", "int_dtype", "extra_dim", "wrong_size"]
    if isinstance(v, torch.Tensor) and v.dim() >= 1:
        ways.append("missing_dim")
    way = draw(st.sampled_from(ways))
    if way == "not_a_tensor":
        out[arg] = draw(st.sampled_from(["x", 3.5, [1, 2]]))
    elif not isinstance(v, torch.Tensor):
        out[arg] = None
    elif way == "int_dtype":
        out[arg] = v.to(torch.int32)
    elif way == "extra_dim":
        out[arg] = v.unsqueeze(0).expand(2, *v.shape)
    elif way == "missing_dim":
        out[arg] = v.reshape(-1) if v.dim() > 1 else v.sum()  # a 0-d tensor
    else:
        dim = draw(st.integers(0, max(0, v.dim() - 1)))
        shape = list(v.shape) or [1]
        shape[dim] += 1
        # randn has no integer kernel: draw in float and cast (timesteps)
        out[arg] = torch.randn(shape).to(v.dtype)
    return out


# ----------------------------------------------------------------------------- the ops
def _lead(draw):
    return tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=2)))


@st.composite
def lora_case(draw, specials=True):
    t = draw(st.integers(0, 2))
    lead, k, n = _lead(draw), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    ranks = [draw(st.integers(1, 4)) for _ in range(t + 1)]
    r = sum(ranks)
    tensor = lambda *shape, **kw: draw_tensor(draw, TensorDraw(shape, **kw), torch.float64, specials)  # noqa: E731
    kwargs = dict(
        x=tensor(*lead, k, special=True), weight=tensor(n, k, scale=k ** -0.5),
        bias=tensor(n) if draw(st.booleans()) else None,
        lora_a=tensor(r, k, scale=k ** -0.5), lora_b=tensor(n, r),
        ranks=ranks, scales=[draw(st.sampled_from([0.5, 1.0, 2.0])) for _ in ranks],
        shared_in_tasks=draw(st.booleans()),
        x_lora=tensor(*lead, k, special=True) if draw(st.booleans()) else None,
        x_tasks=tensor(t, *lead, k, special=True) if t and draw(st.booleans()) else None,
    )
    return Case(kwargs, ("x", "weight", "bias", "lora_a", "lora_b", "x_lora", "x_tasks"),
                fastdense.ops.mt_lora_linear, reference.mt_lora_linear)


@st.composite
def attn_case(draw, specials=True):
    b, h, length, d, n = (draw(st.integers(0, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 7)),
                          draw(st.integers(1, 7)), draw(st.integers(1, 5)))
    per_head = draw(st.booleans())
    tensor = lambda *shape, **kw: draw_tensor(draw, TensorDraw(shape, **kw), torch.float64, specials)  # noqa: E731
    head_reduce = draw(st.sampled_from(["mean", "sum", "none"]))
    kwargs = dict(q=tensor(b, h, length, d, special=True), k=tensor(b, h, length, d, special=True),
                  m_ca=tensor(*((b, h, length, n) if per_head else (b, length, n)), special=True).softmax(-1),
                  scale=d ** -0.5, head_reduce=head_reduce)

    def ref(q, k, m_ca, scale, head_reduce):
        return reference.attn_mask_aggregate(q, k, m_ca, scale, head_reduce)
    return Case(kwargs, ("q", "k", "m_ca"), fastdense.ops.attn_mask_aggregate, ref)


def _dtf_params(draw, r, k, specials):
    # FilterNorm is ill-conditioned for filters with (nearly) equal taps: φ's rows
    # and std are drawn dense and finite, never expanded.
    tensor = lambda *shape, **kw: draw_tensor(draw, TensorDraw(shape, **kw), torch.float64, specials)  # noqa: E731
    return dict(phi_weight=tensor(r * k * k, r, expandable=False),
                phi_bias=tensor(r * k * k, expandable=False) if draw(st.booleans()) else None,
                fn_std=tensor(r * k * k, expandable=False),
                fn_mean=tensor(r * k * k) if draw(st.booleans()) else None)


@st.composite
def dtf_case(draw, specials=True):
    s, hh, ww, r = draw(st.integers(0, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 3))
    k = 3
    kwargs = dict(h=draw_tensor(draw, TensorDraw((s, hh * ww, r), special=True), torch.float64, specials), hw=(hh, ww),
                  **_dtf_params(draw, r, k, specials), window=draw(st.sampled_from([0, 1, 2, 3, 4])))

    def ref(h, hw, phi_weight, phi_bias, fn_std, fn_mean, window):
        return reference.dynamic_task_filter(h, hw, phi_weight, phi_bias, fn_std, fn_mean, window)[0]
    return Case(kwargs, ("h", "phi_weight", "phi_bias", "fn_std", "fn_mean"), fastdense.ops.dynamic_task_filter, ref)


@st.composite
def ta_lora_dtf_case(draw, specials=True):
    t, b, hh, ww = draw(st.integers(1, 3)), draw(st.integers(0, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    c, cout, r, k = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 3)), 3
    n = hh * ww
    tensor = lambda *shape, **kw: draw_tensor(draw, TensorDraw(shape, **kw), torch.float64, specials)  # noqa: E731
    shared_f, shared_base = draw(st.booleans()), draw(st.booleans())
    kwargs = dict(f=tensor(*((b, n, c) if shared_f else (t, b, n, c)), special=True),
                  base_out=tensor(*((b, n, cout) if shared_base else (t, b, n, cout)), special=True),
                  lora_a=tensor(r, c), lora_b=tensor(cout, r), scale=draw(st.sampled_from([0.5, 1.0])), hw=(hh, ww),
                  **_dtf_params(draw, r, k, specials), window=draw(st.sampled_from([0, 2, 3])),
                  num_tasks=t if (shared_f and shared_base) else None)

    def ref(f, base_out, lora_a, lora_b, scale, hw, phi_weight, phi_bias, fn_std, fn_mean, window, num_tasks):
        tasks = num_tasks or (f.shape[0] if f.dim() == 4 else base_out.shape[0])
        f4 = f if f.dim() == 4 else f.unsqueeze(0).expand(tasks, *f.shape)
        b4 = base_out if base_out.dim() == 4 else base_out.unsqueeze(0).expand(tasks, *base_out.shape)
        return reference.ta_lora_dtf(f4, b4, lora_a, lora_b, scale, hw, phi_weight, phi_bias, fn_std, fn_mean,
                                     window)
    return Case(kwargs, ("f", "base_out", "lora_a", "lora_b", "phi_weight", "phi_bias", "fn_std", "fn_mean"),
                fastdense.ops.ta_lora_dtf, ref)


@st.composite
def skill_case(draw, specials=True):
    lead, c = _lead(draw), draw(st.integers(1, 7))
    r, m, t = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    tensor = lambda *shape, **kw: draw_tensor(draw, TensorDraw(shape, **kw), torch.float64, specials)  # noqa: E731
    kwargs = dict(x=tensor(*lead, c, special=True), w_down=tensor(c, r, scale=c ** -0.5), w_up=tensor(r, c),
                  skills=tensor(m, r), w_gamma=tensor(t, r, m), w_beta=tensor(t, r, m))
    return Case(kwargs, tuple(kwargs), fastdense.ops.skill_gated_transform, reference.skill_gated_transform)


T_TRAIN = 50
_SCHEDULE = torch.linspace(0.999, 0.02, T_TRAIN, dtype=torch.float64)


@st.composite
def q_sample_case(draw, specials=True):
    b, k = draw(st.integers(0, 3)), draw(st.integers(1, 4))
    latent = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    shared = draw(st.booleans())
    tensor = lambda *shape, **kw: draw_tensor(draw, TensorDraw(shape, **kw), torch.float64, specials)  # noqa: E731
    steps = [draw(st.integers(0, T_TRAIN - 1)) for _ in range(k)]
    kind = draw(st.sampled_from(["list", "tensor", "strided"]))
    timesteps = steps if kind == "list" else torch.tensor(steps) if kind == "tensor" else \
        torch.tensor([[s, 0] for s in steps])[:, 0]
    noise_shape = (b, *latent) if shared else (k, b, *latent)
    kwargs = dict(z0=tensor(b, *latent, special=True), noise=tensor(*noise_shape, special=True),
                  timesteps=timesteps, alphas_cumprod=_SCHEDULE.float(),
                  layout=draw(st.sampled_from(["timestep", "sample"])))

    def ref(z0, noise, timesteps, alphas_cumprod, layout):
        ts = torch.as_tensor(timesteps)
        return reference.q_sample_multi(z0, noise, ts, alphas_cumprod.double(), layout)
    return Case(kwargs, ("z0", "noise"), fastdense.ops.q_sample_multi, ref)


SPECS = {
    "mt_lora_linear": lora_case,
    "attn_mask_aggregate": attn_case,
    "dynamic_task_filter": dtf_case,
    "ta_lora_dtf": ta_lora_dtf_case,
    "skill_gated_transform": skill_case,
    "q_sample_multi": q_sample_case,
}

# Arguments that a broken case may not break: python-level options with defaults the
# public function documents (breaking them is tested by the ops' own tests).
NOT_BROKEN = {"head_reduce", "layout", "shared_in_tasks", "window", "hw", "num_tasks", "scale", "scales", "ranks"}
