"""``--config FILE``: options from a JSON (or, with PyYAML, YAML) file."""
from __future__ import annotations

import json
import os
from typing import Collection

from fastdense.cli._common import UsageError


def load_config_file(path: str, known: Collection[str]) -> dict:
    """The mapping in ``path`` with option names as Python names (``batch-size`` -> ``batch_size``).

    Every key must be one of ``known``; a list of tasks becomes the comma-separated
    string the ``--tasks`` flag takes.
    """
    if not os.path.isfile(path):
        raise UsageError(f"config file not found: {path}")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise UsageError(f"{path}: YAML configs need PyYAML (pip install pyyaml); or write the config as JSON")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"{path}: invalid YAML: {exc}")
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: invalid JSON: {exc}")
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the config must be a mapping of option names to values")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UsageError(f"{path}: unknown option(s) {unknown}; valid: {sorted(known)}")
    if isinstance(data.get("tasks"), list):
        data["tasks"] = ",".join(data["tasks"])
    return data
