"""Asynchronous checkpoints: the step takes host copies, a background thread writes and publishes them.

A synchronous save stalls every rank for the whole write: files, fsyncs, checksums. Only part of that
needs the training step. Gathering tensor-parallel slices and ZeRO shards is collective on the training
groups, so it stays in the step; so does the copy to host memory (pinned, without waiting for it on a
GPU), because the next optimizer step overwrites the parameters in place. Everything after that is local
to a rank and runs in a writer thread while training continues: the finite checks, the files and their
SHA-256, then the same publish protocol as a synchronous save (every rank's files, an agreement that all
are written, rank 0's manifest, rename and ``latest``). The format and the crash safety are therefore
the same: a process killed during a background save leaves only a ``.global_step{N}.incomplete``
directory, which no loader reads, beside the previous checkpoint.

The agreement runs on a gloo group of its own, created when the :class:`AsyncCheckpointer` is (a
collective, on every rank in the same order): collectives of one group must not be issued from two
threads at once, and the training thread keeps using the default group. At most one save is in flight: a
new save first waits for the previous one. A background failure (a full disk, a non-finite tensor) is
agreed on by every rank in the writer and raised by the next :meth:`AsyncCheckpointer.save` or
:meth:`AsyncCheckpointer.wait`, so every rank raises at the same step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from scaling.core.checkpoint.io import (
    CheckpointOptimizer,
    begin_save,
    manifest_of,
    publish,
    save_checkpoint,
    write_state,
)
from scaling.core.checkpoint.writes import SaveWrites
from scaling.core.logging import get_logger
from scaling.core.pipeline.module import ParallelModule

__all__ = ["AsyncCheckpointer", "HostCopies"]

_logger = get_logger("scaling.checkpoint")

_File = tuple[Path, dict[str, torch.Tensor], dict[str, str], Callable[[str], str]]


class _HostBuffers:
    """Host tensors kept from one save for the next, by shape and dtype: a fresh allocation costs page faults
    (and ``cudaHostAlloc`` when pinned) that would land in the training step. Holds one checkpoint's worth."""

    def __init__(self) -> None:
        self._free: dict[tuple[torch.Size, torch.dtype, bool], list[torch.Tensor]] = {}
        self._lock = threading.Lock()  # taken by the step, given back by the writer

    def take(self, shape: torch.Size, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        with self._lock:
            free = self._free.get((shape, dtype, pinned))
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=pinned)

    def give(self, tensor: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault((tensor.shape, tensor.dtype, tensor.is_pinned()), []).append(tensor)


def _to_host(tensor: torch.Tensor, buffers: _HostBuffers) -> torch.Tensor:
    """A host copy the training step can no longer change: pinned and not waited for when on a GPU (the
    writer waits, see :meth:`HostCopies.replay`), a plain copy when already on the host."""
    tensor = tensor.detach()
    on_gpu = tensor.device.type == "cuda"
    host = buffers.take(tensor.shape, tensor.dtype, pinned=on_gpu)
    host.copy_(tensor, non_blocking=on_gpu)
    return host


def _contents(source: str | Path) -> str | Path | bytes:
    """A file to copy into a background save, read now: callers may delete it once the save returns (a
    tokenizer written to a temporary directory). Unreadable, the path stays and the writer reports it."""
    try:
        return Path(source).read_bytes()
    except OSError:
        return source


class HostCopies:
    """A :class:`~scaling.core.checkpoint.io.TensorSink` that keeps host copies of a rank's files instead of
    writing them; :meth:`replay` writes them later, from any thread."""

    def __init__(self, work: Path, buffers: _HostBuffers | None = None) -> None:
        self.work = work
        self._buffers = buffers if buffers is not None else _HostBuffers()
        self.files: list[_File] = []
        self._from_device = False
        self._copied: torch.cuda.Event | None = None

    def tensors(
        self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], label: Callable[[str], str]
    ) -> None:
        self._from_device = self._from_device or any(t.device.type == "cuda" for t in tensors.values())
        self.files.append((path, {k: _to_host(t, self._buffers) for k, t in tensors.items()}, dict(metadata), label))

    def seal(self) -> None:
        """Mark the end of the copies on the current CUDA stream (nothing to mark on the host)."""
        if self._from_device:
            self._copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._copied.record()

    def replay(self, writes: SaveWrites) -> None:
        """Write every file through ``writes`` (finite check, atomic write, SHA-256), once the copies landed."""
        if self._copied is not None:
            self._copied.synchronize()
        self.files.reverse()
        while self.files:
            path, tensors, metadata, label = self.files.pop()
            writes.tensors(path, tensors, metadata, label)
            for tensor in tensors.values():  # written (or failed): the next save copies into it
                self._buffers.give(tensor)


class AsyncCheckpointer:
    """Saves checkpoints in the background, at most one at a time; construct it on every rank (collective).

    ``save(..., background=False)`` is a synchronous save that first waits for the one in flight (the
    final save and a save on a signal, after which the process exits). Works with any
    :class:`~scaling.core.checkpoint.io.CheckpointOptimizer`, so a plain loop can use it as the trainer does.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self._group = group if group is not None else dist.new_group(backend="gloo")
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._in_flight_step: int | None = None
        self._buffers = _HostBuffers()
        self.last_published: Path | None = None

    @property
    def in_flight(self) -> int | None:
        """The step whose background save is still being written, None when none is."""
        return self._in_flight_step if self._thread is not None and self._thread.is_alive() else None

    def save(
        self,
        save_dir: str | Path,
        step: int,
        module: ParallelModule,
        optimizer: CheckpointOptimizer | None = None,
        *,
        background: bool = True,
        config: Mapping[str, Any] | None = None,
        rank_state: Mapping[str, torch.Tensor] | None = None,
        run_state: Mapping[str, Any] | None = None,
        keep_last: int | None = None,
        weights: Literal["all", "trainable"] = "all",
        files: Mapping[str, str | Path] | None = None,
    ) -> Path | None:
        """Save ``global_step{step}`` like :func:`~scaling.core.checkpoint.io.save_checkpoint` (same
        arguments, collective). In the background: returns None once the host copies are taken; the
        checkpoint is published later. Raises the failure of the previous background save, if it had one."""
        self.wait()
        if not background:
            self.last_published = save_checkpoint(
                save_dir,
                step,
                module,
                optimizer,
                config=config,
                rank_state=rank_state,
                run_state=run_state,
                keep_last=keep_last,
                weights=weights,
                files=files,
            )
            return self.last_published
        writes = begin_save(save_dir, step, module, files)
        copies = HostCopies(writes.work, self._buffers)
        write_state(copies, module, optimizer, weights=weights, rank_state=rank_state)
        manifest = manifest_of(step, module, optimizer, weights=weights, config=config, run_state=run_state)
        copies.seal()
        rank = module.topology.global_rank
        contents = {name: _contents(source) for name, source in (files or {}).items()} if rank == 0 else {}

        def write() -> None:
            try:
                copies.replay(writes)
                self.last_published = publish(
                    writes, Path(save_dir), manifest, files=contents, keep_last=keep_last, rank=rank, group=self._group
                )
            except BaseException as exc:  # raised in the training thread by the next save or wait
                self._failure = exc

        self._in_flight_step = step
        self._thread = threading.Thread(target=write, name=f"checkpoint-writer-step{step}", daemon=True)
        self._thread.start()
        return None

    def wait(self) -> Path | None:
        """Block until the save in flight is published; re-raise its failure. Returns the newest checkpoint
        this checkpointer published (None before the first)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._in_flight_step = None
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure
        return self.last_published

    def close(self) -> None:
        """Wait for the save in flight on the way out of a run that may already be failing: its own failure
        is logged, not raised, so it does not hide the error that ended the run."""
        try:
            self.wait()
        except Exception as exc:
            _logger.error("the background checkpoint save failed: %s", exc)
