"""Layout-independent checkpoints: atomic save, resharding load."""

from scaling.core.checkpoint.files import CheckpointError
from scaling.core.checkpoint.io import CheckpointInfo, find_checkpoint, load_checkpoint, save_checkpoint

__all__ = ["CheckpointError", "CheckpointInfo", "find_checkpoint", "load_checkpoint", "save_checkpoint"]
