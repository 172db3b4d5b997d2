"""Short, file-name-safe tags of this machine's accelerator.

``python -m fastdense device-name`` prints :func:`device_tag`, and the
benchmarks name their results after it (``bench/results/<tag>.json``).
"""
from __future__ import annotations

import os
import platform
import re


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# Marketing words that name a product line rather than the chip; dropping
# them keeps "NVIDIA GeForce RTX 4090" and "Tesla V100-SXM2" short and stable.
_GPU_NOISE = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct", "graphics"}


def gpu_tag(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100"``; vendor, then words up to the model number."""
    vendor = "amd" if re.search(r"\b(amd|radeon|instinct)\b", name, re.I) else "nvidia"
    words = [w for w in re.split(r"[\s\-_/]+", name.lower()) if w and w not in _GPU_NOISE]
    model = []
    for w in words:
        model.append(w)
        if re.search(r"\d", w):  # the model number ends the tag: memory sizes and form factors follow it
            break
    return _slug("-".join([vendor] + model[:3])) or vendor


# Words in /proc/cpuinfo model names that say nothing about the chip.
_CPU_NOISE = {"r", "tm", "cpu", "processor", "core", "with", "radeon", "graphics"}


def cpu_tag(model_name: str | None = None) -> str:
    """``"Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"`` -> ``"cpu-intel-xeon-platinum-8481c-<n>c"``.

    The core count is part of the tag because the same CPU model measured on
    a 2-core slice and on a whole socket must not overwrite each other's results.
    """
    if model_name is None:
        model_name = _cpu_model_name()
    name = model_name.split("@")[0]
    name = re.sub(r"\(.*?\)", " ", name)
    name = re.sub(r"\b\d+-core\b", " ", name, flags=re.I)
    words = [w for w in re.split(r"[^A-Za-z0-9]+", name.lower()) if w and w not in _CPU_NOISE]
    model = "-".join(words[:4]) or _slug(platform.machine()) or "unknown"
    return f"cpu-{_slug(model)}-{os.cpu_count() or 1}c"


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_tag() -> str:
    """Tag of the device benchmarks run on: the first CUDA GPU if any, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return gpu_tag(torch.cuda.get_device_name(0))
    return cpu_tag()
