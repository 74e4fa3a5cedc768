"""Per-step metrics: always a JSON line per step in ``metrics.jsonl``; TensorBoard and W&B when enabled.

The JSONL file is the ground truth a run leaves behind: appended (a resumed run continues it), flushed
every step (a crash loses nothing written), valid JSON on every line. Non-finite values are written as
``null`` with the value's name in ``"non_finite"`` (JSON has no NaN), so a diverged step stays visible.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, SupportsFloat, TextIO

from scaling.core.logging.config import LoggerConfig

__all__ = ["MetricsLogger", "MissingExtraError"]


class MissingExtraError(ImportError):
    """A configured feature needs an optional package that is not installed."""


def _require(module: str, option: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{option} is true but the '{module.split('.')[0]}' package is not installed; "
            "install it with: pip install 'scaling[logging]'"
        ) from None


_RESERVED = ("step", "non_finite")  # keys of the JSONL record itself


def _number(name: str, value: SupportsFloat) -> float | int:
    """A plain Python number; integers stay integers (token counts read better as 4096 than 4096.0)."""
    item = getattr(value, "item", None)  # 0-d torch tensors, numpy scalars: .item() keeps int vs float
    if item is not None:
        try:
            value = item()
        except (RuntimeError, ValueError):  # more than one element
            raise ValueError(f"metric {name!r} is not a single number: {value!r}") from None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    return float(value)


class MetricsLogger:
    """Writes one record per step to every configured sink.

    Only ranks constructed with ``enabled=True`` write anything; which rank that is (usually the last
    pipeline stage's first data- and tensor-parallel rank, where the loss is) is the caller's decision.
    ``run_config`` (a JSON-safe dict, e.g. ``config.to_dict()``) is stored with the W&B run.
    """

    def __init__(
        self, config: LoggerConfig, *, enabled: bool = True, run_config: Mapping[str, object] | None = None
    ) -> None:
        self.config = config
        self.enabled = enabled
        self._file: TextIO | None = None
        self._tensorboard: Any = None  # SummaryWriter; the optional package has no types we can rely on
        self._wandb: Any = None  # the wandb module
        if not enabled:
            return
        try:
            self._open(run_config or {})
        except BaseException:
            self.close()  # do not leak the file or a half-open sink
            raise

    def _open(self, run_config: Mapping[str, object]) -> None:
        config = self.config
        if config.log_dir is not None:
            log_dir = Path(config.log_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
            self._file = (log_dir / "metrics.jsonl").open("a", encoding="utf-8", buffering=1)
        if config.tensorboard:
            assert config.log_dir is not None  # LoggerConfig checks this
            _require("tensorboard", "logger.tensorboard")
            writer_module = _require("torch.utils.tensorboard", "logger.tensorboard")
            self._tensorboard = writer_module.SummaryWriter(log_dir=str(Path(config.log_dir) / "tensorboard"))
        if config.wandb:
            self._wandb = _require("wandb", "logger.wandb")
            self._wandb.init(
                project=config.wandb_project,
                entity=config.wandb_entity,
                name=config.wandb_run_name,
                mode=config.wandb_mode,
                dir=str(config.log_dir) if config.log_dir is not None else None,
                config=dict(run_config),
            )

    def log(self, step: int, metrics: Mapping[str, SupportsFloat]) -> None:
        """Record ``metrics`` (floats, ints, 0-d tensors, numpy scalars) for optimizer step ``step``."""
        if not self.enabled:
            return
        clash = [name for name in _RESERVED if name in metrics]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the record itself")
        values = {name: _number(name, value) for name, value in metrics.items()}
        if self._file is not None:
            record: dict[str, Any] = {"step": step}
            non_finite = [n for n, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
            record.update({n: (None if n in non_finite else v) for n, v in values.items()})
            if non_finite:
                record["non_finite"] = {n: str(values[n]) for n in non_finite}
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        """Flush and close every sink; safe to call more than once."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
