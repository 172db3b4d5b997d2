"""Plain-PyTorch references: the ground truth every kernel is tested against.

These functions read like the papers' equations and are differentiated by
torch autograd in the tests. Do not optimise them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mt_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: list[int],
    scales: list[float],
    shared_in_tasks: bool = False,
    x_lora: torch.Tensor | None = None,
    x_tasks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-task LoRA linear (MTLoRA's ``MTLoRALinear``), outputs stacked.

    Adapter 0 is the shared LoRA, adapters 1..T the task LoRAs; adapter ``a``
    owns rows ``ranks[a]`` of ``lora_a`` (r_a x K) and columns of ``lora_b``
    (N x r_a). With base = x W0ᵀ + b and LoRA_a(u) = s_a · u A_aᵀ B_aᵀ
    (LoRA, Eq. 4 of the timestep paper):

        out[0] = base + LoRA_0(x_lora)
        out[t] = base + LoRA_t(x_tasks[t-1] or x_lora)       ('matrix')
        out[t] = base + LoRA_0(x_lora) + LoRA_t(...)         ('matrixv2', shared_in_tasks)

    ``x_lora`` is the (dropped-out) LoRA input; None means ``x``.
    Returns a tensor of shape (1 + T, *x.shape[:-1], N).
    """
    if x_lora is None:
        x_lora = x
    a_blocks = lora_a.split(list(ranks), dim=0)
    b_blocks = lora_b.split(list(ranks), dim=1)

    def lora(a: int, u: torch.Tensor) -> torch.Tensor:
        return scales[a] * (u @ a_blocks[a].t() @ b_blocks[a].t())

    base = F.linear(x, weight, bias)
    shared = lora(0, x_lora)
    outputs = [base + shared]
    for t in range(1, len(ranks)):
        u = x_lora if x_tasks is None else x_tasks[t - 1]
        task_out = base + lora(t, u)
        if shared_in_tasks:
            task_out = task_out + shared
        outputs.append(task_out)
    return torch.stack(outputs)
