"""Layout-independent checkpoints: atomic save, resharding load."""

from scaling.core.checkpoint.async_save import AsyncCheckpointer
from scaling.core.checkpoint.discovery import find_checkpoint, verify_file
from scaling.core.checkpoint.files import CheckpointError
from scaling.core.checkpoint.io import CheckpointInfo, load_checkpoint, save_checkpoint
from scaling.core.checkpoint.preflight import check_save_dir

__all__ = [
    "AsyncCheckpointer",
    "CheckpointError",
    "CheckpointInfo",
    "check_save_dir",
    "find_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "verify_file",
]
