"""Memory-mapped tokens, blends, and the distributed loader (determinism, dp sharding, tp broadcast, resume)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from scaling.core.data import (
    BlendedDataset,
    DataFileError,
    DistributedDataLoader,
    MemoryMapDataset,
    MemoryMapWriter,
    TokenWindowDataset,
    blend_index,
    weights_by_size,
)
from scaling.core.data import blended as blended_module
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig

DOCUMENTS = [[1, 2, 3], [4], [], [5, 6, 7, 8, 9], [10, 11]]


def _write(prefix: Path, vocab: int = 100, documents: list[list[int]] = DOCUMENTS) -> MemoryMapDataset:
    with MemoryMapWriter(prefix, vocab_size=vocab) as writer:
        writer.add_all(documents)
    return MemoryMapDataset(prefix)


@pytest.mark.parametrize(("vocab", "dtype"), [(100, np.uint16), (70_000, np.uint32)])
def test_memory_map_round_trip(tmp_path: Path, vocab: int, dtype: type) -> None:
    docs = [[d * 1000 % vocab for d in doc] for doc in DOCUMENTS] if vocab > 2**16 else DOCUMENTS
    data = _write(tmp_path / "corpus", vocab, docs)
    assert data.dtype == np.dtype(dtype)
    assert len(data) == 5 and data.token_count == 11
    for index, doc in enumerate(docs):
        assert data[index].tolist() == doc
    assert data.window(2, 4).tolist() == [3, 4, 5, 6][:4] if vocab < 2**16 else True
    windows = TokenWindowDataset(data, sequence_length=3)
    assert len(windows) == 3  # (11 - 1) // 3
    assert windows[1]["tokens"].tolist() == data.window(3, 3).tolist()
    assert windows[1]["targets"].tolist() == data.window(4, 3).tolist()
    assert windows.collate([windows[0], windows[2]])["tokens"].shape == (2, 3)


def test_broken_prefixes_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match=f"{tmp_path / 'missing'}.json does not exist"):
        MemoryMapDataset(tmp_path / "missing")
    _write(tmp_path / "corpus")
    idx = tmp_path / "corpus.idx"
    idx.write_bytes(idx.read_bytes()[:-8])
    with pytest.raises(DataFileError, match=r"corpus\.idx holds 40 bytes, expected 48"):
        MemoryMapDataset(tmp_path / "corpus")
    _write(tmp_path / "other")
    offsets = np.fromfile(tmp_path / "other.idx", dtype=np.int64)
    offsets[2] = 9  # not monotonic any more
    offsets.tofile(tmp_path / "other.idx")
    with pytest.raises(DataFileError, match="document offsets are not a valid index"):
        MemoryMapDataset(tmp_path / "other")
    with (
        pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\)"),
        MemoryMapWriter(tmp_path / "bad", 10) as w,
    ):
        w.add([3, 12])
    assert not list(tmp_path.glob("bad*"))  # an aborted write leaves nothing behind


def test_blend_follows_the_weights_and_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids, samples = blend_index([0.5, 0.3, 0.2], 1000)
    counts = np.bincount(ids, minlength=3)
    assert np.all(np.abs(counts - np.array([500, 300, 200])) <= 1)
    for j in range(3):  # each dataset's samples are taken in order
        assert samples[ids == j].tolist() == list(range(counts[j]))
    assert weights_by_size([100, 400], alpha=1.0) == [0.2, 0.8]
    assert weights_by_size([100, 400], alpha=0.0) == [0.5, 0.5]
    assert weights_by_size([100, 400, 50], cap=200) == pytest.approx([100 / 350, 200 / 350, 50 / 350])
    a, b = _write(tmp_path / "a"), _write(tmp_path / "b", documents=[[50 + i] for i in range(7)])
    blend = BlendedDataset([a, b], [0.25, 0.75], length=40, cache_dir=tmp_path / "cache")
    assert [blend[i].tolist() for i in range(4)] == [[50], [1, 2, 3], [51], [52]]  # ties go to the first
    assert blend[39].tolist() == [b[int(blend.sample_ids[39]) % 7].item()]  # wraps around a small dataset

    def fail(*args: Any) -> Any:
        raise AssertionError("the cached index should have been reused")

    monkeypatch.setattr(blended_module, "blend_index", fail)
    again = BlendedDataset([a, b], [0.25, 0.75], length=40, cache_dir=tmp_path / "cache")
    assert np.array_equal(again.dataset_ids, blend.dataset_ids)


class _Counting:
    """Sample i is tensor [i, 10 i]; counts reads, so tests can see which ranks read."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.reads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        self.reads += 1
        return torch.tensor([index, 10 * index])

    def collate(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"x": torch.stack(items)}


def _loader_run(layout: dict[str, Any], steps: int, resume_after: int | None, workers: int) -> dict[str, Any]:
    topo = Topology(TopologyConfig(**layout, micro_batch_size=2, global_batch_size=8))
    dataset = _Counting(20)
    loader = DistributedDataLoader(dataset, topo, seed=5, num_workers=workers)
    seen: list[Any] = []
    for step in range(steps):
        if resume_after is not None and step == resume_after:
            state = loader.state_dict()
            loader.close()
            loader = DistributedDataLoader(_Counting(20), topo, seed=5, num_workers=workers)
            loader.load_state_dict(state)
        batches = loader.next_batches()
        seen.append([None if b is None else b["x"][:, 0].tolist() for b in batches])
    loader.close()  # stop the reader processes (num_workers > 0) before the rank exits
    return {"coord": (topo.pp_rank, topo.dp_rank, topo.tp_rank), "seen": seen, "reads": dataset.reads}


def test_loader_shards_the_global_batch_over_dp_and_reshuffles_per_epoch() -> None:
    single = run_distributed(_loader_run, 1, {}, 5, None, 0)[0]["seen"]
    steps = [sorted(i for micro in step for i in micro) for step in single]
    assert all(len(step) == 8 for step in steps)
    assert sorted(steps[0] + steps[1]) != list(range(16)) or steps[0] != sorted(steps[0])  # shuffled
    assert sorted(steps[2] + steps[3] + steps[4]) != sorted(steps[0] + steps[1] + steps[2])  # new epoch order
    sharded = run_distributed(_loader_run, 2, {"data_parallel_size": 2}, 5, None, 0)
    for step in range(5):  # the two dp ranks together see exactly the single-process global batch
        union = sorted(i for r in sharded for micro in r["seen"][step] for i in micro)
        assert union == steps[step]
    assert run_distributed(_loader_run, 1, {}, 5, None, 0)[0]["seen"] == single  # deterministic


def test_loader_resumes_exactly_and_workers_read_the_same() -> None:
    straight = run_distributed(_loader_run, 1, {}, 6, None, 0)[0]["seen"]
    assert run_distributed(_loader_run, 1, {}, 6, 3, 0)[0]["seen"] == straight
    assert run_distributed(_loader_run, 1, {}, 6, 3, 2)[0]["seen"] == straight


def test_only_tp_rank_0_reads_and_middle_stages_read_nothing() -> None:
    results = run_distributed(_loader_run, 6, {"model_parallel_size": 2, "pipe_parallel_size": 3}, 2, None, 0)
    by_coord = {r["coord"]: r for r in results}
    for pp in (0, 2):
        assert by_coord[(pp, 0, 1)]["seen"] == by_coord[(pp, 0, 0)]["seen"]  # broadcast to the tp peer
        assert by_coord[(pp, 0, 0)]["reads"] == 16 and by_coord[(pp, 0, 1)]["reads"] == 0
    assert by_coord[(1, 0, 0)]["seen"] == [[None] * 4, [None] * 4] and by_coord[(1, 0, 0)]["reads"] == 0
    assert by_coord[(0, 0, 0)]["seen"] == by_coord[(2, 0, 0)]["seen"]  # first and last stage see the same data
