"""Typed, frozen configs loaded from YAML with dotted overrides and errors that name the field."""

from scaling.core.config.base import BaseConfig
from scaling.core.config.errors import ConfigError, InvalidCombination
from scaling.core.config.overrides import apply_overrides, parse_override

__all__ = ["BaseConfig", "ConfigError", "InvalidCombination", "apply_overrides", "parse_override"]
