"""``--config FILE``: options from a JSON (or, with PyYAML, YAML) file."""
from __future__ import annotations

import json
from typing import Collection

from fastdense.cli._common import UsageError, require_file


def load_config_file(path: str, known: Collection[str]) -> dict:
    """The mapping in ``path`` with option names as Python names (``batch-size`` -> ``batch_size``).

    Every key must be one of ``known``. The values are returned as written: the command
    checks them with its option schema (:mod:`fastdense.cli._options`), which names this file.
    """
    require_file(path, "config file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from None
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise UsageError(f"{path}: YAML configs need PyYAML (pip install pyyaml); "
                             "or write the config as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            # PyYAML's messages span lines (problem, then where); a usage error is one line.
            raise UsageError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the config must be a mapping of option names to values")
    odd = [k for k in data if not isinstance(k, str)]
    if odd:  # YAML keys may be numbers, booleans or null
        raise UsageError(f"{path}: option names must be strings, got {odd[0]!r}")
    options: dict = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in options:  # both batch-size and batch_size: which one was meant?
            raise UsageError(f"{path}: option {name!r} is given twice (with - and with _)")
        options[name] = value
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UsageError(f"{path}: unknown option(s) {unknown}; valid: {sorted(known)}")
    return options
