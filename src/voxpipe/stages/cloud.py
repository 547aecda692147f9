"""What the cloud providers share: their SDK imported at first use, an API key taken from the settings or the
environment and named before anything connects, and an error that names the provider and the problem."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from voxpipe.config.errors import ConfigError
from voxpipe.pipeline.errors import VoxpipeError


class ProviderError(VoxpipeError):
    """A provider failed or sent something voxpipe cannot use; the message names the provider and the problem."""

    def __init__(self, provider: str, problem: str) -> None:
        self.provider = provider
        self.problem = problem
        super().__init__(f"{provider}: {problem}")


def api_key(kind: str, provider: str, given: str | None, env_var: str) -> str:
    """The key from the config (``given``), else from ``$env_var``; a clear config error if neither has one."""
    key = given or os.environ.get(env_var, "")
    if not key:
        raise ConfigError(
            f"{kind}.api_key",
            f"no API key for {provider}: set the environment variable {env_var} (or {kind}.api_key, e.g. "
            f"api_key: ${{{env_var}}})",
        )
    return key


def require_sdk(provider: str, extra: str, *modules: str) -> ModuleType:
    """Import a provider's SDK (the first of ``modules``; the others are what it needs besides) at first use, so
    voxpipe imports without it; a missing one is a :class:`ProviderError` naming the extra that installs it."""
    try:
        loaded = [importlib.import_module(name) for name in modules]
    except ModuleNotFoundError as exc:
        raise ProviderError(
            provider, f"the {provider} SDK is not installed ({exc.name} is missing): pip install 'voxpipe[{extra}]'"
        ) from exc
    return loaded[0]
