"""Pipeline schedules: measured bubble against theory, and activation memory with and without checkpointing.

Run: ``python benchmarks/pipeline.py`` (CPU, 2 processes; on a GPU machine add ``--device cuda``).

Bubble: for pp=2 and m micro-batches, each schedule's step time ``T_pp`` is compared with the same work on
one stage without a pipeline, ``T_1``: one stage's layers for m micro-batches, run by ``pp`` independent
single-process worlds at the same time, so the baseline sees the same load on the machine's cores as the
pipeline does. With perfect overlap ``T_pp == T_1``; the measured bubble fraction is ``1 - T_1 / T_pp``,
printed beside the theoretical ``(p - 1) / (m + p - 1)`` (``(p - 1) / (v m + p - 1)`` interleaved over
``v`` chunks).

Memory: bytes of activations saved for the backward pass, live at the peak of one micro-batch's forward,
through a 4-layer stack, with each activation-checkpointing mode (measured with saved-tensor hooks, so it is
exact on CPU and GPU alike).
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from scaling.core.pipeline.layer_spec import LayerSpec
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig


class MLPBlock(nn.Module):
    def __init__(self, hidden: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


def _loss(y: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return y.float().pow(2).mean(), {}


def _time_steps(module: ParallelModule, batches: list[Any], steps: int) -> float:
    module.train_step(batches)  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        module.train_step(batches)
        if module.topology.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)  # the least disturbed step: on a shared 2-core machine the median mostly measures noise


def _measure(pp: int, layers: int, hidden: int, micro: int, n_micro: int, schedule: str, steps: int) -> float:
    torch.set_num_threads(1)
    config = TopologyConfig(
        pipe_parallel_size=pp,
        gradient_accumulation_steps=n_micro,
        micro_batch_size=micro,
        pipe_schedule=schedule,  # type: ignore[arg-type]
        virtual_pipe_stages=2 if schedule == "interleaved_1f1b" else 1,
    )
    topo = Topology(config)
    specs = [LayerSpec(MLPBlock, (hidden, i)) for i in range(layers)]
    module = ParallelModule(specs, topo, _loss)
    batches = [torch.randn(micro, 16, hidden, device=topo.device) for _ in range(n_micro)]
    return _time_steps(module, batches, steps)


def bubble_table(layers: int, hidden: int, micro: int, steps: int) -> list[dict[str, Any]]:
    pp = 2
    rows = []
    for n_micro in (2, 4, 8):
        # Same work as one stage of the pipeline (layers / pp layers, m micro-batches, no communication), in
        # pp concurrent worlds of one process so the cores are as busy as during the pipelined run.
        with ThreadPoolExecutor(pp) as pool:
            futures = [
                pool.submit(run_distributed, _measure, 1, 1, layers // pp, hidden, micro, n_micro, "1f1b", steps)
                for _ in range(pp)
            ]
            single = statistics.median(f.result()[0] for f in futures)
        for schedule in ("gpipe", "1f1b", "interleaved_1f1b"):
            if schedule == "interleaved_1f1b" and n_micro % pp:
                continue
            timed = run_distributed(_measure, pp, pp, layers, hidden, micro, n_micro, schedule, steps, timeout_s=600)
            step = max(timed)
            theory = (pp - 1) / (n_micro + pp - 1)
            if schedule == "interleaved_1f1b":
                theory = (pp - 1) / (2 * n_micro + pp - 1)  # two chunks per rank
            rows.append(
                {
                    "m": n_micro,
                    "schedule": schedule,
                    "T_pp (ms)": step * 1e3,
                    "T_1 (ms)": single * 1e3,
                    "bubble": 1 - single / step,
                    "theory": theory,
                    "points over theory": 100 * (1 - single / step - theory),
                }
            )
    return rows


class _SavedBytes:
    """Live bytes of tensors saved for backward, and their peak."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def pack(self, tensor: torch.Tensor) -> Any:
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        handle = _Handle(tensor)
        weakref.finalize(handle, self._free, size)
        return handle

    def _free(self, size: int) -> None:
        self.live -= size

    @staticmethod
    def unpack(handle: Any) -> torch.Tensor:
        return handle.tensor  # type: ignore[no-any-return]


class _Handle:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _activation_bytes(mode: str, hidden: int, micro: int) -> int:
    config = TopologyConfig(activation_checkpointing_type=mode)  # type: ignore[arg-type]
    topo = Topology(config)
    module = ParallelModule([LayerSpec(MLPBlock, (hidden, i)) for i in range(4)], topo, _loss)
    counter = _SavedBytes()
    batch = torch.randn(micro, 64, hidden)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        module.train_step([batch])
    return counter.peak


def memory_table(hidden: int, micro: int) -> list[dict[str, Any]]:
    rows = []
    for mode in ("disabled", "every_layer", "every_pipe_stage"):
        peak = run_distributed(_activation_bytes, 1, mode, hidden, micro, timeout_s=600)[0]
        rows.append({"activation_checkpointing": mode, "saved activations (MiB)": peak / 2**20})
    base = rows[0]["saved activations (MiB)"]
    for row in rows:
        row["vs disabled"] = row["saved activations (MiB)"] / base
    return rows


def _print(rows: list[dict[str, Any]]) -> None:
    headers = list(rows[0])
    cells = [[f"{r[h]:.3f}" if isinstance(r[h], float) else str(r[h]) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"pipeline bubble, pp=2, {args.layers} MLP blocks of width {args.hidden}, micro-batch {args.micro_batch}")
    _print(bubble_table(args.layers, args.hidden, args.micro_batch, args.steps))
    print("\nactivation memory of one micro-batch through 4 blocks")
    _print(memory_table(args.hidden, args.micro_batch))


if __name__ == "__main__":
    main()
