"""Functional API of fastdense: ``torch.ops.fastdense.*`` operators with backend dispatch."""
from fastdense.ops._dispatch import (
    BACKENDS,
    BackendNotSupportedError,
    backend,
    forced_backend,
    implementations,
    machine_report,
    select,
)
from fastdense.ops import reference
from fastdense.ops.lora import lora_linear, mt_lora_linear

__all__ = [
    "BACKENDS",
    "BackendNotSupportedError",
    "backend",
    "forced_backend",
    "implementations",
    "lora_linear",
    "machine_report",
    "mt_lora_linear",
    "reference",
    "select",
]
