"""The layouts a planner weighs, and what it concludes about each: a pure enumeration of (tp, pp, dp, ZeRO
stage, activation checkpointing, micro-batch size) for a number of devices and a global batch, and the
plan of one layout (memory, bubble, communication, step time) or the reason it cannot run.

Model-specific rules (heads divisible by tp, layers by pp) are the model's; this module only knows
devices, batches and the engine's own rules: tensor parallelism stays inside a node (its collectives
run once per layer and need the intra-node link), every pipeline stage needs a layer, the global batch
is micro-batch x micro-batches x dp exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from scaling.core.planner.communication import CommunicationVolume
from scaling.core.planner.memory import RankMemory
from scaling.core.planner.roofline import StepTimePrediction

__all__ = ["Layout", "LayoutPlan", "divisors", "enumerate_layouts"]

CHECKPOINTING = ("disabled", "every_layer")


@dataclass(frozen=True, order=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int
    checkpointing: str
    micro_batch_size: int
    n_micro: int  # micro-batches per step on each data-parallel rank (gradient accumulation)
    schedule: str = "1f1b"
    n_chunks: int = 1

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.n_micro * self.dp

    def describe(self) -> str:
        ckpt = {"disabled": "off", "every_layer": "layer", "every_pipe_stage": "stage"}.get(
            self.checkpointing, self.checkpointing
        )
        return (
            f"tp {self.tp} pp {self.pp} dp {self.dp} ZeRO {self.zero_stage} ckpt {ckpt} "
            f"mbs {self.micro_batch_size} x {self.n_micro}"
        )


@dataclass(frozen=True)
class LayoutPlan:
    """A layout and what the planner predicts for its busiest rank, or why it cannot run
    (``infeasible``: one line per reason, e.g. ``needs 91.0 GiB > 80.0 GiB``)."""

    layout: Layout
    memory: RankMemory | None = None
    communication: CommunicationVolume | None = None
    time: StepTimePrediction | None = None
    tokens_per_step: int = 0
    model_flops_per_step: float = 0.0  # whole model, all devices
    device_memory: int = 0
    infeasible: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def fits(self) -> bool:
        return not self.infeasible

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.time.step_s if self.time is not None and self.time.step_s > 0 else 0.0

    @property
    def mfu(self) -> float:
        if self.time is None:
            return 0.0
        return self.time.mfu(self.model_flops_per_step / self.layout.devices)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(
    devices: int,
    global_batch: int,
    *,
    max_micro_batch: int = 16,
    zero_stages: tuple[int, ...] = (0, 1, 2, 3),
    checkpointing: tuple[str, ...] = CHECKPOINTING,
    schedule: str = "1f1b",
) -> Iterator[Layout]:
    """Every (tp, pp, dp) that multiplies to ``devices``, with each ZeRO stage (1-3 only when dp > 1: with
    one replica they shard nothing), each checkpointing choice, and each power-of-two micro-batch size up to
    ``max_micro_batch`` that divides the per-replica batch. Layouts whose batch does not split are left out
    here; :func:`batch_problem` names the reason for a layout the user asked for."""
    for tp in divisors(devices):
        for pp in divisors(devices // tp):
            dp = devices // (tp * pp)
            if global_batch % dp:
                continue
            per_replica = global_batch // dp
            sizes = [m for m in (1, 2, 4, 8, 16, 32, 64) if m <= max_micro_batch and per_replica % m == 0]
            for zero in zero_stages:
                if zero > 0 and dp == 1:
                    continue
                for ckpt in checkpointing:
                    for mbs in sizes:
                        yield Layout(tp, pp, dp, zero, ckpt, mbs, per_replica // mbs, schedule)


def engine_problems(layout: Layout, *, gpus_per_node: int, num_layers: int) -> list[str]:
    """The engine's own reasons a layout cannot run, before any model rule: tensor parallelism across
    nodes, more pipeline stages than layers."""
    problems = []
    if layout.tp > gpus_per_node:
        problems.append(f"tp {layout.tp} > {gpus_per_node} GPUs per node")
    if layout.pp * layout.n_chunks > num_layers:
        problems.append(f"pp {layout.pp} x {layout.n_chunks} chunks > {num_layers} layers")
    return problems
