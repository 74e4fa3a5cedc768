"""The dataset protocol the loader and trainer rely on: length, item by index, and collate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ["Dataset"]

ItemT = TypeVar("ItemT")


@runtime_checkable
class Dataset(Protocol):
    """Random access to samples, plus turning a list of samples into a batch (a pytree of tensors)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...

    def collate(self, items: Sequence[Any]) -> Any: ...
