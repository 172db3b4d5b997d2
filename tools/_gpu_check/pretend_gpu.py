"""A pytest plugin that makes ``torch.cuda.is_available()`` answer True, for collecting only.

The bench suites choose their cases at import time from whether a GPU is
there; ``python tools/gpu_check.py --check-bench`` loads this plugin
(``-p _gpu_check.pretend_gpu``) with ``--collect-only`` to see the test ids a
GPU machine would select, on a machine without one. Nothing may run under it.
"""
import torch

torch.cuda.is_available = lambda: True
