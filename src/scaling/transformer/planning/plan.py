"""Plan a transformer on a layout: the busiest rank's memory, the communication, the step time and MFU,
or the reasons it cannot run; and every layout for a number of GPUs, best first.

Everything is computed from the architecture and the layout (no model is built, no process started), with
the engine's own pieces: the partition of layers over stages, the schedule's instruction lists (in-flight
micro-batches, bubble), the ZeRO memory estimate the trainer prints, and the FLOPs formula MFU uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from scaling.core.config import InvalidCombination
from scaling.core.planner.communication import CommunicationVolume, step_communication
from scaling.core.planner.devices import DeviceSpec
from scaling.core.planner.layout import Layout, LayoutPlan, engine_problems, enumerate_layouts
from scaling.core.planner.memory import RankMemory, StageActivations, rank_memory
from scaling.core.planner.roofline import StepTimePrediction, predict_step_time
from scaling.core.zero.memory import MemoryEstimate, human_bytes
from scaling.transformer.flops import flops_per_token
from scaling.transformer.model.config import TransformerArchitectureConfig, check_against_tensor_parallel
from scaling.transformer.planning.activations import LayerActivations, transformer_activations
from scaling.transformer.planning.shapes import stage_layers, stage_param_sizes

__all__ = ["PlanSettings", "plan_layout", "plan_layouts", "stage_activations", "stage_memory"]

_ADAM_STEP_BYTES = 4 * 4 * 2  # master, gradient, two moments: fp32, each read and written


@dataclass(frozen=True)
class PlanSettings:
    """What does not vary between layouts: the device, the node size, the precision and the sequence."""

    device: DeviceSpec
    gpus_per_node: int = 8
    sequence_length: int = 2048
    compute_dtype: torch.dtype = torch.bfloat16
    reduce_in_fp32: bool = True
    offload: bool = False
    sequence_parallel: bool = False
    partition_method: str = "uniform"


def _gib(n: int) -> str:
    """Two decimals, so a layout just over the limit does not read as equal to it."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else human_bytes(n)


def stage_activations(
    arch: TransformerArchitectureConfig, acts: LayerActivations, layers: list[int], *, pp: int, stage: int
) -> StageActivations:
    """One micro-batch's activations of pipeline rank ``stage``, layer by layer."""
    head = arch.num_layers + 1
    saved = [acts.embedding if i == 0 else acts.head if i == head else acts.decoder for i in layers]
    inputs = [0 if i == 0 else acts.layer_input for i in layers]
    sends = (stage > 0) + (stage < pp - 1) if pp > 1 else 0
    return StageActivations(
        saved=tuple(saved),
        inputs=tuple(inputs),
        boundary=acts.layer_input if pp > 1 else 0,
        sent=sends * acts.layer_input,
        backward_transient=acts.logits if head in layers else 0,
    )


def stage_memory(arch: TransformerArchitectureConfig, layout: Layout, settings: PlanSettings, stage: int) -> RankMemory:
    """The predicted memory of a rank of pipeline stage ``stage`` (every tp and dp rank of a stage holds the
    same): its parameter sizes, one micro-batch's activations and the schedule's in-flight count."""
    compute_bytes = settings.compute_dtype.itemsize
    acts = transformer_activations(
        arch,
        micro_batch_size=layout.micro_batch_size,
        sequence_length=settings.sequence_length,
        tp=layout.tp,
        compute_bytes=compute_bytes,
    )
    layers = stage_layers(arch, layout.pp, settings.partition_method, layout.n_chunks)
    sizes = stage_param_sizes(arch, tp=layout.tp, pp=layout.pp, stage=stage,
                              method=settings.partition_method, n_chunks=layout.n_chunks)  # fmt: skip
    return rank_memory(
        sizes,
        stage_activations(arch, acts, layers[stage], pp=layout.pp, stage=stage),
        zero_stage=layout.zero_stage,
        dp=layout.dp,
        n_micro=layout.n_micro,
        pp=layout.pp,
        stage=stage,
        schedule=layout.schedule,
        n_chunks=layout.n_chunks,
        checkpointing=layout.checkpointing,
        compute_dtype=settings.compute_dtype,
        reduce_dtype=torch.float32 if settings.reduce_in_fp32 else None,
        offload=settings.offload and layout.zero_stage > 0,
    )


def _model_problems(arch: TransformerArchitectureConfig, layout: Layout) -> list[str]:
    try:
        check_against_tensor_parallel(arch, layout.tp)
    except InvalidCombination as exc:
        return [str(exc)]
    return []


def plan_layout(arch: TransformerArchitectureConfig, layout: Layout, settings: PlanSettings) -> LayoutPlan:
    """The plan of one layout: memory of its busiest rank (every pipeline stage is sized, the largest
    counts), communication, predicted step time and MFU; or why it cannot run."""
    problems = engine_problems(layout, gpus_per_node=settings.gpus_per_node, num_layers=arch.num_layers + 2)
    problems += _model_problems(arch, layout)
    tokens_per_step = layout.global_batch * settings.sequence_length
    flops = flops_per_token(arch, settings.sequence_length)
    model_flops = flops.model * tokens_per_step
    if problems:
        return LayoutPlan(layout, tokens_per_step=tokens_per_step, model_flops_per_step=model_flops,
                          device_memory=settings.device.memory_bytes, infeasible=tuple(problems))  # fmt: skip
    compute_bytes = settings.compute_dtype.itemsize
    layers = stage_layers(arch, layout.pp, settings.partition_method, layout.n_chunks)
    memory, stage = max(
        ((stage_memory(arch, layout, settings, s), s) for s in range(layout.pp)), key=lambda m: m[0].peak
    )
    decoders = [sum(1 for i in stage_layer if 0 < i <= arch.num_layers) for stage_layer in layers]
    tokens_micro = layout.micro_batch_size * settings.sequence_length
    # One micro-batch's forward on each stage (per tensor-parallel rank); training is three of them, and
    # checkpointing (every layer or every stage, head included, as the engine does) runs one more.
    forward = [
        tokens_micro * (n * flops.layer_forward + (flops.head_forward if arch.num_layers + 1 in sl else 0)) / layout.tp
        for n, sl in zip(decoders, layers, strict=True)
    ]
    slowest = max(range(layout.pp), key=lambda s: forward[s])
    recomputed = forward[slowest] if layout.checkpointing != "disabled" else 0.0
    decoder_layers = max(decoders)
    state = memory.states
    communication = step_communication(
        tp=layout.tp,
        pp=layout.pp,
        dp=layout.dp,
        zero_stage=layout.zero_stage,
        gpus_per_node=settings.gpus_per_node,
        params_per_rank=state.n_params,
        trainable_per_rank=state.n_trainable,
        compute_bytes=compute_bytes,
        reduce_bytes=4 if settings.reduce_in_fp32 else compute_bytes,
        layers_per_stage=decoder_layers,
        tokens_per_micro_batch=tokens_micro,
        hidden_size=arch.hidden_size,
        n_micro=layout.n_micro,
        sequence_parallel=settings.sequence_parallel,
        n_chunks=layout.n_chunks,
        recomputed_layers=decoder_layers if layout.checkpointing != "disabled" else 0,
    )
    if not settings.device.peak_flops:
        time = None  # a device without a peak (a CPU, unmeasured): memory and communication only
    else:
        time = _predict_time(settings, layout, 3 * forward[slowest], recomputed, communication, state, compute_bytes)
    device_memory = settings.device.memory_bytes
    infeasible: tuple[str, ...] = ()
    if device_memory and memory.peak > device_memory:
        infeasible = (f"needs {_gib(memory.peak)} > {_gib(device_memory)} (stage {stage})",)
    return LayoutPlan(
        layout,
        memory=memory,
        communication=communication,
        time=time,
        tokens_per_step=tokens_per_step,
        model_flops_per_step=model_flops,
        device_memory=device_memory,
        infeasible=infeasible,
    )


def _predict_time(
    settings: PlanSettings,
    layout: Layout,
    stage_flops: float,
    recomputed: float,
    communication: CommunicationVolume,
    state: MemoryEstimate,
    compute_bytes: int,
) -> StepTimePrediction:
    return predict_step_time(
        device=settings.device,
        dtype=settings.compute_dtype,
        flops_per_micro_batch_stage=stage_flops,
        recompute_flops_per_micro_batch_stage=recomputed,
        n_micro=layout.n_micro,
        pp=layout.pp,
        schedule=layout.schedule,
        n_chunks=layout.n_chunks,
        communication=communication,
        optimizer_bytes=_ADAM_STEP_BYTES * state.n_trainable / (layout.dp if layout.zero_stage else 1)
        + 2 * compute_bytes * state.n_params,
    )


def plan_layouts(
    arch: TransformerArchitectureConfig,
    settings: PlanSettings,
    *,
    devices: int,
    global_batch: int,
    layouts: Iterable[Layout] | None = None,
) -> list[LayoutPlan]:
    """Every layout for ``devices`` GPUs and ``global_batch`` samples (or the given ones): those that fit
    by predicted tokens/s, best first, then those that do not, by how far they are from fitting."""
    candidates = layouts if layouts is not None else enumerate_layouts(devices, global_batch)
    plans = [plan_layout(arch, layout, settings) for layout in candidates]
    fitting = sorted((p for p in plans if p.fits), key=lambda p: -p.tokens_per_s)
    rest = sorted((p for p in plans if not p.fits), key=lambda p: p.memory.peak if p.memory else float("inf"))
    return fitting + rest
