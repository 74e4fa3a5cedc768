"""One exception type for every way a config can be wrong.

Users see a config error as a single message that names the source (file or ``<dict>``) and the dotted
path of each offending field, never a traceback from deep inside the code that would later choke on it.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

__all__ = ["ConfigError", "InvalidCombination", "format_validation_error"]


class ConfigError(ValueError):
    """A config could not be loaded. ``str(error)`` is the complete, user-facing explanation."""

    def __init__(self, message: str, *, source: str | None = None, problems: Sequence[str] = ()) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(message)


class InvalidCombination(ValueError):
    """Raised by a config validator when several fields disagree.

    ``fields`` are paths relative to the model that raises it, so the error can name the full dotted path
    (``topology.global_batch_size``) instead of only the enclosing model.
    """

    def __init__(self, message: str, *fields: str) -> None:
        self.fields = fields
        super().__init__(message)


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic model classes reachable from a field annotation (``X | None``, ``list[X]``...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is None and not isinstance(annotation, types.UnionType):
        return []
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_model_classes(arg))
    return found


def _model_at(root: type[BaseModel], loc: Iterable[int | str]) -> list[type[BaseModel]]:
    """The model classes that own the location ``loc`` (which ends with a field name)."""
    models: list[type[BaseModel]] = [root]
    for part in loc:
        if isinstance(part, int):
            continue
        next_models: list[type[BaseModel]] = []
        for model in models:
            field = model.model_fields.get(part)
            if field is not None:
                next_models.extend(_model_classes(field.annotation))
        if not next_models:
            break
        models = next_models
    return models


def _did_you_mean(root: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    key = loc[-1]
    if not isinstance(key, str):
        return ""
    candidates: list[str] = []
    for model in _model_at(root, loc[:-1]):
        candidates.extend(model.model_fields)
    matches = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def _dotted(loc: Iterable[int | str]) -> str:
    return ".".join(str(part) for part in loc) or "<root>"


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) is typing.Union or isinstance(annotation, types.UnionType)


def _field_path(root: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """``loc`` without pydantic's union-member tags (``'list[int]'``, ``'str-enum[...]'``, a model name).

    A user writes ``pipe_partition_method: round_robin``; the error should be about that field, not about
    each alternative type pydantic tried.
    """
    kept: list[int | str] = []
    models: list[type[BaseModel]] = [root]
    union_members: list[Any] | None = None
    for part in loc:
        if isinstance(part, int):
            kept.append(part)
            continue
        if union_members is not None:
            named = [m for m in _model_classes_in(union_members) if m.__name__ == part]
            union_members = None
            if named or not any(part in m.model_fields for m in models):
                models = named
                continue  # a tag naming the union member pydantic tried
        kept.append(part)
        annotation = next((m.model_fields[part].annotation for m in models if part in m.model_fields), None)
        models = _model_classes(annotation) if annotation is not None else []
        union_members = list(typing.get_args(annotation)) if annotation is not None and _is_union(annotation) else None
    return tuple(kept)


def _model_classes_in(members: list[Any]) -> list[type[BaseModel]]:
    found: list[type[BaseModel]] = []
    for member in members:
        found.extend(_model_classes(member))
    return found


def format_validation_error(error: ValidationError, root: type[BaseModel], source: str) -> ConfigError:
    """Turn pydantic's error list into one ``ConfigError`` naming the source and each dotted field path.

    Errors for the alternatives of one union field are merged into one line for that field.
    """
    problems: dict[str, list[str]] = {}
    inputs: dict[str, Any] = {}
    for item in error.errors(include_url=False):
        loc = _field_path(root, tuple(item["loc"]))
        kind = item["type"]
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidCombination):
            paths = [_dotted((*loc, field)) for field in cause.fields] or [_dotted(loc)]
            problems.setdefault(", ".join(paths), []).append(str(cause))
        elif kind == "extra_forbidden":
            problems.setdefault(_dotted(loc), []).append(f"unknown field{_did_you_mean(root, loc)}")
        elif kind == "missing":
            problems.setdefault(_dotted(loc), []).append("required field is missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.setdefault(_dotted(loc), []).append(message)
            inputs.setdefault(_dotted(loc), item.get("input"))
    lines = []
    for path, messages in problems.items():
        unique = list(dict.fromkeys(messages))
        got = f" (got {inputs[path]!r})" if path in inputs else ""
        lines.append(f"{path}: {'; or '.join(unique)}{got}")
    header = f"invalid {root.__name__} in {source}:"
    return ConfigError("\n  ".join([header, *lines]), source=source, problems=lines)
