"""Models and data of a training run: `--model`, `--model-arg`, `--data`, `--data-root`, `--pretrained`.

Any model registered with ``kind="multitask"`` (``fastdense.models.list_models(kind="multitask")``)
can be trained; its constructor gets ``tasks`` and, when it names them as
parameters, ``dataset`` (the task table to use), ``img_size`` (the training
resolution) and ``pretrained`` (backbone weights), plus every ``--model-arg``.
"""
from __future__ import annotations

import ast
import inspect
from typing import Any, Mapping, Sequence

from fastdense.cli._common import UsageError

DATASETS = ("synthetic", "pascal", "nyud")
# The tasks a run trains when --tasks is not given: the papers' sets on the real data.
DEFAULT_TASKS = {
    "synthetic": ("semseg", "normal", "depth_euclidean", "saliency"),
    "pascal": ("semseg", "human_parts", "sal", "normals"),
    "nyud": ("semseg", "depth", "normals", "edge"),
}


def parse_value(text: str) -> Any:
    """``--model-arg`` values: Python literals (ints, floats, True/False/None, tuples),
    ``true``/``false``, comma-separated numbers as a tuple, anything else a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(value, list) else value


def parse_model_args(items: Sequence[str] | Mapping[str, Any] | None, where: str = "--model-arg") -> dict:
    """``["rank=32", "filter=static"]`` (flags) or a mapping (a config file) -> keyword arguments."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        bad = [k for k in items if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise UsageError(f"{where} must map argument names to values, got keys {bad}")
        return dict(items)
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise UsageError(f"{where} takes key=value (e.g. rank=32), got {item!r}")
        out[key] = parse_value(value)
    return out


def check_model(name: str) -> None:
    """UsageError unless ``name`` is a registered multi-task model."""
    from fastdense.models import is_model, list_models, model_kind

    if not is_model(name) or model_kind(name) != "multitask":
        raise UsageError(f"unknown model {name!r}; models `fastdense train` can train: "
                         f"{', '.join(list_models(kind='multitask'))}")


def model_kwargs(name: str, *, dataset: str, resolution: int, pretrained: str | None,
                 model_args: Mapping[str, Any]) -> dict:
    """The keyword arguments (besides ``tasks``) the run passes to the constructor of ``name``."""
    from fastdense.models import model_constructor

    params = inspect.signature(model_constructor(name)).parameters
    out = {}
    if "dataset" in params:
        out["dataset"] = dataset
    if "img_size" in params:
        out["img_size"] = resolution
    if pretrained is not None:
        if "pretrained" not in params:
            raise UsageError(f"--pretrained: model {name!r} takes no pretrained backbone weights")
        out["pretrained"] = pretrained
    out.update(model_args)
    return out


def build_model(name: str, tasks: Sequence[str], kwargs: Mapping[str, Any]):
    """``create_model(name, tasks=tasks, **kwargs)`` with constructor errors as UsageError."""
    from fastdense.models import create_model

    try:
        return create_model(name, tasks=list(tasks), **kwargs)
    except TypeError as exc:  # an argument the constructor does not take
        raise UsageError(f"model {name!r}: {exc}") from None
    except (ValueError, FileNotFoundError) as exc:  # a bad value, or pretrained weights that are not there
        raise UsageError(f"model {name!r}: {exc}") from None


def build_datasets(data: str, tasks: Sequence[str], *, resolution: int, data_root: str | None,
                   train_samples: int, val_samples: int, seed: int):
    """(train set, validation set, run-spec data entry) of a run."""
    if data == "synthetic":
        from fastdense.data import SyntheticScenes

        # Validation scenes come from another seed, so they are scenes the model never trained on.
        val_seed = seed + 1_000_003
        train_set = SyntheticScenes(train_samples, resolution, seed=seed, tasks=list(tasks))
        val_set = SyntheticScenes(val_samples, resolution, seed=val_seed, tasks=list(tasks))
        return train_set, val_set, {"dataset": "synthetic", "resolution": resolution, "val_samples": val_samples,
                                    "val_seed": val_seed}
    if data_root is None:
        raise UsageError(f"--data {data} needs --data-root DIR (the data set's folder)")
    val_set = real_dataset(data, data_root, "val", tasks, resolution)
    train_set = real_dataset(data, data_root, "train", tasks, resolution)
    return train_set, val_set, {"dataset": data, "resolution": resolution, "data_root": str(data_root),
                                "val_samples": len(val_set)}


def real_dataset(data: str, root: str, split: str, tasks: Sequence[str], resolution: int):
    """PASCAL-Context or NYUD with the papers' preprocessing (random scale/crop/flip for training)."""
    from fastdense.data import NYUDMT, PascalContextMT
    from fastdense.data.transforms import eval_transforms, train_transforms

    cls = PascalContextMT if data == "pascal" else NYUDMT
    transform = train_transforms(resolution) if split == "train" else eval_transforms(resolution)
    try:
        return cls(root, split, tasks=list(tasks), transform=transform)
    except (FileNotFoundError, ValueError) as exc:  # DatasetNotFoundError, a task the set does not have
        raise UsageError(str(exc)) from None
