"""FLOP/s per device, MFU and HFU from tokens/s, the model's FLOPs per token and the device's peak.

The engine does not know the model's shape, so the FLOPs per token come from outside as two numbers
(:class:`TokenFlops`; the transformer suite computes them in ``scaling.transformer.flops``):

- *model* FLOPs: forward + backward of the model, the same whatever the layout or recomputation; MFU
  (model FLOPs utilisation, PaLM's definition) = model FLOP/s per device / peak FLOP/s per device;
- *hardware* FLOPs: model FLOPs plus the forwards activation checkpointing runs again; HFU = hardware
  FLOP/s per device / peak.

The peak is the device table's dense figure for the compute dtype (``trainer.mfu_device``), or what a
matmul measured on this machine reaches (``measured``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scaling.core.logging import get_logger

__all__ = ["TokenFlops", "peak_flops_for", "throughput_metrics"]

_logger = get_logger("scaling.profiler")


@dataclass(frozen=True)
class TokenFlops:
    """FLOPs per trained token: ``model`` (forward + backward) and ``hardware`` (with recomputation)."""

    model: float
    hardware: float


def peak_flops_for(mfu_device: str, device: torch.device, dtype: torch.dtype) -> tuple[float, str] | None:
    """Peak FLOP/s of one device for ``dtype`` and the spec's name, or None where there is no peak.

    ``"auto"``: the table's entry for the local GPU (None on CPUs and unknown GPUs, so a CPU test run does
    not time a matmul); ``"measured"``: a short matmul on ``device`` in ``dtype``; any other value: a table
    name (checked when the config loads).
    """
    from scaling.core.planner.devices import device_spec, measure_local_device, spec_for_local_device

    if mfu_device == "auto":
        spec = spec_for_local_device(device)
    elif mfu_device == "measured":
        spec = measure_local_device(device, (dtype,), seconds=0.2)
    else:
        spec = device_spec(mfu_device)
    if spec is None:
        return None
    try:
        return spec.flops(dtype), spec.name
    except KeyError as exc:
        _logger.warning("no MFU: %s", exc.args[0])
        return None


def throughput_metrics(
    flops: TokenFlops, tokens_per_s: float, n_devices: int, peak_flops: float | None
) -> dict[str, float]:
    """The FLOP/s keys of a step's record; ``tokens_per_s`` over the whole run, ``n_devices`` all ranks."""
    model_per_device = flops.model * tokens_per_s / n_devices
    hardware_per_device = flops.hardware * tokens_per_s / n_devices
    record = {
        "model_flops_per_token": flops.model,
        "hardware_flops_per_token": flops.hardware,
        "tflops_per_device": model_per_device / 1e12,
        "hardware_tflops_per_device": hardware_per_device / 1e12,
    }
    if peak_flops is not None and peak_flops > 0:
        record["mfu"] = model_per_device / peak_flops
        record["hfu"] = hardware_per_device / peak_flops
    return record
