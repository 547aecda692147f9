"""``${VAR}`` interpolation: secrets and machine-specific paths come from the environment, not the file."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from voxpipe.config.errors import ConfigError

_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str] | None = None, path: str = "") -> Any:
    """Replace ``${NAME}`` (or ``${NAME:-default}``) in every string of ``value``, recursively.

    A reference to an unset variable without a default is an error naming the key and the variable.
    """
    env = os.environ if env is None else env
    if isinstance(value, str):
        return _interpolate_string(value, env, path)
    if isinstance(value, dict):
        return {key: interpolate(item, env, f"{path}.{key}" if path else str(key)) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env, f"{path}[{i}]") for i, item in enumerate(value)]
    return value


def _interpolate_string(text: str, env: Mapping[str, str], path: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(path, f"refers to the environment variable {name}, which is not set", f"set {name}")

    return _REFERENCE.sub(replace, text)
