"""Pipeline schedules: measured bubble against theory, and activation memory with and without checkpointing.

Run: ``python benchmarks/pipeline.py`` (CPU, gloo, 2 processes).

Bubble: for pp=2 and m micro-batches, each schedule's step time ``T_pp`` is compared with the same work
without a pipeline, ``T_1``: each stage's layers for m micro-batches (stages after the first also
computing their input's gradient, as they must to send it back), run by ``pp`` independent
single-process worlds at the same time so the baseline sees the same load on the machine's cores as the
pipeline does; ``T_1`` is the slowest of them, the pace a pipeline cannot beat. With perfect overlap
``T_pp == T_1``; the measured bubble fraction is ``1 - T_1 / T_pp``, printed beside the theoretical
``(p - 1) / (m + p - 1)`` (``(p - 1) / (v m + p - 1)`` interleaved over ``v`` chunks).

Memory: the peak, over one ``train_step``, of the bytes held by activations (tensors kept for the backward
pass, including those activation checkpointing recomputes during it) and of all tensors the step creates,
with each activation-checkpointing mode and 4 blocks per stage: first in one process (pp=1, one
micro-batch), then on every stage of a pp=2 run with the 1F1B schedule, where the first stage holds up
to pp micro-batches in flight. Each mode is compared with ``disabled`` against the target of cutting
activation memory at least in half. Counted per tensor storage as ops run (see ``_ActivationMemory``),
so the numbers are exact on CPU and independent of the allocator.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

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


def _measure(
    pp: int, layers: int, hidden: int, micro: int, n_micro: int, schedule: str, steps: int, input_grad: bool = False
) -> float:
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
    batches = [torch.randn(micro, 16, hidden, device=topo.device).requires_grad_(input_grad) for _ in range(n_micro)]
    return _time_steps(module, batches, steps)


def bubble_table(layers: int, hidden: int, micro: int, steps: int) -> list[dict[str, Any]]:
    pp = 2
    rows = []
    for n_micro in (2, 4, 8):
        # The work of each stage of the pipeline (layers / pp layers, m micro-batches, no communication), in
        # pp concurrent worlds of one process so the cores are as busy as during the pipelined run. Every
        # stage after the first also computes the gradient of its input (to send it back), so its world does
        # too; a pipeline runs at the pace of its slowest stage, so that stage's time is the baseline.
        with ThreadPoolExecutor(pp) as pool:
            futures = [
                pool.submit(
                    run_distributed, _measure, 1, 1, layers // pp, hidden, micro, n_micro, "1f1b", steps, stage > 0
                )
                for stage in range(pp)
            ]
            single = max(f.result()[0] for f in futures)
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


class _ActivationMemory(TorchDispatchMode):
    """Peak live bytes of activations, and of every tensor a step creates, on this rank.

    An activation is a tensor kept for the backward pass: one packed by autograd's saved-tensor hooks in
    the forward pass (a checkpointed block's inputs included), or one recomputed by activation checkpointing
    in the backward pass, which checkpointing saves through hooks of its own that the outer hooks never
    see. Recomputed tensors are therefore recognised here, as the outputs of ops that run with gradients
    enabled inside a backward pass. Memory is counted per storage (a view or an in-place result adds
    nothing), a storage stops counting as soon as it is freed, and parameters never count. Exact on CPU
    and GPU alike, whatever the allocator does.
    """

    def __init__(self, parameters: list[torch.Tensor]) -> None:
        super().__init__()
        self._excluded = {p.untyped_storage()._cdata for p in parameters}
        self._live: dict[int, tuple[StorageWeakRef, int, bool]] = {}  # storage -> (ref, bytes, activation?)
        self.peak_activations = 0
        self.peak_all = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs)) if _has_storage(t)}
        recomputing = torch._C._current_graph_task_id() != -1 and torch.is_grad_enabled()
        for tensor in pytree.tree_leaves(out):
            if _has_storage(tensor):
                self._track(tensor, activation=recomputing, aliases=inputs)
        self._update()
        return out

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if _has_storage(tensor):
            self._track(tensor, activation=True, aliases=set())
            self._update()
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def _track(self, tensor: torch.Tensor, *, activation: bool, aliases: set[int]) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live and not self._live[key][0].expired():
            ref, size, was_activation = self._live[key]
            self._live[key] = (ref, size, was_activation or activation)  # a tensor saved after it was made
        elif key not in self._excluded and key not in aliases:
            self._live[key] = (StorageWeakRef(storage), storage.nbytes(), activation)

    def _update(self) -> None:
        self._live = {k: v for k, v in self._live.items() if not v[0].expired()}
        self.peak_all = max(self.peak_all, sum(size for _, size, _ in self._live.values()))
        activations = sum(size for _, size, activation in self._live.values() if activation)
        self.peak_activations = max(self.peak_activations, activations)


def _has_storage(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type != "meta"


def _peak_memory(mode: str, pp: int, layers_per_stage: int, hidden: int, micro: int, n_micro: int) -> dict[str, int]:
    """Peak activation bytes and peak bytes of all tensors created during one ``train_step`` on this stage.

    A warm-up step first, so buffers allocated once (gradient buckets, message headers) do not count.
    """
    torch.set_num_threads(1)
    config = TopologyConfig(
        pipe_parallel_size=pp,
        micro_batch_size=micro,
        gradient_accumulation_steps=n_micro,
        activation_checkpointing_type=mode,  # type: ignore[arg-type]
    )
    topo = Topology(config)
    specs = [LayerSpec(MLPBlock, (hidden, i)) for i in range(pp * layers_per_stage)]
    module = ParallelModule(specs, topo, _loss)
    batches = [torch.randn(micro, 64, hidden, device=topo.device) for _ in range(n_micro)]
    module.train_step(batches)
    counter = _ActivationMemory(list(module.parameters()))
    with counter, torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        module.train_step(batches)
    return {"activations": counter.peak_activations, "all": counter.peak_all}


_MODES = ("disabled", "every_layer", "every_pipe_stage")


def memory_table(pp: int, hidden: int, micro: int, n_micro: int) -> list[dict[str, Any]]:
    """One row per (stage, checkpointing mode): peak memory of a ``train_step`` with 4 blocks per stage."""
    measured = {
        mode: run_distributed(_peak_memory, pp, mode, pp, 4, hidden, micro, n_micro, timeout_s=600) for mode in _MODES
    }
    rows = []
    for stage in range(pp):
        base = measured["disabled"][stage]["activations"]
        for mode in _MODES:
            peak = measured[mode][stage]
            ratio = peak["activations"] / base
            rows.append(
                {
                    "stage": stage,
                    "activation_checkpointing": mode,
                    "activations (MiB)": peak["activations"] / 2**20,
                    "all step tensors (MiB)": peak["all"] / 2**20,
                    "vs disabled": ratio,
                    "target <= 0.5": "-" if mode == "disabled" else ("met" if ratio <= 0.5 else "missed"),
                }
            )
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
    parser.add_argument("--memory-micro-batches", type=int, default=4, help="micro-batches in the memory runs")
    args = parser.parse_args()
    print(f"pipeline bubble, pp=2, {args.layers} MLP blocks of width {args.hidden}, micro-batch {args.micro_batch}")
    _print(bubble_table(args.layers, args.hidden, args.micro_batch, args.steps))
    shape = f"4 MLP blocks of width {args.hidden} per stage, micro-batch {args.micro_batch} x 64 tokens"
    print(f"\npeak memory of one train_step, pp=1 (one micro-batch), {shape}")
    _print(memory_table(1, args.hidden, args.micro_batch, 1))
    m = args.memory_micro_batches
    print(f"\npeak memory of one train_step per stage, pp=2, 1f1b over {m} micro-batches, {shape}")
    _print(memory_table(2, args.hidden, args.micro_batch, m))


if __name__ == "__main__":
    main()
