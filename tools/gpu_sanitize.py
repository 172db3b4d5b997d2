"""Every CUDA and Triton op of fastdense, forward and backward, on odd shapes, checked as it goes.

Made to run under ``compute-sanitizer`` (``tools/gpu_check.py`` runs it plain,
then under memcheck, racecheck and initcheck), but useful alone on any GPU:

    python tools/gpu_sanitize.py                         # every op, cuda + triton, fp32/bf16/fp16
    python tools/gpu_sanitize.py --ops lora,dtf --dtypes bf16
    python tools/gpu_sanitize.py --list                  # the cases, without running them

A sanitizer that reports no error while the kernels compute garbage is not a
pass, so every call is judged against the plain-PyTorch reference: the output
and every gradient, with the rule of :mod:`fastdense.testing.checks` (error
against a float64 truth at most a few times the error of the reference run in
the same dtype, plus a floor), made looser than the op tests' on purpose: this
script hunts wrong indexing and memory errors, the op tests judge precision.
References run on the CPU, so the sanitizer's time goes to fastdense's kernels.

Shapes are small and awkward: odd M/N/K, ranks that differ per adapter, T = 3,
windows that clip at the map's edge, kernel sizes 3 and 5, non-power-of-two
head dims and concept counts, host and device timesteps. Before each call the
CUDA caching allocator's free memory is filled with 0xFF bytes (NaN in every
float dtype), so an output element a kernel never writes shows up as NaN;
under ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (how memcheck is run, so that it
sees every allocation's real bounds) there is no cache to poison and the
sanitizer's own initcheck covers unwritten memory.

Exit status: 0 every check passed; 1 a check failed or raised; 3 no CUDA
device (nothing was checked); 4 no check could run (all refused or filtered out).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import fastdense.ops as ops  # noqa: E402
from fastdense.ops import _dispatch, reference  # noqa: E402
from fastdense.testing.backends import registered  # noqa: E402
from fastdense.testing.checks import max_error, run_with_grads  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_BACKENDS = ("cuda", "triton")
# Floors of the tolerance, relative to the truth's largest value (at least 1),
# and the factor on the same-dtype reference's own error.
FLOOR = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
FACTOR = 4.0


@dataclasses.dataclass(frozen=True)
class Case:
    family: str                                  # the op family (file stem): lora, dtf, ...
    op: str                                      # the dispatch name whose backends are forced
    label: str
    make: Callable[[torch.Generator], dict]      # float64 CPU inputs, by keyword
    grads: tuple[str, ...]                       # the inputs that are differentiated
    fused: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]


def _randn(g: torch.Generator, *shape, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64) * std


# ----------------------------------------------------------------------------- multi-task LoRA
def _lora_case(label, lead, k, n, ranks, *, bias=True, shared_in_tasks=False, x_lora=False, x_tasks=False,
               grads=("x", "lora_a", "lora_b")):
    scales = [0.5 + 0.25 * i for i in range(len(ranks))]
    r = sum(ranks)

    def make(g):
        t = {"x": _randn(g, *lead, k), "weight": _randn(g, n, k, std=k ** -0.5),
             "lora_a": _randn(g, r, k, std=k ** -0.5), "lora_b": _randn(g, n, r, std=0.5)}
        if bias:
            t["bias"] = _randn(g, n, std=0.1)
        if x_lora:
            t["x_lora"] = _randn(g, *lead, k)
        if x_tasks:
            t["x_tasks"] = _randn(g, len(ranks) - 1, *lead, k)
        return t

    def call(fn):
        def run(x, weight, lora_a, lora_b, bias=None, x_lora=None, x_tasks=None):
            return fn(x, weight, bias, lora_a, lora_b, list(ranks), scales, shared_in_tasks=shared_in_tasks,
                      x_lora=x_lora, x_tasks=x_tasks)
        return run

    return Case("lora", "mt_lora_linear", label, make, grads, call(ops.mt_lora_linear),
                call(lambda *a, **kw: reference.mt_lora_linear(*a, **kw)))


def _single_lora_case():
    def make(g):
        return {"x": _randn(g, 5, 17), "weight": _randn(g, 9, 17, std=17 ** -0.5), "bias": _randn(g, 9),
                "lora_a": _randn(g, 7, 17, std=17 ** -0.5), "lora_b": _randn(g, 9, 7, std=0.5)}

    return Case("lora", "mt_lora_linear", "lora_linear M5 K17 N9 r7", make, ("x", "lora_a", "lora_b"),
                lambda x, weight, bias, lora_a, lora_b: ops.lora_linear(x, weight, bias, lora_a, lora_b, 0.7),
                lambda x, weight, bias, lora_a, lora_b: reference.mt_lora_linear(
                    x, weight, bias, lora_a, lora_b, [7], [0.7])[0])


# ----------------------------------------------------------------------------- TADFormer DTF
def _dtf_params(g, r, k, bias=True, mean=True):
    t = {"phi_weight": _randn(g, r * k * k, r, std=r ** -0.5), "fn_std": _randn(g, r * k * k, std=1 / k)}
    if bias:
        t["phi_bias"] = _randn(g, r * k * k, std=0.1)
    if mean:
        t["fn_mean"] = _randn(g, r * k * k, std=0.1)
    return t


def _dtf_case(label, f_shape, base_shape, c_out, r, k, hw, window, *, bias=True, mean=True, grads=None):
    c = f_shape[-1]

    def make(g):
        return {"f": _randn(g, *f_shape), "base_out": _randn(g, *base_shape[:-1], c_out),
                "lora_a": _randn(g, r, c, std=c ** -0.5), "lora_b": _randn(g, c_out, r, std=0.5),
                **_dtf_params(g, r, k, bias, mean)}

    def fused(f, base_out, lora_a, lora_b, phi_weight, fn_std, phi_bias=None, fn_mean=None):
        return ops.ta_lora_dtf(f, base_out, lora_a, lora_b, 0.5, hw, phi_weight, phi_bias, fn_std, fn_mean, window,
                               num_tasks=None if f.dim() == 4 or base_out.dim() == 4 else 3)

    def ref(f, base_out, lora_a, lora_b, phi_weight, fn_std, phi_bias=None, fn_mean=None):
        tasks = base_out.shape[0] if base_out.dim() == 4 else 3
        f4 = f if f.dim() == 4 else f.unsqueeze(0).expand(tasks, *f.shape)
        b4 = base_out if base_out.dim() == 4 else base_out.unsqueeze(0).expand(tasks, *base_out.shape)
        # reference.ta_lora_dtf's equation, spelled out for a kernel size other than its default 3
        h = f4 @ lora_a.t()
        filtered, _ = reference.dynamic_task_filter(h.reshape(-1, *h.shape[2:]), hw, phi_weight, phi_bias, fn_std,
                                                    fn_mean, window, k)
        return b4 + 0.5 * (filtered.reshape(h.shape) @ lora_b.t())

    grads = grads or ("f", "base_out", "lora_a", "lora_b", "phi_weight", "fn_std") + \
        (("phi_bias",) if bias else ()) + (("fn_mean",) if mean else ())
    return Case("dtf", "ta_lora_dtf", label, make, grads, fused, ref)


def _static_dtf_case():
    tasks, r, k, hw, window, c, c_out = 3, 4, 3, (6, 7), 3, 11, 5

    def make(g):
        return {"f": _randn(g, tasks, 2, hw[0] * hw[1], c), "base_out": _randn(g, tasks, 2, hw[0] * hw[1], c_out),
                "lora_a": _randn(g, r, c, std=c ** -0.5), "lora_b": _randn(g, c_out, r, std=0.5),
                "static_weight": _randn(g, tasks, r, k, k, std=1 / k), "static_bias": _randn(g, tasks, r, std=0.1)}

    def fused(f, base_out, lora_a, lora_b, static_weight, static_bias):
        return ops.ta_lora_dtf(f, base_out, lora_a, lora_b, 0.5, hw, window=window, filter="static",
                               static_weight=static_weight, static_bias=static_bias)

    def ref(f, base_out, lora_a, lora_b, static_weight, static_bias):
        h = f @ lora_a.t()
        outs = [reference.static_task_filter(h[t], hw, static_weight[t], static_bias[t], window) for t in range(tasks)]
        return base_out + 0.5 * (torch.stack(outs) @ lora_b.t())

    return Case("dtf", "ta_lora_dtf", "static filter T3 B2 6x7 window 3 (clipped) r4 k3", make,
                ("f", "base_out", "lora_a", "lora_b", "static_weight", "static_bias"), fused, ref)


def _filter_case():
    hw, window, r, k = (10, 7), 3, 5, 3

    def make(g):
        return {"h": _randn(g, 3, hw[0] * hw[1], r), **_dtf_params(g, r, k)}

    def fused(h, phi_weight, phi_bias, fn_std, fn_mean):
        return ops.dynamic_task_filter(h, hw, phi_weight, phi_bias, fn_std, fn_mean, window)

    def ref(h, phi_weight, phi_bias, fn_std, fn_mean):
        return reference.dynamic_task_filter(h, hw, phi_weight, phi_bias, fn_std, fn_mean, window, k)[0]

    return Case("dtf", "dynamic_task_filter", "dynamic_task_filter S3 10x7 window 3 (clipped) r5 k3", make,
                ("h", "phi_weight", "phi_bias", "fn_std", "fn_mean"), fused, ref)


# ----------------------------------------------------------------------------- attention-mask aggregation
def _attn_case(label, b, h, length, d, n, *, per_head=False, head_reduce="mean", with_lse=False):
    scale = d ** -0.5

    def make(g):
        m_shape = (b, h, length, n) if per_head else (b, length, n)
        return {"q": _randn(g, b, h, length, d), "k": _randn(g, b, h, length, d),
                "m_ca": torch.softmax(_randn(g, *m_shape) * 2, dim=-1)}

    def fused(q, k, m_ca):
        lse = None
        if with_lse:  # what SDPA's forward would hand over, computed by torch
            lse = torch.logsumexp((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
        return ops.attn_mask_aggregate(q, k, m_ca, scale, lse=lse, head_reduce=head_reduce)

    def ref(q, k, m_ca):
        return reference.attn_mask_aggregate(q, k, m_ca, scale, head_reduce)

    return Case("attn_mask_aggregate", "attn_mask_aggregate", label, make, ("q", "k", "m_ca"), fused, ref)


# ----------------------------------------------------------------------------- TDSS skill-gated transform
def _skill_case(label, lead, c, r, m, t, grads):
    def make(g):
        return {"x": _randn(g, *lead, c), "w_down": _randn(g, c, r, std=c ** -0.5), "w_up": _randn(g, r, c, std=0.5),
                "skills": _randn(g, m, r), "w_gamma": _randn(g, t, r, m), "w_beta": _randn(g, t, r, m)}

    return Case("skill_gated_transform", "skill_gated_transform", label, make, grads, ops.skill_gated_transform,
                reference.skill_gated_transform)


# ----------------------------------------------------------------------------- multi-timestep noising
_SCHEDULE = torch.linspace(0.9999, 0.005, 1000, dtype=torch.float64)


def _q_sample_case(label, z_shape, timesteps, *, shared, layout, host_timesteps):
    k = len(timesteps)

    def make(g):
        return {"z0": _randn(g, *z_shape), "noise": _randn(g, *(z_shape if shared else (k, *z_shape)))}

    def ts(device):
        return list(timesteps) if host_timesteps else torch.tensor(timesteps, device=device)

    def fused(z0, noise):
        return ops.q_sample_multi(z0, noise, ts(z0.device), _SCHEDULE.to(z0.device), layout)

    def ref(z0, noise):
        return reference.q_sample_multi(z0, noise, torch.tensor(timesteps), _SCHEDULE, layout)

    return Case("q_sample_multi", "q_sample_multi", label, make, ("z0", "noise"), fused, ref)


CASES: list[Case] = [
    _lora_case("T3 M21 K13 N11 ranks 5/3/1/2, W0 and b trained", (3, 7), 13, 11, (5, 3, 1, 2),
               grads=("x", "weight", "bias", "lora_a", "lora_b")),
    _lora_case("T3 M133 K70 N67 ranks 66/4/4/4 matrixv2 x_lora x_tasks, no bias", (7, 19), 70, 67, (66, 4, 4, 4),
               bias=False, shared_in_tasks=True, x_lora=True, x_tasks=True,
               grads=("x", "lora_a", "lora_b", "x_lora", "x_tasks")),
    _single_lora_case(),
    _dtf_case("T3 B2 9x11 window 4 (clipped) C13->17 r5 k3", (3, 2, 99, 13), (3, 2, 99, 17), 17, 5, 3, (9, 11), 4),
    _dtf_case("shared f (B2 7x5), T3 base_out, whole map C10->9 r6 k5, no phi_bias/fn_mean", (2, 35, 10),
              (3, 2, 35, 9), 9, 6, 5, (7, 5), 0, bias=False, mean=False),
    _static_dtf_case(),
    _filter_case(),
    _attn_case("B2 H3 L37 d20 N7 mean", 2, 3, 37, 20, 7),
    _attn_case("B1 H2 L70 d33 N5 per-head maps, none, lse given", 1, 2, 70, 33, 5, per_head=True, head_reduce="none",
               with_lse=True),
    _skill_case("x 2x9xC20 R6 M5 T3, every gradient", (2, 9), 20, 6, 5, 3,
                ("x", "w_down", "w_up", "skills", "w_gamma", "w_beta")),
    _skill_case("x 37xC48 R12 M10 T4, x frozen", (37,), 48, 12, 10, 4,
                ("w_down", "w_up", "skills", "w_gamma", "w_beta")),
    _q_sample_case("B3 4x5x7 per-step noise, k3 device timesteps", (3, 4, 5, 7), (1, 500, 999), shared=False,
                   layout="timestep", host_timesteps=False),
    _q_sample_case("B2 3x3x3 shared noise, k4 host timesteps, sample layout", (2, 3, 3, 3), (7, 0, 999, 250),
                   shared=True, layout="sample", host_timesteps=True),
]
FAMILIES = tuple(dict.fromkeys(c.family for c in CASES))


# ----------------------------------------------------------------------------- running one check
def poison_cache(device: str) -> None:
    """Fill the caching allocator's free memory with 0xFF bytes (NaN in every float dtype)."""
    if device != "cuda" or os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1":
        return
    # Up to 1 MB an allocation comes from the small pool (2 MB segments), above from the large one.
    blocks = [torch.full((1 << 20,), 255, dtype=torch.uint8, device="cuda") for _ in range(16)]
    blocks += [torch.full((32 << 20,), 255, dtype=torch.uint8, device="cuda")]
    del blocks


def tolerance(reference_error: float, truth: torch.Tensor, dtype: torch.dtype) -> float:
    magnitude = truth.abs().max().item() if truth.numel() else 0.0
    return FACTOR * reference_error + FLOOR[dtype] * max(1.0, magnitude)


def check(case: Case, backend: str, dtype: torch.dtype, device: str = "cuda") -> tuple[str, str]:
    """("pass" | "fail" | "refused", what to print) for one (case, backend, dtype)."""
    inputs = case.make(torch.Generator().manual_seed(0))
    out64, grads64, upstream = run_with_grads(case.reference, inputs, case.grads, torch.float64, "cpu")
    out_low, grads_low, _ = run_with_grads(case.reference, inputs, case.grads, dtype, "cpu", upstream)
    poison_cache(device)
    try:
        with ops.backend(backend):
            out, grads, _ = run_with_grads(case.fused, inputs, case.grads, dtype, device, upstream)
        if device == "cuda":
            torch.cuda.synchronize()
    except _dispatch.BackendNotSupportedError as exc:
        return "refused", str(exc).splitlines()[0][:240]
    truth = {"out": out64, **grads64}
    low = {"out": out_low, **grads_low}
    got = {"out": out, **grads}
    worst, lines = 0.0, []
    for name, t in truth.items():
        g = got.get(name)
        if g is None:
            lines.append(f"{name}: no gradient")
            worst = float("inf")
            continue
        if tuple(g.shape) != tuple(t.shape):
            lines.append(f"{name}: shape {tuple(g.shape)}, expected {tuple(t.shape)}")
            worst = float("inf")
            continue
        err = max_error(g.cpu(), t)
        tol = tolerance(max_error(low[name], t), t, dtype)
        ratio = err / tol if tol > 0 else float("inf")
        if not ratio <= 1.0:  # NaN fails too
            lines.append(f"{'forward' if name == 'out' else 'd' + name}: error {err:.3e} > tol {tol:.1e}")
        if not ratio <= worst:
            worst = ratio
    if lines:
        return "fail", "; ".join(lines)
    return "pass", f"worst error/tolerance {worst:.2f} over forward and {len(truth) - 1} gradients"


def _is_device_error(exc: Exception) -> bool:
    """An error after which no later CUDA call can be trusted (an illegal address, a trap)."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    msg = str(exc)
    return "CUDA error" in msg or "illegal memory access" in msg or "unspecified launch failure" in msg


def selected(args) -> list[tuple[Case, str, str]]:
    fams = set(args.ops.split(",")) if args.ops else set(FAMILIES)
    unknown = fams - set(FAMILIES)
    if unknown:
        raise SystemExit(f"unknown op families {sorted(unknown)}; known: {', '.join(FAMILIES)}")
    backends = args.backends.split(",")
    dtypes = args.dtypes.split(",")
    plan = []
    for case in CASES:
        if case.family not in fams:
            continue
        names = [name for name, _ in registered(case.op)]
        for backend in backends:
            if backend not in names:
                continue  # e.g. attn_mask_aggregate has no cuda backend
            for dt in dtypes:
                plan.append((case, backend, dt))
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default="", help=f"comma-separated op families (default all: {','.join(FAMILIES)})")
    parser.add_argument("--backends", default=",".join(GPU_BACKENDS), help="comma-separated (default cuda,triton)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated of fp32,bf16,fp16 (default all)")
    parser.add_argument("--list", action="store_true", help="print the checks and exit")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: the same checks on CPU tensors (with --backends cpp,torch, or triton under "
                             "TRITON_INTERPRET=1), to test this script without a GPU")
    args = parser.parse_args(argv)
    bad = set(args.dtypes.split(",")) - set(DTYPES)
    if bad:
        parser.error(f"unknown dtypes {sorted(bad)}")
    plan = selected(args)
    if args.list:
        for case, backend, dt in plan:
            print(f"{case.op:<22} {backend:<7} {dt:<5} {case.label}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize: no CUDA device; nothing checked")
        return 3
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "the CPU"
    print(f"gpu_sanitize: {len(plan)} checks on {where}, torch {torch.__version__}, "
          f"caching allocator {'off' if os.environ.get('PYTORCH_NO_CUDA_MEMORY_CACHING') == '1' else 'on (poisoned)'}",
          flush=True)
    counts = {"pass": 0, "fail": 0, "refused": 0}
    t0 = time.perf_counter()
    for i, (case, backend, dt) in enumerate(plan):
        label = f"[{i + 1}/{len(plan)}] {case.op} {backend} {dt} {case.label}"
        fatal = False
        try:
            status, text = check(case, backend, DTYPES[dt], args.device)
        except Exception as exc:
            msg = str(exc).strip()
            status, text = "fail", f"raised {type(exc).__name__}: {msg.splitlines()[0][:300] if msg else ''}"
            traceback.print_exc()
            fatal = _is_device_error(exc)
        counts[status] += 1
        print(f"{status.upper():<7} {label}: {text}", flush=True)
        if fatal:
            print("gpu_sanitize: a device-side error leaves the CUDA context unusable; stopping here", flush=True)
            break
    print(f"gpu_sanitize: {counts['pass']} passed, {counts['fail']} failed, {counts['refused']} refused "
          f"of {len(plan)} checks in {time.perf_counter() - t0:.1f} s", flush=True)
    if counts["fail"]:
        return 1
    return 0 if counts["pass"] else 4


if __name__ == "__main__":
    sys.exit(main())
