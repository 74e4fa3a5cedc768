"""Training samples for language models: packed pretraining windows and prompt/completion or chat finetuning.

Every sample is ``{"tokens", "targets", "loss_mask", "positions"}`` (+ ``"document_ids"`` when documents are
packed with masking), all ``[sequence_length]``; ``collate`` stacks them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaling.core.data import MemoryMapDataset
from scaling.transformer.data.tokenizer import Tokenizer

__all__ = ["FinetuningDataset", "PretrainingDataset", "collate_samples"]

Sample = dict[str, torch.Tensor]


def collate_samples(items: Sequence[Sample]) -> Sample:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


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
            raise ValueError(
                f"{data.prefix}: {data.token_count} tokens is too few for one window of {sequence_length + 1}"
            )

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
    ``"<role>: <content>\\n"``). Sequences are cut or padded to ``sequence_length``; padding has no loss.
    """

    def __init__(self, path: str | Path, tokenizer: Tokenizer, sequence_length: int) -> None:
        self.path = Path(path)
        self.sequence_length = sequence_length
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.require_eos()
        eos = tokenizer.require_eos()
        self.samples: list[tuple[list[int], list[float]]] = []
        if not self.path.is_file():
            raise ValueError(f"finetuning data {self.path} does not exist")
        with self.path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    pieces = self._pieces(json.loads(line), number)
                    ids: list[int] = []
                    mask: list[float] = []
                    for text, learn in pieces:
                        encoded = tokenizer.encode(text)
                        ids += encoded
                        mask += [1.0 if learn else 0.0] * len(encoded)
                    ids.append(eos)
                    mask.append(1.0)
                    self.samples.append((ids, mask))
        if not self.samples:
            raise ValueError(f"finetuning data {self.path} holds no samples")

    def _pieces(self, record: Any, number: int) -> list[tuple[str, bool]]:
        where = f"{self.path}:{number}"
        if isinstance(record, dict) and "prompt" in record and "completion" in record:
            return [(str(record["prompt"]), False), (str(record["completion"]), True)]
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            pieces = []
            for message in record["messages"]:
                if not isinstance(message, dict) or "role" not in message or "content" not in message:
                    raise ValueError(f"{where}: every message needs 'role' and 'content'")
                pieces.append((f"{message['role']}: ", False))
                pieces.append((f"{message['content']}\n", message["role"] == "assistant"))
            return pieces
        raise ValueError(f"{where}: expected 'prompt' and 'completion', or 'messages'")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        ids, mask = self.samples[index]
        length = self.sequence_length + 1
        ids, mask = ids[:length], mask[:length]
        padding = length - len(ids)
        ids = ids + [self.pad] * padding
        mask = mask + [0.0] * padding
        window = torch.tensor(ids)
        return {
            "tokens": window[:-1],
            "targets": window[1:],
            "loss_mask": torch.tensor(mask[1:]),  # the mask of the token each position predicts
            "positions": torch.arange(self.sequence_length),
        }

    def collate(self, items: Sequence[Sample]) -> Sample:
        return collate_samples(items)
