"""Functional API of fastdense: ``torch.ops.fastdense.*`` operators with backend dispatch."""
from fastdense.ops import reference
from fastdense.ops._dispatch import (
    BACKENDS,
    BackendNotSupportedError,
    backend,
    forced_backend,
    implementations,
    machine_report,
    select,
)
from fastdense.ops.attn_mask_aggregate import attn_mask_aggregate
from fastdense.ops.dtf import dynamic_task_filter, ta_lora_dtf
from fastdense.ops.lora import lora_linear, mt_lora_linear
from fastdense.ops.q_sample_multi import q_sample_multi
from fastdense.ops.skill_gated_transform import skill_gated_transform

__all__ = [
    "BACKENDS",
    "BackendNotSupportedError",
    "attn_mask_aggregate",
    "backend",
    "dynamic_task_filter",
    "forced_backend",
    "implementations",
    "lora_linear",
    "machine_report",
    "mt_lora_linear",
    "q_sample_multi",
    "reference",
    "select",
    "skill_gated_transform",
    "ta_lora_dtf",
]
