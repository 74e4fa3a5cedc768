"""Finetuning batches for a plain PyTorch loop: ``for batch in LlamaLoader(dataset, 2048, 64): loss = model(batch)``.

A user of the plain loop brings instruction data (a list of dicts, a Hugging Face dataset) and no trainer, so
everything ``scaling train`` does for its finetuning data has to happen inside one iterable:

- **What is learned.** Records are ``{"prompt", "completion"}`` or ``{"messages"}`` dicts, rendered and masked
  by ``scaling.transformer.data.records`` (the definition ``scaling train`` uses too), so the loss covers
  completions (assistant turns) and the appended end of sequence, never the prompt or the padding.
- **Global batches.** ``batch_size`` counts rows per optimizer step over all data-parallel replicas, as in a
  one-process loop; each rank yields its own ``batch_size // dp_size`` rows of every global batch, found from
  the plain world the preset model set up (``scaling.transformer.plain_world``), so a script is the same on 1
  and on 8 processes. All ranks pad to the global batch's longest row: their batches concatenated are the
  one-process batch, tensor for tensor.
- **Never a NaN loss.** A sample whose completion lies entirely beyond ``max_sequence_length`` has no token to
  learn; a batch of only such rows would divide a zero loss by zero tokens. They are skipped and counted.
- **Exact resumption.** The order of epoch ``e`` is a permutation seeded by ``(seed, e)``, and the position is a
  batch counter, so ``state_dict()`` is a few integers and a fingerprint of the tokenized data, and loading it
  into a loader made for other data or settings is refused instead of silently training on the wrong rows.

Records are tokenized once, at construction (fine for instruction datasets of up to some million records);
nothing here touches the network: the default tokenizer is built in code (``Tokenizer.byte_level()``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from scaling.transformer.data.datasets import padded_width
from scaling.transformer.data.records import encode_pieces, pieces_of
from scaling.transformer.data.tokenizer import Tokenizer
from scaling.transformer.plain_world import current_topology, data_parallel_coordinates

__all__ = ["LlamaLoader", "RecordDataset", "format_alpaca"]

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]

# The fields of a state that must match the loader it is loaded into, in the order they are checked (the
# data first: a different dataset is the likeliest mistake and the clearest message).
_IDENTITY = ("dataset_length", "fingerprint", "seed", "batch_size", "max_sequence_length", "packing", "shuffle",
             "drop_last")  # fmt: skip
_STATE_FORMAT = "scaling.loaders.LlamaLoader/1"


class RecordDataset(Protocol):
    """What the loader reads: any map-style dataset (a list, a Hugging Face ``datasets.Dataset``...)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, object]: ...


def _resolve_tokenizer(tokenizer: Tokenizer | str | Path | None) -> Tokenizer:
    if tokenizer is None:
        return Tokenizer.byte_level()
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, Path)):
        return Tokenizer.from_file(tokenizer)
    raise TypeError(
        f"tokenizer: expected a scaling Tokenizer, a path to a tokenizer.json or None (byte level), "
        f"got {type(tokenizer).__name__}"
    )


def _resolve_length(max_sequence_length: int | None, max_words: int | None) -> int:
    if max_sequence_length is not None and max_words is not None:
        raise TypeError(
            f"give max_sequence_length ({max_sequence_length}) or its other name max_words ({max_words}), not both"
        )
    length = max_sequence_length if max_sequence_length is not None else max_words
    if length is None:
        raise TypeError("LlamaLoader needs max_sequence_length= (or max_words=): the longest row in tokens")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"max_sequence_length must be a positive int, got {length!r}")
    return length


def _epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit generator seed for ``(seed, epoch)``: neighbouring pairs such as (0, 1) and (1, 0)
    get unrelated orders, which ``seed + epoch`` would not give."""
    digest = hashlib.sha256(f"scaling.loaders:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class LlamaLoader:
    """An iterable of this rank's finetuning batches, one epoch per ``for`` loop.

    Args:
        dataset: ``len()`` and ``dataset[i]`` giving ``{"prompt", "completion"}`` or ``{"messages"}`` dicts (map
            Alpaca records through ``format_alpaca`` first).
        max_sequence_length: the longest row in tokens; longer samples are cut (``max_words`` is another name).
        batch_size: the global batch: rows per step over all data-parallel ranks (each gets its share).
        tokenizer: a ``Tokenizer``, a path to a ``tokenizer.json``, or None for ``Tokenizer.byte_level()``.
        shuffle: a new order every epoch (seeded by ``seed`` and the epoch); False keeps the dataset order.
        packing: concatenate samples into rows of exactly ``max_sequence_length`` (with ``document_ids`` and
            positions restarting per sample) instead of one padded row per sample.
        pad_multiple: padded widths are rounded up to this (fewer distinct shapes; aligned kernels).
        drop_last: drop the last incomplete global batch; False fills it up from the start of the epoch's order.
        data_parallel_rank, data_parallel_size: override the coordinates read from the plain world (tests,
            or a loop that set up its own process groups); give both or neither.

    A batch is ``{"tokens", "targets", "positions"}`` int64 ``[rows, width]`` and ``"loss_mask"`` float ``[rows,
    width]`` (the mask of the token each position predicts), plus ``"document_ids"`` when packing.
    """

    def __init__(
        self,
        dataset: RecordDataset,
        max_sequence_length: int | None = None,
        batch_size: int | None = None,
        *,
        tokenizer: Tokenizer | str | Path | None = None,
        shuffle: bool = True,
        seed: int = 0,
        packing: bool = False,
        pad_multiple: int = 8,
        drop_last: bool = True,
        max_words: int | None = None,
        data_parallel_rank: int | None = None,
        data_parallel_size: int | None = None,
    ) -> None:
        self.max_sequence_length = _resolve_length(max_sequence_length, max_words)
        if batch_size is None:
            raise TypeError("LlamaLoader needs batch_size= (the global batch: rows per step over all ranks)")
        for name, value in (("batch_size", batch_size), ("pad_multiple", pad_multiple)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if (data_parallel_rank is None) != (data_parallel_size is None):
            raise TypeError(
                f"give data_parallel_rank ({data_parallel_rank}) and data_parallel_size ({data_parallel_size}) "
                "together, or neither (then they come from the plain world)"
            )
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.packing = packing
        self.pad_multiple = pad_multiple
        self.drop_last = drop_last
        self._override = None if data_parallel_rank is None else (data_parallel_rank, data_parallel_size or 0)
        self.tokenizer = _resolve_tokenizer(tokenizer)
        self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.require_eos()
        self.dataset_length = len(dataset)
        self._tokenize(dataset)
        self._rows = self._pack() if packing else [[i] for i in range(len(self._lengths))]
        if len(self) == 0:
            unit = "packed rows" if packing else "usable samples"
            raise ValueError(
                f"batch_size ({batch_size}) is larger than the {len(self._rows)} {unit} of an epoch, so no batch "
                "would be yielded (use a smaller batch_size, or drop_last=False to fill it up)"
            )
        self.epoch = 0
        self._consumed = 0  # global batches of this epoch already yielded
        self._generation = 0  # which `for` loop may advance the position (the latest one)
        self._order_cache: tuple[int, torch.Tensor] | None = None
        if self._override is not None or current_topology() is not None:
            self._coordinates()  # fail now on a batch that does not split; otherwise at the first `for`

    # -- construction ------------------------------------------------------------------------------------------

    def _tokenize(self, dataset: RecordDataset) -> None:
        """Every record once, cut to ``max_sequence_length + 1`` ids; samples left with no loss are skipped."""
        if self.dataset_length == 0:
            raise ValueError("dataset is empty: LlamaLoader needs at least one record")
        eos = self.tokenizer.require_eos()
        limit = self.max_sequence_length + 1
        ids: list[int] = []
        mask: list[float] = []
        lengths: list[int] = []
        self.skipped = 0
        for index in range(self.dataset_length):
            sample_ids, sample_mask = encode_pieces(self._pieces(dataset[index], index), self.tokenizer, eos)
            sample_ids, sample_mask = sample_ids[:limit], sample_mask[:limit]
            if sum(sample_mask[1:]) == 0:  # no predicted token is learned: the completion was cut away
                self.skipped += 1
                continue
            ids += sample_ids
            mask += sample_mask
            lengths.append(len(sample_ids))
        if self.skipped:
            logger.warning(
                "LlamaLoader: skipped %d of %d samples with no completion token within max_sequence_length=%d",
                self.skipped,
                self.dataset_length,
                self.max_sequence_length,
            )
        if not lengths:
            raise ValueError(
                f"none of the {self.dataset_length} samples has a completion token within "
                f"max_sequence_length={self.max_sequence_length}: every prompt fills the row (raise the length)"
            )
        self._ids = np.asarray(ids, dtype=np.int64)
        self._mask = np.asarray(mask, dtype=np.float32)
        self._lengths = np.asarray(lengths, dtype=np.int64)  # ids per sample: one more than its tokens
        self._starts = np.concatenate([[0], np.cumsum(self._lengths)[:-1]]).astype(np.int64)
        digest = hashlib.sha256()
        for array in (self._lengths, self._ids, self._mask):
            digest.update(array.tobytes())
        self.fingerprint = digest.hexdigest()

    @staticmethod
    def _pieces(record: object, index: int) -> list[tuple[str, bool]]:
        where = f"dataset[{index}]"
        if not isinstance(record, Mapping):
            raise ValueError(f"{where}: expected a dict record, got {type(record).__name__}")
        if "instruction" in record and not {"prompt", "completion", "messages"} & set(record):
            raise ValueError(
                f"{where}: an Alpaca record ({', '.join(map(str, record))}): map format_alpaca over the dataset "
                "first to get {'prompt', 'completion'} records"
            )
        return pieces_of(record, where)

    def _pack(self) -> list[list[int]]:
        """Samples in dataset order, each kept whole, into rows of at most ``max_sequence_length`` tokens (next
        fit). Packed once, so every epoch has the same rows (shuffled) and ``len(loader)`` never changes."""
        rows: list[list[int]] = [[]]
        used = 0
        for sample, length in enumerate(self._lengths.tolist()):
            tokens = length - 1
            if rows[-1] and used + tokens > self.max_sequence_length:
                rows.append([])
                used = 0
            rows[-1].append(sample)
            used += tokens
        return rows

    # -- iteration ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Global batches per epoch (every rank yields this many)."""
        full, rest = divmod(len(self._rows), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch (all of it, unless a state was loaded or a loop broke off)."""
        rank, size = self._coordinates()
        if self._consumed >= len(self):
            self._next_epoch()
        self._generation += 1
        return self._batches(self._generation, rank, size)

    def _batches(self, generation: int, rank: int, size: int) -> Iterator[Batch]:
        while self._consumed < len(self):
            if generation != self._generation:
                return  # a newer loop (or a loaded state) owns the position now
            batch = self._global_rows(self.epoch, self._consumed)
            per_rank = self.batch_size // size
            mine = batch[rank * per_rank : (rank + 1) * per_rank]
            self._consumed += 1
            yield self._collate(mine, batch)
        if generation == self._generation:
            self._next_epoch()

    def _next_epoch(self) -> None:
        self.epoch += 1
        self._consumed = 0

    def _coordinates(self) -> tuple[int, int]:
        rank, size = self._override if self._override is not None else data_parallel_coordinates()
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"data-parallel rank {rank} is not in range for data-parallel size {size}")
        if self.batch_size % size:
            raise ValueError(
                f"batch_size ({self.batch_size}) is not divisible by the data-parallel size ({size}): each rank "
                "gets batch_size // data_parallel_size rows of every global batch"
            )
        return rank, size

    def _order(self, epoch: int) -> torch.Tensor:
        if self._order_cache is None or self._order_cache[0] != epoch:
            count = len(self._rows)
            if self.shuffle:
                generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
                order = torch.randperm(count, generator=generator)
            else:
                order = torch.arange(count)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _global_rows(self, epoch: int, batch: int) -> list[list[int]]:
        """The rows of global batch ``batch`` of ``epoch``, each a list of sample indices (one unless packing).

        Past the end of the epoch's order (the last batch with ``drop_last=False``) the order wraps around,
        so every global batch has ``batch_size`` rows and every rank the same number.
        """
        order = self._order(epoch)
        where = (batch * self.batch_size + torch.arange(self.batch_size)) % len(order)
        return [self._rows[int(i)] for i in order[where].tolist()]

    def _collate(self, rows: list[list[int]], global_batch: list[list[int]]) -> Batch:
        if self.packing:
            width = self.max_sequence_length
        else:
            longest = max(int(self._lengths[row[0]]) - 1 for row in global_batch)
            width = padded_width(longest, self.pad_multiple, self.max_sequence_length)
        shape = (len(rows), width)
        batch = {
            "tokens": torch.full(shape, self.pad_id, dtype=torch.int64),
            "targets": torch.full(shape, self.pad_id, dtype=torch.int64),
            "loss_mask": torch.zeros(shape, dtype=torch.float32),
            "positions": torch.zeros(shape, dtype=torch.int64),
        }
        if self.packing:
            batch["document_ids"] = torch.zeros(shape, dtype=torch.int64)
        for r, row in enumerate(rows):
            at = 0
            for document, sample in enumerate(row):
                start, length = int(self._starts[sample]), int(self._lengths[sample])
                ids = torch.from_numpy(self._ids[start : start + length])
                mask = torch.from_numpy(self._mask[start : start + length])
                end = at + length - 1
                batch["tokens"][r, at:end] = ids[:-1]
                batch["targets"][r, at:end] = ids[1:]
                batch["loss_mask"][r, at:end] = mask[1:]  # the mask of the token each position predicts
                batch["positions"][r, at:end] = torch.arange(length - 1)
                if self.packing:
                    batch["document_ids"][r, at:end] = document
                at = end
            # Padding: positions go on (packing: from 0, as a document of its own), so no row repeats one.
            batch["positions"][r, at:] = torch.arange(width - at) + (0 if self.packing else at)
            if self.packing:
                batch["document_ids"][r, at:] = len(row)
        return batch

    # -- resumption --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, object]:
        """Where the next batch comes from, and what this loader was made of (plain ints, bools and strings)."""
        epoch, consumed = (self.epoch + 1, 0) if self._consumed >= len(self) else (self.epoch, self._consumed)
        return {
            "format": _STATE_FORMAT,
            **{field: getattr(self, field) for field in _IDENTITY},
            "epoch": epoch,
            "batches_consumed": consumed,
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Continue exactly where ``state`` was taken; a state of other data or settings is a ValueError."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"loader state: format is {state.get('format')!r}, expected {_STATE_FORMAT!r}")
        for field in (*_IDENTITY, "epoch", "batches_consumed"):
            if field not in state:
                raise ValueError(f"loader state: no field {field!r}")
        for field in _IDENTITY:
            if state[field] != getattr(self, field):
                raise ValueError(
                    f"loader state: {field} is {state[field]!r} in the state but {getattr(self, field)!r} in this "
                    "loader (the state was saved for other data or settings)"
                )
        epoch, consumed = state["epoch"], state["batches_consumed"]
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"loader state: epoch must be an int >= 0, got {epoch!r}")
        if not isinstance(consumed, int) or not 0 <= consumed <= len(self):
            raise ValueError(f"loader state: batches_consumed must be in 0..{len(self)}, got {consumed!r}")
        self.epoch, self._consumed = epoch, consumed
        self._generation += 1  # a loop begun before the load stops instead of yielding from the old position


_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def format_alpaca(record: Mapping[str, object]) -> dict[str, str]:
    """An Alpaca record ``{"instruction", "input", "output"}`` as ``{"prompt", "completion"}`` in the Alpaca
    prompt format, so models finetuned here answer prompts written the way Alpaca models are prompted.

    A record with a non-empty ``input`` gets the template with an ``### Input:`` section; one without (missing,
    empty or only whitespace) the shorter one. The completion is ``output``; the loader appends the end of text.
    """
    for field in ("instruction", "output"):
        if field not in record:
            fields = ", ".join(map(str, record)) or "none"
            raise ValueError(f"format_alpaca: the record has no field {field!r} (fields here: {fields})")
    instruction = str(record["instruction"])
    given = record.get("input")
    context = "" if given is None else str(given)
    if context.strip():
        prompt = (
            f"{_PREAMBLE_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
        )
    else:
        prompt = f"{_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    return {"prompt": prompt, "completion": str(record["output"])}
