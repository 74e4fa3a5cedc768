"""Run a function on N local processes that form a ``torch.distributed`` world: the harness behind every
distributed test, and usable for any model code built on scaling.

Design points, each learned from harnesses that flake:

* rendezvous through a ``FileStore`` in a fresh temporary directory, so no TCP port is chosen for the
  store and concurrent test runs cannot collide;
* one deadline for the whole world: when it passes, every rank still running is killed and the error
  names them, so a deadlock fails in seconds instead of hanging CI;
* the first rank that raises is reported with its own traceback, and the others (likely blocked in a
  collective waiting for it) are killed;
* processes come from a fork server that has already imported torch, so starting 8 ranks costs
  milliseconds of import time instead of seconds per rank.

Results travel back through ``torch.save``/``torch.load(weights_only=True)``: return tensors, numbers,
strings, and lists/tuples/dicts of them.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistributedTestFailure", "DistributedTimeout", "run_distributed"]

_GRACE_S = 0.5  # after the first failure, time for other ranks' failures to arrive before killing them


class DistributedTestFailure(RuntimeError):
    """A rank raised (or died); the message carries its rank and traceback."""

    def __init__(self, message: str, failed_ranks: list[int]) -> None:
        self.failed_ranks = failed_ranks
        super().__init__(message)


class DistributedTimeout(DistributedTestFailure):
    """The world did not finish before the deadline; the hung ranks were killed."""


_PRELOAD = [
    "torch",
    "torch.distributed",
    "scaling.core.trainer",
    "scaling.core.optimizer.optimizer",
    "scaling.core.zero.memory",
    "scaling.transformer.train",
]


def _context() -> mp.context.BaseContext:
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # Every rank of every test then starts with the library imported (a few seconds of CPU per rank
        # otherwise, paid ~400 times in the suite); a module that fails to import is skipped silently
        # here and imported, raising its error, by the rank that needs it.
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return mp.get_context("spawn")


def _encode(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _worker(
    rank: int,
    world_size: int,
    store_path: str,
    backend: str,
    timeout_s: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: mp.Queue[tuple[int, bytes | None, str | None]],
) -> None:
    torch.set_num_threads(1)  # many ranks share few cores: oversubscription makes every collective slow
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        store = dist.FileStore(store_path, world_size)  # type: ignore[attr-defined]
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
        value = fn(*args)
        results.put((rank, _encode(value), None))
    except BaseException:
        results.put((rank, None, traceback.format_exc()))
        # Flush before tearing down the group: peers then fail in their collectives, and the root cause
        # must reach the parent before their secondary errors do.
        results.close()
        results.join_thread()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 60.0,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` processes with an initialised process group.

    ``fn`` must be importable by name (a module-level function). Returns each rank's return value,
    indexed by rank. Raises :class:`DistributedTestFailure` naming the failing rank with its traceback,
    or :class:`DistributedTimeout` naming the ranks still running after ``timeout_s`` seconds.
    """
    ctx = _context()
    results: mp.Queue[tuple[int, bytes | None, str | None]] = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="scaling-dist-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(  # type: ignore[attr-defined]
                target=_worker,
                args=(rank, world_size, store_path, backend, timeout_s, fn, args, results),
                name=f"rank{rank}",
                daemon=False,  # ranks may start worker processes of their own (data loading)
            )
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        try:
            return _collect(procs, results, world_size, timeout_s)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
            for proc in procs:
                proc.join(timeout=10)


def _collect(
    procs: list[Any],
    results: mp.Queue[tuple[int, bytes | None, str | None]],
    world_size: int,
    timeout_s: float,
) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    first_error_at: float | None = None
    while len(values) + len(errors) < world_size:
        now = time.monotonic()
        if first_error_at is not None and now > first_error_at + _GRACE_S:
            break
        if now > deadline:
            pending = sorted(set(range(world_size)) - values.keys() - errors.keys())
            raise DistributedTimeout(
                f"distributed run timed out after {timeout_s:.0f} s; ranks {pending} did not finish and were killed"
                + _format_errors(errors),
                pending,
            )
        try:
            rank, payload, error = results.get(timeout=0.1)
        except queue.Empty:
            _note_dead_ranks(procs, values, errors)
            if errors and first_error_at is None:
                first_error_at = time.monotonic()
            continue
        if error is not None:
            errors[rank] = error
            first_error_at = first_error_at or time.monotonic()
        else:
            assert payload is not None
            values[rank] = torch.load(io.BytesIO(payload), weights_only=True)
    if errors:
        failed = list(errors)  # in order of arrival: the first is the root cause, later ones often follow from it
        raise DistributedTestFailure(f"rank {failed[0]} of {world_size} failed" + _format_errors(errors), failed)
    return [values[rank] for rank in range(world_size)]


def _note_dead_ranks(procs: list[Any], values: dict[int, Any], errors: dict[int, str]) -> None:
    """A rank that exited without reporting (crash, os._exit, killed) is a failure too."""
    for rank, proc in enumerate(procs):
        if rank in values or rank in errors or proc.is_alive():
            continue
        proc.join(timeout=0.5)  # give a result in flight the chance to land first
        if proc.exitcode is not None and proc.exitcode != 0:
            errors[rank] = f"process exited with code {proc.exitcode} without reporting a result\n"


def _format_errors(errors: dict[int, str]) -> str:
    return "".join(f"\n\n--- rank {rank} ---\n{text.rstrip()}" for rank, text in errors.items())
