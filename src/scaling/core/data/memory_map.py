"""Memory-mapped token storage: ``PREFIX.bin`` (all tokens, back to back), ``PREFIX.idx`` (int64 document
offsets, one more than documents) and ``PREFIX.json`` (dtype, counts, format version, the vocabulary size
and whatever else the writer was given to record, e.g. which tokenizer produced the ids).

Reading maps the files and never loads them: a document or a fixed-length window of tokens (crossing
document boundaries) is a slice of the map. Tokens are uint16 when the vocabulary fits, else uint32.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

__all__ = ["DataFileError", "MemoryMapDataset", "MemoryMapWriter", "TokenWindowDataset", "token_dtype_for"]

FORMAT_VERSION = 1


class DataFileError(ValueError):
    """A data prefix is missing or its files are inconsistent; the message names the file."""


def token_dtype_for(vocab_size: int) -> np.dtype[Any]:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class MemoryMapWriter:
    """Append documents, then ``close()`` (or leave the ``with`` block) to write the index and meta.

    Files are written under temporary names and renamed on close, so a reader never sees a half-written
    prefix and an interrupted write leaves nothing behind under the final names.
    """

    def __init__(self, prefix: str | Path, vocab_size: int, metadata: Mapping[str, Any] | None = None) -> None:
        """``metadata`` (JSON-serialisable) is recorded in ``PREFIX.json`` next to the counts."""
        self.prefix = Path(prefix)
        self.dtype = token_dtype_for(vocab_size)
        self.vocab_size = vocab_size
        self.metadata = dict(metadata or {})
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = Path(f"{self.prefix}.bin.tmp{os.getpid()}")
        self._bin = self._bin_tmp.open("wb")
        self._offsets = [0]

    def add(self, tokens: Sequence[int] | np.ndarray[Any, Any] | torch.Tensor) -> None:
        array = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{array.min()}, {array.max()}]")
        self._bin.write(array.astype(self.dtype, copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + array.size)

    def add_all(self, documents: Iterable[Sequence[int]]) -> None:
        for document in documents:
            self.add(document)

    def close(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        idx_tmp = Path(f"{self.prefix}.idx.tmp{os.getpid()}")
        np.asarray(self._offsets, dtype=np.int64).tofile(idx_tmp)
        meta = {
            "version": FORMAT_VERSION,
            "dtype": self.dtype.name,
            "documents": len(self._offsets) - 1,
            "tokens": self._offsets[-1],
            "vocab_size": self.vocab_size,
            **self.metadata,
        }
        meta_tmp = Path(f"{self.prefix}.json.tmp{os.getpid()}")
        meta_tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        for tmp, suffix in ((self._bin_tmp, ".bin"), (idx_tmp, ".idx"), (meta_tmp, ".json")):
            os.replace(tmp, f"{self.prefix}{suffix}")

    def __enter__(self) -> MemoryMapWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self._bin.close()
            self._bin_tmp.unlink(missing_ok=True)


class MemoryMapDataset:
    """Documents of a prefix; ``dataset[i]`` is document i as an int64 tensor."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        meta_path, bin_path, idx_path = (Path(f"{self.prefix}{s}") for s in (".json", ".bin", ".idx"))
        for path in (meta_path, bin_path, idx_path):
            if not path.is_file():
                raise DataFileError(f"data prefix {self.prefix}: {path} does not exist")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            self.dtype = np.dtype(meta["dtype"])
            documents, tokens = int(meta["documents"]), int(meta["tokens"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
            raise DataFileError(f"{meta_path} is not a valid data meta file: {exc}") from None
        self.meta: dict[str, Any] = meta
        self.meta_path = meta_path
        if idx_path.stat().st_size != 8 * (documents + 1):
            raise DataFileError(
                f"{idx_path} holds {idx_path.stat().st_size} bytes, expected {8 * (documents + 1)} "
                f"for {documents} documents: the index is corrupt or from another prefix"
            )
        if bin_path.stat().st_size != tokens * self.dtype.itemsize:
            raise DataFileError(
                f"{bin_path} holds {bin_path.stat().st_size} bytes, expected {tokens} {self.dtype} tokens"
            )
        self.offsets = np.memmap(idx_path, dtype=np.int64, mode="r")
        if self.offsets[0] != 0 or self.offsets[-1] != tokens or np.any(np.diff(self.offsets) < 0):
            raise DataFileError(f"{idx_path}: document offsets are not a valid index of {tokens} tokens")
        # An empty file cannot be mapped; a prefix of empty documents is still a valid (empty) stream.
        self.tokens: np.ndarray[Any, Any] = (
            np.memmap(bin_path, dtype=self.dtype, mode="r") if tokens else np.zeros(0, dtype=self.dtype)
        )
        self.documents, self.token_count = documents, tokens

    @property
    def vocab_size(self) -> int | None:
        """The vocabulary size the writer recorded (None for files written without it)."""
        value = self.meta.get("vocab_size")
        return int(value) if isinstance(value, int) else None

    def max_token(self) -> int:
        """The largest token id in the file (reads all tokens: for files that do not record a vocabulary)."""
        return int(self.tokens.max()) if self.token_count else -1

    def __len__(self) -> int:
        return self.documents

    def document(self, index: int) -> np.ndarray[Any, Any]:
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    def window(self, start: int, length: int) -> np.ndarray[Any, Any]:
        """``length`` consecutive tokens from global position ``start``, across document boundaries."""
        if start < 0 or start + length > self.token_count:
            raise IndexError(f"window [{start}, {start + length}) outside {self.token_count} tokens of {self.prefix}")
        return self.tokens[start : start + length]

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.document(index).astype(np.int64))

    def collate(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.nn.utils.rnn.pad_sequence(list(items), batch_first=True)


class TokenWindowDataset:
    """Fixed windows of ``sequence_length + 1`` tokens (inputs and shifted targets), tiling the token stream."""

    def __init__(self, data: MemoryMapDataset, sequence_length: int) -> None:
        self.data = data
        self.sequence_length = sequence_length
        self.windows = (data.token_count - 1) // sequence_length
        if self.windows < 1:
            raise DataFileError(
                f"{data.prefix} has {data.token_count} tokens: too few for one window of {sequence_length + 1}"
            )

    def __len__(self) -> int:
        return self.windows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.windows:
            raise IndexError(f"window {index} outside {self.windows}")
        tokens = torch.from_numpy(
            self.data.window(index * self.sequence_length, self.sequence_length + 1).astype(np.int64)
        )
        return {"tokens": tokens[:-1], "targets": tokens[1:]}

    def collate(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}
