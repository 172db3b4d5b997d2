"""fastdense: fused kernels and drop-in modules for parameter-efficient
multi-task and few-shot dense prediction."""
__version__ = "0.1.0"

from fastdense import _ext  # noqa: F401  (loads fastdense._C or warns once)
from fastdense import ops  # noqa: F401  (registers torch.ops.fastdense.*)
from fastdense.ops import backend

__all__ = ["__version__", "backend", "ops"]
