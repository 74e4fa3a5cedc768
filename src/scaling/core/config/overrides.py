"""Dotted ``key.path=value`` overrides, applied to the raw mapping before validation.

Values are parsed as YAML scalars (``lr=3e-4`` is a float, ``flag=true`` a bool, ``x=null`` None), so a
command-line override behaves exactly as if it had been written in the file.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from scaling.core.config.errors import ConfigError

__all__ = ["apply_overrides", "parse_override"]


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b.c=value"`` into (["a", "b", "c"], parsed value)."""
    key, sep, raw = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise ConfigError(f"override {text!r}: expected KEY.PATH=VALUE, e.g. topology.micro_batch_size=4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from None
    return path, value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with each override set; intermediate mappings are created as needed."""
    result: dict[str, Any] = copy.deepcopy(dict(data))
    for text in overrides:
        path, value = parse_override(text)
        node: Any = result
        for depth, part in enumerate(path[:-1]):
            where = ".".join(path[: depth + 1])
            if isinstance(node, list):
                node = node[_list_index(part, node, where, text)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{where}' is not a mapping")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        last = path[-1]
        if isinstance(node, list):
            node[_list_index(last, node, ".".join(path), text)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {text!r}: '{'.'.join(path[:-1])}' is not a mapping")
    return result


def _list_index(part: str, node: list[Any], where: str, text: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"override {text!r}: '{where}' is not a valid index into a list of {len(node)}")
    return int(part)
