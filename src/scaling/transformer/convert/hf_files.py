"""Hugging Face safetensors folders: lazy reading (one file or sharded with an index) and sharded writing.

Reading opens headers only; a tensor is loaded when asked for, so converting a large model holds one
layer of Hugging Face tensors at a time. Writing streams tensors into shards of at most ``max_shard_bytes``
(a single tensor larger than that gets a shard of its own), named like ``save_pretrained`` names them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from scaling.transformer.convert.errors import ConversionError

__all__ = ["INDEX_FILE", "SINGLE_FILE", "HFWeightReader", "ShardedWriter"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class HFWeightReader:
    """Tensors of a Hugging Face model folder by name, loaded on demand."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._handles: dict[Path, Any] = {}  # safe_open handles (headers parsed once, data read on demand)
        index, single = folder / INDEX_FILE, folder / SINGLE_FILE
        if index.is_file():
            self.listing = index  # the file that says which tensors exist: named in "missing" errors
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConversionError(f"{index} is not a safetensors index (no weight_map): {exc}") from None
            self.file_of = {name: folder / file for name, file in weight_map.items()}
        elif single.is_file():
            self.listing = single
            self.file_of = dict.fromkeys(self._open(single).keys(), single)
        else:
            raise ConversionError(
                f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors weights convert "
                "(re-save .bin weights with save_pretrained(..., safe_serialization=True))"
            )

    def _open(self, path: Path) -> Any:
        if path not in self._handles:
            if not path.is_file():
                raise ConversionError(f"{path} is missing (named by {self.listing})")
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise ConversionError(f"{path} is not a readable safetensors file: {exc}") from None
            self._handles[path] = handle
        return self._handles[path]

    @property
    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.file_of[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        tensor: torch.Tensor = self._open(self.file_of[name]).get_slice(name)[:0]  # reads no data
        return tensor.dtype

    def read(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise ConversionError(f"tensor {name!r} is missing from {self.listing}")
        tensor: torch.Tensor = self._open(self.file_of[name]).get_tensor(name)
        return tensor

    def check(self, expected: Mapping[str, tuple[int, ...]], ignored: Iterable[str] = ()) -> None:
        """Every expected tensor present with its shape, nothing else except ``ignored`` names."""
        for name, shape in expected.items():
            if name not in self.file_of:
                raise ConversionError(f"tensor {name!r} (shape {list(shape)}) is missing from {self.listing}")
            actual = self.shape(name)
            if actual != shape:
                raise ConversionError(
                    f"tensor {name!r} in {self.file_of[name]} has shape {list(actual)}; "
                    f"config.json implies {list(shape)}"
                )
        skip = set(ignored)
        unexpected = [n for n in self.file_of if n not in expected and n not in skip]
        if unexpected:
            more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            raise ConversionError(
                f"unexpected tensor {unexpected[0]!r} in {self.file_of[unexpected[0]]}{more}: not part of the "
                "model its config.json describes"
            )


class ShardedWriter:
    """Streams named tensors into ``model.safetensors``, or shards plus an index when they do not fit one."""

    def __init__(self, folder: Path, max_shard_bytes: int) -> None:
        if max_shard_bytes < 1:
            raise ConversionError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self._pending and self._pending_bytes + size > self.max_shard_bytes:
                self._flush()
            self._pending[name] = tensor.detach().to("cpu").contiguous()
            self._pending_bytes += size
            self._total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f".shard{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Write what is left, give the shards their final names, write the index if sharded."""
        if self._pending or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            final = self.folder / SINGLE_FILE
            self._shards[0][0].rename(final)
            return [final]
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        finals = []
        for number, (path, names) in enumerate(self._shards, start=1):
            final = self.folder / f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            finals.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return finals
