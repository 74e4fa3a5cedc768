"""A restart on a fixed rendezvous port (``runner.master_port``): the new attempt's process group must not
meet the keys the previous attempt left in the launcher's store (with ``--standalone`` every attempt gets a
fresh store; with a fixed port the store outlives the attempt)."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from .processes import SCALING

_WORKER = """
import os, sys, time
import torch, torch.distributed as dist
from scaling.core.topology import TopologyConfig, init_distributed
attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
init_distributed(TopologyConfig(data_parallel_size=2, device="cpu"))
total = torch.ones(1)
dist.all_reduce(total)  # the process group really connects both ranks
with open(sys.argv[1], "a") as out:
    out.write(f"{attempt}:{rank}:{int(total.item())}\\n")
if attempt == 0 and rank == 1:
    os.kill(os.getpid(), 9)
if attempt == 0:
    time.sleep(60)  # until the launcher stops it
dist.barrier()
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(90)
def test_a_restart_on_an_explicit_master_port_connects_the_new_world(tmp_path: Path) -> None:
    script, out = tmp_path / "worker.py", tmp_path / "attempts.txt"
    script.write_text(_WORKER)
    runner = {"script": str(script), "module": False, "script_args": [str(out)], "master_port": _free_port()}
    config = tmp_path / "launch.yml"
    config.write_text(json.dumps({"runner": runner, "topology": {"data_parallel_size": 2}}))
    result = subprocess.run(
        [str(SCALING), "launch", str(config), "--max-restarts", "1"], capture_output=True, text=True, timeout=80
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(out.read_text().split()) == ["0:0:2", "0:1:2", "1:0:2", "1:1:2"], result.stderr[-3000:]
    assert "restarting the world" in result.stderr
