"""Drop-in modules: LoRA and multi-task LoRA linear layers and model injection."""
from fastdense.nn.inject import inject_lora, lora_parameters, mark_only_lora_trainable
from fastdense.nn.lora import LoRALinear, MultiTaskLoRALinear
from fastdense.nn.skill_adapter import TaskDynamicSkillAdapter

__all__ = [
    "LoRALinear",
    "MultiTaskLoRALinear",
    "TaskDynamicSkillAdapter",
    "inject_lora",
    "lora_parameters",
    "mark_only_lora_trainable",
]
