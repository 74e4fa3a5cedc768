"""A slot's parameters as one flat fp32 vector, and this data-parallel rank's contiguous share of it.

The flat vector is padded to a multiple of the data-parallel size so every rank owns exactly
``padded / dp`` elements (balanced partitions; the padding is zeros that never change). Without ZeRO the
"share" is the whole vector. The pure range arithmetic is what makes a sharded optimizer state reloadable
on another data-parallel size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["FlatShard", "shard_range"]


def shard_range(numel: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part ``index`` of a vector of ``numel`` elements padded to a multiple of ``parts``."""
    per_part = -(-numel // parts)
    return index * per_part, (index + 1) * per_part


@dataclass
class _Piece:
    param: nn.Parameter
    flat_start: int  # offset of the parameter in the flat vector
    lo: int  # overlap with this rank's share, in the parameter's own flat index
    hi: int


class FlatShard:
    """This rank's share of the flat vector of ``params``, as an fp32 master ``nn.Parameter``."""

    def __init__(self, params: Sequence[nn.Parameter], parts: int, index: int, group: dist.ProcessGroup | None):
        self.params = list(params)
        self.parts, self.index, self.group = parts, index, group
        self.numel = sum(p.numel() for p in self.params)
        self.start, self.end = shard_range(self.numel, parts, index)
        self.pieces: list[_Piece] = []
        offset = 0
        for p in self.params:
            lo, hi = max(self.start - offset, 0), min(self.end - offset, p.numel())
            if lo < hi:
                self.pieces.append(_Piece(p, offset, lo, hi))
            offset += p.numel()
        device = self.params[0].device
        master = torch.zeros(self.end - self.start, dtype=torch.float32, device=device)
        self.master = nn.Parameter(master)
        self._aliases: list[tuple[nn.Parameter, int]] = []
        self.load_from_params()
        # Unsharded fp32 parameters become views of the master vector: the optimizer then updates the
        # model in place, with no copy back and no second fp32 copy of the weights.
        if parts == 1 and all(p.dtype == torch.float32 and p.device == device for p in self.params):
            offset = 0
            for p in self.params:
                p.data = self.master.data[offset : offset + p.numel()].view_as(p)
                self._aliases.append((p, p.data_ptr()))
                offset += p.numel()
        # Gradient buffers are allocated once and overwritten every step: fresh full-size allocations
        # each step cost more than the update itself (the memory is faulted in anew every time). Their
        # padding is zeroed here and never written again.
        self._grad: torch.Tensor | None = None
        self._flat: torch.Tensor | None = None

    def _grad_buffer(self) -> torch.Tensor:
        if self._grad is None:
            self._grad = torch.zeros_like(self.master)
        return self._grad

    def load_from_params(self) -> None:
        """Master weights from the model's (possibly bf16) parameters."""
        if self._aliased():
            return  # the parameters are the master
        with torch.no_grad():
            for piece in self.pieces:
                at = piece.flat_start + piece.lo - self.start
                self.master[at : at + piece.hi - piece.lo].copy_(piece.param.detach().reshape(-1)[piece.lo : piece.hi])

    def set_grad(self, grads: dict[int, torch.Tensor]) -> None:
        """Point the master's ``.grad`` at this share of the given full gradients (keyed by id(param))."""
        grad = self._grad_buffer()
        for piece in self.pieces:
            at = piece.flat_start + piece.lo - self.start
            grad[at : at + piece.hi - piece.lo].copy_(grads[id(piece.param)].reshape(-1)[piece.lo : piece.hi])
        self.master.grad = grad

    def gather(self, share: torch.Tensor) -> torch.Tensor:
        """The full flat vector (unpadded) from every rank's ``share`` of it; collective when sharded."""
        if self.parts == 1:
            return share[: self.numel]
        full = torch.empty(share.numel() * self.parts, dtype=share.dtype, device=share.device)
        dist.all_gather_single(full, share.contiguous(), group=self.group)
        return full[: self.numel]

    def local_share(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's padded share of an unpadded full flat vector."""
        share = torch.zeros(self.end - self.start, dtype=full.dtype, device=full.device)
        piece = full[self.start : min(self.end, self.numel)]
        share[: piece.numel()].copy_(piece)
        return share

    def reduce_scatter_grad(self, grads: dict[int, torch.Tensor]) -> None:
        """Set the master's ``.grad`` to this share of the data-parallel *mean* of the local gradient sums.

        One reduce-scatter of the slot's flat vector: each rank receives only the share it updates.
        """
        if self._flat is None:
            self._flat = torch.zeros(self.master.numel() * self.parts, dtype=torch.float32, device=self.master.device)
        flat = self._flat
        offset = 0
        for p in self.params:
            flat[offset : offset + p.numel()].copy_(grads[id(p)].reshape(-1))
            offset += p.numel()
        grad = self._grad_buffer()
        dist.reduce_scatter_single(grad, flat, group=self.group)
        self.master.grad = grad.div_(self.parts)

    def squared_norm(self, counted: set[int]) -> torch.Tensor:
        """Sum of squares of this share's gradient over the parameters in ``counted`` (ids)."""
        assert self.master.grad is not None
        grad = self.master.grad
        slices = [
            grad[piece.flat_start + piece.lo - self.start : piece.flat_start + piece.hi - self.start]
            for piece in self.pieces
            if id(piece.param) in counted
        ]
        if not slices:
            return torch.zeros((), dtype=torch.float32, device=self.master.device)
        return torch.stack(torch._foreach_norm(slices, 2.0)).pow(2).sum()  # one multi-tensor kernel

    def _aliased(self) -> bool:
        """Whether every parameter still is its view of the master (code may have replaced ``.data``)."""
        return bool(self._aliases) and all(p.data_ptr() == ptr for p, ptr in self._aliases)

    def write_back(self) -> None:
        """Copy updated master weights into the model: all-gather the shares over dp ranks when sharded."""
        if self._aliased():
            return
        with torch.no_grad():
            full = self.gather(self.master.detach())
            offset = 0
            for p in self.params:
                p.copy_(full[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
