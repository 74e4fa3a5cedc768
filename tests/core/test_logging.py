"""Rank-aware log lines and the metrics sinks (JSONL, TensorBoard, W&B, missing extras)."""

from __future__ import annotations

import json
import logging
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from scaling.core.config import ConfigError
from scaling.core.logging import LoggerConfig, MetricsLogger, MissingExtraError, configure_logging, get_logger


def test_every_line_names_rank_and_coordinates(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LoggerConfig(log_level="debug"), rank=3, coord=(0, 1, 1))
    configure_logging(LoggerConfig(log_level="debug"), rank=3, coord=(0, 1, 1))  # idempotent: one handler
    get_logger("scaling.trainer").debug("hello %s", "world")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].endswith("DEBUG [rank 3 pp0 dp1 tp1] hello world")
    configure_logging(LoggerConfig(log_level="warning"), rank=0)
    get_logger().info("hidden")
    assert capsys.readouterr().err == ""
    logging.getLogger("scaling").handlers.clear()


def test_rank_defaults_to_the_launcher_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "5")
    configure_logging(LoggerConfig())
    get_logger("optimizer").warning("careful")  # short names land under 'scaling.'
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d WARNING \[rank 5\] careful", line), line
    logging.getLogger("scaling").handlers.clear()


def test_metrics_jsonl_one_line_per_step_appended_across_runs(tmp_path: Path) -> None:
    config = LoggerConfig(log_dir=tmp_path)
    with MetricsLogger(config) as metrics:
        metrics.log(1, {"loss": torch.tensor(2.5), "lr": np.float32(0.5), "tokens": np.int64(4096)})
        metrics.log(2, {"loss": float("nan"), "lr": 1e-3})
    with MetricsLogger(config) as metrics:  # a resumed run continues the file
        metrics.log(3, {"loss": 2.0})
    with MetricsLogger(config, enabled=False) as metrics:  # other ranks write nothing
        metrics.log(4, {"loss": 1.0})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 1, "loss": 2.5, "lr": 0.5, "tokens": 4096},
        {"step": 2, "loss": None, "lr": 1e-3, "non_finite": {"loss": "nan"}},
        {"step": 3, "loss": 2.0},
    ]


def test_bad_metrics_are_refused(tmp_path: Path) -> None:
    with MetricsLogger(LoggerConfig(log_dir=tmp_path)) as metrics:
        with pytest.raises(ValueError, match="reserved"):
            metrics.log(1, {"step": 1.0})
        with pytest.raises(ValueError, match="metric 'loss' is not a single number"):
            metrics.log(1, {"loss": torch.ones(2)})
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_tensorboard_needs_a_log_dir() -> None:
    with pytest.raises(ConfigError, match="tensorboard: tensorboard needs log_dir"):
        LoggerConfig.from_dict({"tensorboard": True})


def test_tensorboard_writes_event_files(tmp_path: Path) -> None:
    with MetricsLogger(LoggerConfig(log_dir=tmp_path, tensorboard=True)) as metrics:
        metrics.log(1, {"loss": 3.0})
        metrics.log(2, {"loss": 2.0})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("loss")] == [(1, 3.0), (2, 2.0)]


def test_wandb_receives_init_log_and_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs))  # type: ignore[attr-defined]
    fake.log = lambda values, step: calls.append(("log", (values, step)))  # type: ignore[attr-defined]
    fake.finish = lambda: calls.append(("finish", None))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = LoggerConfig(log_dir=tmp_path, wandb=True, wandb_project="p", wandb_run_name="r", wandb_mode="offline")
    with MetricsLogger(config, run_config={"lr": 0.1}) as metrics:
        metrics.log(7, {"loss": torch.tensor(1.5)})
    assert calls == [
        ("init", {"project": "p", "entity": None, "name": "r", "mode": "offline", "dir": str(tmp_path),
                  "config": {"lr": 0.1}}),
        ("log", ({"loss": 1.5}, 7)),
        ("finish", None),
    ]  # fmt: skip


@pytest.mark.parametrize(("option", "module"), [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_missing_extra_gives_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(
        MissingExtraError, match=rf"logger.{option} is true but the '{module}' package is not installed"
    ):
        MetricsLogger(LoggerConfig(log_dir=tmp_path, **{option: True}))
