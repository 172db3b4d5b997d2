"""Fused attention-mask aggregation M_attn = M_saᵀ M_ca against what a user would otherwise run.

Implementations, on each case:

* ``fused``            ``fastdense.ops.attn_mask_aggregate`` (automatic dispatch), lse computed
* ``fused-<backend>``  the same op forced onto one backend (skipped, with the
                       backend's reasons, where it cannot run)
* ``reference``        softmax(q kᵀ·scale) materialised, then M_saᵀ M_ca (a bmm):
                       ``fastdense.ops.reference.attn_mask_aggregate``
* ``reference-compiled``  the reference under ``torch.compile`` (marked ``compile``)

and, in the ``+sdpa`` groups, the whole attention layer of a recorder that also
needs the layer's output:

* ``sdpa+probs``       SDPA for the attention output plus a separate explicit
                       softmax for the probabilities (what prompt-to-prompt /
                       VPD-style processors do), then M_saᵀ M_ca
* ``sdpa-lse+fused``   flash-attention SDPA returning its log-sum-exp, passed to
                       the fused op, which then skips its own lse pass

Shapes are Stable Diffusion U-Net self-attention layers: SD 1.x at 64×64
latents (L = 4096, H = 8, d = 40, N = 77 CLIP tokens), SD 2.1 at 64×64
(L = 4096, H = 5, d = 64, N = 40 concepts), 32×32 (L = 1024) and 16×16
(L = 256), batch 1–8; bf16 on CUDA. On the CPU the suite is cut to what a
2-core machine runs in a minute or two: fp32, batch 1, L = 1024 and 256, the
compiled reference only at L = 256.

Modes: ``fwd`` (autograd recording, as in training) and ``fwdbwd`` (adds the
backward into q, k and m_ca for a given output gradient; in the ``+sdpa``
groups also into v through the attention output).

FLOPs are the minimum of the map: forward 2·B·H·L²·(d + N) (q kᵀ and Pᵀ M_ca),
backward 4·B·H·L²·(d + N) (P G, m Gᵀ, dS k, dSᵀ q); the ``+sdpa`` groups add
attention's 4·B·H·L²·d forward and 10·B·H·L²·d backward. Bytes: the inputs and
outputs once. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA; on
the CPU it is not recorded (tracemalloc does not see torch's CPU allocations;
tests/ops/test_attn_mask_aggregate_memory.py measures the resident set instead).
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

import fastdense
from _cases import ON_GPU, assert_computes, impl_params, maybe_compiled, measure_modes, random
from fastdense.ops import reference

SUITE = "attn_mask_aggregate"
OP = "attn_mask_aggregate"


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    tokens: int  # L
    head_dim: int
    concepts: int  # N

    @property
    def id(self) -> str:
        return f"{self.name}-B{self.batch}-H{self.heads}-L{self.tokens}-d{self.head_dim}-N{self.concepts}"


GPU_SHAPES = [
    Shape("sd1-64x64", 2, 8, 4096, 40, 77),
    Shape("sd21-64x64", 2, 5, 4096, 64, 40),
    Shape("sd1-32x32", 8, 8, 1024, 40, 77),
    Shape("sd21-32x32", 8, 5, 1024, 64, 40),
    Shape("sd21-16x16", 8, 5, 256, 64, 40),
]
CPU_SHAPES = [
    Shape("sd21-32x32", 1, 8, 1024, 64, 40),
    Shape("sd1-16x16", 1, 8, 256, 40, 77),
]
SHAPES = GPU_SHAPES if ON_GPU else CPU_SHAPES


def _compiled_case(shape: Shape) -> bool:
    return ON_GPU or shape.tokens <= 256


def _cases():
    for shape in SHAPES:
        yield from impl_params(shape, ["reference"], "reference-compiled" if _compiled_case(shape) else None,
                               slow=True)
        for impl in ("sdpa+probs", "sdpa-lse+fused"):
            yield pytest.param(shape, impl, id=f"{shape.id}-{impl}")


# ----------------------------------------------------------------------------- inputs and cost model
def make_inputs(shape: Shape, device, dtype) -> dict:
    b, h, length, d, n = shape.batch, shape.heads, shape.tokens, shape.head_dim, shape.concepts
    randn = random(device, dtype)
    return {
        "q": randn(b, h, length, d),
        "k": randn(b, h, length, d),
        "v": randn(b, h, length, d),
        "m_ca": torch.softmax(randn(b, length, n).float() * 2, dim=-1).to(dtype),
        "grad": randn(b, length, n),
        "grad_attn": randn(b, h, length, d),
        "scale": d ** -0.5,
    }


def cost(shape: Shape, itemsize: int, mode: str, with_sdpa: bool) -> tuple[int, int]:
    b, h, length, d, n = shape.batch, shape.heads, shape.tokens, shape.head_dim, shape.concepts
    square = b * h * length * length
    flops = 2 * square * (d + n) * (1 if mode == "fwd" else 3)
    elems = 2 * b * h * length * d + 2 * b * length * n  # q, k, m_ca in; the map out
    if mode == "fwdbwd":
        elems += 2 * b * h * length * d + 2 * b * length * n  # grad in; dq, dk, dm_ca out
    if with_sdpa:
        flops += 4 * square * d * (1 if mode == "fwd" else 3.5)
        elems += 2 * b * h * length * d * (1 if mode == "fwd" else 3)
    return elems * itemsize, int(flops)


@functools.lru_cache(maxsize=4)
def _expected(shape: Shape, device, dtype):
    t = make_inputs_cached(shape, device, dtype)
    with torch.no_grad():
        return reference.attn_mask_aggregate(t["q"].float(), t["k"].float(), t["m_ca"].float(), t["scale"])


@functools.lru_cache(maxsize=1)
def make_inputs_cached(shape: Shape, device, dtype) -> dict:
    torch.manual_seed(0)
    return make_inputs(shape, device, dtype)


# ----------------------------------------------------------------------------- implementations
# Each returns (forward() -> (map, attention output or None), leaves whose .grad backward fills).
def _leaves(t, names):
    return [t[n].detach().clone().requires_grad_(True) for n in names]


def fused_impl(t):
    q, k, m = _leaves(t, ("q", "k", "m_ca"))

    def forward():
        return fastdense.ops.attn_mask_aggregate(q, k, m, t["scale"]), None

    return forward, [q, k, m]


def reference_impl(t, impl: str):
    q, k, m = _leaves(t, ("q", "k", "m_ca"))
    fn = maybe_compiled(impl, reference.attn_mask_aggregate)

    def forward():
        return fn(q, k, m, t["scale"]), None

    return forward, [q, k, m]


def sdpa_probs_impl(t):
    q, k, v, m = _leaves(t, ("q", "k", "v", "m_ca"))

    def forward():
        attn = F.scaled_dot_product_attention(q, k, v, scale=t["scale"])
        return reference.attn_mask_aggregate(q, k, m, t["scale"]), attn

    return forward, [q, k, v, m]


def _sdpa_with_lse(q, k, v, scale):
    if q.is_cuda:
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)
        return out[0], out[1]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)


def sdpa_lse_fused_impl(t):
    q, k, v, m = _leaves(t, ("q", "k", "v", "m_ca"))

    def forward():
        attn, lse = _sdpa_with_lse(q, k, v, t["scale"])
        return fastdense.ops.attn_mask_aggregate(q, k, m, t["scale"], lse=lse.detach()), attn

    return forward, [q, k, v, m]


# ----------------------------------------------------------------------------- the benchmark
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape, impl", list(_cases()))
def test_attn_mask_aggregate(benchmark, measure, use_backend, device, dtype, shape, impl, mode):
    t = make_inputs_cached(shape, device, dtype)
    op_args = (t["q"], t["k"], t["m_ca"], t["scale"], None, "mean")
    with_sdpa = impl.startswith("sdpa")
    info = {"impl": impl, "mode": mode, "layer": shape.name, "batch": shape.batch, "heads": shape.heads,
            "tokens": shape.tokens, "head_dim": shape.head_dim, "concepts": shape.concepts,
            "includes_sdpa": with_sdpa}
    # fused-cuda is skipped: no cuda backend is registered (a CUDA kernel is only worth it if it beats Triton).
    use_backend(OP, impl, op_args, info)

    if impl.startswith("fused"):
        forward, leaves = fused_impl(t)
    elif impl.startswith("reference"):
        forward, leaves = reference_impl(t, impl)
    elif impl == "sdpa+probs":
        forward, leaves = sdpa_probs_impl(t)
    else:
        forward, leaves = sdpa_lse_fused_impl(t)

    def fwd_bwd():
        out, attn = forward()
        if attn is None:
            out.backward(t["grad"])
        else:
            torch.autograd.backward([out, attn], [t["grad"], t["grad_attn"]])

    # Guard: what is measured computes the right map.
    assert_computes(impl, forward()[0].detach(), _expected(shape, device, dtype), dtype)

    bytes_moved, flops = cost(shape, t["q"].element_size(), mode, with_sdpa)
    measure_modes(benchmark, measure, suite=SUITE, case_id=shape.id + (" +sdpa" if with_sdpa else ""), mode=mode,
                  forward=forward, leaves=leaves, grad=None, fwd_bwd=fwd_bwd, device=device, dtype=dtype, info=info,
                  bytes_moved=bytes_moved, flops=flops, first_call=True, warmup=1)
