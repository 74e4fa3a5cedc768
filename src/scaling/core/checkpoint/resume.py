"""What a starting run resumes from, decided before anything trains or is written.

Starting from scratch is the one decision that can destroy saved work: the new run saves its own
``global_step*`` directories and retention (``keep_last_n_checkpoints``) deletes the older ones. So a
fresh start is allowed only where nothing was saved, or when the user asks for it explicitly; and a
checkpoint that exists but is damaged is an error naming the file, never "nothing to resume".
"""

from __future__ import annotations

from pathlib import Path

from scaling.core.checkpoint.discovery import find_checkpoint, finished_checkpoints, holds_checkpoints
from scaling.core.checkpoint.files import CheckpointError
from scaling.core.config import ConfigError

__all__ = ["continues_to", "resume_source"]


def resume_source(
    load_dir: Path | None,
    save_dir: Path | None,
    *,
    allow_fresh_start: bool = False,
    require_checkpoint: bool = False,
) -> Path | None:
    """The checkpoint directory to load, or None to start from scratch.

    ``load_dir`` that holds anything (hidden leftovers of a crashed first save aside) is resolved by
    :func:`~scaling.core.checkpoint.discovery.find_checkpoint`, whose errors propagate: a damaged
    checkpoint is never taken for "nothing saved yet". Otherwise (missing or empty) the run
    starts fresh, unless ``require_checkpoint`` (``CheckpointError``) or ``save_dir`` already holds
    checkpoints and ``allow_fresh_start`` is off (``ConfigError`` naming both directories).
    """
    if load_dir is not None and _holds_anything(load_dir):
        return find_checkpoint(load_dir)
    if require_checkpoint:
        raise CheckpointError(f"no checkpoint at {load_dir} (trainer.assert_checkpoint_loaded is set)")
    if save_dir is None or allow_fresh_start or not holds_checkpoints(save_dir):
        return None
    saved = finished_checkpoints(save_dir)
    what = f"checkpoints (newest {saved[-1].name})" if saved else "checkpoint files"
    remedy = (
        f"set trainer.load_dir to {save_dir} to resume, or trainer.allow_fresh_start_beside_checkpoints=true "
        "to start from scratch beside them"
    )
    if load_dir is None:
        raise ConfigError(f"trainer.save_dir {save_dir} already holds {what} but trainer.load_dir is unset: {remedy}")
    raise ConfigError(
        f"trainer.load_dir {load_dir} holds no checkpoint, but trainer.save_dir {save_dir} already holds {what} "
        f"(is load_dir mistyped?): {remedy}"
    )


def _holds_anything(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(not p.name.startswith(".") for p in path.iterdir()))


def continues_to(checkpoint_step: int, train_iterations: int, checkpoint: Path) -> bool:
    """Whether a run resumed at ``checkpoint_step`` has steps left before ``train_iterations``.

    Equal: the run is complete (False, nothing to do). Beyond: ``ConfigError`` naming both numbers,
    since "training" zero steps and saving again would hide the mismatch.
    """
    if checkpoint_step > train_iterations:
        raise ConfigError(
            f"trainer.train_iterations ({train_iterations}) is below the step of the checkpoint {checkpoint} "
            f"({checkpoint_step}): raise train_iterations to continue, or load another checkpoint"
        )
    return checkpoint_step < train_iterations
