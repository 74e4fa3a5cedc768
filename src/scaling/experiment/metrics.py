"""``log_metrics(step, loss=...)``: an experiment's metrics into its run's ``metrics.jsonl``.

One JSON object per call and line (``{"step": 3, "time": ..., "loss": 2.1}``), written by global rank 0
only, so a metric logged on every rank (a loss already reduced over the world) appears once. Outside
``scaling run`` (``train.run({...})`` from Python, a test) there is no run directory and nothing is written,
so an experiment can log unconditionally. Tensors and NumPy scalars are stored as plain numbers.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from scaling.experiment.records import RunPaths
from scaling.experiment.run_context import current_run

__all__ = ["log_metrics"]


def _global_rank() -> int:
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _number(name: str, value: object) -> float | int | str | bool | None:
    item = getattr(value, "item", None)  # a one-element tensor or a NumPy scalar
    if callable(item):
        value = item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no nan/inf; keep them readable
    raise TypeError(f"log_metrics: {name}={value!r} is not a number, a string or a one-element tensor")


def log_metrics(step: int, **values: object) -> None:
    """Append ``{"step": step, "time": now, **values}`` to the current run's ``metrics.jsonl`` (rank 0)."""
    run = current_run()
    if run is None or _global_rank() != 0:
        return
    entry: dict[str, object] = {"step": int(step), "time": round(time.time(), 3)}
    entry.update({name: _number(name, value) for name, value in values.items()})
    with RunPaths(run.run_dir).metrics.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
