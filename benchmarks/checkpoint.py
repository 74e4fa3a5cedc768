"""Checkpoint save/load against plain torch.save/torch.load, and data loader throughput from a memory map.

Run: ``python benchmarks/checkpoint.py``.

Checkpoint: one process holds a model of MLP blocks (about 50M fp32 parameters by default) with an
AdamW optimizer that has taken a step; ``save_checkpoint``/``load_checkpoint`` (weights + fp32 master +
two moments, atomic publish) are timed against ``torch.save``/``torch.load(weights_only=True)`` of exactly
the same tensors (model state dict + the optimizer's per-parameter states) to the same disk. Our save
fsyncs every file (a crash must not lose a published checkpoint); plain ``torch.save`` does not, so the
table also shows ``torch.save`` followed by an fsync. Target: within 1.5x in time, about the same bytes.

Stall: what a save costs the training loop. The same model trains (one micro-batch per step) and saves
every few steps, once synchronously (``save_checkpoint``) and once in the background
(``AsyncCheckpointer``, as ``trainer.async_save: true`` does); the stall is the saving step's time minus the
median step time without a save. The background save's later cost is shown too: the extra time of the
steps that run while its writer is busy (on CPU the writer competes for the same cores), and when it is
published. Medians over ``--repeats``: the first background save also allocates the host buffers the
later ones reuse. Target: asynchronous stall <= 10% of the synchronous one. ``--device cuda`` measures pinned
device-to-host copies (NCCL default group, the writer's gloo group beside it).

Restart: what a dead rank costs under ``--max-restarts 1``. A tiny 2-rank ``scaling train`` run on the CPU
saves every few steps; once the first checkpoint is published, rank 1 gets ``kill -9``. Timed from the
kill: until the launcher logs the restart of the world (the death noticed and the world stopped), until
the new attempt's ranks run, and until the new attempt's first step is done (from its first metrics
record; the step it resumed from and the ``lost_to_restarts_s`` it reports are shown). The run is then
stopped: what follows is ordinary training.

Data: a memory-mapped corpus of random tokens is read through ``TokenWindowDataset`` and the
``DistributedDataLoader`` (one process, one thread); tokens/s counts input tokens delivered. Target:
above 1M tokens/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from scaling.core.checkpoint import load_checkpoint, save_checkpoint
from scaling.core.checkpoint.async_save import AsyncCheckpointer
from scaling.core.data import DistributedDataLoader, MemoryMapDataset, MemoryMapWriter, TokenWindowDataset
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.layer_spec import LayerSpec
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


def _loss(y: torch.Tensor, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return y.pow(2).mean(), {}


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _checkpoint_bench(directory: str, layers: int, hidden: int, repeats: int) -> dict[str, float]:
    torch.set_num_threads(1)
    root = Path(directory)
    topo = Topology(TopologyConfig())
    module = ParallelModule([LayerSpec(Block, (hidden,)) for _ in range(layers)], topo, _loss)
    optimizer = Optimizer.for_module(module, OptimizerConfig())
    module.train_step([torch.randn(2, hidden)])
    optimizer.step(0)
    names = dict(module.named_parameters_canonical())
    plain = {n: p.detach() for n, p in names.items()}
    plain.update({f"{n}.{k}": v for n in names for k, v in optimizer.parameter_state(n).items()})
    timings: dict[str, list[float]] = {
        "save": [],
        "load": [],
        "torch.save": [],
        "torch.save+fsync": [],
        "torch.load": [],
    }
    for i in range(repeats):
        start = time.perf_counter()
        saved = save_checkpoint(root / f"ours{i}", 1, module, optimizer)
        timings["save"].append(time.perf_counter() - start)
        start = time.perf_counter()
        load_checkpoint(saved, module, optimizer)
        timings["load"].append(time.perf_counter() - start)
        path = root / f"plain{i}.pt"
        start = time.perf_counter()
        torch.save(plain, path)
        timings["torch.save"].append(time.perf_counter() - start)
        durable = root / f"durable{i}.pt"
        start = time.perf_counter()
        with open(durable, "wb") as handle:  # what a crash-safe save must also pay: the data on disk
            torch.save(plain, handle)
            handle.flush()
            os.fsync(handle.fileno())
        timings["torch.save+fsync"].append(time.perf_counter() - start)
        start = time.perf_counter()
        torch.load(path, weights_only=True)
        timings["torch.load"].append(time.perf_counter() - start)
    result = {k: float(np.median(v)) for k, v in timings.items()}
    result["ours_mib"] = _size(root / "ours0" / "global_step1") / 2**20
    result["plain_mib"] = (root / "plain0.pt").stat().st_size / 2**20
    result["parameters_m"] = sum(p.numel() for p in names.values()) / 1e6
    return result


def _timed_step(module: ParallelModule, optimizer: Optimizer, batch: torch.Tensor, step: int) -> float:
    start = time.perf_counter()
    module.train_step([batch])
    optimizer.step(step)
    _sync(batch.device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stall_bench(directory: str, layers: int, hidden: int, repeats: int, device: str) -> dict[str, float]:
    """Median stall of a synchronous and of a background save, with the background save's later costs."""
    torch.set_num_threads(1)
    root = Path(directory)
    topo = Topology(TopologyConfig(), device=device)
    module = ParallelModule([LayerSpec(Block, (hidden,)) for _ in range(layers)], topo, _loss)
    optimizer = Optimizer.for_module(module, OptimizerConfig())
    batch = torch.randn(8, hidden, device=topo.device)
    step = 0
    for _ in range(3):  # warm-up: allocations, the optimizer state
        _timed_step(module, optimizer, batch, step)
        step += 1
    plain = []
    for _ in range(10):
        plain.append(_timed_step(module, optimizer, batch, step))
        step += 1
    base = float(np.median(plain))
    saver = AsyncCheckpointer()
    sync_stall, async_stall, tail, tail_steps, published = [], [], [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        _timed_step(module, optimizer, batch, step)
        step += 1
        save_checkpoint(root / "sync", step, module, optimizer, keep_last=1)
        sync_stall.append(time.perf_counter() - start - base)
        start = time.perf_counter()
        _timed_step(module, optimizer, batch, step)
        step += 1
        saver.save(root / "async", step, module, optimizer, keep_last=1)
        _sync(topo.device)  # the copies to host count in full, although a GPU would overlap part of them
        async_stall.append(time.perf_counter() - start - base)
        extra, steps = 0.0, 0
        while saver.in_flight is not None and steps < 10_000:
            extra += _timed_step(module, optimizer, batch, step) - base
            step += 1
            steps += 1
        saver.wait()
        published.append(time.perf_counter() - start)
        tail.append(extra)
        tail_steps.append(steps)
    return {
        "parameters_m": sum(p.numel() for p in module.parameters()) / 1e6,
        "checkpoint_mib": _size(next((root / "async").glob("global_step*"))) / 2**20,
        "step_s": base,
        "sync_stall_s": float(np.median(sync_stall)),
        "async_stall_s": float(np.median(async_stall)),
        "async_tail_s": float(np.median(tail)),
        "async_tail_steps": float(np.median(tail_steps)),
        "async_published_s": float(np.median(published)),
    }


def _print_stall(r: dict[str, float], device: str) -> None:
    ratio = r["async_stall_s"] / r["sync_stall_s"]
    print(
        f"\nstep-time stall of a save: {r['parameters_m']:.1f}M parameters, {r['checkpoint_mib']:.0f} MiB per "
        f"checkpoint, {device}, step {r['step_s'] * 1e3:.1f} ms without a save"
    )
    print(f"{'':38}{'synchronous':>12}{'asynchronous':>14}")
    print(f"{'stall of the saving step (s)':38}{r['sync_stall_s']:>12.3f}{r['async_stall_s']:>14.3f}")
    print(f"{'later steps slowed by the writer (s)':38}{'-':>12}{r['async_tail_s']:>14.3f}")
    print(f"{'  over this many steps':38}{'-':>12}{r['async_tail_steps']:>14.0f}")
    print(f"{'published after (s)':38}{r['sync_stall_s'] + r['step_s']:>12.3f}{r['async_published_s']:>14.3f}")
    print(
        f"asynchronous stall / synchronous stall: {ratio:.3f} (target <= 0.10: {'met' if ratio <= 0.10 else 'NOT met'})"
    )


_TINY = {"vocab_size": 64, "vocab_multiple": 64, "hidden_size": 16, "num_layers": 2, "num_attention_heads": 4,
         "num_kv_heads": 2, "intermediate_size": 32, "sequence_length": 16}  # fmt: skip


def _restart_config(root: Path, save_every: int) -> Path:
    """A tiny 2-rank run on a counting corpus that trains far longer than the benchmark waits."""
    rng = np.random.default_rng(0)
    with MemoryMapWriter(root / "corpus", vocab_size=64) as writer:
        for _ in range(40):
            start = int(rng.integers(0, 64))
            writer.add([(start + i) % 64 for i in range(40)])
    schedule = {"learning_rate": 0.01, "learning_rate_decay_style": "constant"}
    config = {
        "topology": {"data_parallel_size": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "device": "cpu"},
        "architecture": _TINY,
        "trainer": {"train_iterations": 1_000_000, "log_interval": 1, "save_interval": save_every,
                    "save_dir": str(root / "ckpt")},
        "optimizer": {"training_groups": [{"learning_rate_schedule": schedule}]},
        "data": {"prefixes": [str(root / "corpus")], "validation_fraction": 0.1},
        "logger": {"log_dir": str(root / "logs")},
    }  # fmt: skip
    path = root / "run.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                if fields[0] != "Z":
                    parents[int(entry)] = int(fields[1])
    return parents


def _below(pid: int) -> list[int]:
    parents, found, frontier = _parents(), [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def _ranks(launcher: int) -> dict[int, int]:
    """rank -> pid of the training ranks (children of the elastic agent) below ``launcher``."""
    ranks = {}
    for pid in _below(launcher):
        with contextlib.suppress(OSError):
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if b"scaling.core.runner.agent" not in Path(f"/proc/{parent}/cmdline").read_bytes():
                continue
            for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                if item.startswith(b"RANK="):
                    ranks[int(item[5:])] = pid
    return ranks


def _first_record_of_attempt(metrics: Path, attempt: int) -> dict[str, Any] | None:
    with contextlib.suppress(OSError):
        for line in metrics.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("restarts") == attempt and "loss" in record:
                    return record
    return None


def _restart_bench(save_every: int, timeout_s: float, master_port: int | None = None) -> dict[str, float]:
    """Seconds from a rank's ``kill -9`` to the restart, to the new ranks, to the first new step."""
    with tempfile.TemporaryDirectory(prefix="scaling-bench-") as tmp:
        root = Path(tmp)
        config = _restart_config(root, save_every)
        argv = [str(Path(sys.executable).with_name("scaling")), "train", str(config), "--max-restarts", "1"]
        if master_port is not None:  # a fixed rendezvous port instead of --standalone
            argv += ["-o", f"runner.master_port={master_port}"]
        run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: queue.Queue[tuple[float, str]] = queue.Queue()
        output: list[str] = []

        def read() -> None:
            assert run.stdout is not None
            for line in run.stdout:
                output.append(line)
                lines.put((time.time(), line))

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        try:
            while not (root / "ckpt" / "latest").is_file():
                if run.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the run published no checkpoint:\n" + "".join(output[-40:]))
                time.sleep(0.02)
            before = _ranks(run.pid)
            if set(before) != {0, 1}:
                raise RuntimeError(f"expected ranks 0 and 1, found {sorted(before)}")
            saved_step = int((root / "ckpt" / "latest").read_text().removeprefix("global_step"))
            os.kill(before[1], signal.SIGKILL)
            killed = time.time()
            restarted = ranks_up = first = None
            record = None
            while record is None:
                if run.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("no first step after the restart:\n" + "".join(output[-40:]))
                with contextlib.suppress(queue.Empty):
                    while True:
                        at, line = lines.get_nowait()
                        if restarted is None and "restarting the world" in line:
                            restarted = at
                if ranks_up is None:
                    now = _ranks(run.pid)
                    if len(now) == 2 and not set(now.values()) & set(before.values()):
                        ranks_up = time.time()
                record = _first_record_of_attempt(root / "logs" / "metrics.jsonl", 1)
                if record is None:
                    time.sleep(0.02)
            first = float(record["wall_time"])
        finally:
            for pid in [run.pid, *_below(run.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.wait(timeout=10)
        return {
            "saved_step": float(saved_step),
            "restart_logged_s": (restarted if restarted is not None else float("nan")) - killed,
            "ranks_running_s": (ranks_up if ranks_up is not None else float("nan")) - killed,
            "first_step_s": first - killed,
            "first_step_time_s": float(record.get("step_time_s", float("nan"))),
            "resumed_at_step": float(record["step"]) - 1,
            "lost_to_restarts_s": float(record.get("lost_to_restarts_s", float("nan"))),
        }


def _print_restart(r: dict[str, float]) -> None:
    print("\nrestart after kill -9 of rank 1: scaling train --max-restarts 1, tiny model, dp 2 on the CPU")
    print(f"{'from the death of the rank to':46}{'seconds':>10}")
    print(f"{'  the restart of the world logged':46}{r['restart_logged_s']:>10.2f}")
    print(f"{'  the ranks of the new attempt running':46}{r['ranks_running_s']:>10.2f}")
    print(f"{'  the first step of the new attempt done':46}{r['first_step_s']:>10.2f}")
    print(
        f"the new attempt resumed from step {r['resumed_at_step']:.0f} (last checkpoint before the kill: step "
        f"{r['saved_step']:.0f}); its first step took {r['first_step_time_s']:.3f} s; it reports "
        f"lost_to_restarts_s = {r['lost_to_restarts_s']:.2f}"
    )


def _loader_bench(prefix: str, sequence: int, micro: int, steps: int) -> float:
    torch.set_num_threads(1)
    topo = Topology(TopologyConfig(micro_batch_size=micro, gradient_accumulation_steps=4))
    loader = DistributedDataLoader(TokenWindowDataset(MemoryMapDataset(prefix), sequence), topo, seed=1)
    loader.next_batches()  # warm-up: first epoch's permutation
    start = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        tokens += sum(int(b["tokens"].numel()) for b in loader.next_batches())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stall-only", action="store_true", help="only the synchronous/asynchronous stall")
    parser.add_argument("--stall-layers", type=int, default=8)
    parser.add_argument("--stall-hidden", type=int, default=512)
    parser.add_argument("--device", default="cpu", help="where the stall benchmark trains: cpu or cuda")
    parser.add_argument("--restart-only", action="store_true", help="only the restart after a rank's kill -9")
    parser.add_argument("--no-restart", action="store_true", help="leave out the restart benchmark")
    parser.add_argument("--restart-save-every", type=int, default=10, help="save interval of the restarted run")
    parser.add_argument("--restart-master-port", type=int, default=None, help="runner.master_port of that run")
    args = parser.parse_args()
    if args.restart_only:
        _print_restart(_restart_bench(args.restart_save_every, timeout_s=300, master_port=args.restart_master_port))
        return
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    with tempfile.TemporaryDirectory(prefix="scaling-bench-") as tmp:
        stall = run_distributed(
            _stall_bench,
            1,
            tmp,
            args.stall_layers,
            args.stall_hidden,
            args.repeats,
            args.device,
            timeout_s=1200,
            backend=backend,
        )[0]
        _print_stall(stall, args.device)
    if args.stall_only:
        return
    if not args.no_restart:
        _print_restart(_restart_bench(args.restart_save_every, timeout_s=300, master_port=args.restart_master_port))
    with tempfile.TemporaryDirectory(prefix="scaling-bench-") as tmp:
        r = run_distributed(_checkpoint_bench, 1, tmp, args.layers, args.hidden, args.repeats, timeout_s=1200)[0]
        print(f"checkpoint of {r['parameters_m']:.1f}M parameters (weights + fp32 master + 2 Adam moments)")
        print(f"{'':22}{'scaling':>10}{'torch':>10}{'ratio':>8}")
        rows = (
            ("save (s)", "save", "torch.save"),
            ("save, both fsynced (s)", "save", "torch.save+fsync"),
            ("load (s)", "load", "torch.load"),
        )
        for label, ours, theirs in rows:
            print(f"{label:22}{r[ours]:>10.3f}{r[theirs]:>10.3f}{r[ours] / r[theirs]:>8.2f}")
        print(f"{'size (MiB)':22}{r['ours_mib']:>10.1f}{r['plain_mib']:>10.1f}{r['ours_mib'] / r['plain_mib']:>8.2f}")
        shutil.rmtree(Path(tmp), ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="scaling-bench-") as tmp:
        prefix = Path(tmp) / "corpus"
        rng = np.random.default_rng(0)
        with MemoryMapWriter(prefix, vocab_size=50_000) as writer:
            for _ in range(2_000):
                writer.add(rng.integers(0, 50_000, size=int(rng.integers(100, 2_000))))
        throughput = run_distributed(_loader_bench, 1, str(prefix), 2048, 8, 50, timeout_s=600)[0]
        print(f"\ndata loader: {throughput / 1e6:.2f}M tokens/s (sequence 2048, micro-batch 8, one process)")
        print(f"target > 1M tokens/s: {'met' if throughput > 1e6 else 'NOT met'}")


if __name__ == "__main__":
    main()
