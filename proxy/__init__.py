"""The sidecar proxy. Public surface: :func:`serve` (the ``tracemesh sidecar`` command) and the
config model (:func:`load_config`, :func:`parse_config`, :class:`ConfigError`)."""

from tracemesh.proxy._config import ConfigError, MeshConfig, load_config, parse_config
from tracemesh.proxy._serve import serve

__all__ = ["ConfigError", "MeshConfig", "load_config", "parse_config", "serve"]
