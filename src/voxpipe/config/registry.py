"""The provider registry: which class provides each ``kind.name`` (e.g. ``llm.llama``).

Providers are found through the ``voxpipe.providers`` entry-point group; voxpipe's own are registered there too,
in pyproject.toml, so a third-party provider is exactly as first-class as a built-in one. Nothing is imported
until a config uses it, so listing providers never pulls in a heavy SDK. A provider declares the packages it imports
only once it runs, for the settings it is given (a ``required_packages(settings)`` class method returning
:class:`Package` objects); they are looked up without importing them, so a missing SDK is named before a call.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from voxpipe.config.errors import ConfigError

ENTRY_POINT_GROUP = "voxpipe.providers"
KINDS = ("vad", "stt", "llm", "tts")


@dataclass(frozen=True)
class Package:
    """A package a provider imports only once it is built or started (its SDK, its model runtime, its default
    model), which pip installs as ``distribution``: with voxpipe's ``extra`` for voxpipe's own providers; a
    third-party provider's package has none, and is named as ``pip install <distribution>``."""

    module: str  # the top-level module it installs
    distribution: str
    extra: str | None = None

    def __post_init__(self) -> None:
        # find_spec("a.b") imports the package a: looking a dotted name up would import the SDK it is meant to spare.
        if not self.module or "." in self.module:
            raise ValueError(f"Package module {self.module!r} must be a top-level module name, such as 'anthropic'")

    def installed(self) -> bool:
        """Whether it can be imported, found without importing it (an SDK takes a second or more to import)."""
        try:
            return importlib.util.find_spec(self.module) is not None
        except ValueError:  # in sys.modules without a spec (a module made in code): it is there
            return True


def required_packages(provider: type, settings: Any) -> tuple[Package, ...]:
    """The packages ``provider`` needs to run with ``settings`` (its validated ``Settings``): what its
    ``required_packages(settings)`` class method declares, or none for a provider without one."""
    declare = getattr(provider, "required_packages", None)
    return tuple(declare(settings)) if declare is not None else ()


# What the loopback fakes of the cloud services (voxpipe call --fake-providers) serve with.
FAKE_SERVER_PACKAGES = (Package("aiohttp", "aiohttp", "fakes"),)


@dataclass(frozen=True)
class ProviderEntry:
    """One registered provider: ``target`` is ``"module:Class"`` (or the class itself, registered in code)."""

    kind: str
    name: str
    target: str | type

    def load(self) -> type:
        if isinstance(self.target, type):
            return self.target
        module_name, _, attribute = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise ConfigError(
                f"{self.kind}.provider",
                f"provider {self.name!r} cannot be loaded: module {exc.name!r} is not installed",
                "install the extra that provides it, e.g. pip install 'voxpipe[embedded]'",
            ) from exc
        provider: Any = getattr(module, attribute)
        if not hasattr(provider, "Settings"):
            raise ConfigError(f"{self.kind}.provider", f"provider {self.name!r} ({self.target}) has no Settings model")
        return provider  # type: ignore[no-any-return]


class Registry:
    """Providers by kind and name."""

    def __init__(self, entries: list[ProviderEntry] | None = None) -> None:
        self._entries: dict[tuple[str, str], ProviderEntry] = {}
        for entry in entries or []:
            self._entries[entry.kind, entry.name] = entry

    @classmethod
    def discover(cls) -> Registry:
        """Every provider installed in this environment (entry points named ``kind.name``)."""
        entries = []
        for point in entry_points(group=ENTRY_POINT_GROUP):
            kind, _, name = point.name.partition(".")
            if kind in KINDS and name:
                entries.append(ProviderEntry(kind, name, point.value))
        return cls(entries)

    def register(self, kind: str, name: str, provider: type) -> None:
        """Register a provider class in code (tests, applications with their own stages)."""
        if kind not in KINDS:
            raise ValueError(f"unknown stage kind {kind!r}; kinds are {', '.join(KINDS)}")
        self._entries[kind, name] = ProviderEntry(kind, name, provider)

    def names(self, kind: str) -> list[str]:
        return sorted(name for k, name in self._entries if k == kind)

    def get(self, kind: str, name: str) -> ProviderEntry:
        entry = self._entries.get((kind, name))
        if entry is None:
            raise ConfigError(
                f"{kind}.provider", f"unknown {kind} provider {name!r}", ", ".join(self.names(kind)) or "none installed"
            )
        return entry
