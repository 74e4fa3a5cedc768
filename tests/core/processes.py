"""Helpers for tests that start real processes: a tiny `scaling train` run, reading its output with bounded
waits, and finding (and killing) every process it started."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from scaling.core.data import MemoryMapWriter

REPO = Path(__file__).resolve().parents[2]
SCALING = Path(sys.executable).with_name("scaling")


ARCHITECTURE = {"vocab_size": 64, "vocab_multiple": 64, "hidden_size": 16, "num_layers": 2, "num_attention_heads": 4,
                "num_kv_heads": 2, "intermediate_size": 32, "sequence_length": 16}  # fmt: skip


def tiny_config(tmp_path: Path, topology: dict[str, Any], trainer: dict[str, Any]) -> Path:
    """A config file of a tiny transformer on a counting corpus (written beside it) with this layout and loop."""
    generator = torch.Generator().manual_seed(0)
    with MemoryMapWriter(tmp_path / "corpus", vocab_size=64) as writer:
        for _ in range(40):
            start = int(torch.randint(0, 64, (1,), generator=generator))
            writer.add([(start + i) % 64 for i in range(40)])
    config = {
        "topology": topology,
        "architecture": ARCHITECTURE,
        "trainer": trainer,
        "optimizer": {"training_groups": [{"learning_rate_schedule": {"learning_rate": 0.01,
                                                                       "learning_rate_decay_style": "constant"}}]},
        "data": {"prefixes": [str(tmp_path / "corpus")], "validation_fraction": 0.1},
        "logger": {"log_dir": str(tmp_path / "logs")},
    }  # fmt: skip
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_run(tmp_path: Path, **trainer: Any) -> Path:
    """A 2-rank (dp 2) run that trains until stopped and saves to ``tmp_path/ckpt``; returns the config file."""
    topology = {"data_parallel_size": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "device": "cpu"}
    loop = {"train_iterations": 100_000, "log_interval": 1, "save_dir": str(tmp_path / "ckpt"), **trainer}
    return tiny_config(tmp_path, topology, loop)


class Started:
    """A process whose merged stdout/stderr is read by a thread, so waits on its output can be bounded."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            self._new.put(line)
        self._new.put(None)

    def wait_for(self, text: str, timeout_s: float) -> str:
        """The first line containing ``text`` (also one read before); fails after ``timeout_s``."""
        for line in list(self.lines):
            if text in line:
                return line
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._new.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} within {timeout_s} s; output:\n{self.output[-4000:]}")

    def wait(self, timeout_s: float) -> int:
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=10)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def descendants(self) -> list[int]:
        return descendants(self.process.pid)

    def kill_all(self) -> None:
        """Kill what is left of this process and everything it started (also stopped processes)."""
        for pid in [self.process.pid, *self.descendants()]:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


def process_parents() -> dict[int, int]:
    """pid -> parent pid of every process now alive (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":  # a zombie is dead, only not yet reaped
            parents[int(entry)] = int(fields[1])
    return parents


def descendants(pid: int, parents: dict[int, int] | None = None) -> list[int]:
    """Every process below ``pid`` (children, grandchildren...), from ``parents`` or a fresh look at /proc."""
    parents = process_parents() if parents is None else parents
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def alive(pids: list[int]) -> list[int]:
    living = process_parents()
    return [pid for pid in pids if pid in living]


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait until none of ``pids`` is alive; returns those still alive after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def rank_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the ranks started (through the agent, torchrun) by the process ``launcher``."""
    parents = process_parents()
    ranks = {}
    for pid in descendants(launcher):
        try:
            parent_cmdline = Path(f"/proc/{parents[pid]}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, KeyError):
            continue
        if b"scaling.core.runner.agent" not in parent_cmdline:
            continue  # the agent itself, or a rank's own helper process (data loading)
        for item in environ:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = pid
    return ranks
