"""ZeRO-1: optimizer-state bytes per rank, peak memory, and step time against plain data parallelism.

Run: ``python benchmarks/optimizer.py`` (CPU, gloo; on a GPU machine the same script uses CUDA + NCCL).

For dp = 1, 2, 4 and ZeRO on/off, each rank builds the same MLP stack, runs a few training steps and
reports: the bytes of fp32 master weights + Adam moments it holds (target with ZeRO: full / dp within
1%), the peak memory of the process (CUDA: max allocated; CPU: peak resident set size, which includes
the interpreter and torch), the median time of ``optimizer.step`` and of the whole step (forward,
backward, gradient communication, optimizer). With ZeRO the gradient reduce-scatter runs inside
``optimizer.step``; without it the all-reduce runs during the backward pass, so only the whole step
compares like with like.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from typing import Any

import torch
from torch import nn

from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.layer_spec import LayerSpec
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig


class Block(nn.Module):
    def __init__(self, hidden: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


def _loss(y: torch.Tensor, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return y.pow(2).mean(), {}


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def _run(zero: bool, layers: int, hidden: int, steps: int) -> dict[str, float]:
    torch.set_num_threads(1)
    topo = Topology(TopologyConfig(data_parallel_size=torch.distributed.get_world_size()))
    config = OptimizerConfig(zero_stage=1 if zero else 0)
    specs = [LayerSpec(Block, (hidden, i)) for i in range(layers)]
    module = ParallelModule(specs, topo, _loss, sharding=config.sharding)
    optimizer = Optimizer.for_module(module, config)
    n_params = sum(p.numel() for p in module.parameters())
    batch = torch.randn(4, 8, hidden, device=topo.device)
    times, totals = [], []
    for step in range(steps + 1):
        begin = time.perf_counter()
        module.train_step([batch], step=step)
        start = time.perf_counter()
        optimizer.step(step)
        if topo.device.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:  # the first step allocates the Adam moments
            times.append(time.perf_counter() - start)
            totals.append(time.perf_counter() - begin)
    state_bytes = sum(
        t.numel() * t.element_size()
        for slot in optimizer.shard_state_dict()["slots"]
        for t in (slot["master"], slot["exp_avg"], slot["exp_avg_sq"])
    )
    return {
        "state_mib": state_bytes / 2**20,
        "full_state_mib": 3 * 4 * n_params / 2**20,
        "peak_mib": _peak_memory_mib(topo.device),
        "step_ms": statistics.median(times) * 1e3,
        "total_ms": statistics.median(totals) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for dp in (1, 2, 4):
        for zero in (False, True):
            results = run_distributed(_run, dp, zero, args.layers, args.hidden, args.steps, timeout_s=900)
            state = max(r["state_mib"] for r in results)
            full = results[0]["full_state_mib"]
            rows.append(
                {
                    "dp": dp,
                    "zero": zero,
                    "state/rank (MiB)": state,
                    "full/dp (MiB)": full / dp,
                    "state vs full/dp": state / (full / dp),
                    "peak/rank (MiB)": max(r["peak_mib"] for r in results),
                    "optimizer step (ms)": max(r["step_ms"] for r in results),
                    "whole step (ms)": max(r["total_ms"] for r in results),
                }
            )
    baseline = {row["dp"]: row["whole step (ms)"] for row in rows if not row["zero"]}
    for row in rows:
        row["whole step vs plain dp"] = row["whole step (ms)"] / baseline[row["dp"]]
    headers = list(rows[0])
    cells = [[f"{r[h]:.3f}" if isinstance(r[h], float) else str(r[h]) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print(f"AdamW on {args.layers} MLP blocks of width {args.hidden}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))


if __name__ == "__main__":
    main()
