"""The demo's multi-task LoRA case: inputs, the check of one backend, and the timings
of the fused op and of the MTLoRA-style eager loop."""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch

import fastdense
from fastdense.testing import baselines
from fastdense.testing.checks import Expected

# What the demo differentiates: the input (earlier layers train too) and the
# adapters; W0 and its bias are frozen, as in every PEFT method reproduced here.
GRAD_NAMES = ("x", "lora_a", "lora_b")


@dataclasses.dataclass
class DemoCase:
    batch: int = 1
    tokens: int = 28 * 28  # Swin-T stage 3 at 448² input
    in_features: int = 96
    out_features: int = 384  # fc1: C -> 4C
    tasks: int = 4
    shared_rank: int = 64
    task_rank: int = 4
    scale: float = 4.0  # MTLoRA's shared and task scale

    @property
    def ranks(self) -> list[int]:
        return [self.shared_rank] + [self.task_rank] * self.tasks

    @property
    def scales(self) -> list[float]:
        return [self.scale] * (1 + self.tasks)

    def tensors(self, device) -> dict[str, torch.Tensor]:
        """float64 inputs on ``device`` and the output gradient ``grad``, from a fixed seed."""
        gen = torch.Generator().manual_seed(0)

        def randn(*shape, std=1.0):
            return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(device)

        return baselines.mtlora_inputs(randn, batch=self.batch, tokens=self.tokens, in_features=self.in_features,
                                       out_features=self.out_features, ranks=self.ranks, bias_std=0.1)

    def op_args(self, t: dict, dtype) -> tuple:
        """The internal op's arguments, for asking each backend whether it can run them."""
        p = {k: v.to(dtype) for k, v in t.items()}
        return (p["x"].reshape(self.batch * self.tokens, -1), p["weight"], p["bias"], p["lora_a"], p["lora_b"],
                self.ranks, self.scales, False, None, None)

    def call(self, op: Callable) -> Callable[..., torch.Tensor]:
        """``op`` (the fused op or its reference) with this case's ranks and scales, keyword inputs."""
        return lambda x, weight, bias, lora_a, lora_b: op(x, weight, bias, lora_a, lora_b, self.ranks, self.scales)


def expected(case: DemoCase, t64: dict, dtype, device) -> Expected:
    """The float64 truth and the tolerances (from the error of the same-dtype reference)."""
    inputs = {k: v for k, v in t64.items() if k != "grad"}
    return Expected.of(case.call(fastdense.ops.reference.mt_lora_linear), inputs, GRAD_NAMES, dtype, device,
                       upstream=t64["grad"])


def check_line(name: str, case: DemoCase, t64: dict, want: Expected, dtype, device) -> tuple[bool, str]:
    """Check the fused op on backend ``name``: (passed, the line the demo prints)."""
    inputs = {k: v for k, v in t64.items() if k != "grad"}
    with fastdense.ops.backend(name):
        errors = want.errors(case.call(fastdense.ops.mt_lora_linear), inputs, dtype, device)
    ok = want.passes(errors)
    detail = ", ".join(f"{'forward' if k == 'out' else 'd' + k} {errors[k]:.2e} (tol {want.tolerance[k]:.1e})"
                       for k in errors)
    return ok, f"  {name:<8} {'PASS' if ok else 'FAIL'}  max abs error vs float64 reference: {detail}"


# ----------------------------------------------------------------------------- timings
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], None], device, budget_s: float, min_reps: int = 3, max_reps: int = 50) -> float:
    """Median wall time of ``fn`` in ms after one warm-up call, within about ``budget_s``."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    reps = int(min(max_reps, max(min_reps, budget_s / max(first, 1e-6))))
    times = [first]
    for _ in range(reps - 1):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_fused(name, t64, case: DemoCase, dtype, dev, budget, bar) -> dict[str, float]:
    leaves = {k: v.to(dtype).detach().requires_grad_(k in GRAD_NAMES) for k, v in t64.items()}
    grad = leaves.pop("grad").detach()

    def forward():
        return fastdense.ops.mt_lora_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"],
                                            leaves["lora_b"], case.ranks, case.scales)

    def fwd_bwd():
        for k in GRAD_NAMES:
            leaves[k].grad = None
        forward().backward(grad)

    with fastdense.ops.backend(name):
        fwd = median_ms(forward, dev, budget)
        bar.step(f"{name} forward timed")
        both = median_ms(fwd_bwd, dev, budget)
        bar.step(f"{name} forward+backward timed")
    return {"fwd": fwd, "fwdbwd": both}


def time_loop(t64, case: DemoCase, dtype, dev, budget, bar) -> dict[str, float]:
    x = t64["x"].to(dtype).requires_grad_(True)
    weight, bias = t64["weight"].to(dtype), t64["bias"].to(dtype)
    # Separate leaf tensors per adapter, as MTLoRA holds one nn.Linear pair per task.
    a_list = [a.to(dtype).clone().requires_grad_(True) for a in t64["lora_a"].split(case.ranks, 0)]
    b_list = [b.to(dtype).clone().requires_grad_(True) for b in t64["lora_b"].split(case.ranks, 1)]
    grads = list(t64["grad"].to(dtype).unbind(0))

    def forward():
        return baselines.mtlora_loop(x, weight, bias, a_list, b_list, case.scales)

    def fwd_bwd():
        for t in [x, *a_list, *b_list]:
            t.grad = None
        shared, tasks = forward()
        torch.autograd.backward([shared, *tasks.values()], grads)

    fwd = median_ms(forward, dev, budget)
    bar.step("loop forward timed")
    both = median_ms(fwd_bwd, dev, budget)
    bar.step("loop forward+backward timed")
    return {"fwd": fwd, "fwdbwd": both}
