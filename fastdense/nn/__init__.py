"""Drop-in modules: LoRA and multi-task LoRA linear layers and model injection."""
from fastdense.nn.inject import inject_lora, lora_parameters, mark_only_lora_trainable
from fastdense.nn.lora import LoRALinear, MultiTaskLoRALinear
from fastdense.nn.task_filter import DynamicTaskFilter, FilterNorm, StaticTaskFilter, TaskAwareLoRALinear

__all__ = [
    "DynamicTaskFilter",
    "FilterNorm",
    "LoRALinear",
    "MultiTaskLoRALinear",
    "StaticTaskFilter",
    "TaskAwareLoRALinear",
    "inject_lora",
    "lora_parameters",
    "mark_only_lora_trainable",
]
