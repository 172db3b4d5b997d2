"""Models for multi-task dense prediction; build them by name with :func:`build_model`."""
from fastdense.models.tiny_mtl import MODELS, SUPPORTED_TASKS, TASK_CHANNELS, TinyMTL, build_model, check_tasks

__all__ = ["MODELS", "SUPPORTED_TASKS", "TASK_CHANNELS", "TinyMTL", "build_model", "check_tasks"]
