"""``BaseConfig``: the frozen, strict pydantic model every configurable part of scaling derives from.

Each config class sits next to the code it configures; composite configs only nest them. Loading goes
through one path (mapping -> overrides -> validation) so every entry point reports errors the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from scaling.core.config.errors import ConfigError, format_validation_error
from scaling.core.config.overrides import apply_overrides

__all__ = ["BaseConfig"]

ConfigT = TypeVar("ConfigT", bound="BaseConfig")


class BaseConfig(BaseModel):
    """Frozen (hashable, safe to share between components), unknown keys rejected, every field described."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=False,
        protected_namespaces=(),
    )

    @classmethod
    def from_dict(
        cls: type[ConfigT],
        data: Mapping[str, Any],
        overrides: Iterable[str] = (),
        *,
        source: str = "<dict>",
    ) -> ConfigT:
        """Validate ``data`` (after applying dotted ``key=value`` overrides) into this config class."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"invalid {cls.__name__} in {source}: expected a mapping at the top level, got {type(data).__name__}",
                source=source,
            )
        merged = apply_overrides(data, overrides)
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            raise format_validation_error(exc, cls, source) from None

    @classmethod
    def from_yaml(cls: type[ConfigT], path: str | Path, overrides: Iterable[str] = ()) -> ConfigT:
        """Load a YAML (or JSON, which is YAML) file; errors name the file and the field path."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}", source=str(path)) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}", source=str(path)) from None
        return cls.from_dict({} if data is None else data, overrides, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (enums as values, paths as strings) that ``from_dict`` turns back into ``self``."""
        return self.model_dump(mode="json")

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text; also written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def template(cls) -> str:
        """A complete YAML document of this config with each field's description as a comment."""
        from scaling.core.config.template import render_template

        return render_template(cls)
