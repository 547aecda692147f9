"""Config files: YAML → validated schema → a pipeline, with providers found through a registry."""

from voxpipe.config.build import BuildContext, build_pipeline, construct
from voxpipe.config.errors import ConfigError
from voxpipe.config.registry import ENTRY_POINT_GROUP, KINDS, Package, ProviderEntry, Registry
from voxpipe.config.schema import PipelineConfig, load_config, parse_config

__all__ = [
    "ENTRY_POINT_GROUP",
    "KINDS",
    "BuildContext",
    "ConfigError",
    "Package",
    "PipelineConfig",
    "ProviderEntry",
    "Registry",
    "build_pipeline",
    "construct",
    "load_config",
    "parse_config",
]
