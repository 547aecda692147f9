"""The provider registry: which class provides each ``kind.name`` (e.g. ``llm.llama``).

Providers are found through the ``voxpipe.providers`` entry-point group; voxpipe's own are registered there too,
in pyproject.toml, so a third-party provider is exactly as first-class as a built-in one. Nothing is imported
until a config uses it, so listing providers never pulls in a heavy SDK; the packages voxpipe's own providers import
only once they run (:data:`PACKAGES`) are looked up without importing them, so a missing SDK is named before a call.
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
    """A package a provider imports only once it is built or started (its SDK, its model runtime), which pip
    installs as ``distribution`` with voxpipe's ``extra``."""

    module: str  # the top-level module it installs
    distribution: str
    extra: str

    def installed(self) -> bool:
        """Whether it can be imported, found without importing it (an SDK takes a second or more to import)."""
        try:
            return importlib.util.find_spec(self.module) is not None
        except ValueError:  # in sys.modules without a spec (a module made in code): it is there
            return True


# What voxpipe's own providers import lazily, by provider module (the extras are pyproject.toml's). websockets:
# the ElevenLabs SDK depends on it, and Cartesia's extra asks for it (cartesia[websockets]).
_ONNXRUNTIME = Package("onnxruntime", "onnxruntime", "embedded")
PACKAGES: dict[str, tuple[Package, ...]] = {
    "voxpipe.stages.deepgram_stt": (Package("deepgram", "deepgram-sdk", "deepgram"),),
    "voxpipe.stages.anthropic_llm": (Package("anthropic", "anthropic", "anthropic"),),
    "voxpipe.stages.elevenlabs_tts": (
        Package("elevenlabs", "elevenlabs", "elevenlabs"),
        Package("websockets", "websockets", "elevenlabs"),
    ),
    "voxpipe.stages.cartesia_tts": (
        Package("cartesia", "cartesia", "cartesia"),
        Package("websockets", "websockets", "cartesia"),
    ),
    "voxpipe.stages.silero_vad": (_ONNXRUNTIME,),
    "voxpipe.stages.whisper_stt": (Package("faster_whisper", "faster-whisper", "embedded"),),
    "voxpipe.stages.llama_llm": (Package("llama_cpp", "llama-cpp-python", "embedded"),),
    "voxpipe.stages.piper_tts": (Package("piper", "piper-tts", "embedded"), _ONNXRUNTIME),
}
# What the loopback fakes of the cloud services (voxpipe call --fake-providers) serve with.
FAKE_SERVER_PACKAGES = (Package("aiohttp", "aiohttp", "fakes"),)


@dataclass(frozen=True)
class ProviderEntry:
    """One registered provider: ``target`` is ``"module:Class"`` (or the class itself, registered in code)."""

    kind: str
    name: str
    target: str | type

    @property
    def module(self) -> str:
        return self.target.__module__ if isinstance(self.target, type) else self.target.partition(":")[0]

    def missing_packages(self) -> list[Package]:
        """The packages this provider imports once it runs that are not installed (looked up, not imported)."""
        return [package for package in PACKAGES.get(self.module, ()) if not package.installed()]

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
