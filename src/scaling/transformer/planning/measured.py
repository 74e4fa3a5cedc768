"""The planner's memory prediction against what a real training step holds, on this machine.

Runs in every rank of an initialised world (``scaling.core.testing.run_distributed`` in the tests,
``benchmarks/planner.py``): builds the transformer through the engine on each layout (same world size),
trains two steps inside torch's memory tracker (:func:`scaling.core.zero.memory.measure_peak`) and returns
this rank's measured peak and step time. Two steps, because the optimizer's state only exists from the
first one on; then two more outside the tracker (which slows every operator) for the time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from scaling.core.nn.precision import Precision, PrecisionConfig
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule
from scaling.core.planner.layout import Layout
from scaling.core.topology import Topology, TopologyConfig
from scaling.core.zero.memory import live_tensor_bytes, measure_peak, param_sizes
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.model.layers import LanguageModelLoss, loss_tokens, transformer_layer_specs

__all__ = ["CHECK_ARCH", "CHECK_LAYOUTS", "MeasuredLayout", "layout_of", "measure_layouts"]

STEPS = 2

# The check of tests/transformer/test_plan_memory.py and benchmarks/planner.py: a small transformer whose
# activations are about half of every rank's peak, and ten layouts of a 2-process world that cover ZeRO 0-3,
# fp32 and bf16, 1F1B and GPipe, tensor parallelism, and checkpointing per layer and per stage.
CHECK_ARCH: dict[str, Any] = {
    "vocab_size": 256, "vocab_multiple": 8, "hidden_size": 64, "num_layers": 4, "num_attention_heads": 4,
    "num_kv_heads": 2, "intermediate_size": 128, "sequence_length": 64,
}  # fmt: skip
CHECK_LAYOUTS: list[dict[str, Any]] = [
    {"dp": 2, "zero_stage": 0, "n_micro": 2, "micro_batch_size": 2},
    {"dp": 2, "zero_stage": 1, "n_micro": 2, "micro_batch_size": 2},
    {"dp": 2, "zero_stage": 2, "n_micro": 1, "micro_batch_size": 2, "precision": "bfloat16"},
    {"dp": 2, "zero_stage": 3, "n_micro": 2, "micro_batch_size": 2},
    {"dp": 2, "zero_stage": 3, "n_micro": 2, "micro_batch_size": 2, "checkpointing": "every_layer"},
    {"pp": 2, "zero_stage": 0, "n_micro": 4, "micro_batch_size": 2},
    {"pp": 2, "zero_stage": 0, "n_micro": 4, "micro_batch_size": 2, "checkpointing": "every_layer"},
    {"pp": 2, "zero_stage": 0, "n_micro": 4, "micro_batch_size": 2, "checkpointing": "every_pipe_stage"},
    {"pp": 2, "zero_stage": 0, "n_micro": 3, "micro_batch_size": 2, "schedule": "gpipe"},
    {"tp": 2, "zero_stage": 0, "n_micro": 2, "micro_batch_size": 2},
]


def layout_of(fields: dict[str, Any]) -> Layout:
    """The planner's :class:`Layout` of a measured layout's fields."""
    return Layout(
        tp=fields.get("tp", 1),
        pp=fields.get("pp", 1),
        dp=fields.get("dp", 1),
        zero_stage=fields.get("zero_stage", 0),
        checkpointing=fields.get("checkpointing", "disabled"),
        micro_batch_size=fields["micro_batch_size"],
        n_micro=fields["n_micro"],
        schedule=fields.get("schedule", "1f1b"),
    )


@dataclass(frozen=True)
class MeasuredLayout:
    """One rank's figures for one layout: measured peak bytes of live tensors over two training steps, the
    wall time of a later step, and the parameter sizes its table holds (what the planner must reproduce)."""

    layout: dict[str, Any]
    rank: int
    coord: tuple[int, int, int]  # (pp, dp, tp)
    peak_bytes: int
    step_s: float
    param_sizes: list[tuple[str, int, bool, int]]
    at_peak: dict[str, int]  # the tracker's categories at the peak (param, grad, opt, act, temp, oth)


def _batches(n: int, micro: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (micro, seq + 1), generator=g)
        out.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:]})
    return out


def _one(arch: TransformerArchitectureConfig, layout: dict[str, Any], timed: bool) -> MeasuredLayout:
    topo = Topology(
        TopologyConfig(
            model_parallel_size=layout.get("tp", 1),
            pipe_parallel_size=layout.get("pp", 1),
            data_parallel_size=layout.get("dp", 1),
            micro_batch_size=layout["micro_batch_size"],
            gradient_accumulation_steps=layout["n_micro"],
            activation_checkpointing_type=layout.get("checkpointing", "disabled"),
            pipe_schedule=layout.get("schedule", "1f1b"),
        )
    )
    precision = PrecisionConfig(precision=Precision(layout.get("precision", "float32")))
    config = OptimizerConfig(zero_stage=layout.get("zero_stage", 0))
    module = ParallelModule(
        transformer_layer_specs(arch, topo, seed=1),
        topo,
        LanguageModelLoss(topo),
        precision=precision,
        weight_fn=loss_tokens,
        sharding=config.sharding,
    )
    optimizer = Optimizer.for_module(module, config)
    batches = _batches(layout["n_micro"], layout["micro_batch_size"], arch.sequence_length, arch.vocab_size)
    times: list[float] = []

    def train() -> None:
        for step in range(STEPS):
            start = time.perf_counter()
            module.train_step(batches, step=step)
            optimizer.step(step)
            times.append(time.perf_counter() - start)

    measurement = measure_peak(train, module, optimizer)
    peak = measurement.peak_bytes
    if timed:
        times.clear()  # the tracker slows every operator: time steps without it
        train()
    sizes = [(s.name, s.numel, s.trainable, s.layer) for s in param_sizes(module.param_table.values())]
    return MeasuredLayout(
        layout,
        topo.global_rank,
        (topo.pp_rank, topo.dp_rank, topo.tp_rank),
        peak,
        times[-1],
        sizes,
        measurement.at_peak,
    )


def measure_layouts(
    arch_fields: dict[str, Any], layouts: list[dict[str, Any]], timed: bool = False
) -> list[dict[str, Any]]:
    """This rank's measurement of every layout (each must use the whole world). The bytes alive before a
    layout's model is built (earlier models kept alive by autograd hooks' reference cycles) are taken off,
    so each figure is what that layout's training holds. ``timed``: two more steps outside the tracker
    give ``step_s`` (otherwise it is the time of a tracked step, which the tracker slows). Plain dicts
    (``MeasuredLayout`` fields), so they cross process boundaries as data."""
    arch = TransformerArchitectureConfig.from_dict(arch_fields)
    out = []
    for layout in layouts:
        floor = live_tensor_bytes()
        measured = _one(arch, layout, timed)
        out.append(
            asdict(
                MeasuredLayout(
                    measured.layout,
                    measured.rank,
                    measured.coord,
                    measured.peak_bytes - floor,
                    measured.step_s,
                    measured.param_sizes,
                    measured.at_peak,
                )
            )
        )
        dist.barrier()
    return out
