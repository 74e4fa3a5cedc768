"""A slot's parameters as one flat fp32 vector (ZeRO stage 0), and the range arithmetic of shares of it.

Stage 0 keeps the whole vector on every rank: one fp32 master per slot, so AdamW runs one fused kernel per
slot instead of one per parameter, and fp32 parameters are simply views of it (no second copy). The
range arithmetic (:func:`shard_range`, :class:`SlotLayout`) is what lets an optimizer state saved by one
data-parallel size or ZeRO stage be cut anew for another: state dicts store each rank's contiguous share of
the padded flat vector of a slot, whatever the stage that produced it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FlatShard", "SlotLayout", "shard_range"]


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


class FlatShard:
    """The flat fp32 master vector of one slot's parameters, whole (ZeRO stage 0)."""

    def __init__(self, names: Sequence[str], params: Sequence[nn.Parameter]) -> None:
        self.names = list(names)
        self.params = list(params)
        self.layout = SlotLayout(tuple(self.names), tuple(tuple(p.shape) for p in self.params))
        self.numel = self.layout.numel
        device = self.params[0].device
        self.master = nn.Parameter(torch.zeros(self.numel, dtype=torch.float32, device=device))
        self._aliases: list[tuple[nn.Parameter, int]] = []
        self.load_from_params()
        # fp32 parameters become views of the master vector: the optimizer then updates the model in
        # place, with no copy back and no second fp32 copy of the weights.
        if all(p.dtype == torch.float32 and p.device == device for p in self.params):
            for p, (_, offset, _) in zip(self.params, self.layout.offsets(), strict=True):
                p.data = self.master.data[offset : offset + p.numel()].view_as(p)
                self._aliases.append((p, p.data_ptr()))
        # The gradient buffer is allocated once and overwritten every step: a fresh full-size allocation
        # each step costs more than the update itself (the memory is faulted in anew every time).
        self._grad: torch.Tensor | None = None

    def view(self, vector: torch.Tensor, name: str) -> torch.Tensor:
        """Parameter ``name``'s part of a flat vector of this slot, shaped like the parameter."""
        for n, offset, shape in self.layout.offsets():
            if n == name:
                return vector[offset : offset + _numel(shape)].view(shape)
        raise KeyError(name)

    def load_from_params(self) -> None:
        """Master weights from the model's (possibly bf16) parameters."""
        if self._aliased():
            return  # the parameters are the master
        with torch.no_grad():
            for p, (_, offset, _) in zip(self.params, self.layout.offsets(), strict=True):
                self.master[offset : offset + p.numel()].copy_(p.detach().reshape(-1))

    def set_grad(self, grads: Mapping[str, torch.Tensor | None]) -> None:
        """Point the master's ``.grad`` at the given gradients (by name), zeros for a missing one."""
        if self._grad is None:
            self._grad = torch.zeros_like(self.master)
        grad = self._grad
        for name, offset, shape in self.layout.offsets():
            g = grads.get(name)
            target = grad[offset : offset + _numel(shape)]
            if g is None:
                target.zero_()
            else:
                target.copy_(g.reshape(-1))
        self.master.grad = grad

    def _aliased(self) -> bool:
        """Whether every parameter still is its view of the master (code may have replaced ``.data``)."""
        return bool(self._aliases) and all(p.data_ptr() == ptr for p, ptr in self._aliases)

    def write_back(self) -> None:
        """Copy updated master weights into the model (nothing to do when the parameters are views)."""
        if self._aliased():
            return
        with torch.no_grad():
            for p, (_, offset, _) in zip(self.params, self.layout.offsets(), strict=True):
                p.copy_(self.master[offset : offset + p.numel()].view_as(p))
