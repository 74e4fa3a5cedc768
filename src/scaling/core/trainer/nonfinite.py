"""What the training loop does about steps that cannot be trusted: non-finite ones, and a gradient stuck at 0.

The optimizer decides per step whether to skip the update (a non-finite loss or gradient norm; every rank
sees the same global norm and loss, so every rank skips together). This module holds the policy over
many steps, on every rank alike, so every rank also stops together:

* a skipped step is counted (``skipped_steps``, a running total in metrics and the console line);
* without fp16 loss scaling, ``max_consecutive_skips`` skips in a row mean the run diverged: one skipped
  step is a bad batch, five in a row is a model that will not recover, and skipping on silently would
  burn the rest of the job on no-op steps;
* with fp16 loss scaling, overflows are the scaler's business (it lowers the scale and they stop); only
  an overflow while the scale already sits at the scaler's minimum stops the run;
* a gradient norm of exactly 0 for several steps in a row (everything saturated, or nothing trainable
  reached by the loss) trains nothing, yet looks healthy in a loss curve: it is warned about, once per
  such stretch, naming the steps.

Steps are numbered as the console and the metrics number them: the step that completes as step ``n``
(1-based, ``TrainingContext.step`` after the update).
"""

from __future__ import annotations

import math

import torch

from scaling.core.logging import get_logger
from scaling.core.optimizer.optimizer import OptimizerStepResult

__all__ = ["ZERO_NORM_WARNING_STEPS", "StepHealth", "TrainingDiverged"]

_logger = get_logger("scaling.trainer")

ZERO_NORM_WARNING_STEPS = 3  # a zero norm this many steps in a row is warned about (one exact 0 can be chance)


class TrainingDiverged(RuntimeError):
    """The run stopped because its steps stayed non-finite; the message is one line saying what and what to try.

    Not bad input (the config was valid): callers report the message and exit non-zero (1).
    """


class StepHealth:
    """Counts skipped steps and stops the run when skipping cannot end; warns about a gradient norm stuck at 0."""

    def __init__(
        self,
        max_consecutive_skips: int,
        *,
        announce: bool = True,
        zero_norm_warning_steps: int = ZERO_NORM_WARNING_STEPS,
    ) -> None:
        self.max_consecutive_skips = max_consecutive_skips
        self.announce = announce  # this rank writes the zero-norm warning (every rank sees the same global norm)
        self.zero_norm_warning_steps = zero_norm_warning_steps
        self.skipped_steps = 0  # running total of this process's run (a resumed run starts again at 0)
        self._skip_streak_start: int | None = None
        self._skip_streak = 0
        self._zero_streak_start: int | None = None
        self._zero_streak = 0
        self._zero_warned = False

    def record(
        self, step: int, update: OptimizerStepResult, loss: torch.Tensor | float, *, loss_scaling: bool
    ) -> TrainingDiverged | None:
        """Take note of the step that completed as ``step``; returns the error that stops the run when it must
        stop (the caller logs this last step first, then raises it).

        ``loss`` is the step's loss (read to the host only for the message of a stop); ``loss_scaling`` tells
        whether an fp16 loss scaler decides about overflows.
        """
        self._watch_zero_norm(step, update)
        norm = update.grad_norm_value
        if not update.skipped:
            self._skip_streak, self._skip_streak_start = 0, None
            return None
        self.skipped_steps += 1
        self._skip_streak += 1
        if self._skip_streak_start is None:
            self._skip_streak_start = step
        if loss_scaling:
            if update.loss_scale_exhausted:
                return TrainingDiverged(
                    f"training diverged at step {step}: the gradients overflow even at the fp16 loss scaler's "
                    f"minimum scale ({update.loss_scale:g}; loss {float(loss):g}, grad norm {norm:g}); "
                    "lower the learning rate, train in bfloat16, or lower optimizer.loss_scaler.min_scale"
                )
            return None
        if self._skip_streak < self.max_consecutive_skips and self.announce:
            _logger.warning(
                "step %d skipped: loss %.4g, gradient norm %.3g (%d in a row; %d in a row stop the run)",
                step,
                float(loss),
                norm,
                self._skip_streak,
                self.max_consecutive_skips,
            )
        if self._skip_streak >= self.max_consecutive_skips:
            return TrainingDiverged(
                f"training diverged: {self._skip_streak} steps in a row ({self._skip_streak_start}-{step}) had a "
                f"non-finite loss or gradient norm (last: loss {float(loss):g}, grad norm {norm:g}) and "
                "were skipped; lower the learning rate, check the data, or raise trainer.max_consecutive_skips"
            )
        return None

    def _watch_zero_norm(self, step: int, update: OptimizerStepResult) -> None:
        zero = not update.skipped and math.isfinite(update.grad_norm_value) and update.grad_norm_value == 0.0
        if not zero:
            self._zero_streak, self._zero_streak_start, self._zero_warned = 0, None, False
            return
        self._zero_streak += 1
        if self._zero_streak_start is None:
            self._zero_streak_start = step
        if self._zero_streak >= self.zero_norm_warning_steps and not self._zero_warned:
            self._zero_warned = True
            if not self.announce:
                return
            _logger.warning(
                "the gradient norm is exactly 0 at steps %d-%d: nothing is learning (saturated activations, "
                "e.g. from a far too large learning rate, or no trainable parameter reached by the loss)",
                self._zero_streak_start,
                step,
            )
