"""The ``torch`` backend of the multi-task LoRA op: explicit forward and backward.

It spells out the fused algorithm the kernels implement (one shrink GEMM over
the concatenated A's, the base GEMM once, a grouped expand) with plain PyTorch
calls, and is the fallback on every device. ``reference.mt_lora_linear`` stays
the ground truth; this file is checked against it like any other backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Order of the gradients returned by every backend's backward.
GRAD_NAMES = ("x", "weight", "bias", "lora_a", "lora_b", "x_lora", "x_tasks")


def segments(ranks: list[int]) -> list[tuple[int, int]]:
    """(start, stop) of each adapter's rows of A / columns of B."""
    out, start = [], 0
    for r in ranks:
        out.append((start, start + r))
        start += r
    return out


def shrink(lora_a, ranks, u, x_tasks):
    """h = [u A_0ᵀ | x_1 A_1ᵀ | ...]: one GEMM when all adapters read u."""
    if x_tasks is None:
        return u @ lora_a.t()
    seg = segments(ranks)
    parts = [u @ lora_a[seg[0][0]:seg[0][1]].t()]
    for t in range(1, len(ranks)):
        a0, a1 = seg[t]
        parts.append(x_tasks[t - 1] @ lora_a[a0:a1].t())
    return torch.cat(parts, dim=1)


def forward(x, weight, bias, lora_a, lora_b, ranks, scales, shared_in_tasks, x_lora, x_tasks):
    u = x if x_lora is None else x_lora
    h = shrink(lora_a, ranks, u, x_tasks)
    seg = segments(ranks)
    base = F.linear(x, weight, bias)
    out = base.new_empty((len(ranks), x.shape[0], weight.shape[0]))
    s0, s1 = seg[0]
    shared = torch.addmm(base, h[:, s0:s1], lora_b[:, s0:s1].t(), alpha=scales[0], out=out[0])
    task_base = shared if shared_in_tasks else base
    for t in range(1, len(ranks)):
        a0, a1 = seg[t]
        torch.addmm(task_base, h[:, a0:a1], lora_b[:, a0:a1].t(), alpha=scales[t], out=out[t])
    return out, h


def backward(grad, x, weight, bias, lora_a, lora_b, ranks, scales, shared_in_tasks,
             x_lora, x_tasks, h, needs):
    seg = segments(ranks)
    grad_base = grad.sum(0)
    # Gradient reaching each adapter's output: the shared LoRA feeds every
    # output in 'matrixv2', only out[0] in 'matrix'.
    grad_adapter = [grad_base if (a == 0 and shared_in_tasks) else grad[a] for a in range(len(ranks))]
    dh = torch.cat([scales[a] * (grad_adapter[a] @ lora_b[:, s0:s1]) for a, (s0, s1) in enumerate(seg)], dim=1)
    empty = x.new_empty(0)
    u = x if x_lora is None else x_lora

    d_lora_b = empty
    if needs[4]:
        d_lora_b = torch.cat([scales[a] * (grad_adapter[a].t() @ h[:, s0:s1])
                              for a, (s0, s1) in enumerate(seg)], dim=1)
    d_x_tasks = empty
    if x_tasks is None:
        d_lora_a = dh.t() @ u if needs[3] else empty
        d_u = dh @ lora_a
    else:
        s0, s1 = seg[0]
        d_lora_a = empty
        if needs[3]:
            d_lora_a = torch.cat([dh[:, s0:s1].t() @ u] + [
                dh[:, a0:a1].t() @ x_tasks[t - 1] for t, (a0, a1) in enumerate(seg) if t > 0])
        d_u = dh[:, s0:s1] @ lora_a[s0:s1]
        if needs[6]:
            per_task = [dh[:, a0:a1] @ lora_a[a0:a1] for t, (a0, a1) in enumerate(seg) if t > 0]
            d_x_tasks = torch.stack(per_task) if per_task else torch.zeros_like(x_tasks)

    d_x = empty
    if needs[0]:
        d_x = grad_base @ weight
        if x_lora is None:
            d_x = d_x + d_u
    d_x_lora = d_u if (x_lora is not None and needs[5]) else empty
    d_weight = grad_base.t() @ x if needs[1] else empty
    d_bias = grad_base.sum(0) if (needs[2] and bias is not None) else empty
    return d_x, d_weight, d_bias, d_lora_a, d_lora_b, d_x_lora, d_x_tasks
