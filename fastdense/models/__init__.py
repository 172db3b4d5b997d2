"""Models for multi-task dense prediction; build them by name with :func:`create_model`."""
from fastdense.models import concept_fewshot as _concept_fewshot  # noqa: F401  (registers concept_fewshot)
from fastdense.models import swin  # noqa: F401  (registers swin_t, swin_s, swin_b)
from fastdense.models import tts_token_matcher as _tts_token_matcher  # noqa: F401  (registers tts_token_matcher)
from fastdense.models.mtlora import MTLoRASwin, mtlora_swin_t  # registers mtlora_swin_t
from fastdense.models.mtlora_checkpoint import convert_mtlora_checkpoint
from fastdense.models.peft import ParameterReport, PEFTModel
from fastdense.models.registry import (KINDS, create_model, is_model, list_models, model_constructor, model_kind,
                                       register_model)
from fastdense.models.swin_checkpoint import LoadReport, convert_microsoft_swin, load_pretrained
from fastdense.models.tadformer import TADFormerSwin, tadformer_swin_t  # registers tadformer_swin_t
from fastdense.models.tadformer_checkpoint import convert_tadformer_checkpoint
from fastdense.models.tdss import TDSSSwin, tdss_swin_t  # registers tdss_swin_t
from fastdense.models.tiny_fewshot import FEWSHOT_TASK_CHANNELS, FEWSHOT_TASKS, TinyFewShot, check_fewshot_tasks
from fastdense.models.tiny_mtl import SUPPORTED_TASKS, TASK_CHANNELS, TinyMTL, check_tasks


__all__ = ["LoadReport", "MTLoRASwin", "PEFTModel", "ParameterReport", "convert_microsoft_swin",
           "convert_mtlora_checkpoint", "mtlora_swin_t", "create_model", "is_model", "list_models", "load_pretrained",
           "register_model", "KINDS", "model_constructor", "model_kind", "SUPPORTED_TASKS", "TASK_CHANNELS", "TinyMTL",
           "check_tasks", "FEWSHOT_TASKS", "FEWSHOT_TASK_CHANNELS", "TinyFewShot", "check_fewshot_tasks"]
__all__ += ["TADFormerSwin", "convert_tadformer_checkpoint", "tadformer_swin_t"]
__all__ += ["TDSSSwin", "tdss_swin_t"]
