"""Device and backend choice: the topology decides, model code never names ``cuda``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["DeviceChoice", "choose_device", "choose_device_for_this_process", "local_rank_from_env"]


@dataclass(frozen=True, slots=True)
class DeviceChoice:
    device: str  # "cpu" or "cuda:N"
    backend: Literal["gloo", "nccl"]


def choose_device(
    requested: Literal["auto", "cpu", "cuda"], *, cuda_available: bool, cuda_count: int, local_rank: int
) -> DeviceChoice:
    """CUDA + NCCL when available and requested (``auto`` or ``cuda``), otherwise CPU + gloo.

    ``local_rank`` (from ``LOCAL_RANK``) picks the GPU so each process on a node owns one.
    """
    if requested == "cpu" or (requested == "auto" and not cuda_available):
        return DeviceChoice("cpu", "gloo")
    if not cuda_available or cuda_count == 0:
        raise RuntimeError("topology.device is 'cuda' but no CUDA device is available")
    if local_rank >= cuda_count:
        raise RuntimeError(f"LOCAL_RANK {local_rank} has no GPU: only {cuda_count} visible on this node")
    return DeviceChoice(f"cuda:{local_rank}", "nccl")


def local_rank_from_env() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def choose_device_for_this_process(requested: Literal["auto", "cpu", "cuda"]) -> DeviceChoice:
    available = torch.cuda.is_available()
    return choose_device(
        requested,
        cuda_available=available,
        cuda_count=torch.cuda.device_count() if available else 0,
        local_rank=local_rank_from_env(),
    )
