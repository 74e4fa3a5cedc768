"""Render a config class as a commented YAML document that loads back to the default config.

Every field appears with its default value and, above it, its description and type, so the template is
the config reference: ``scaling config template > my_run.yml`` is a valid starting point.

A required section has no default to show, so its fields that declare ``examples`` are rendered with their
first example instead (marked ``# EDIT``): the template then still loads, and the placeholder says what
to replace (``data.prefixes`` of a transformer run, for instance).
"""

from __future__ import annotations

import enum
import textwrap
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

__all__ = ["render_template"]

_WIDTH = 100


def render_template(model: type[BaseModel]) -> str:
    header = [f"# {model.__name__}: every field with its default.", *_comment(model.__doc__ or "", 0)]
    return "\n".join([*header, *_render_model(model, 0)]) + "\n"


def _render_model(model: type[BaseModel], indent: int, *, required: bool = False) -> list[str]:
    lines: list[str] = []
    for name, field in model.model_fields.items():
        lines.extend(_render_field(name, field, indent, required=required))
    return lines


def _render_field(name: str, field: FieldInfo, indent: int, *, required: bool = False) -> list[str]:
    """``required``: the field sits in a required section, so its example (if any) replaces the default."""
    pad = " " * indent
    description = field.description or ""
    lines = _comment(f"{description} [type: {_type_name(field.annotation)}]", indent)
    nested = _nested_model(field.annotation)
    default = _default(field)
    if default is PydanticUndefined:
        lines.append(f"{pad}{name}:  # REQUIRED")
        if nested is not None:
            lines.extend(_render_model(nested, indent + 2, required=True))
        return lines
    if required and field.examples:
        value = _yaml_value(name, _jsonable(field.examples[0]), indent)
        return [*lines, *value[:-1], f"{value[-1]}  # EDIT: an example; the default is {_jsonable(default)!r}"]
    if nested is not None and isinstance(default, BaseModel):
        lines.append(f"{pad}{name}:")
        lines.extend(_render_model(type(default), indent + 2))
        return lines
    lines.extend(_yaml_value(name, _jsonable(default), indent))
    return lines


def _default(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return field.default


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if value is not None and not isinstance(value, str | int | float | bool):
        return str(value)
    return value


def _yaml_value(name: str, value: Any, indent: int) -> list[str]:
    pad = " " * indent
    # Flow style keeps short lists on one line; a mapping holding only a scalar must stay in block style.
    flow = None if isinstance(value, list | dict) else False
    text = yaml.safe_dump({name: value}, sort_keys=False, default_flow_style=flow, width=1000).rstrip("\n")
    return [pad + line for line in text.splitlines()]


def _comment(text: str, indent: int) -> list[str]:
    text = " ".join(text.split())
    if not text:
        return []
    prefix = " " * indent + "# "
    return [prefix + line for line in textwrap.wrap(text, width=_WIDTH - len(prefix))]


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else None
    return None


def _type_name(annotation: Any) -> str:
    if annotation is None or annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) if not isinstance(a, enum.Enum) else repr(a.value) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(repr(m.value) for m in annotation)
    return getattr(annotation, "__name__", str(annotation))
