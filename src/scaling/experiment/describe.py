"""How experiments and their parameters are shown to a person: ``experiments list`` and ``run EXPERIMENT --help``.

Values are written as ``--param NAME=VALUE`` takes them (``true``/``false`` for booleans, a string as it is),
so what a user reads can be typed back unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scaling.experiment.decorators import Experiment
from scaling.experiment.params import Param, ParamValue

__all__ = ["format_table", "param_default", "param_type", "source_of", "value_text"]


def value_text(value: ParamValue) -> str:
    """``value`` as it is written after ``--param NAME=``; an empty string as ``""`` so it stays visible."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    return str(value)


def param_type(param: Param) -> str:
    """``int``, ``float``, ``bool``, ``str``, or ``str, one of: a|b|c`` for a choice."""
    if param.options is None:
        return param.type.__name__
    return f"{param.type.__name__}, one of: " + "|".join(value_text(o) for o in param.options)


def param_default(param: Param) -> str:
    return value_text(param.default)


def source_of(experiment: Experiment[Any], root: Path) -> str:
    """``file:line`` of the definition, relative to the project root when it lies inside it."""
    file, line = experiment.source
    try:
        shown = os.path.relpath(file, root) if Path(file).resolve().is_relative_to(root.resolve()) else file
    except ValueError:  # another drive (Windows)
        shown = file
    return f"{shown}:{line}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, a header line and a rule under it; no trailing spaces."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=False)).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)]) + "\n"
