"""The range arithmetic of a slot's parameters laid end to end as one flat vector, and shares of it.

In-memory optimizer state dicts store each data-parallel rank's contiguous share of the padded flat vector
of a slot (a group's parameters with one weight decay), whatever the ZeRO stage that produced it; this is
what lets a state saved by one data-parallel size or stage be cut anew for another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SlotLayout", "shard_range"]


def shard_range(numel: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part ``index`` of a vector of ``numel`` elements padded to a multiple of ``parts``."""
    per_part = -(-numel // parts)
    return index * per_part, (index + 1) * per_part


@dataclass(frozen=True)
class SlotLayout:
    """Where each parameter of a slot sits in its flat vector, and which share of it a rank stores."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    parts: int = 1
    index: int = 0

    @property
    def numel(self) -> int:
        return sum(_numel(s) for s in self.shapes)

    @property
    def range(self) -> tuple[int, int]:
        return shard_range(self.numel, self.parts, self.index)

    def offsets(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """(name, offset in the flat vector, shape) of every parameter."""
        out, offset = [], 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            out.append((name, offset, shape))
            offset += _numel(shape)
        return out

    def local_share(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's padded share of an unpadded full flat vector."""
        start, end = self.range
        share = torch.zeros(end - start, dtype=full.dtype, device=full.device)
        piece = full[start : min(end, self.numel)]
        share[: piece.numel()].copy_(piece)
        return share


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n
