"""Runs as ``scaling report`` sees them: where a run's files are, its parameters, and its metrics as series.

Two kinds of run directory are read, both by the ``metrics.jsonl`` they hold:

* an experiment run (``runs/EXPERIMENT/RUN_NAME/``, :mod:`scaling.experiment.records`): ``record.json``
  (name, status), ``params.json`` (the parameters) and the metrics of ``scaling.experiment.metrics``;
* a ``scaling train`` log dir (``logger.log_dir``, :mod:`scaling.core.logging.metrics`): ``metrics.jsonl``
  and ``config.json`` (which ``scaling train`` writes there) or a kept ``config.yml`` / ``config.yaml`` as the
  parameters.

A folder without ``metrics.jsonl`` whose one sub-folder has it is read as that sub-folder (a log dir one
level down); with several such sub-folders the user is asked to name them, rather than guessing.

A run may still be writing: the last line of ``metrics.jsonl`` without its newline is a record not yet
complete and is left out, as is any line that is not a JSON object (a crash mid-write leaves one; the count
is kept and shown). ``null`` values (the trainer's non-finite numbers) and the strings that
``log_metrics`` writes for them ("nan", "inf") are gaps in a series, never zeros.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from scaling.core.config import ConfigError

__all__ = ["METRICS_FILE", "Run", "Series", "find_metrics", "read_metrics", "read_run", "read_runs"]

METRICS_FILE = "metrics.jsonl"
CONFIG_FILES = ("config.json", "config.yml", "config.yaml")  # a `scaling train` run's parameters, if kept
_NOT_METRICS = ("step", "time", "non_finite")  # keys of the record itself


@dataclass
class Series:
    """One metric over steps, in file order; ``None`` is a gap (a non-finite value)."""

    steps: list[int] = field(default_factory=list)
    values: list[float | None] = field(default_factory=list)

    def finite(self) -> list[float]:
        return [v for v in self.values if v is not None]

    def last(self) -> float | None:
        return next((v for v in reversed(self.values) if v is not None), None)


@dataclass
class Run:
    """What the report shows of one run.

    Attributes:
        name: the run's name: ``run_name`` of its record, else its folder's name (made unique by the reader).
        path: the folder that holds ``metrics.jsonl``.
        kind: "experiment" (a ``record.json`` is there) or "train".
        params: the parameters, flattened to dotted keys (``optimizer.training_groups.0.name``).
        record: the experiment run's record (``None`` for a train log dir).
        series: every numeric metric by name.
        unreadable_lines: lines of ``metrics.jsonl`` left out (not complete or not a JSON object).
    """

    name: str
    path: Path
    kind: str
    params: dict[str, object]
    record: dict[str, object] | None
    series: dict[str, Series]
    unreadable_lines: int = 0

    @property
    def status(self) -> str | None:
        status = self.record.get("status") if self.record is not None else None
        return str(status) if status is not None else None


def find_metrics(run_dir: Path) -> Path:
    """The ``metrics.jsonl`` of ``run_dir`` (or of its one sub-folder that has one); a ``ConfigError`` else."""
    if not run_dir.exists():
        raise ConfigError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: not a directory (expected a run directory holding {METRICS_FILE})")
    direct = run_dir / METRICS_FILE
    if direct.is_file():
        return direct
    below = sorted(child / METRICS_FILE for child in run_dir.iterdir() if (child / METRICS_FILE).is_file())
    if len(below) == 1:
        return below[0]
    if below:
        names = ", ".join(str(path.parent) for path in below)
        raise ConfigError(f"{run_dir}: no {METRICS_FILE} here but {len(below)} runs below it; pass them: {names}")
    raise ConfigError(f"{run_dir}: no {METRICS_FILE} (in it or one level down): not a run directory")


def _number(value: object) -> float | None:
    """A metric value as a float, ``None`` for a gap; raises ``TypeError`` for a value that is no metric."""
    if value is None:
        return None
    if isinstance(value, bool | int | float):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return None  # log_metrics writes non-finite floats as "nan", "inf", "-inf"
    raise TypeError(value)


def read_metrics(path: Path) -> tuple[dict[str, Series], int]:
    """Every numeric metric in ``path`` by name, and how many lines were left out (see the module docstring).

    The file is read once, as it is now: lines appended while reading belong to the next report.
    """
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    lines = text.split("\n")
    partial = lines.pop()  # after the last newline: "" for a complete file, else a line still being written
    unreadable = 1 if partial.strip() else 0
    series: dict[str, Series] = {}
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            unreadable += 1
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            unreadable += 1
            continue
        step = int(record["step"])
        for name, value in record.items():
            if name in _NOT_METRICS:
                continue
            try:
                number = _number(value)
            except TypeError:
                continue  # a string or list an experiment logged: not something to plot
            entry = series.setdefault(name, Series())
            entry.steps.append(step)
            entry.values.append(number)
    return series, unreadable


def flatten(data: object, prefix: str = "") -> dict[str, object]:
    """Nested mappings and lists as ``{"a.b.0.c": value}``, so two configs compare row by row."""
    if isinstance(data, Mapping):
        items: Sequence[tuple[str, object]] = [(str(key), value) for key, value in data.items()]
    elif isinstance(data, list) and data:
        items = [(str(index), value) for index, value in enumerate(data)]
    else:
        return {prefix: data} if prefix else {}
    flat: dict[str, object] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def _read_json_object(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _train_params(folder: Path) -> dict[str, object]:
    """The config kept beside a ``scaling train`` run's metrics, flattened; nothing when there is none."""
    for name in CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if path.suffix == ".json":
            return flatten(_read_json_object(path))
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read ({exc})") from None
        return flatten(data) if isinstance(data, dict) else {}
    return {}


def read_run(run_dir: Path) -> Run:
    """The run in ``run_dir`` (see the module docstring); bad input is one ``ConfigError`` naming the path."""
    metrics = find_metrics(run_dir)
    folder = metrics.parent
    series, unreadable = read_metrics(metrics)
    record_path = folder / "record.json"
    if record_path.is_file():
        record = _read_json_object(record_path)
        params_path = folder / "params.json"
        raw = _read_json_object(params_path) if params_path.is_file() else record.get("params") or {}
        params = flatten(raw)
        name = str(record.get("run_name") or folder.resolve().name)
        return Run(name, folder, "experiment", params, record, series, unreadable)
    return Run(folder.resolve().name, folder, "train", _train_params(folder), None, series, unreadable)


def read_runs(run_dirs: Sequence[Path]) -> list[Run]:
    """Every run asked for, in order; runs of one name are called by their folders (which differ) instead."""
    runs = [read_run(path) for path in run_dirs]
    seen = [run.path.resolve() for run in runs]
    for index, path in enumerate(seen):
        if path in seen[:index]:
            raise ConfigError(f"{run_dirs[index]}: the same run is given twice")
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = str(run.path)
    return runs
