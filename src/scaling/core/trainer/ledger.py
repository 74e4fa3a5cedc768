"""The bad-batch ledger: the global batches whose step was skipped, rolled back or aborted, kept on disk.

A batch that made a step non-finite or spike once will do so again when the run replays it (after a
rollback, or after a resume from a checkpoint older than the event), so the run must remember it beyond
its own process. Each entry is one JSON line: the step, the data position (samples consumed before the
batch; with the data seed and the global batch size it names the batch exactly), the global sample
indices, the data source, the event and its values. A run reads the ledger once at start, and every
data position in it is stepped over on replay: the loader moves on to the next global batch, so the
step trains on fresh data instead.

Only global rank 0 writes (every rank decides the same events from the same global loss and norm, so
every rank also adds the same entry to its in-memory copy), and at start the positions rank 0 read are
the ones every rank steps over, so the file need not be visible from every node. Each entry is appended
and flushed to disk before training goes on: a crash right after an event still leaves it recorded.

The default file is ``.bad_batches.jsonl`` in the save directory: hidden, because a save directory that
holds only non-hidden files none of which is a checkpoint is refused as a resume source.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scaling.core.config import ConfigError
from scaling.core.data.loader import DistributedDataLoader
from scaling.core.logging import get_logger

__all__ = ["LEDGER_NAME", "BadBatch", "BadBatchLedger", "global_sample_indices"]

_logger = get_logger("scaling.trainer")

LEDGER_NAME = ".bad_batches.jsonl"


@dataclass(frozen=True)
class BadBatch:
    """One ledger entry. ``position``: samples consumed before this global batch; ``step``: the step it was
    read for (1-based, as the console numbers steps)."""

    step: int
    position: int
    global_batch: int
    seed: int
    samples: list[int]
    source: str
    event: str
    loss: float
    grad_norm: float
    threshold: float | None = None
    layer_grad_norms: dict[str, dict[str, float]] | None = None  # {step: {layer: norm}}: the steps up to the event


def global_sample_indices(loader: DistributedDataLoader, position: int) -> list[int]:
    """The dataset indices of the whole global batch read at ``position`` (every data-parallel rank's share)."""
    step = position // loader.global_batch
    epoch, step_in_epoch = divmod(step, loader.steps_per_epoch)
    start = step_in_epoch * loader.global_batch
    # The loader's own order (seeded by seed and epoch), so the ledger names exactly what was read.
    order = loader._order_for(epoch)
    return [int(i) for i in order[start : start + loader.global_batch].tolist()]


def data_source(loader: DistributedDataLoader) -> str:
    """What the ledger calls the data: the dataset's file when it has one, else its class name."""
    dataset = loader.dataset
    return str(getattr(dataset, "source", None) or type(dataset).__name__)


class BadBatchLedger:
    """The ledger of one run: ``path`` (None: kept in memory only, e.g. without a save directory)."""

    def __init__(self, path: Path | None, *, writer: bool) -> None:
        self.path = path
        self.writer = writer  # global rank 0
        self.entries: list[BadBatch] = []
        if path is not None and path.is_file():
            self.entries = _read(path)

    def positions(self, loader: DistributedDataLoader) -> set[int]:
        """The data positions to step over with ``loader``: entries of the same seed and global batch size
        (another global batch size cuts the data differently; those entries cannot name a batch of it)."""
        same = [e for e in self.entries if e.seed == loader.seed and e.global_batch == loader.global_batch]
        if len(same) < len(self.entries) and self.writer:
            _logger.warning(
                "%s: %d bad-batch entries were written with another data seed or global batch size and are "
                "not honoured",
                self.path,
                len(self.entries) - len(same),
            )
        return {e.position for e in same}

    def add(self, entry: BadBatch) -> None:
        self.entries.append(entry)
        if self.path is None or not self.writer:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(asdict(entry), allow_nan=True) + "\n")
            file.flush()
            os.fsync(file.fileno())


def _read(path: Path) -> list[BadBatch]:
    """The entries of ``path``; a last line without its newline (a crash during the append) is dropped."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw: dict[str, Any] = json.loads(line)
            entries.append(BadBatch(**raw))
        except (ValueError, TypeError) as exc:
            if number == len(lines) and not text.endswith("\n"):
                _logger.warning("%s:%d: ignoring an incomplete last entry (%s)", path, number, exc)
                break
            raise ConfigError(f"{path}:{number}: not a bad-batch ledger entry ({exc})") from None
    return entries
