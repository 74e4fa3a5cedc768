"""Predicted step time of one layout: a roofline sum of compute, the pipeline bubble and exposed
communication.

The model, per rank and optimizer step (``m`` micro-batches):

* **compute**: matmul FLOPs run at ``matmul_efficiency`` of the device's peak for the dtype. 0.6 is what a
  large bf16 matmul reaches on current GPUs; good training runs report 40-55% MFU once everything else is
  added. One micro-batch's forward takes a third of its time, the backward two thirds (the backward
  computes two matmuls per forward matmul); recomputation (activation checkpointing) runs in the backward.
* **tp**: tensor-parallel collectives sit between the layer's matmuls, so they are fully exposed; each
  micro-batch's share is added to its forward and backward in proportion to their compute.
* **pipeline**: those per-micro-batch times are played out by
  :func:`~scaling.core.planner.bubble.pipeline_timeline` on the schedule's own instructions. The idle time
  with instant messages is the **bubble**; what the point-to-point messages add to the makespan on top
  of that is **pp** communication (it is zero when messages hide behind other stages' work).
* **dp**: gradient reductions and parameter gathers overlap compute, up to ``dp_overlap`` of their time,
  but never more than the compute they can hide behind: a reduction runs during the backward of its
  micro-batch (stages 0 and 1 reduce once, during the last one), a gather during a forward. The rest is
  exposed.
* **optimizer**: memory-bound, ``optimizer_bytes`` (masters, gradients, both moments, parameters, read
  and written) over the memory bandwidth.

Bandwidths are the device's per-direction link figures times ``comm_efficiency`` (0.8: NCCL's ring
bus bandwidth on NVLink and InfiniBand). A spec that lacks a bandwidth (a measured CPU spec knows only
its FLOP/s) gets a rough stand-in, named in ``assumed``, so the prediction stays finite.

Left out, deliberately: kernel launch and Python overhead, the data loader, memory-bound elementwise
work (norms, softmax) outside the FLOP count, and link contention between groups.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from scaling.core.pipeline.schedule import ScheduleType
from scaling.core.planner.bubble import pipeline_timeline
from scaling.core.planner.communication import CommunicationVolume, Group, Link
from scaling.core.planner.devices import DeviceSpec

__all__ = ["StepTimePrediction", "predict_step_time"]

# Stand-ins when the spec has no figure: a laptop's DRAM, gloo over loopback or a 10 GbE link.
_FALLBACK_MEMORY_BW = 20e9
_FALLBACK_LINK_BW = {"intra": 5e9, "inter": 1.25e9}


@dataclass(frozen=True)
class StepTimePrediction:
    """Seconds per optimizer step on one rank; ``step_s`` is the sum of the parts."""

    compute_s: float  # model matmuls, forward and backward
    recompute_s: float  # forwards run again for activation checkpointing
    tp_comm_s: float  # tensor-parallel collectives (all on the critical path)
    dp_comm_s: float  # the part of data-parallel traffic not hidden behind compute
    pp_comm_s: float  # what point-to-point messages add to the pipeline's makespan
    bubble_s: float  # pipeline idle time with instant messages
    optimizer_s: float  # the memory-bound optimizer step
    step_s: float
    peak_flops: float  # the device's peak for the dtype, the MFU denominator
    bubble_fraction: float  # of the pipeline's makespan (no messages)
    assumed: tuple[str, ...] = ()  # figures the spec lacked and that were stood in for

    def mfu(self, model_flops_per_step_per_device: float) -> float:
        """Model FLOPs utilisation: model FLOPs (no recomputation) per second over the peak."""
        return model_flops_per_step_per_device / (self.step_s * self.peak_flops) if self.step_s > 0 else 0.0


def _link_bandwidth(device: DeviceSpec, link: Link, assumed: list[str]) -> float:
    bandwidth = device.intra_node_bw if link == "intra" else device.inter_node_bw
    if bandwidth > 0:
        return bandwidth
    assumed.append(f"{link}-node bandwidth {_FALLBACK_LINK_BW[link] / 1e9:g} GB/s")
    return _FALLBACK_LINK_BW[link]


def predict_step_time(
    *,
    device: DeviceSpec,
    dtype: torch.dtype | str,
    flops_per_micro_batch_stage: float,
    recompute_flops_per_micro_batch_stage: float,
    n_micro: int,
    pp: int,
    schedule: ScheduleType | str,
    n_chunks: int,
    communication: CommunicationVolume,
    links: Mapping[Group, Link] | None = None,
    optimizer_bytes: float,
    matmul_efficiency: float = 0.6,
    comm_efficiency: float = 0.8,
    dp_overlap: float = 0.8,
) -> StepTimePrediction:
    """Predict one step (module docstring has the model).

    ``flops_per_micro_batch_stage``: forward+backward model FLOPs of one micro-batch on this rank (its
    stage's layers, already divided by tp); ``links`` defaults to ``communication.links``.
    """
    for name, value in (("matmul_efficiency", matmul_efficiency), ("comm_efficiency", comm_efficiency)):
        if not 0 < value <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
    if not 0 <= dp_overlap <= 1:
        raise ValueError(f"dp_overlap must be in [0, 1], got {dp_overlap}")
    if n_micro < 1:
        raise ValueError(f"n_micro must be >= 1, got {n_micro}")
    links = dict(communication.links if links is None else links)
    assumed: list[str] = []
    peak = device.flops(dtype)
    achieved = peak * matmul_efficiency

    def seconds(n_bytes: float, group: Group) -> float:
        if n_bytes <= 0:
            return 0.0
        return n_bytes / (_link_bandwidth(device, links.get(group, "inter"), assumed) * comm_efficiency)

    # one micro-batch on this rank
    compute = flops_per_micro_batch_stage / achieved
    recompute = recompute_flops_per_micro_batch_stage / achieved
    tp = seconds(communication.tp, "tp") / n_micro
    forward = compute / 3
    backward = 2 * compute / 3 + recompute
    forward_share = forward / (forward + backward) if forward + backward > 0 else 0.5
    forward, backward = forward + tp * forward_share, backward + tp * (1 - forward_share)

    ideal = pipeline_timeline(schedule, n_micro, pp, n_chunks, forward_s=forward, backward_s=backward)
    p2p = seconds(communication.pp_message, "pp")
    timed = pipeline_timeline(schedule, n_micro, pp, n_chunks, forward_s=forward, backward_s=backward, p2p_s=p2p)
    pp_comm = max(0.0, timed.makespan_s - ideal.makespan_s)

    # dp: each reduction hides behind one micro-batch backward, each gather behind one forward
    reduce_window = communication.dp_reduce_calls * backward
    gather_window = communication.dp_gather_calls * forward
    reduce_s, gather_s = seconds(communication.dp_reduce, "dp"), seconds(communication.dp_gather, "dp")
    hidden = min(dp_overlap * reduce_s, reduce_window) + min(dp_overlap * gather_s, gather_window)
    dp_comm = reduce_s + gather_s - hidden

    memory_bw = device.memory_bw
    if memory_bw <= 0:
        memory_bw = _FALLBACK_MEMORY_BW
        assumed.append(f"memory bandwidth {memory_bw / 1e9:g} GB/s")
    optimizer = optimizer_bytes / memory_bw

    parts = {
        "compute_s": n_micro * compute,
        "recompute_s": n_micro * recompute,
        "tp_comm_s": n_micro * tp,
        "dp_comm_s": dp_comm,
        "pp_comm_s": pp_comm,
        "bubble_s": ideal.bubble_s,
        "optimizer_s": optimizer,
    }
    return StepTimePrediction(
        **parts,
        step_s=sum(parts.values()),
        peak_flops=peak,
        bubble_fraction=ideal.bubble_fraction,
        assumed=tuple(dict.fromkeys(assumed)),
    )
