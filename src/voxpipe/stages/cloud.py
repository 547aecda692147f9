"""What the cloud providers share: their SDK imported at first use, an API key taken from the settings or the
environment and named before anything connects, URLs checked when the config is read, and an error that names the
provider and the problem."""

from __future__ import annotations

import importlib
import os
import urllib.parse
from types import ModuleType
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, SecretStr, field_validator

from voxpipe.config.env import unset_reference
from voxpipe.config.errors import ConfigError
from voxpipe.pipeline.errors import VoxpipeError


class ProviderError(VoxpipeError):
    """A provider failed or sent something voxpipe cannot use; the message names the provider and the problem."""

    def __init__(self, provider: str, problem: str) -> None:
        self.provider = provider
        self.problem = problem
        super().__init__(f"{provider}: {problem}")


class CloudSettings(BaseModel):
    """What every cloud provider's settings have: an API key, given in the config or read from the environment.
    Each provider's settings redeclare ``api_key`` with their own description and set the two class variables."""

    model_config = ConfigDict(extra="forbid")

    service_name: ClassVar[str]  # the provider as errors name it ("Deepgram")
    api_key_env: ClassVar[str]  # the environment variable read when the config gives no key

    api_key: SecretStr | None = None

    @field_validator("base_url", "websocket_url", check_fields=False)  # the providers' fields that have them
    @classmethod
    def _a_url_with_a_host_and_port(cls, url: str | None) -> str | None:
        # A provider's pattern checks only the scheme: a bad host or port ("…:443x", "wss://[::1") would otherwise
        # fail only when the call connects, as a bare ValueError from a URL parser naming neither key nor provider.
        if url is None:
            return None
        try:
            parsed = urllib.parse.urlsplit(url)
            parsed.port  # noqa: B018 -- reading the port is the check: it raises for a non-number or one past 65535
        except ValueError as exc:
            raise ValueError(f"not a URL {cls.service_name} can be reached at: {exc}") from None
        if not parsed.hostname:
            raise ValueError(f"not a URL {cls.service_name} can be reached at: it has no host")
        if parsed.query or parsed.fragment:  # the SDKs append their paths after it: "…?x=1/v1/listen"
            raise ValueError(f"a base URL for {cls.service_name} takes no query or fragment ('?…', '#…')")
        return url.rstrip("/")  # the SDKs append "/v1/…": a trailing slash made "//v1/listen"

    def api_key_or_none(self) -> str | None:
        """The key from the config, else from ``$api_key_env``; None if neither has one (or the config's
        ``api_key: ${VAR}`` names a variable that was not set: no other key is taken in its place). Spaces and a
        newline around a key (one pasted, or read from a file) are not part of it, so a blank key is no key."""
        given = self.api_key.get_secret_value().strip() if self.api_key is not None else ""
        if unset_reference(given) is not None:
            return None
        return given or os.environ.get(self.api_key_env, "").strip() or None

    def key_source(self, kind: str) -> str:
        """Where a call took its key, for the error about a rejected one: ``kind.api_key`` when the config gives one
        (its own, or a ${VAR} it names), else the usual environment variable."""
        given = self.api_key.get_secret_value().strip() if self.api_key is not None else ""
        return f"{kind}.api_key" if given else self.api_key_env

    def key_variable(self) -> str:
        """The environment variable a call takes the key from: the config's ``api_key: ${VAR}``, else the usual one."""
        given = self.api_key.get_secret_value() if self.api_key is not None else ""
        return unset_reference(given) or self.api_key_env

    def require_api_key(self, kind: str) -> str:
        """The key; a :class:`ConfigError` at ``kind.api_key`` naming where to put one if there is none."""
        key = self.api_key_or_none()
        if key is None:
            env = self.key_variable()
            if env != self.api_key_env:
                problem = f"no API key for {self.service_name}: {kind}.api_key refers to ${env}, which is not set"
            else:
                problem = (
                    f"no API key for {self.service_name}: set the environment variable {env} (or {kind}.api_key, "
                    f"e.g. api_key: ${{{env}}})"
                )
            raise ConfigError(f"{kind}.api_key", problem)
        return key


def abort_unless_closed(connection: Any) -> None:
    """After a websocket's ``close()``, finished or not: abort the connection unless it is CLOSED. websockets aborts
    it only when its own ``close_timeout`` runs out inside ``close()``, so a close cut short (cancelled by a
    barge-in or the call's teardown) would leave a socket whose server stopped reading CLOSING for good, its
    transport open and its keepalive task pending."""
    state = getattr(getattr(connection, "state", None), "name", "CLOSED")
    transport = getattr(connection, "transport", None)
    if state != "CLOSED" and transport is not None:
        transport.abort()


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
