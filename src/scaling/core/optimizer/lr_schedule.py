"""Learning-rate schedules: linear warm-up, then constant, linear or cosine decay to a minimum.

``learning_rate_at(step)`` is a pure function of the step, so resuming from a checkpoint only needs the
step number. Steps count optimizer updates from 0.

::

    lr
    max |        ______
        |      /        `-.            cosine
        |    /              `-.
        |  /                    `-.______  min
        +--|-------|----------------|------> step
           0    warmup         decay_steps
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from scaling.core.config import BaseConfig, InvalidCombination

__all__ = ["LearningRateScheduleConfig", "learning_rate_at"]


class LearningRateScheduleConfig(BaseConfig):
    """Warm-up and decay of one parameter group's learning rate."""

    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate, reached at the end of warm-up.")
    learning_rate_minimum: float = Field(
        0.0, ge=0, description="Floor of the decay; the learning rate after decay_steps."
    )
    learning_rate_decay_style: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="Shape of the decay after warm-up: 'constant', 'linear' or 'cosine'."
    )
    learning_rate_warmup_steps: int = Field(
        0, ge=0, description="Steps of linear warm-up from learning_rate / warmup_steps to learning_rate."
    )
    learning_rate_decay_steps: int = Field(
        1000,
        ge=1,
        description="Step at which the decay reaches learning_rate_minimum (counted from step 0, warm-up included).",
    )

    @model_validator(mode="after")
    def _check(self) -> LearningRateScheduleConfig:
        if self.learning_rate_minimum > self.learning_rate:
            raise InvalidCombination(
                f"learning_rate_minimum ({self.learning_rate_minimum}) is above learning_rate ({self.learning_rate})",
                "learning_rate_minimum",
            )
        if self.learning_rate_decay_style != "constant" and (
            self.learning_rate_warmup_steps > self.learning_rate_decay_steps
        ):
            raise InvalidCombination(
                f"warm-up ({self.learning_rate_warmup_steps} steps) is longer than the decay, which ends at step "
                f"{self.learning_rate_decay_steps}",
                "learning_rate_warmup_steps",
            )
        return self


def learning_rate_at(step: int, config: LearningRateScheduleConfig) -> float:
    """The learning rate used for the update at ``step`` (0-based)."""
    peak, floor = config.learning_rate, config.learning_rate_minimum
    warmup = config.learning_rate_warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if config.learning_rate_decay_style == "constant":
        return peak
    decay_span = config.learning_rate_decay_steps - warmup
    if decay_span <= 0 or step >= config.learning_rate_decay_steps:
        return floor
    progress = (step - warmup) / decay_span
    if config.learning_rate_decay_style == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
