"""Automatic restarts (``--max-restarts N``): which attempt a rank belongs to, and what a restarted one loads.

torchrun's elastic agent restarts the whole local world when a rank fails (``runner.max_restarts``). A
restarted attempt must continue the run, not begin it again: it resumes from the newest complete
checkpoint in ``trainer.save_dir``, with everything (step, data position, random streams), whatever the
config says it starts from. A finetuning run configured to load base weights from ``load_dir`` would
otherwise start over from the base after every crash; a run with only ``save_dir`` set would be refused
as "a fresh start beside checkpoints". Before the first checkpoint a restarted attempt starts as the first
did (the same seed gives the same weights).

This module reads only the environment and the file system; it imports nothing heavy (the command lines
import it).
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from scaling.core.runner.reports import RESTART_COUNT_ENV

if TYPE_CHECKING:
    from scaling.core.trainer.config import TrainerConfig

__all__ = ["JOB_START_ENV", "add_restarts_argument", "restart_count", "restart_overrides", "resume_after_restart"]

JOB_START_ENV = "SCALING_JOB_START"  # time.time() when the launcher started: the wall time of every attempt


def restart_count() -> int:
    """0 in the first attempt (or outside torchrun), 1 after the first restart, and so on."""
    value = os.environ.get(RESTART_COUNT_ENV, "0")
    return int(value) if value.isdigit() else 0


def resume_after_restart(config: TrainerConfig) -> TrainerConfig:
    """``config`` for this attempt: a restarted one resumes everything from ``save_dir``'s newest checkpoint.

    The first attempt and a run without ``save_dir`` keep ``config``. A restart before the first checkpoint
    was complete starts as the first attempt did; what a save cut short left in ``save_dir`` is this job's
    own (the first attempt found nothing to refuse there), so it does not count as "checkpoints beside a
    fresh start".
    """
    from scaling.core.checkpoint.discovery import finished_checkpoints  # the checkpoint package imports torch

    if restart_count() == 0 or config.save_dir is None:
        return config
    if not finished_checkpoints(config.save_dir):
        return config.model_copy(update={"allow_fresh_start_beside_checkpoints": True})
    return config.model_copy(update={"load_dir": config.save_dir, "load": "everything"})


def add_restarts_argument(parser: argparse.ArgumentParser) -> None:
    """``--max-restarts N``, the same on ``scaling train``, ``scaling launch`` and ``scaling run``."""
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=None,
        metavar="N",
        help="Restart the whole world up to N times when a rank fails (killed, crashed); each restart resumes "
        "from the newest complete checkpoint in trainer.save_dir (same as -o runner.max_restarts=N).",
    )


def restart_overrides(args: argparse.Namespace) -> list[str]:
    """The config override ``--max-restarts`` stands for (none when it was not given)."""
    value = getattr(args, "max_restarts", None)
    return [] if value is None else [f"runner.max_restarts={value}"]
