"""TDSS's Task-Dynamic Skill Adapter (TDSA), built on ``fastdense.ops.skill_gated_transform``.

TDSS (§4.2, Eq. 3–7) puts a TDSA in parallel with each attention and FFN layer
of every Swin block. For a layer input x (..., C) it computes, for every task t,

    h   = x W_d                                          (3)  C -> R, shared
    γ̂_t = softmax(h W_γ^t),  β̂_t = softmax(h W_β^t)      (4)  M skills
    γ_t = γ̂_t S,  β_t = β̂_t S                           (5)  S (M, R), shared
    x^t = GELU(γ_t ⊙ h + β_t) W_u                        (6–7) R -> C, shared

All T outputs come from one fused call (one read of x, h computed once).

Reading of the paper used here (docs/paper-decisions.md, 'TDSS lateral stream'): the adapter
reads the *frozen* backbone layer's input x, so no gradient flows through the
backbone (the stated memory saving). Task t's lateral stream starts from the
stage's input features, accumulates every x^t of the stage, goes through the
frozen patch merging and seeds the next stage's lateral stream::

    adapters = {name: TaskDynamicSkillAdapter(C, tasks=TASKS) for name in ("attn", "ffn")}
    lateral = {t: stage_input for t in TASKS}        # per-task lateral stream
    for block in stage.blocks:                       # frozen Swin blocks
        x = block.norm1_input                        # the frozen layer's input
        for t, xt in adapters["attn"](x).items():
            lateral[t] = lateral[t] + xt
        x = block(x)  ... (likewise "ffn" on the FFN input)
    lateral = {t: patch_merging(f) for t, f in lateral.items()}

Initialisation (the paper gives none): W_d Kaiming-uniform like nn.Linear
(bound 1/√C); W_u zeros, so every x^t starts at zero and the lateral path adds
nothing at the first step (LoRA's B = 0, adapters' near-identity start);
S = 1 + 0.1·N(0, 1), so every skill starts near γ = 1 and h_s ≈ h + β, a plain
bottleneck adapter whose skills drift apart during training; W_γ, W_β ~
N(0, 0.02²), so the gates start close to uniform over the skills.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from fastdense.nn._tasks import task_names, task_outputs
from fastdense.ops import skill_gated_transform

__all__ = ["TaskDynamicSkillAdapter", "swin_tdsa_parameters"]

# Swin-T (Liu et al. 2021): embedding width and blocks per stage.
SWIN_T_EMBED_DIM = 96
SWIN_T_DEPTHS = (2, 2, 6, 2)


def _positive_int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{what} must be a positive int, got {v!r}")
    return v


class TaskDynamicSkillAdapter(nn.Module):
    """TDSS's TDSA for T tasks at once (Eq. 3–7), a lateral module for any layer.

    Args:
        dim: C, the width of the layer input (and of each output x^t).
        rank: R, the bottleneck width; default ``dim // 4`` (TDSS: R = C/4).
        num_skills: M, the number of shared skill vectors (TDSS: 10).
        tasks: number of tasks T, or their names (keys of the output dict).

    ``forward(x)`` takes x (..., C) and returns ``{task: x^t}`` with each
    x^t (..., C), or the stacked (T, ..., C) tensor with ``stacked=True``.
    See the module docstring for the initialisation and how TDSS wires it.
    """

    def __init__(self, dim: int, rank: int | None = None, num_skills: int = 10, tasks=4, *,
                 device=None, dtype=None):
        super().__init__()
        self.dim = _positive_int(dim, "dim")
        self.rank = _positive_int(max(1, dim // 4) if rank is None else rank, "rank")
        self.num_skills = _positive_int(num_skills, "num_skills")
        self.tasks = task_names(tasks)
        t, c, r, m = len(self.tasks), self.dim, self.rank, self.num_skills
        kw = {"device": device, "dtype": dtype}
        self.w_down = nn.Parameter(torch.empty(c, r, **kw))        # W_d
        self.w_up = nn.Parameter(torch.empty(r, c, **kw))          # W_u
        self.skills = nn.Parameter(torch.empty(m, r, **kw))        # S
        self.w_gamma = nn.Parameter(torch.empty(t, r, m, **kw))    # W_γ^t, stacked over t
        self.w_beta = nn.Parameter(torch.empty(t, r, m, **kw))     # W_β^t
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.dim)  # kaiming_uniform_(a=√5) with fan_in = C
        self.w_down.uniform_(-bound, bound)
        self.w_up.zero_()
        self.skills.normal_(0.0, 0.1).add_(1.0)
        self.w_gamma.normal_(0.0, 0.02)
        self.w_beta.normal_(0.0, 0.02)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @staticmethod
    def count_parameters(dim: int, rank: int | None = None, num_skills: int = 10, tasks: int = 4) -> int:
        """Trainable parameters of one TDSA: 2·C·R (W_d, W_u) + M·R (S) + 2·T·R·M (gates)."""
        r = max(1, dim // 4) if rank is None else rank
        return 2 * dim * r + num_skills * r + 2 * tasks * r * num_skills

    def forward(self, x: torch.Tensor, stacked: bool = False):
        out = skill_gated_transform(x, self.w_down, self.w_up, self.skills, self.w_gamma, self.w_beta)
        return task_outputs(self.tasks, out, stacked)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}, num_skills={self.num_skills}, tasks={self.tasks}"


def swin_tdsa_parameters(embed_dim: int = SWIN_T_EMBED_DIM, depths: Sequence[int] = SWIN_T_DEPTHS,
                         tasks: int = 4, num_skills: int = 10, per_block: int = 2) -> int:
    """Parameters of TDSS's adapters on a Swin backbone: ``per_block`` TDSAs
    (attention and FFN) in every block, stage s at width embed_dim·2^s, R = C/4.

    Swin-T with T = 4, M = 10 gives 2,355,264 (docs/papers.md, 'Trainable parameter counts': ≈ 2.36 M).
    """
    total = 0
    for stage, depth in enumerate(depths):
        c = embed_dim * 2 ** stage
        total += per_block * depth * TaskDynamicSkillAdapter.count_parameters(c, None, num_skills, tasks)
    return total
