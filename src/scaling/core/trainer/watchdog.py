"""A per-rank watchdog: a step that makes no progress is named in the log long before the collective times out.

A rank that stops (SIGSTOP, a hung disk, a dead GPU) leaves every other rank blocked in its next collective
until ``topology.collective_timeout_s`` passes, silently. The training loop beats the watchdog at each phase
of a step (data, forward/backward, optimizer, evaluation, save); a thread warns when no beat came for
``warn_after_s``, naming this rank, its coordinates, the step and the phase it is stuck in, and again after
twice, four times... that long while it stays stuck. The thread also notices when this process's parent
(the launcher) is gone and sends this process SIGTERM, so it stops like on any SIGTERM (a fallback where
the kernel's parent-death signal is not available).

Given a :class:`~scaling.core.trainer.hang.HangWatchdog`, the watchdog also starts and stops it and passes
each beat on to its heartbeat: the warning says "this rank waits", the hang watchdog ends a run in which no
rank progresses and names the rank(s) that did not arrive.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from scaling.core.logging import get_logger

if TYPE_CHECKING:
    from scaling.core.trainer.hang import HangWatchdog

__all__ = ["SLOW_PHASES", "StallWatchdog"]

SLOW_PHASES = frozenset({"save", "rollback"})  # may last long without events (files): a longer hang limit

_logger = get_logger("scaling.trainer.watchdog")


class StallWatchdog:
    """Warns when ``beat`` was not called for ``warn_after_s`` seconds; use as a context manager.

    Args:
        warn_after_s: seconds without a beat before a warning (and between repeated warnings).
        where: names this rank in the warning, e.g. "rank 1 (pp 0, dp 1, tp 0)".
        collective_timeout_s: mentioned in the warning: when the run will fail if nothing changes.
        warn: where warnings go (the logger's ``warning`` by default; tests pass their own).
        watch_parent: also stop (SIGTERM to this process) when the parent exits; for launched ranks only, a
            process started by hand (``nohup``) must outlive its shell.
        hang: started and stopped with this watchdog; every beat reaches its heartbeat.
    """

    def __init__(
        self,
        warn_after_s: float,
        where: str,
        *,
        collective_timeout_s: float | None = None,
        warn: Callable[[str], None] | None = None,
        watch_parent: bool = False,
        hang: HangWatchdog | None = None,
    ) -> None:
        self.warn_after_s = warn_after_s
        self.where = where
        self.collective_timeout_s = collective_timeout_s
        self._warn = warn or _logger.warning
        self._phase, self._step = "start", 0
        self._last_beat = time.monotonic()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._parent = os.getppid() if watch_parent else None
        self.warnings = 0  # how many were given, for callers and tests
        self.hang = hang

    def beat(self, phase: str, step: int) -> None:
        """This rank made progress and now enters ``phase`` of ``step`` (cheap: three assignments)."""
        self._phase, self._step = phase, step
        self._last_beat = time.monotonic()
        if self.hang is not None:
            self.hang.heartbeat.beat(phase, step, slow=phase in SLOW_PHASES)

    def start(self) -> StallWatchdog:
        self._last_beat = time.monotonic()
        if self.hang is not None:
            self.hang.start()
        self._thread = threading.Thread(target=self._watch, name="scaling-stall-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.hang is not None:
            self.hang.stop()

    def __enter__(self) -> StallWatchdog:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def _watch(self) -> None:
        poll_s = min(1.0, self.warn_after_s / 4)
        beat, next_warning_s = self._last_beat, self.warn_after_s
        while not self._stopped.wait(poll_s):
            if self._parent is not None and os.getppid() != self._parent:
                _logger.warning("%s: the launcher is gone; stopping after this step", self.where)
                self._parent = None  # once is enough: the trainer stops after this step
                os.kill(os.getpid(), signal.SIGTERM)
            if self._last_beat != beat:  # progress: the next stall is warned about after warn_after_s again
                beat, next_warning_s = self._last_beat, self.warn_after_s
            idle_s = time.monotonic() - beat
            if idle_s >= next_warning_s:
                next_warning_s *= 2  # 60 s, 120 s, 240 s...: a long stall is not a warning every minute
                self.warnings += 1
                self._warn(self._message(idle_s))

    def _message(self, idle_s: float) -> str:
        text = (
            f"{self.where} has made no progress for {idle_s:.0f} s in step {self._step}, phase {self._phase}: "
            "it is waiting, probably in a collective for another rank that stopped or is slow"
        )
        if self.hang is not None:
            text += (
                f"; the run ends when no rank has progressed for {self.hang.timeout_s:.0f} s (trainer.hang_timeout_s, "
                "longer while saving)"
            )
        elif self.collective_timeout_s is not None:
            text += (
                f"; the run fails when the collective times out ({self.collective_timeout_s:.0f} s after it "
                "began, topology.collective_timeout_s)"
            )
        return text
