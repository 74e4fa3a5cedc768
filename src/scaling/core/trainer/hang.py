"""Hang forensics: when no rank progresses for ``hang_timeout_s``, every rank writes what it was doing to the
run directory and the job exits with one line naming the rank(s) that did not arrive.

Without this a stopped rank (SIGSTOP, a hung disk or driver) leaves every other rank blocked in its next
collective until the collective timeout (ten minutes by default), and then each rank only says that a
collective timed out. Here each rank's watchdog thread

1. publishes this rank's :class:`~scaling.core.trainer.heartbeat.Heartbeat` (what it is doing, how many
   events so far) to the rendezvous store every ``poll_s``, and adds its new events to one shared progress
   counter. The store is the one the process group was built on, through a connection of its own: never a
   collective, since collectives are what hangs;
2. declares a hang when the shared counter has not moved for ``timeout_s`` (``slow_timeout_s`` while this
   rank is in a phase that may take long without events: writing a checkpoint), or when another rank
   declared one;
3. reads every rank's heartbeat twice, a few publications apart: a rank whose publications stopped is
   *unresponsive* (stopped, dead, or stuck so deep that its threads do not run); otherwise the culprits are
   the ranks outside any collective (busy elsewhere) or, if every rank waits in one, those that entered
   fewer collectives than the rest (they wait in an earlier one);
4. writes ``DIR/rank_N.txt``: the one line, what the rank was doing, its recent pipeline instructions and
   collectives, the Python stack of every thread, and the last heartbeat of every rank. The first rank to
   claim the report also writes the files of unresponsive ranks from their last heartbeat (they cannot),
   waits (bounded) for the others' files, then hands the one line to the launcher
   (:mod:`scaling.core.runner.reports`, which prints it once) or logs it when there is no launcher;
5. exits the process with code 1 (``os._exit``: the main thread is blocked in a collective and cannot be
   unwound). The launcher then stops the ranks that did not exit themselves.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch._C._distributed_c10d import Store

from scaling.core.logging import get_logger
from scaling.core.runner.reports import WorkerReport, report_dir, write_report
from scaling.core.trainer.heartbeat import Heartbeat, record_collectives

if TYPE_CHECKING:
    from scaling.core.pipeline.module import ParallelModule
    from scaling.core.topology.topology import Topology

__all__ = ["HANG_EXIT_CODE", "HangWatchdog", "culprits", "hang_line", "hang_watchdog", "watch_for_hangs"]

HANG_EXIT_CODE = 1
_logger = get_logger("scaling.trainer.hang")
_MAX_NAMED = 4  # ranks described in the one line; the files have all of them
_SILENT = "stopped responding"


def culprits(views: Mapping[int, Mapping[str, Any]], responsive: set[int], world_size: int) -> dict[int, str]:
    """The ranks that did not arrive, each with how it failed (pure: the heartbeats of every rank in).

    ``views``: rank -> its last published heartbeat (ranks that never published are absent). ``responsive``:
    the ranks whose publications continued while the run stood still.
    """
    missing = {r: "never published a heartbeat" for r in range(world_size) if r not in views}
    silent = {r: _SILENT for r in views if r not in responsive}
    if missing or silent:
        return dict(sorted({**missing, **silent}.items()))
    busy = {r: "is busy outside any collective" for r, v in views.items() if not v.get("in_collective")}
    if busy and len(busy) < world_size:
        return dict(sorted(busy.items()))
    counts = {r: int(v.get("collectives", 0)) for r, v in views.items()}
    fewest = min(counts.values(), default=0)
    behind = {r: "waits in an earlier collective than the others" for r, c in counts.items() if c == fewest}
    if len(behind) < len(counts):
        return dict(sorted(behind.items()))
    return {}  # every rank waits in its n-th collective: mismatched collectives or the network


def hang_line(
    named: Mapping[int, str],
    views: Mapping[int, Mapping[str, Any]],
    idle_s: float,
    dump_dir: Path,
    waiting: str | None = None,
) -> str:
    """The one line the job ends with: who did not arrive, what each was doing, and where the dumps are."""
    head = f"the run hung: no rank made progress for {idle_s:.0f} s"
    if not named and views and not any(v.get("in_collective") for v in views.values()):
        first = next(iter(views.values())).get("doing")
        who = f"no rank is in a collective: each is stuck in its own work ({first})"
    elif not named:
        who = "every rank waits in a collective (mismatched collectives on different ranks, or the network)"
    else:
        parts = []
        for rank, how in list(named.items())[:_MAX_NAMED]:
            view = views.get(rank, {})
            where = view.get("where", f"rank {rank}")
            doing = view.get("doing")
            seen = "last seen: " if rank in views and how == _SILENT else ""  # published up to poll_s before
            parts.append(f"{where} {how}" + (f" ({seen}{doing})" if doing else ""))
        if len(named) > _MAX_NAMED:
            parts.append(f"and {len(named) - _MAX_NAMED} more")
        noun = "rank" if len(named) == 1 else "ranks"
        who = f"{noun} {', '.join(str(r) for r in named)} did not arrive: " + "; ".join(parts)
    tail = f"; the others wait ({waiting})" if waiting and named else ""
    return f"{head}; {who}{tail}; stacks and recent instructions in {dump_dir}"


def _exit(code: int) -> None:
    """Leave now: the main thread is blocked in a collective, so no exception could reach the top."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(code)


def _thread_stacks() -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    blocks = []
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        blocks.append(f"--- thread {names.get(ident, '?')} ({ident}), most recent call last ---\n{stack}")
    return "\n".join(blocks)


def _own_store(store: Store, timeout_s: float) -> Store:
    """A connection of its own to ``store`` with a short timeout: the training thread may be blocked inside
    the shared one, and a store whose host stopped must not block the report for minutes."""
    try:
        clone: Store = store.clone()  # type: ignore[attr-defined]  # not in this torch's stubs
        clone.set_timeout(timedelta(seconds=timeout_s))
        return clone
    except Exception:  # stores without clone (file, hash): shared, they do not block on other processes
        return store


class HangWatchdog:
    """A thread that declares, reports and ends a hang of the world; see the module docstring.

    Args:
        heartbeat: this rank's record (the training loop and the pipeline executor beat it).
        store: shared by every rank of the run (the default group's store; tests pass a ``HashStore``).
        rank, world_size: of the default group.
        timeout_s: no progress anywhere for this long is a hang.
        dump_dir: where ``rank_N.txt`` go (created when needed).
        slow_timeout_s: the limit while this rank is in a slow phase (a save); ``timeout_s`` when unset.
        on_hang: called with the exit code once this rank has written its file (tests record it; the
            default leaves the process at once).
        key_prefix: of this run's keys in the store (an attempt of a restarted run uses its own).
        record: record this process's collectives in ``heartbeat`` while started (one watchdog per process
            may; tests that simulate several ranks in one process switch it off).
    """

    def __init__(
        self,
        heartbeat: Heartbeat,
        store: Store,
        rank: int,
        world_size: int,
        timeout_s: float,
        dump_dir: Path,
        *,
        slow_timeout_s: float | None = None,
        on_hang: Callable[[int], None] = _exit,
        key_prefix: str = "scaling/hang",
        record: bool = True,
    ) -> None:
        self.heartbeat = heartbeat
        self.rank, self.world_size = rank, world_size
        self.timeout_s = timeout_s
        self.slow_timeout_s = max(timeout_s, slow_timeout_s or timeout_s)
        self.dump_dir = Path(dump_dir)
        # 20 looks per timeout, at most one a second: what a stopped rank last published is that fresh
        self.poll_s = min(1.0, max(0.05, timeout_s / 20))
        self._store = _own_store(store, max(5.0, 4 * self.poll_s))
        self._on_hang = on_hang
        self._prefix = key_prefix
        self._alive = 0  # publications so far: other ranks see this rank's thread is running
        self._published = 0  # heartbeat.progress already added to the shared counter
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._recording = ExitStack()
        self._record = record
        self.line: str | None = None  # the one line, on the rank that reported it (for tests)
        self._store_timeout_s = max(5.0, 4 * self.poll_s)
        self._in_store_since: float | None = None  # a store op in flight since (a TCPStore whose host stopped
        self._reporting = threading.Lock()  # blocks it for good: the guard thread then reports without it)

    @classmethod
    def for_world(
        cls, heartbeat: Heartbeat, timeout_s: float, dump_dir: Path, *, slow_timeout_s: float | None = None
    ) -> HangWatchdog:
        """For the initialised default process group, its store, and the launcher's attempt (keys of a
        restarted attempt never mix with those of the one before)."""
        attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
        store = dist.distributed_c10d._get_default_store()
        return cls(
            heartbeat,
            store,
            dist.get_rank(),
            dist.get_world_size(),
            timeout_s,
            dump_dir,
            slow_timeout_s=slow_timeout_s,
            key_prefix=f"scaling/hang/{attempt}",
        )

    # Keys -----------------------------------------------------------------------------------------
    def _key(self, name: str) -> str:
        return f"{self._prefix}/{name}"

    def _publish(self) -> None:
        self._alive += 1
        payload = {**self.heartbeat.snapshot(), "alive": self._alive}
        self._store.set(self._key(f"rank{self.rank}"), json.dumps(payload))

    def _views(self) -> dict[int, dict[str, Any]]:
        keys = [self._key(f"rank{r}") for r in range(self.world_size)]
        present = [(r, k) for r, k in enumerate(keys) if self._store.check([k])]
        values = self._store.multi_get([k for _, k in present]) if present else []
        return {r: json.loads(bytes(v).decode()) for (r, _), v in zip(present, values, strict=True)}

    # Lifetime -------------------------------------------------------------------------------------
    def start(self) -> HangWatchdog:
        if self._record:
            self._recording.enter_context(record_collectives(self.heartbeat))
        with suppress(Exception):  # every rank is known from the start, even one that stops at once
            self._publish()
        self._thread = threading.Thread(target=self._watch, name="scaling-hang-watchdog", daemon=True)
        self._thread.start()
        guard = threading.Thread(target=self._guard, name="scaling-hang-store-guard", daemon=True)
        guard.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        self._recording.close()

    # The watch ------------------------------------------------------------------------------------
    def _watch(self) -> None:
        total, changed_at, store_ok = -1, time.monotonic(), True
        own = self.heartbeat.progress
        while not self._stopped.wait(self.poll_s):
            now = time.monotonic()
            progress = self.heartbeat.progress
            try:
                self._in_store_since = now
                self._publish()
                seen = self._store.add(self._key("progress"), progress - self._published)
                self._published, store_ok = progress, True
                declared = self._store.check([self._key("declared")])
                self._in_store_since = None
            except Exception:
                self._in_store_since = None  # the store's host is gone or stopped: judge by this rank's progress alone
                seen, store_ok, declared = total, False, False
                if progress != own:
                    changed_at = now
            own = progress
            if seen != total:
                total, changed_at = seen, now
            limit = self.slow_timeout_s if self.heartbeat.slow else self.timeout_s
            if declared or now - changed_at >= limit:
                if self._stopped.is_set():
                    return  # the loop ended meanwhile: not a hang
                self._report(now - changed_at, store_ok)
                return

    def _guard(self) -> None:
        """Report without the store when a store op has blocked past its timeout while this rank made no
        progress for the hang limit (TCPStore clients do not time out every op when the host is stopped)."""
        own, changed_at = self.heartbeat.progress, time.monotonic()
        while not self._stopped.wait(self.poll_s):
            now = time.monotonic()
            if self.heartbeat.progress != own:
                own, changed_at = self.heartbeat.progress, now
            since = self._in_store_since
            limit = self.slow_timeout_s if self.heartbeat.slow else self.timeout_s
            if since is not None and now - since > self._store_timeout_s and now - changed_at >= limit:
                self._report(now - changed_at, store_ok=False)
                return

    def _report(self, idle_s: float, store_ok: bool) -> None:
        if not self._reporting.acquire(blocking=False):
            return  # the other thread reports
        views: dict[int, dict[str, Any]] = {}
        responsive = {self.rank}
        reporter = True
        if store_ok:
            try:
                self._store.set(self._key("declared"), "1")
                first = self._views()
                for _ in range(3):  # a few publications: a live rank's count moves, a stopped one's does not
                    time.sleep(self.poll_s)
                    self._publish()
                views = self._views()
                responsive |= {r for r, v in views.items() if r in first and v.get("alive") != first[r].get("alive")}
            except Exception:
                store_ok = False
        named = culprits(views, responsive, self.world_size) if store_ok else {}
        waiting = self.heartbeat.doing() if self.rank not in named else None
        if store_ok:
            line = hang_line(named, views, idle_s, self.dump_dir, waiting)
        else:
            line = (
                f"the run hung: {self.heartbeat.where} made no progress for {idle_s:.0f} s ({self.heartbeat.doing()}) "
                f"and the rendezvous store does not answer (its host, usually rank 0 or the launcher, stopped?); "
                f"stacks and recent instructions in {self.dump_dir}"
            )
        self._write_own(line, views)
        if store_ok:
            try:
                self._store.add(self._key("dumped"), 1)
                reporter = self._store.add(self._key("reporter"), 1) == 1
            except Exception:
                reporter = True
        if reporter:
            for rank in named:
                if rank not in responsive:
                    self._write_for(rank, line, views)
            if store_ok:  # without the store nobody else can be waited for (its ops may block for good)
                self._wait_for("dumped", len(responsive), 10.0)
            self.line = line
            self._deliver(line)
            if store_ok:
                with suppress(Exception):
                    self._store.set(self._key("reported"), "1")
        else:
            self._wait_for("reported", 1, 20.0)  # the reporter must hand its line over before this rank exits
        self._on_hang(HANG_EXIT_CODE)

    def _wait_for(self, name: str, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self._store.check([self._key(name)]) and self._store.add(self._key(name), 0) >= count:
                    return
            except Exception:
                return
            time.sleep(self.poll_s)

    def _deliver(self, line: str) -> None:
        directory = report_dir()
        if directory is None:
            _logger.error("%s", line)
            return
        write_report(directory, WorkerReport(self.rank, HANG_EXIT_CODE, line, "", time.time(), collective=False))

    # Files ----------------------------------------------------------------------------------------
    def _header(self, rank: int, line: str) -> str:
        host, when = socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
        by = f"written by rank {self.rank} (pid {os.getpid()}, {host}) at {when}"
        return f"{line}\n\nrank {rank} of {self.world_size}; {by}\n"

    def _write_own(self, line: str, views: Mapping[int, Mapping[str, Any]]) -> None:
        beat = self.heartbeat
        text = (
            f"{self._header(self.rank, line)}\n{beat.where} was doing: {beat.doing()}\n\n{beat.history()}\n\n"
            f"Python stacks of every thread:\n{_thread_stacks()}\n{_table(views)}"
        )
        self._write(self.rank, text)

    def _write_for(self, rank: int, line: str, views: Mapping[int, Mapping[str, Any]]) -> None:
        view = views.get(rank)
        doing = "nothing published" if view is None else f"{view.get('where')} was doing: {view.get('doing')}"
        process = "" if view is None else f"pid {view.get('pid')} on {view.get('host')}"
        text = (
            f"{self._header(rank, line)}\nThis rank ({process}) did not respond, so it could not write this file "
            f"itself; its last published heartbeat:\n{doing}\n\nIts stack: attach py-spy (py-spy dump --pid PID) "
            f"or gdb to that process while it is stopped.\n{_table(views)}"
        )
        self._write(rank, text)

    def _write(self, rank: int, text: str) -> None:
        try:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            target = self.dump_dir / f"rank_{rank}.txt"
            partial = target.with_suffix(f".partial{self.rank}")
            partial.write_text(text, encoding="utf-8")
            os.replace(partial, target)
        except OSError as exc:  # the report line still goes out; say where the file could not go
            _logger.error("could not write the hang report of rank %d to %s: %s", rank, self.dump_dir, exc)


def _table(views: Mapping[int, Mapping[str, Any]]) -> str:
    if not views:
        return "\n(no heartbeats of other ranks: the store did not answer)\n"
    rows = [f"  {v.get('where', f'rank {r}')}: {v.get('doing')}" for r, v in sorted(views.items())]
    return "\nlast heartbeat of every rank:\n" + "\n".join(rows) + "\n"


def hang_watchdog(
    timeout_s: float | None, where: str, module: ParallelModule, run_dir: Path, topology: Topology
) -> HangWatchdog | None:
    """The trainer's hang watchdog (None when ``timeout_s`` is unset or there is no process group): a
    heartbeat that ``module``'s pipeline executor beats, dumps to ``run_dir/hang``, and the collective
    timeout as the limit while saving."""
    if timeout_s is None or not dist.is_initialized():
        return None
    heartbeat = Heartbeat(where)
    module.instruction_hook = heartbeat.on_instruction
    return HangWatchdog.for_world(
        heartbeat, timeout_s, run_dir / "hang", slow_timeout_s=topology.config.collective_timeout_s
    )


@contextmanager
def watch_for_hangs(timeout_s: float = 60.0, dump_dir: str | Path = "hang") -> Iterator[Heartbeat]:
    """Hang forensics for a training loop of your own (the trainer sets this up itself).

    Yields this rank's heartbeat; call ``heartbeat.beat("step", step)`` (or any phase name) at least once
    per step: collectives issued from Python (FSDP2's, ``dist.all_reduce``) count as progress by themselves,
    but DistributedDataParallel reduces from C++, unseen, so a loop without beats would look hung.
    Needs an initialised default process group.
    """
    if not dist.is_initialized():
        raise RuntimeError("watch_for_hangs needs an initialised process group (torch.distributed.init_process_group)")
    heartbeat = Heartbeat(f"rank {dist.get_rank()}")
    watchdog = HangWatchdog.for_world(heartbeat, timeout_s, Path(dump_dir)).start()
    try:
        yield heartbeat
    finally:
        watchdog.stop()
