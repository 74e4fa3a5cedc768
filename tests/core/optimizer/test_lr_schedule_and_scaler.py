"""LR schedules against closed forms; the fp16 loss scaler's back-off, hysteresis and growth."""

from __future__ import annotations

import math

import pytest

from scaling.core.config import ConfigError
from scaling.core.optimizer.loss_scaler import DynamicLossScaler, LossScalerConfig
from scaling.core.optimizer.lr_schedule import LearningRateScheduleConfig, learning_rate_at


def _config(**kwargs: object) -> LearningRateScheduleConfig:
    return LearningRateScheduleConfig.from_dict(kwargs)


def test_warmup_is_linear_from_peak_over_warmup() -> None:
    c = _config(learning_rate=1.0, learning_rate_warmup_steps=4, learning_rate_decay_steps=10)
    assert [learning_rate_at(s, c) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize(
    ("style", "step", "expected"),
    [
        ("constant", 0, 0.5),
        ("constant", 10_000, 2.0),
        ("linear", 10, 2.0),  # first step after warm-up: the peak
        ("linear", 60, 0.1 + 1.9 * 0.5),  # half-way through the decay
        ("linear", 110, 0.1),
        ("linear", 500, 0.1),
        ("cosine", 10, 2.0),
        ("cosine", 35, 0.1 + 1.9 * 0.5 * (1 + math.cos(math.pi * 0.25))),
        ("cosine", 60, 0.1 + 1.9 * 0.5),
        ("cosine", 110, 0.1),
    ],
)
def test_decay_matches_closed_form(style: str, step: int, expected: float) -> None:
    c = _config(
        learning_rate=2.0,
        learning_rate_minimum=0.1,
        learning_rate_decay_style=style,
        learning_rate_warmup_steps=4 if step == 0 else 10,
        learning_rate_decay_steps=110,
    )
    assert learning_rate_at(step, c) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("given", "field", "fragment"),
    [
        ({"learning_rate": -1e-3}, "learning_rate", "greater than 0"),
        ({"learning_rate": 1e-3, "learning_rate_minimum": 1e-2}, "learning_rate_minimum", "above learning_rate"),
        ({"learning_rate_warmup_steps": 200, "learning_rate_decay_steps": 100}, "learning_rate_warmup_steps",
         "longer than the decay"),
    ],
)  # fmt: skip
def test_bad_schedules_name_the_field(given: dict[str, object], field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        LearningRateScheduleConfig.from_dict(given)
    assert f"{field}:" in str(info.value) and fragment in str(info.value)


def test_scaler_backs_off_after_hysteresis_and_grows_after_the_window() -> None:
    scaler = DynamicLossScaler(LossScalerConfig(initial_scale=1024, growth_interval=3, hysteresis=2, factor=2))
    assert scaler.update(found_overflow=True) is True  # skipped, but hysteresis absorbs the first
    assert scaler.scale == 1024
    assert scaler.update(found_overflow=True) is True
    assert scaler.scale == 512
    assert scaler.update(found_overflow=True) is True  # hysteresis exhausted until the next growth
    assert scaler.scale == 256
    assert [scaler.update(found_overflow=False) for _ in range(2)] == [False, False]
    assert scaler.scale == 256
    assert scaler.update(found_overflow=False) is False
    assert scaler.scale == 512  # grew after 3 clean steps
    assert scaler.update(found_overflow=True) is True
    assert scaler.scale == 512  # hysteresis was restored by the growth


def test_scaler_respects_the_minimum_and_round_trips_its_state() -> None:
    scaler = DynamicLossScaler(LossScalerConfig(initial_scale=4, hysteresis=1, min_scale=2))
    for _ in range(5):
        scaler.update(found_overflow=True)
    assert scaler.scale == 2
    restored = DynamicLossScaler(LossScalerConfig())
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()
