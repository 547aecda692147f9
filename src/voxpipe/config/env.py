"""``${VAR}`` interpolation: secrets and machine-specific paths come from the environment, not the file."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from voxpipe.config.errors import ConfigError

_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# Secrets whose ``${VAR}`` may be unset: the reference is then kept as written, and the provider's key check decides
# whether a call needs it, naming that variable (a cloud provider never falls back to another key in its place).
# So ``voxpipe validate`` and ``--fake-providers`` work where the keys are not set.
SECRET_KEYS = frozenset({"api_key"})


def interpolate(value: Any, env: Mapping[str, str] | None = None, path: str = "") -> Any:
    """Replace ``${NAME}`` (or ``${NAME:-default}``) in every string of ``value``, recursively.

    A reference to an unset variable without a default is an error naming the key and the variable, except in a
    secret (``api_key``): that is kept as written (see :func:`unset_reference`).
    """
    env = os.environ if env is None else env
    if isinstance(value, str):
        return _interpolate_string(value, env, path)
    if isinstance(value, dict):
        return {
            key: item
            if key in SECRET_KEYS and isinstance(item, str) and _refers_to_unset(item, env)
            else interpolate(item, env, f"{path}.{key}" if path else str(key))
            for key, item in value.items()
        }
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


def _refers_to_unset(text: str, env: Mapping[str, str]) -> bool:
    """Whether ``text`` refers to a variable that is not set and has no default."""
    return any(match.group(1) not in env and match.group(2) is None for match in _REFERENCE.finditer(text))


def unset_reference(text: str) -> str | None:
    """The variable a secret kept as written refers to (``api_key: ${MY_KEY}`` with ``MY_KEY`` unset), or None."""
    match = _REFERENCE.search(text)
    return match.group(1) if match else None
