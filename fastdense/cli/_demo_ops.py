"""The demo's check of every op other than the multi-task LoRA linear.

For each op: small, awkward inputs; every backend that can run them computes
the output and the gradients, which must match a float64 reference within
twice the error of the reference computed in the backend's dtype
(:mod:`fastdense.testing.checks`). Timings are left to ``make bench``; this is
the user's "does it compute the right thing here".
"""
from __future__ import annotations

import dataclasses
from typing import Callable, TextIO

import torch

import fastdense.ops as ops
from fastdense.ops import _dispatch, reference
from fastdense.testing.backends import registered
from fastdense.testing.checks import Expected


@dataclasses.dataclass(frozen=True)
class OpCheck:
    op: str                                   # the dispatch name, as `fastdense info` lists it
    make: Callable[[torch.Generator], dict]   # float64 CPU inputs
    grads: tuple[str, ...]                    # the inputs that are differentiated
    fused: Callable[..., torch.Tensor]        # the public function, keyword arguments = make()'s keys
    reference: Callable[..., torch.Tensor]


def _randn(g: torch.Generator, *shape, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64) * std


def _attn_inputs(g):
    return {"q": _randn(g, 1, 2, 37, 40), "k": _randn(g, 1, 2, 37, 40),
            "m_ca": torch.softmax(_randn(g, 1, 37, 5), dim=-1)}


def _dtf_inputs(g):
    r, c, c_out, k2 = 4, 8, 6, 9
    return {"f": _randn(g, 2, 1, 63, c), "base_out": _randn(g, 2, 1, 63, c_out),
            "lora_a": _randn(g, r, c, std=c ** -0.5), "lora_b": _randn(g, c_out, r, std=0.5),
            "phi_weight": _randn(g, r * k2, r, std=0.5), "phi_bias": _randn(g, r * k2, std=0.1),
            "fn_std": _randn(g, r * k2, std=1 / 3), "fn_mean": _randn(g, r * k2, std=0.1)}


def _skill_inputs(g):
    c, r, m, t = 16, 4, 10, 3
    return {"x": _randn(g, 2, 9, c), "w_down": _randn(g, c, r, std=c ** -0.5), "w_up": _randn(g, r, c, std=0.5),
            "skills": _randn(g, m, r), "w_gamma": _randn(g, t, r, m), "w_beta": _randn(g, t, r, m)}


def _q_sample_inputs(g):
    return {"z0": _randn(g, 2, 4, 5, 7), "noise": _randn(g, 2, 4, 5, 7)}


_SCHEDULE = torch.linspace(0.9999, 0.005, 1000, dtype=torch.float64)
_TIMESTEPS = torch.tensor([1, 100, 999])
_HW = (7, 9)


def _checks() -> list[OpCheck]:
    return [
        OpCheck("attn_mask_aggregate", _attn_inputs, ("q", "k", "m_ca"),
                lambda q, k, m_ca: ops.attn_mask_aggregate(q, k, m_ca, 40 ** -0.5),
                lambda q, k, m_ca: reference.attn_mask_aggregate(q, k, m_ca, 40 ** -0.5)),
        OpCheck("ta_lora_dtf", _dtf_inputs, ("f", "lora_a", "lora_b", "phi_weight", "fn_std"),
                lambda **t: ops.ta_lora_dtf(scale=0.5, hw=_HW, **t),
                lambda **t: reference.ta_lora_dtf(scale=0.5, hw=_HW, **t)),
        OpCheck("skill_gated_transform", _skill_inputs, ("x", "w_down", "w_up", "skills", "w_gamma", "w_beta"),
                ops.skill_gated_transform, reference.skill_gated_transform),
        OpCheck("q_sample_multi", _q_sample_inputs, ("z0", "noise"),
                lambda z0, noise: ops.q_sample_multi(z0, noise, _TIMESTEPS.to(z0.device), _SCHEDULE.to(z0.device)),
                lambda z0, noise: reference.q_sample_multi(z0, noise, _TIMESTEPS.to(z0.device),
                                                           _SCHEDULE.to(z0.device))),
    ]


def check_ops(device: torch.device, dtype: torch.dtype, forced: str | None, out: TextIO) -> tuple[int, int]:
    """Print one line per (op, backend); return (failures, backends that passed).

    ``forced`` (the user's FASTDENSE_BACKEND) narrows the check to that backend.
    """
    failures = passed = 0
    for check in _checks():
        inputs = check.make(torch.Generator().manual_seed(0))
        want = Expected.of(check.reference, inputs, check.grads, dtype, device)
        for name, impl in registered(check.op):
            label = f"    {check.op:<22} {name:<7}"
            if name not in _dispatch.PRIORITY.get(device.type, ()):
                continue  # e.g. triton on CPU tensors: only the interpreter runs it
            if forced and name != forced:
                continue
            reasons = impl.machine_reasons()
            if reasons:
                print(f"{label} skipped: " + "; ".join(reasons), file=out)
                continue
            try:
                with ops.backend(name):
                    errors = want.errors(check.fused, inputs, dtype, device)
            except _dispatch.BackendNotSupportedError as exc:
                print(f"{label} skipped: {str(exc).splitlines()[0][:200]}", file=out)
                continue
            except Exception as exc:  # a backend that claims it can run but raises is a failure
                print(f"{label} FAIL  raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=out)
                failures += 1
                continue
            ok = want.passes(errors)
            worst = max(errors, key=lambda k: errors[k] / want.tolerance[k])
            print(f"{label} {'PASS' if ok else 'FAIL'}  worst of forward and {len(check.grads)} gradients: "
                  f"{'forward' if worst == 'out' else 'd' + worst} {errors[worst]:.2e} "
                  f"(tol {want.tolerance[worst]:.1e})", file=out)
            failures += 0 if ok else 1
            passed += 1 if ok else 0
    return failures, passed
