"""The run an experiment function is executing in, for code that needs its folders or resume point.

``scaling run`` starts each rank through the worker, which sets the current run before calling the
experiment; the function (or the trainer and ``model.save`` inside it) then asks :func:`current_run` where
to write checkpoints and whether there is one to resume from. Called from plain Python (``train.run``) or a
test, there is no run and :func:`current_run` returns ``None``, so such code falls back to its arguments.

A scheduler that takes the nodes back (Slurm preemption, a time limit's warning, ``scontrol requeue``) sends
SIGTERM; the worker then sets :attr:`RunContext.stop_requested`, and a plain loop that looks at it saves a
checkpoint and returns, so the requeued job resumes from there. An experiment that never looks at it keeps
the default: SIGTERM ends the process at once (see :mod:`scaling.experiment.worker`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
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
        stop_requested: True once the run was asked to stop (SIGTERM): save a checkpoint and return.
    """

    name: str
    run_dir: Path
    checkpoint_dir: Path
    last_checkpoint: Path | None
    params: Params
    seed: int
    _stop: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)
    _watched: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    @property
    def stop_requested(self) -> bool:
        """Whether the scheduler asked this run to stop; reading it tells the worker the loop will stop itself."""
        self._watched.set()
        return self._stop.is_set()

    @property
    def stop_watched(self) -> bool:
        """Whether the experiment ever read :attr:`stop_requested` (else SIGTERM must end the process)."""
        return self._watched.is_set()

    def request_stop(self) -> None:
        """Ask the experiment to stop at its next check (the worker's SIGTERM handler calls this)."""
        self._stop.set()


_current: RunContext | None = None


def current_run() -> RunContext | None:
    """The run this process is executing, or ``None`` outside ``scaling run``."""
    return _current


def _set_current_run(run: RunContext | None) -> RunContext | None:
    """Make ``run`` the current run (``None`` clears it); returns the previous one so callers can restore it."""
    global _current
    previous, _current = _current, run
    return previous
