"""Models for multi-task dense prediction; build them by name with :func:`create_model`."""
from fastdense.models import swin  # noqa: F401  (registers swin_t, swin_s, swin_b)
from fastdense.models import tiny_mtl as _tiny_mtl
from fastdense.models.registry import create_model, is_model, list_models, register_model
from fastdense.models.swin_checkpoint import LoadReport, convert_microsoft_swin, load_pretrained
from fastdense.models.tiny_fewshot import (FEWSHOT_MODELS, FEWSHOT_TASK_CHANNELS, FEWSHOT_TASKS, TinyFewShot,
                                           check_fewshot_tasks)
from fastdense.models.tiny_mtl import MODELS, SUPPORTED_TASKS, TASK_CHANNELS, TinyMTL, check_tasks


def build_model(name: str, tasks, **kwargs):
    """Build the registered model ``name`` for ``tasks``: a multi-task model of :data:`MODELS`
    or a few-shot model of :data:`FEWSHOT_MODELS`; unknown names raise ValueError."""
    # Few-shot models live in their own registry: they take other tasks and another forward
    # signature, so `fastdense train` (which offers MODELS) must not list them.
    if name in FEWSHOT_MODELS:
        return FEWSHOT_MODELS[name](check_fewshot_tasks(tasks), **kwargs)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}; "
                         f"few-shot models: {', '.join(sorted(FEWSHOT_MODELS))}")
    return _tiny_mtl.build_model(name, tasks, **kwargs)


__all__ = ["LoadReport", "convert_microsoft_swin", "create_model", "is_model", "list_models", "load_pretrained",
           "register_model", "MODELS", "SUPPORTED_TASKS", "TASK_CHANNELS", "TinyMTL", "build_model", "check_tasks",
           "FEWSHOT_MODELS", "FEWSHOT_TASKS", "FEWSHOT_TASK_CHANNELS", "TinyFewShot", "check_fewshot_tasks"]
