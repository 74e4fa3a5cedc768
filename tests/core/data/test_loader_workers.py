"""The loader's background reader processes end: on close(), leaving ``with``, and when the rank exits."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from scaling.core.data import DistributedDataLoader
from scaling.core.testing import DistributedTestFailure, run_distributed
from scaling.core.topology import Topology, TopologyConfig


class _Numbers:
    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([index])

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(items)


def _worker_pids(loader: DistributedDataLoader) -> list[int]:
    return [int(w.pid) for w in getattr(loader._workers, "_workers", [])]


def _read_then(close: str) -> dict[str, Any]:
    topo = Topology(TopologyConfig(micro_batch_size=2, global_batch_size=4))
    loader = DistributedDataLoader(_Numbers(), topo, seed=1, num_workers=2)
    loader.next_batches()
    pids = _worker_pids(loader)
    if close == "close":
        loader.close()
    elif close == "with":
        with DistributedDataLoader(_Numbers(), topo, num_workers=2) as other:
            other.next_batches()
            pids += _worker_pids(other)
        loader.close()
    # "exit": the rank returns with the loader still reading; interpreter exit must stop its workers.
    left = [p.pid for p in multiprocessing.active_children()] if close != "exit" else []
    return {"pids": pids, "children_left": left, "keep": id(loader)}


def _read_then_die(pid_file: str) -> None:
    topo = Topology(TopologyConfig(micro_batch_size=2, global_batch_size=4))
    loader = DistributedDataLoader(_Numbers(), topo, seed=1, num_workers=2)
    loader.next_batches()
    Path(pid_file).write_text(" ".join(map(str, _worker_pids(loader))))
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs: only the workers' own watchdog helps


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[-1][:1] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _wait_gone(pids: list[int], timeout_s: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _kill(pids: list[int]) -> None:
    for pid in pids:  # never leave a leak of a failing test behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_closed_loader_leaves_no_child_processes() -> None:
    for how in ("close", "with"):
        result = run_distributed(_read_then, 1, how)[0]
        try:
            assert len(result["pids"]) == (2 if how == "close" else 4)
            assert result["children_left"] == []  # seen from the rank itself, right after closing
            assert _wait_gone(result["pids"]) == []
        finally:
            _kill(result["pids"])


def test_loader_workers_end_when_the_rank_exits_without_closing() -> None:
    result = run_distributed(_read_then, 1, "exit")[0]
    try:
        assert len(result["pids"]) == 2
        assert _wait_gone(result["pids"]) == []
    finally:
        _kill(result["pids"])


def test_loader_workers_end_when_the_rank_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    with pytest.raises(DistributedTestFailure, match="exited with code -9"):
        run_distributed(_read_then_die, 1, str(pid_file))
    pids = [int(p) for p in pid_file.read_text().split()]
    try:
        assert len(pids) == 2
        assert _wait_gone(pids) == []  # torch's watchdog polls its parent every 5 s
    finally:
        _kill(pids)
