"""Checks on a save directory before the first step, so a bad one fails at once and not at the first save.

A run that trains for hours and then cannot write its checkpoint (the path is a file, read-only, or the
disk is full) has wasted those hours. Both the trainer and the launcher call :func:`check_save_dir`
before anything trains.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from scaling.core.config import ConfigError

__all__ = ["OPTIMIZER_BYTES_PER_PARAMETER", "check_save_dir", "expected_checkpoint_bytes"]

OPTIMIZER_BYTES_PER_PARAMETER = 12  # fp32 master weights and both Adam moments, stored full-size


def expected_checkpoint_bytes(n_parameters: int, weight_bytes: int, with_optimizer: bool) -> int:
    """Bytes one checkpoint takes: every weight in its dtype, plus the fp32 optimizer state if saved."""
    return n_parameters * (weight_bytes + (OPTIMIZER_BYTES_PER_PARAMETER if with_optimizer else 0))


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_save_dir(save_dir: str | Path, expected_bytes: int = 0) -> None:
    """Raise ``ConfigError`` (one line naming the path) unless ``save_dir`` can take one more checkpoint.

    ``save_dir`` may not exist yet: then its nearest existing ancestor must be a writable directory.
    Nothing is created; a probe file is written and removed to prove writability (permissions alone
    miss read-only mounts). ``expected_bytes``: the size of one checkpoint, checked against the free
    space of the file system that will hold it.
    """
    save_dir = Path(save_dir)
    if save_dir.exists() and not save_dir.is_dir():
        raise ConfigError(f"trainer.save_dir {save_dir} is a file, not a directory")
    where = _existing_ancestor(save_dir.absolute())
    if not where.is_dir():
        raise ConfigError(f"trainer.save_dir {save_dir} cannot be created: {where} is a file, not a directory")
    probe = where / f".scaling-write-test.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"trainer.save_dir {save_dir} is not writable ({where}: {exc.strerror or exc})") from None
    free = shutil.disk_usage(where).free
    if free < expected_bytes:
        raise ConfigError(
            f"trainer.save_dir {save_dir} has {free / 2**20:.1f} MiB free, one checkpoint needs about "
            f"{expected_bytes / 2**20:.1f} MiB"
        )
