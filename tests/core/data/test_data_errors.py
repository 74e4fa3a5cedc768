"""Data errors are DataFileErrors naming the file: what the launcher reports as one line (exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scaling.core.data import DataFileError, DistributedDataLoader, MemoryMapDataset, MemoryMapWriter
from scaling.core.testing import DistributedTestFailure, run_distributed
from scaling.core.topology import Topology, TopologyConfig


class _Small:
    source = "corpus/small"

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, items: list[int]) -> list[int]:
        return items


def _loader_on_small_data() -> None:
    DistributedDataLoader(_Small(), Topology(TopologyConfig(micro_batch_size=2, global_batch_size=4)))


def test_a_dataset_smaller_than_one_global_batch_is_a_data_file_error_naming_it() -> None:
    with pytest.raises(DistributedTestFailure, match=r"DataFileError: corpus/small: 3 samples, fewer than one global"):
        run_distributed(_loader_on_small_data, 1)


def test_unreadable_meta_names_the_file_and_empty_data_opens(tmp_path: Path) -> None:
    with MemoryMapWriter(tmp_path / "empty", vocab_size=10) as writer:
        writer.add_all([[], []])
    empty = MemoryMapDataset(tmp_path / "empty")  # an empty .bin cannot be mapped: it must still open
    assert len(empty) == 2 and empty.token_count == 0 and empty.max_token() == -1
    assert empty.vocab_size == 10
    meta = tmp_path / "empty.json"
    for broken in ("{not json", json.dumps(["a", "list"]), json.dumps({"dtype": "nonsense", "documents": 2})):
        meta.write_text(broken)
        with pytest.raises(DataFileError, match=rf"{meta} is not a valid data meta file"):
            MemoryMapDataset(tmp_path / "empty")
    meta.write_bytes(b"\xff\xfe binary")
    with pytest.raises(DataFileError, match=rf"{meta} is not a valid data meta file"):
        MemoryMapDataset(tmp_path / "empty")


def test_writer_records_metadata_next_to_the_counts(tmp_path: Path) -> None:
    with MemoryMapWriter(tmp_path / "c", vocab_size=50, metadata={"tokenizer": {"sha256": "ab"}}) as writer:
        writer.add([1, 49])
    data = MemoryMapDataset(tmp_path / "c")
    assert data.meta["tokenizer"] == {"sha256": "ab"} and data.vocab_size == 50 and data.max_token() == 49
