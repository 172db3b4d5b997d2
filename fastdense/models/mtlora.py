"""MTLoRA on Swin-T: task-agnostic and task-specific low-rank adaptation for dense multi-task learning.

MTLoRA (Agiza, Neseem, Reda, CVPR 2024) fine-tunes a frozen ImageNet Swin-T for
several dense tasks at once. Every linear layer of every block carries a
*task-agnostic* LoRA (shared by all tasks); the last block of each stage also
carries one *task-specific* LoRA per task on its attention projection and its
two MLP layers, which turns that block's output into one feature map per
task. Each task's four stage features go to the task's own decoder
(:class:`fastdense.models.heads.TaskDecoder`). The layer is
:class:`fastdense.nn.MultiTaskLoRALinear`: one fused ``mt_lora_linear`` call
computes the shared output and every task output of a layer.

What follows is the released code (``scale-lab/MTLoRA``,
``models/swin_transformer_mtlora.py`` and ``models/swin_mtl.py``), stated in
this file's terms (docs/papers.md, section 'MTLoRA'):

* Blocks that are not the last of their stage: the Swin block with the shared
  LoRA on qkv, proj, fc1 and fc2 (no task outputs).
* The last block of a stage, from shared tokens x (B, H, W, C), with h_0 the
  shared output and h_t task t's output of a :class:`MultiTaskLoRALinear`:

  - qkv has the shared LoRA only, so the attention itself is computed once;
    proj returns h_0 and every h_t from the same attention output (the task
    LoRAs read it through the same dropout as the shared one).
  - Residual: a_0 = x + drop_path(h_0) and a_t = x + drop_path(h_t); every
    task branch starts from the shared shortcut x.
  - MLP: fc1 gets norm2(a_0) as its input and norm2(a_t) as task t's LoRA
    input, so h_t = fc1_pretrained(norm2(a_0)) + s_t · LoRA_t(norm2(a_t)) (the
    pretrained weight always reads the shared stream; 'matrix' mode, the
    released configuration). GELU and dropout act on every output; fc2 takes
    fc1's shared output as its input and fc1's task outputs as the task LoRA
    inputs, the same way.
  - Output: x_0 = a_0 + drop_path(fc2 h_0) continues the backbone; task t's
    feature is a_t + drop_path(fc2 h_t).
* The stage's feature for task t is that feature passed through the *next*
  stage's patch merging (the released Swin keeps patch merging at the end of a
  stage, and applies it to the shared and to every task feature); the last
  stage has none. The task features never re-enter the backbone: each stage's
  last block derives them afresh from the shared stream. For Swin-T at 448²
  the decoders therefore see 56², 28², 14², 14² maps of 192, 384, 768, 768
  channels.
* The backbone has no final LayerNorm and no classifier.
* Trainable (the released ``mark_only_lora_as_trainable`` with the config's
  defaults): every ``lora_*`` parameter, the patch embedding, every LayerNorm,
  the relative-position bias tables and the patch-merging reductions of the
  backbone, and all of the decoders.

How fastdense computes the last block: proj's outputs are stacked into a
(1 + T) * B batch, so the Swin block's own window-reverse and roll code
(:meth:`SwinBlock.window_attention`) runs unchanged on them; fc1 and fc2 take
that stack (index 0 shared, 1 + i task i) and return the same layout, so the
block's own ``Mlp`` runs unchanged too; the next stage's patch merging runs
once on the whole stack. Dropout and drop-path draw independent masks per
task and sample, as the released per-task calls do.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint

from fastdense.models._tasks import validate_tasks
from fastdense.models.heads import DECODER_CHANNELS, TaskDecoder
from fastdense.models.peft import PEFTModel
from fastdense.models.registry import register_model
from fastdense.models.swin import SwinBlock, SwinTransformer
from fastdense.nn.lora import MultiTaskLoRALinear

PASCAL_TASKS = ("semseg", "human_parts", "sal", "normals")


# ---------------------------------------------------------------------------------------
# layers: MultiTaskLoRALinear with the input/output layout each place in the block needs
# ---------------------------------------------------------------------------------------

class SharedLoRALinear(MultiTaskLoRALinear):
    """A layer without task adapters: ``forward(x)`` returns the shared output h_0 alone,
    so it stands in for ``nn.Linear`` inside the unmodified Swin code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.forward_stacked(x)[0]


class FanOutLoRALinear(MultiTaskLoRALinear):
    """The last block's attention projection: one input, all outputs stacked (1 + T, ..., N)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.forward_stacked(x)


class StackedLoRALinear(MultiTaskLoRALinear):
    """The last block's fc1 and fc2: a stacked input (1 + T, ..., K), index 0 the shared
    input (base GEMM and shared LoRA), 1 + i task i's LoRA input; stacked output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.forward_stacked(x[0], x[1:])


# ---------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------

def _task_block(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """The last block of a stage (see the module docstring): (B, H, W, C) shared tokens ->
    (1 + T, B, H, W, C), index 0 the shared output, 1 + i task i's feature."""
    b = x.shape[0]
    attn = block.window_attention(block.norm1(x))                    # ((1 + T) * B, H, W, C)
    a = x + block.drop_path1(attn).unflatten(0, (-1, b))              # every branch from the shortcut x
    m = block.mlp(block.norm2(a))                                     # stacked fc1 -> GELU -> stacked fc2
    return a + block.drop_path2(m.flatten(0, 1)).unflatten(0, (-1, b))


class MTLoRASwin(PEFTModel, nn.Module):
    """Swin backbone with MTLoRA adapters and one :class:`TaskDecoder` per task.

    ``forward(image) -> {task: (B, C_t, H, W) raw output}`` at the image's size
    (logits for segmentation, saliency and edges, unnormalised normals, depth).

    Args:
        tasks: task names; ``num_outputs``: their output channels.
        shared_rank, task_rank: ranks of the task-agnostic and task-specific LoRAs
            (``task_rank`` an int or one per task); shared_scale, task_scale: their
            scales, used as given (not divided by the rank); dropout: LoRA dropout.
        shared_mode: "matrix" (released configuration), "matrixv2" or "addition"
            (see :class:`~fastdense.nn.MultiTaskLoRALinear`).
        trainable_shared_scale, trainable_task_scale: make the scales Parameters.
        decoder_channels: the Downsampler widths per stage.
        img_size: the input size the model is configured for (448 in the paper;
            read by the CLI and the benchmarks as their default). Any size whose
            stage maps Swin can pad works; outputs always match the input size.
        train_base: train every parameter (for training from scratch) instead of
            the paper's set.
        freeze_patch_embed, freeze_norm, freeze_position_bias, freeze_patch_merging:
            the released ``TRAIN.FREEZE_*`` switches (all False in its configuration).
        **swin_kwargs: :class:`~fastdense.models.swin.SwinTransformer` arguments
            (embed_dim, depths, num_heads, window_size, drop_path_rate, ...).
    """

    def __init__(self, tasks: Sequence[str], num_outputs: Mapping[str, int], *, shared_rank: int = 64,
                 task_rank: Union[int, Mapping[str, int]] = 4, shared_scale: float = 4.0,
                 task_scale: Union[float, Mapping[str, float]] = 4.0, dropout: float = 0.05,
                 shared_mode: str = "matrix", trainable_shared_scale: bool = False,
                 trainable_task_scale: bool = False, decoder_channels: Sequence[int] = DECODER_CHANNELS,
                 img_size: int = 448, train_base: bool = False, freeze_patch_embed: bool = False,
                 freeze_norm: bool = False, freeze_position_bias: bool = False, freeze_patch_merging: bool = False,
                 **swin_kwargs: Any) -> None:
        nn.Module.__init__(self)
        self.tasks = list(tasks)
        missing = [t for t in self.tasks if t not in num_outputs]
        if missing:
            raise ValueError(f"num_outputs has no entry for task(s) {missing}")
        self.num_outputs = {t: int(num_outputs[t]) for t in self.tasks}
        self.img_size = int(img_size)
        self.train_base = bool(train_base)
        self.freeze = {"patch_embed": freeze_patch_embed, "norm": freeze_norm,
                       "relative_position_bias_table": freeze_position_bias,
                       "downsample.reduction": freeze_patch_merging}
        self.backbone = SwinTransformer(num_classes=0, **swin_kwargs)
        # The released backbone ends at the last stage: no final LayerNorm to train.
        self.backbone.norm = nn.Identity()
        lora = dict(shared_rank=shared_rank, task_ranks=task_rank, shared_scale=shared_scale,
                    task_scale=task_scale, dropout=dropout, shared_mode=shared_mode,
                    trainable_shared_scale=trainable_shared_scale, trainable_task_scale=trainable_task_scale)
        for stage in self.backbone.layers:
            for j, block in enumerate(stage.blocks):
                last = j == len(stage.blocks) - 1
                self._adapt_block(block, self.tasks if last else None, lora)
        dims = self.backbone.dims
        n = len(dims)
        # Stage i's features leave through stage i + 1's patch merging (none after the last).
        self.feature_channels = tuple(dims[min(i + 1, n - 1)] for i in range(n))
        self.decoders = nn.ModuleDict({t: TaskDecoder(self.feature_channels, self.num_outputs[t], decoder_channels)
                                       for t in self.tasks})
        self.grad_checkpointing = False
        self.mark_trainable()

    @staticmethod
    def _adapt_block(block: SwinBlock, tasks: Optional[Sequence[str]], lora: Dict[str, Any]) -> None:
        attn, mlp = block.attn, block.mlp
        attn.qkv = SharedLoRALinear.from_linear(attn.qkv, None, **lora)
        if tasks is None:
            attn.proj = SharedLoRALinear.from_linear(attn.proj, None, **lora)
            mlp.fc1 = SharedLoRALinear.from_linear(mlp.fc1, None, **lora)
            mlp.fc2 = SharedLoRALinear.from_linear(mlp.fc2, None, **lora)
        else:
            attn.proj = FanOutLoRALinear.from_linear(attn.proj, tasks, **lora)
            mlp.fc1 = StackedLoRALinear.from_linear(mlp.fc1, tasks, **lora)
            mlp.fc2 = StackedLoRALinear.from_linear(mlp.fc2, tasks, **lora)

    # ------------------------------------------------------------------ PEFT
    def is_paper_trainable(self, name: str) -> bool:
        """The released ``mark_only_lora_as_trainable`` on the backbone (substring rules),
        everything outside the backbone (the decoders) trainable."""
        if not name.startswith("backbone."):
            return True
        if "lora_" in name:
            return True
        return any(key in name and not frozen for key, frozen in self.freeze.items())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in backward instead of storing its activations."""
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------ forward
    def _run(self, fn, *args):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward_features(self, image: torch.Tensor) -> Dict[str, list]:
        """{task: [NCHW feature of each stage]} (the decoders' inputs, finest first)."""
        bb = self.backbone
        x = bb.patch_embed(image)
        x = bb.layers[0].downsample(x)  # Identity in Swin; kept so that a merging there would apply
        per_stage = []
        n = len(bb.layers)
        for i, stage in enumerate(bb.layers):
            *body, last = stage.blocks
            for block in body:
                x = self._run(block, x)
            y = self._run(_task_block, last, x)                         # (1 + T, B, H, W, C)
            if i + 1 < n:
                y = bb.layers[i + 1].downsample(y.flatten(0, 1)).unflatten(0, y.shape[:2])
            x = y[0]
            per_stage.append(y[1:])
        return {t: [f[k].permute(0, 3, 1, 2) for f in per_stage] for k, t in enumerate(self.tasks)}

    def forward(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.forward_features(image)
        size = image.shape[-2:]
        return {t: self.decoders[t](feats[t], size) for t in self.tasks}


# ---------------------------------------------------------------------------------------
# constructors
# ---------------------------------------------------------------------------------------

def _num_outputs(tasks: Sequence[str], dataset: Optional[str],
                 num_outputs: Optional[Mapping[str, int]]) -> Dict[str, int]:
    from fastdense.engine.tasks import TASKS, dataset_of, task_channels  # the engine imports no model

    if num_outputs is not None:
        return {t: int(num_outputs[t]) for t in tasks if t in num_outputs}
    dataset = dataset if dataset is not None else dataset_of(tasks)
    if dataset not in TASKS:
        raise ValueError(f"unknown data set {dataset!r}; data sets: {', '.join(TASKS)}")
    validate_tasks(tasks, TASKS[dataset], kind=f"{dataset} task")
    return task_channels(tasks, dataset)


#: Swin-T's shape (and stochastic depth 0.2), the backbone of the three multi-task models.
SWIN_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.2)


def swin_model_tasks(tasks: Union[Sequence[str], str], dataset: Optional[str],
                     num_outputs: Optional[Mapping[str, int]]) -> tuple[list, Dict[str, int]]:
    """The constructors' task handling: ``tasks`` as a list (or "a,b") and each task's output
    channels, from ``num_outputs`` or the data set's task table."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if num_outputs is not None:
        tasks = validate_tasks(tasks, num_outputs)
    tasks = list(tasks)
    return tasks, _num_outputs(tasks, dataset, num_outputs)


@register_model(kind="multitask")
def mtlora_swin_t(tasks: Union[Sequence[str], str] = PASCAL_TASKS, *, dataset: Optional[str] = None,
                  num_outputs: Optional[Mapping[str, int]] = None, shared_rank: int = 64,
                  task_rank: Union[int, Mapping[str, int]] = 4, shared_scale: float = 4.0,
                  task_scale: Union[float, Mapping[str, float]] = 4.0, dropout: float = 0.05,
                  shared_mode: str = "matrix", img_size: int = 448, pretrained: Optional[str] = None,
                  train_base: bool = False, **kwargs: Any) -> MTLoRASwin:
    """MTLoRA on Swin-T (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7, stochastic
    depth 0.2), the released ``mtlora_tiny_448_r{16,32,64}_scale4_pertask`` configuration
    with ``shared_rank`` = r: task rank 4, scales 4, dropout 0.05, 'matrix'.

    ``tasks`` (a list or a comma-separated string) take their output channels from
    ``dataset`` ("pascal", "nyud" or "synthetic"; by default the first of those that has
    all the tasks, see :mod:`fastdense.engine.tasks`) unless ``num_outputs`` gives them.
    ``pretrained``: a local Swin-T checkpoint (timm or Microsoft layout, loaded into the
    backbone) or an MTLoRA checkpoint of the released code (loaded whole), see
    :func:`fastdense.models.mtlora_checkpoint.load_pretrained`. Other keyword arguments
    go to :class:`MTLoRASwin` and :class:`~fastdense.models.swin.SwinTransformer`.
    """
    tasks, outputs = swin_model_tasks(tasks, dataset, num_outputs)
    model = MTLoRASwin(tasks, outputs, shared_rank=shared_rank, task_rank=task_rank,
                       shared_scale=shared_scale, task_scale=task_scale, dropout=dropout, shared_mode=shared_mode,
                       img_size=img_size, train_base=train_base, **{**SWIN_T, **kwargs})
    if pretrained is not None:
        from fastdense.models.mtlora_checkpoint import load_pretrained

        load_pretrained(model, pretrained)
    return model


__all__ = ["FanOutLoRALinear", "MTLoRASwin", "PASCAL_TASKS", "SharedLoRALinear", "StackedLoRALinear",
           "mtlora_swin_t"]
