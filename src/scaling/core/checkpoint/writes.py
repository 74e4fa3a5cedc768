"""One rank's file writes during a save, and how every rank learns that one of them failed.

A save is collective: ranks gather tensor-parallel slices and ZeRO shards between their writes. A rank
whose write fails (a full disk) or whose tensor is not finite must not raise on its own, or the other
ranks wait in the next collective until the timeout. So the first failure is recorded, the rank keeps
taking part (writing nothing more), and the failures are exchanged once every rank is done.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from scaling.core.checkpoint.files import write_tensors

__all__ = ["SaveWrites", "first_error"]


class SaveWrites:
    """The files one rank writes into a save's ``work`` directory, with their SHA-256, or its first failure."""

    def __init__(self, work: Path, step: int) -> None:
        self.work = work
        self.step = step
        self.digests: dict[str, str] = {}  # path inside the checkpoint -> SHA-256
        self.error: str | None = None

    def tensors(
        self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], label: Callable[[str], str]
    ) -> None:
        """Write ``tensors`` to ``path`` unless one is not finite; ``label(key)`` says what a tensor is."""
        if self.error is not None:
            return
        floats = [(key, t) for key, t in tensors.items() if t.is_floating_point()]
        if floats and not bool(torch.stack([torch.isfinite(t).all() for _, t in floats]).all()):  # one host sync
            bad = next(key for key, t in floats if not bool(torch.isfinite(t).all()))
            self.error = f"{label(bad)} is not finite at step {self.step}: the checkpoint is not saved"
            return
        digest = self.guard(path, write_tensors, path, tensors, metadata)
        if digest is not None:
            self.digests[path.relative_to(self.work).as_posix()] = digest

    def guard(self, path: Path, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, an ``OSError`` (full disk, read-only file system) recorded as the failure naming ``path``."""
        if self.error is not None:
            return None
        try:
            return fn(*args)
        except OSError as exc:
            self.error = f"could not write checkpoint file {path}: {exc.strerror or exc}"
            return None


def first_error(error: str | None, group: dist.ProcessGroup | None = None) -> str | None:
    """The failure of the lowest rank that had one, on every rank (collective over ``group``, all ranks)."""
    every_rank: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every_rank, error, group=group)
    return next((e for e in every_rank if e is not None), None)
