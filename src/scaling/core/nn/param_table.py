"""The parameter table: what every parameter of this rank *is*, keyed by its layout-free name.

Tensor attributes and ``id(param)`` maps do not survive what happens to parameters during training:
FSDP2's ``fully_shard`` replaces every parameter object by a sharded ``DTensor``, LoRA wraps modules, dtype
casts make new tensors. A name does survive all three, so the engine records each parameter's facts once,
when the layers are built, and everything after that (gradient synchronisation, the optimizer, the norm,
checkpoints, the memory estimate) reads this table instead of the tensor.

Per name:

* ``shape``: the full tensor's shape (all tensor-parallel slices together);
* ``tp_split_dim`` / ``tp_parts``: the dimension split over tensor-parallel ranks and into how many parts
  (None / 1 when every tp rank holds all of it);
* ``tied_key`` / ``tied_owner``: copies of one weight on several pipeline stages share a key; the owner's
  copy (the first stage holding it) is the one saved and counted in norms;
* ``partial_grad_over_tp``: a replicated parameter whose gradient on each tp rank is a partial sum;
* ``trainable``; ``layer``: the index of the layer that holds it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

__all__ = ["ParamRecord", "ParamTable"]


@dataclass(frozen=True, slots=True)
class ParamRecord:
    name: str
    layer: int
    shape: tuple[int, ...]
    tp_split_dim: int | None
    tp_parts: int
    tied_key: str | None
    tied_owner: bool
    partial_grad_over_tp: bool
    trainable: bool

    @property
    def numel(self) -> int:
        """Elements of the full tensor."""
        n = 1
        for size in self.shape:
            n *= size
        return n

    @property
    def local_numel(self) -> int:
        """Elements this tensor-parallel rank holds (before any data-parallel sharding)."""
        return self.numel // self.tp_parts

    @property
    def is_replicated(self) -> bool:
        return self.tp_split_dim is None

    def counted_in_norm(self, tp_rank: int) -> bool:
        """Whether this rank adds the parameter's gradient to a model-wide norm, so each weight counts once:
        split parameters on every tp rank (each holds a different slice), replicated ones on tp rank 0,
        tied copies on their owner stage only."""
        if not self.trainable or (self.tied_key is not None and not self.tied_owner):
            return False
        return not self.is_replicated or tp_rank == 0


class ParamTable(Mapping[str, ParamRecord]):
    """Records of this rank's parameters, in registration order."""

    def __init__(self, records: list[ParamRecord]) -> None:
        self._records = {r.name: r for r in records}
        if len(self._records) != len(records):
            raise ValueError("parameter names in a table must be unique")

    def __getitem__(self, name: str) -> ParamRecord:
        return self._records[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def trainable(self) -> list[ParamRecord]:
        return [r for r in self._records.values() if r.trainable]

    def layers(self) -> list[int]:
        return sorted({r.layer for r in self._records.values()})
