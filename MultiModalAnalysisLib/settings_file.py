"""Reading a settings file (JSON, or YAML by its suffix) into a dictionary, with one-line
errors: the one reader behind every ``--settings`` option."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from MultiModalAnalysisLib.errors import ConfigError


def read_settings_file(path: str | Path, what: str = "settings") -> dict[str, Any]:
    """The JSON object (or YAML mapping, for ``.yaml``/``.yml``) held by ``path``.

    Args:
        path: the file.
        what: what the settings are for, in messages ("feature settings"...).

    Raises:
        ConfigError: the file is missing, cannot be parsed, or holds no object/mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} file {path} is not a text file: give a JSON (or YAML) "
                          "settings file.") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            values = yaml_module(path).safe_load(text)
            values = {} if values is None else values
        else:
            values = json.loads(text)
    except Exception as error:  # json and yaml raise their own error types
        reason = " ".join(str(error).split())  # (YAML's caret diagram: one line)
        raise ConfigError(f"{what} file {path} could not be parsed: {reason}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{what} file {path} must hold a JSON object (a YAML mapping).")
    return values


def yaml_module(path: Path):
    """PyYAML, or a ConfigError naming ``path`` when it is not installed."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        raise ConfigError(f"{path}: reading YAML needs PyYAML; use a .json file.") from None
    return yaml
