"""The run an experiment function is executing in, for code that needs its folders or resume point.

``scaling run`` starts each rank through the worker, which sets the current run before calling the
experiment; the function (or the trainer and ``model.save`` inside it) then asks :func:`current_run` where
to write checkpoints and whether there is one to resume from. Called from plain Python (``train.run``) or a
test, there is no run and :func:`current_run` returns ``None``, so such code falls back to its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scaling.experiment.params import Params

__all__ = ["RunContext", "current_run"]


@dataclass(frozen=True)
class RunContext:
    """One recorded run, as seen from inside the experiment function.

    Attributes:
        name: the run's name (``RUN_NAME`` in ``runs/EXPERIMENT/RUN_NAME/``).
        run_dir: that folder (record, logs, metrics).
        checkpoint_dir: where this run saves checkpoints (``run_dir / "checkpoints"``).
        last_checkpoint: the checkpoint a resumed run continues from; ``None`` for a fresh start.
        params: the resolved parameters of the run.
        seed: the seed applied before the function was called.
    """

    name: str
    run_dir: Path
    checkpoint_dir: Path
    last_checkpoint: Path | None
    params: Params
    seed: int


_current: RunContext | None = None


def current_run() -> RunContext | None:
    """The run this process is executing, or ``None`` outside ``scaling run``."""
    return _current


def _set_current_run(run: RunContext | None) -> RunContext | None:
    """Make ``run`` the current run (``None`` clears it); returns the previous one so callers can restore it."""
    global _current
    previous, _current = _current, run
    return previous
