"""Drop-in modules: LoRA and multi-task LoRA layers and their injection, TADFormer's
TA-module and Dynamic Task Filter, TDSS's skill adapter, timestep selection (TTS)
and timestep feature consolidation (TFC)."""
from fastdense.nn.inject import inject_lora, lora_parameters, mark_only_lora_trainable
from fastdense.nn.lora import LoRALinear, MultiTaskLoRALinear
from fastdense.nn.skill_gated_transform import TaskDynamicSkillAdapter
from fastdense.nn.dtf import DynamicTaskFilter, FilterNorm, StaticTaskFilter, TaskAwareLoRALinear
from fastdense.nn.timestep_consolidation import TimestepFeatureConsolidation
from fastdense.nn.timestep_selection import TaskAwareTimestepSelector

__all__ = [
    "DynamicTaskFilter",
    "FilterNorm",
    "LoRALinear",
    "MultiTaskLoRALinear",
    "StaticTaskFilter",
    "TaskAwareLoRALinear",
    "TaskAwareTimestepSelector",
    "TaskDynamicSkillAdapter",
    "TimestepFeatureConsolidation",
    "inject_lora",
    "lora_parameters",
    "mark_only_lora_trainable",
]
