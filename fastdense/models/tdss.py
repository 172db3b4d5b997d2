"""TDSS on Swin-T: task-dynamic skill adapters on lateral streams, one frozen backbone pass for all tasks.

TDSS (Yao, Chen, Luo, Zhang, Liao, You, AAAI 2026; no public code) adapts a
frozen ImageNet Swin-T to several dense tasks with two trainable parts:

* **TDSA** (§4.2, Eq. 3-7): a :class:`~fastdense.nn.TaskDynamicSkillAdapter`
  beside the attention and the FFN layer of each of the 12 blocks. It reads
  the frozen layer's input and returns one feature x^t per task from shared
  down/up projections, a shared pool of M skills and per-task softmax gates
  (one fused ``skill_gated_transform`` call for all tasks).
* **TSAI** (§4.3, Eq. 8) and the heads: :mod:`fastdense.models.tdss_tsai`.

How this file reads the paper (docs/paper-decisions.md, the '# TDSS' part):

* **One backbone pass, no gradient through it** ('TDSS lateral stream'). The
  backbone runs once under ``torch.no_grad()``, for all tasks, and records
  each adapter's input; the task streams never re-enter it. Task t's lateral
  stream is the backbone's residual stream plus the task's own accumulated
  adaptation::

      L_t = x + Δ_t,   Δ_t += x^t after every adapted layer of the stage

  so a stage's feature for task t is F_t = x_end + Δ_t. At the end of a stage
  the stream goes through the frozen patch merging, PM(F_t), and continues
  in the next stage as PM(F_t) = x_start' + Δ_t' (x_start' = PM(x_end) is the
  backbone's own next input). Without adapters (or with W_u = 0, the
  initialisation) every task sees exactly the pretrained Swin's stage outputs,
  which is how Table 4(a) describes "+TSAI": "feeding pretrained features
  directly into TSAI". The gradient reaches the adapters through the additions
  and the frozen patch mergings only; the backbone's activations are not kept
  for backward (tests/models/test_tdss.py counts what autograd saves).
* **TDSA input** ('TDSA input'): the normalised input each frozen sublayer
  reads, ``norm1(x)`` for attention and ``norm2(x')`` for the FFN (Swin is
  pre-norm), as parallel adapters (AdaptFormer) read it.
* **Rank** R = C · ``rank_ratio`` (C/4) per stage, M = ``num_skills`` (10).
* **Trainable set** (Fig. 2a: "only the parameters in TDSA and TSAI are
  tunable"): the adapters, TSAI and the heads; the whole backbone (norms,
  position biases and patch mergings included) is frozen.
* The backbone has no final LayerNorm (stage outputs are raw, as MTLoRA's and
  TADFormer's decoders read them) and no classifier.

``train_base=True`` (training from scratch, e.g. the synthetic CPU tests and
``fastdense train --model-arg train_base=true``) makes every parameter
trainable *and* runs the backbone with autograd, so its weights learn too;
it is not the paper's method and gives up the single-pass memory saving.

Trainable parameters for PASCAL-Context's four tasks at 448²: TDSA
2,355,264 + TSAI 1,153,952 (fusion 702,720, synergy 448,128, heads 3,104)
= 3,509,216, the paper's 3.52 M within 0.31 % (docs/papers.md, 'Trainable
parameter counts').
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn

from fastdense.models.mtlora import PASCAL_TASKS, SWIN_T, swin_model_tasks
from fastdense.models.peft import PEFTModel
from fastdense.models.registry import register_model
from fastdense.models.swin import SwinTransformer
from fastdense.models.swin_checkpoint import LoadReport
from fastdense.models.tdss_tsai import TSAI, TSAI_DIM, TSAI_HEADS, TSAI_MLP_RATIO, TSAI_SR_RATIO
from fastdense.nn.skill_gated_transform import TaskDynamicSkillAdapter

#: The two adapted layers of every Swin block, in the order the block runs them.
ADAPTED_LAYERS = ("attn", "ffn")


class BackbonePass(NamedTuple):
    """What the single backbone pass leaves for the task streams, per stage: ``start``
    (the stage's input, after patch merging), ``taps`` (the input of every adapted layer,
    in order: block 0 attn, block 0 ffn, block 1 attn, ...) and ``end`` (its output)."""

    start: torch.Tensor
    taps: List[torch.Tensor]
    end: torch.Tensor


def adapter_rank(dim: int, rank_ratio: float) -> int:
    """R for a stage of width C: round(C · rank_ratio), at least 1 (C/4 for TDSS)."""
    return max(1, int(round(dim * rank_ratio)))


class TDSSSwin(PEFTModel, nn.Module):
    """Frozen Swin backbone, TDSA lateral streams and TSAI with one head per task.

    ``forward(image) -> {task: (B, C_t, H, W)}`` raw outputs at the image's size.

    Args:
        tasks: task names; ``num_outputs``: their output channels.
        num_skills: M, the skills of every TDSA (10).
        rank_ratio: R / C of every TDSA (0.25).
        synergy_layers: K, the TSAI synergy layers (4).
        tsai_dim, tsai_heads, tsai_mlp_ratio, tsai_sr_ratio: TSAI's width, attention
            heads, FFN ratio and key/value pooling (:mod:`fastdense.models.tdss_tsai`).
        img_size: the input size the model is configured for (448 in the paper; read by
            the CLI and the benchmarks). Any size Swin can pad works.
        train_base: train every parameter, backbone included, with autograd through the
            backbone (see the module docstring); not the paper's method.
        **swin_kwargs: :class:`~fastdense.models.swin.SwinTransformer` arguments.
    """

    def __init__(self, tasks: Sequence[str], num_outputs: Mapping[str, int], *, num_skills: int = 10,
                 rank_ratio: float = 0.25, synergy_layers: int = 4, tsai_dim: int = TSAI_DIM,
                 tsai_heads: int = TSAI_HEADS, tsai_mlp_ratio: float = TSAI_MLP_RATIO,
                 tsai_sr_ratio: int = TSAI_SR_RATIO, img_size: int = 448, train_base: bool = False,
                 **swin_kwargs: Any) -> None:
        nn.Module.__init__(self)
        self.tasks = list(tasks)
        missing = [t for t in self.tasks if t not in num_outputs]
        if missing:
            raise ValueError(f"num_outputs has no entry for task(s) {missing}")
        if not 0.0 < rank_ratio <= 1.0:
            raise ValueError(f"rank_ratio must lie in (0, 1], got {rank_ratio}")
        self.num_outputs = {t: int(num_outputs[t]) for t in self.tasks}
        self.img_size = int(img_size)
        self.train_base = bool(train_base)
        self.backbone = SwinTransformer(num_classes=0, **swin_kwargs)
        self.backbone.norm = nn.Identity()  # stage outputs are read raw; nothing to freeze or load
        dims, depths = self.backbone.dims, self.backbone.depths
        self.adapters = nn.ModuleList(
            nn.ModuleList(
                nn.ModuleDict({layer: TaskDynamicSkillAdapter(c, adapter_rank(c, rank_ratio), num_skills, self.tasks)
                               for layer in ADAPTED_LAYERS})
                for _ in range(depth))
            for c, depth in zip(dims, depths))
        self.feature_channels = tuple(dims)
        self.tsai = TSAI(self.tasks, dims, self.num_outputs, dim=tsai_dim, depth=synergy_layers,
                         num_heads=tsai_heads, mlp_ratio=tsai_mlp_ratio, sr_ratio=tsai_sr_ratio)
        self.mark_trainable()

    # ------------------------------------------------------------------ PEFT
    def is_paper_trainable(self, name: str) -> bool:
        """TDSA and TSAI (with the heads); nothing of the backbone."""
        return name.startswith(("adapters.", "tsai."))

    def parameter_group(self, name: str, module: nn.Module) -> str:
        if name.startswith("adapters."):
            return "adapters"
        if name.startswith("tsai."):
            return "decoders"  # TSAI and the heads turn stage features into predictions
        return super().parameter_group(name, module)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute TSAI's synergy layers in the backward pass instead of storing their
        activations, most of what TDSS keeps per task (the backbone keeps nothing to recompute)."""
        self.tsai.grad_checkpointing = enable

    # ------------------------------------------------------------------ backbone
    def backbone_pass(self, image: torch.Tensor) -> List[BackbonePass]:
        """Run the backbone once (under ``torch.no_grad()`` unless ``train_base``) and return,
        per stage, ``(start, taps, end)`` (see :class:`BackbonePass`)."""
        if self.train_base:
            return self._backbone_pass(image)
        with torch.no_grad():
            return self._backbone_pass(image)

    def _backbone_pass(self, image: torch.Tensor) -> List[BackbonePass]:
        bb = self.backbone
        x = bb.patch_embed(image)
        stages = []
        for stage in bb.layers:
            x = stage.downsample(x)
            start, taps = x, []
            for block in stage.blocks:  # SwinBlock.forward, keeping each sublayer's input
                u = block.norm1(x)
                x = x + block.drop_path1(block.window_attention(u))
                v = block.norm2(x)
                x = x + block.drop_path2(block.mlp(v))
                taps += [u, v]
            stages.append(BackbonePass(start, taps, x))
        return stages

    # ------------------------------------------------------------------ lateral streams
    def forward_lateral(self, image: torch.Tensor) -> List[torch.Tensor]:
        """Every task's stage features, stacked: one (T, B, H_s, W_s, C_s) tensor per stage
        (strides 4, 8, 16, 32), F_t = x_end + Δ_t (see the module docstring)."""
        stages = self.backbone_pass(image)
        t, b = len(self.tasks), image.shape[0]
        feats: List[torch.Tensor] = []
        carry: Optional[torch.Tensor] = None
        for i, ((_, taps, end), blocks) in enumerate(zip(stages, self.adapters)):
            # The stream accumulates in the backbone stream's dtype (fp32 under autocast).
            f = end if carry is None else end + carry
            adapters = [blk[layer] for blk in blocks for layer in ADAPTED_LAYERS]
            for adapter, tap in zip(adapters, taps):
                f = f + adapter(tap, stacked=True)
            if f.dim() == end.dim():  # a stage without adapters: every task has the backbone's feature
                f = f.expand(t, *f.shape)
            feats.append(f)
            if i + 1 < len(stages):
                merged = self.backbone.layers[i + 1].downsample(f.flatten(0, 1))
                carry = merged.unflatten(0, (t, b)) - stages[i + 1].start
        return feats

    def forward_features(self, image: torch.Tensor) -> Dict[str, List[torch.Tensor]]:
        """{task: [NCHW stage feature of each stage]} (TSAI's inputs, finest first)."""
        feats = self.forward_lateral(image)
        return {task: [f[k].permute(0, 3, 1, 2) for f in feats] for k, task in enumerate(self.tasks)}

    def forward(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.tsai(self.forward_lateral(image), image.shape[-2:])


# ---------------------------------------------------------------------------------------
# checkpoints and constructors
# ---------------------------------------------------------------------------------------

def load_pretrained(model: TDSSSwin, path: Union[str, os.PathLike], *, source: str = "auto",
                    strict: bool = True) -> LoadReport:
    """Load a local ImageNet Swin checkpoint (timm or Microsoft layout) into ``model.backbone``;
    never downloads. The checkpoint's final norm and classifier are dropped (TDSS's backbone
    has neither); adapters and TSAI keep their initialisation. With ``strict`` a missing or
    unexpected backbone key raises ValueError."""
    from fastdense.models.swin_checkpoint import load_pretrained as load_swin_pretrained

    path = os.fspath(path)
    report = load_swin_pretrained(model.backbone, path, source=source)
    final = [k for k in report.unexpected if k.startswith("norm.")]
    report.unexpected = [k for k in report.unexpected if k not in final]
    report.dropped += final
    report.missing = ["backbone." + k for k in report.missing]
    if final:
        report.notes.append("the checkpoint's final norm is dropped: TDSS's backbone has none")
    report.notes.append("the TDSA adapters, TSAI and the heads keep their initialisation")
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"{path} does not fit the TDSS backbone:\n{report}")
    return report


@register_model(kind="multitask")
def tdss_swin_t(tasks: Union[Sequence[str], str] = PASCAL_TASKS, *, dataset: Optional[str] = None,
                num_outputs: Optional[Mapping[str, int]] = None, num_skills: int = 10, rank_ratio: float = 0.25,
                synergy_layers: int = 4, img_size: int = 448, pretrained: Optional[str] = None,
                train_base: bool = False, **kwargs: Any) -> TDSSSwin:
    """TDSS on Swin-T (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7, stochastic depth
    0.2 as in the shared Swin-T recipe) with the paper's defaults M = 10, R = C/4, K = 4.

    ``tasks`` (a list or a comma-separated string) take their output channels from
    ``dataset`` ("pascal", "nyud" or "synthetic"; by default the first that has all the
    tasks) unless ``num_outputs`` gives them. ``pretrained``: a local ImageNet Swin-T
    checkpoint for the backbone (:func:`load_pretrained`). Other keyword arguments go to
    :class:`TDSSSwin` (TSAI's ``tsai_*``) and :class:`~fastdense.models.swin.SwinTransformer`.
    """
    tasks, outputs = swin_model_tasks(tasks, dataset, num_outputs)
    model = TDSSSwin(tasks, outputs, num_skills=num_skills, rank_ratio=rank_ratio,
                     synergy_layers=synergy_layers, img_size=img_size, train_base=train_base, **{**SWIN_T, **kwargs})
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


__all__ = ["ADAPTED_LAYERS", "BackbonePass", "TDSSSwin", "adapter_rank", "load_pretrained", "tdss_swin_t"]
