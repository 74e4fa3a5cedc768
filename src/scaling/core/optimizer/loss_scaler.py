"""Dynamic loss scaling for fp16: scale the loss up so small gradients survive fp16, and back off when the
scaled gradients overflow.

On an overflow (inf/nan in any rank's gradients; the caller agrees on it over all ranks first) the step is
skipped and, once ``hysteresis`` overflows have been seen since the last growth, the scale is multiplied
by ``1 / factor`` (not below ``min_scale``). After ``growth_interval`` clean steps in a row the scale grows
by ``factor``. bf16 and fp32 need no scaler: their exponent range is fp32's.

A back-off that is due while the scale already sits at ``min_scale`` sets :attr:`DynamicLossScaler.exhausted`:
scaling cannot help any more (the gradients are non-finite at the smallest scale allowed, so the model
itself diverged), and the training loop stops the run instead of skipping steps forever.
"""

from __future__ import annotations

from pydantic import Field

from scaling.core.config import BaseConfig

__all__ = ["DynamicLossScaler", "LossScalerConfig"]


class LossScalerConfig(BaseConfig):
    """Dynamic loss scaling, used only with fp16 precision."""

    enable: bool = Field(True, description="Use dynamic loss scaling when precision is float16.")
    initial_scale: float = Field(2.0**16, gt=0, description="Loss scale at the first step.")
    growth_interval: int = Field(1000, ge=1, description="Clean steps in a row after which the scale grows.")
    hysteresis: int = Field(2, ge=1, description="Overflows tolerated before the scale is lowered.")
    min_scale: float = Field(1.0, gt=0, description="The scale never drops below this.")
    factor: float = Field(2.0, gt=1, description="Growth and back-off factor.")


class DynamicLossScaler:
    """State machine of the loss scale. :meth:`update` is called once per step with the agreed overflow flag."""

    def __init__(self, config: LossScalerConfig) -> None:
        self.config = config
        self.scale = config.initial_scale
        self._clean_steps = 0
        self._hysteresis_left = config.hysteresis
        self.exhausted = False  # a back-off was due at min_scale: the caller stops the run

    def update(self, found_overflow: bool) -> bool:
        """Record this step's outcome; returns True when the step must be skipped."""
        if found_overflow:
            self._clean_steps = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                if self.scale <= self.config.min_scale:
                    self.exhausted = True
                self.scale = max(self.scale / self.config.factor, self.config.min_scale)
            return True
        self._clean_steps += 1
        if self._clean_steps >= self.config.growth_interval:
            self._clean_steps = 0
            self._hysteresis_left = self.config.hysteresis
            self.scale *= self.config.factor
        return False

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "clean_steps": self._clean_steps, "hysteresis_left": self._hysteresis_left}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.scale = float(state["scale"])
        self._clean_steps = int(state["clean_steps"])
        self._hysteresis_left = int(state["hysteresis_left"])
