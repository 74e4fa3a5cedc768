"""The training loop, its config and the context passed to user code."""

from scaling.core.trainer.config import TrainerConfig
from scaling.core.trainer.context import TrainingContext
from scaling.core.trainer.nonfinite import TrainingDiverged
from scaling.core.trainer.trainer import Trainer

__all__ = ["Trainer", "TrainerConfig", "TrainingContext", "TrainingDiverged"]
