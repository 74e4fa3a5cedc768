"""Training samples for language models: packed pretraining windows and prompt/completion or chat finetuning.

Every sample is ``{"tokens", "targets", "loss_mask", "positions"}`` (+ ``"document_ids"`` when documents are
packed with masking). Pretraining samples are all ``[sequence_length]`` and ``collate`` stacks them; a
finetuning sample is as long as its text, and ``collate`` pads a micro-batch only to its longest sample, so
a step costs what its real tokens cost, not ``sequence_length`` per sample. Every error in the data is a
``DataFileError`` naming the file (and line).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from scaling.core.data import DataFileError, MemoryMapDataset
from scaling.transformer.data.records import Piece, encode_pieces, pieces_of
from scaling.transformer.data.tokenizer import Tokenizer

__all__ = ["FinetuningDataset", "PretrainingDataset", "collate_samples", "padded_width"]

Sample = dict[str, torch.Tensor]


def collate_samples(items: Sequence[Sample]) -> Sample:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def padded_width(longest: int, multiple: int, limit: int) -> int:
    """``longest`` rounded up to ``multiple`` (fewer distinct shapes, aligned kernels), at most ``limit``."""
    return min(-(-max(longest, 1) // multiple) * multiple, limit)


class PretrainingDataset:
    """Consecutive windows of ``sequence_length + 1`` tokens over the packed corpus.

    With ``document_masking`` each window also carries the document id of every token and positions that
    restart at each document start, so attention and RoPE treat packed documents as separate sequences.
    """

    def __init__(self, data: MemoryMapDataset, sequence_length: int, document_masking: bool = False) -> None:
        self.data = data
        self.sequence_length = sequence_length
        self.document_masking = document_masking
        self.windows = (data.token_count - 1) // sequence_length
        if self.windows < 1:
            raise DataFileError(
                f"{data.prefix}: {data.token_count} tokens is too few for one window of {sequence_length + 1}"
            )

    @property
    def source(self) -> str:
        return str(self.data.prefix)

    def __len__(self) -> int:
        return self.windows

    def __getitem__(self, index: int) -> Sample:
        start = index * self.sequence_length
        window = torch.from_numpy(self.data.window(start, self.sequence_length + 1).astype(np.int64))
        tokens, targets = window[:-1], window[1:]
        sample = {"tokens": tokens, "targets": targets, "loss_mask": torch.ones(self.sequence_length)}
        if not self.document_masking:
            sample["positions"] = torch.arange(self.sequence_length)
            return sample
        where = np.arange(start, start + self.sequence_length)
        documents = np.searchsorted(np.asarray(self.data.offsets), where, side="right") - 1
        document_ids = torch.from_numpy(documents - documents[0])
        starts = torch.from_numpy(np.asarray(self.data.offsets)[documents] - start)  # < 0: began before the window
        sample["positions"] = torch.arange(self.sequence_length) - starts
        sample["document_ids"] = document_ids
        return sample

    def collate(self, items: Sequence[Sample]) -> Sample:
        return collate_samples(items)


class FinetuningDataset:
    """JSONL finetuning data with the loss only on what the model should learn to write.

    A line is either ``{"prompt": ..., "completion": ...}`` (loss on the completion) or ``{"messages":
    [{"role": ..., "content": ...}, ...]}`` (loss on assistant messages; each message is rendered as
    ``"<role>: <content>\\n"``). Sequences are cut to ``sequence_length``; ``collate`` pads a micro-batch to
    its longest sample rounded up to ``pad_multiple`` (a multiple of the tensor-parallel size under sequence
    parallelism), and padding has no loss, so the loss does not depend on the padded width.
    """

    def __init__(self, path: str | Path, tokenizer: Tokenizer, sequence_length: int, pad_multiple: int = 8) -> None:
        self.path = Path(path)
        self.sequence_length = sequence_length
        self.pad_multiple = pad_multiple
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.require_eos()
        eos = tokenizer.require_eos()
        self.samples: list[tuple[list[int], list[float]]] = []
        if not self.path.is_file():
            raise DataFileError(f"finetuning data {self.path} does not exist")
        try:
            with self.path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        self.samples.append(encode_pieces(self._pieces(line, number), tokenizer, eos))
        except UnicodeDecodeError as exc:
            raise DataFileError(f"{self.path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if not self.samples:
            raise DataFileError(f"finetuning data {self.path} holds no samples (no non-empty line)")

    @property
    def source(self) -> str:
        return str(self.path)

    def _pieces(self, line: str, number: int) -> list[Piece]:
        where = f"{self.path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
        return pieces_of(record, where)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        """The sample as long as its text (at most ``sequence_length``); ``collate`` pads it."""
        ids, mask = self.samples[index]
        ids, mask = ids[: self.sequence_length + 1], mask[: self.sequence_length + 1]
        window = torch.tensor(ids)
        return {
            "tokens": window[:-1],
            "targets": window[1:],
            "loss_mask": torch.tensor(mask[1:]),  # the mask of the token each position predicts
        }

    def collate(self, items: Sequence[Sample]) -> Sample:
        width = padded_width(max(len(item["tokens"]) for item in items), self.pad_multiple, self.sequence_length)
        batch = {
            "tokens": torch.full((len(items), width), self.pad, dtype=torch.int64),
            "targets": torch.full((len(items), width), self.pad, dtype=torch.int64),
            "loss_mask": torch.zeros(len(items), width),
        }
        for row, item in enumerate(items):
            for key, tensor in batch.items():
                tensor[row, : len(item[key])] = item[key]
        batch["positions"] = torch.arange(width).expand(len(items), width).contiguous()
        return batch
