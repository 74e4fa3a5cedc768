"""Peak memory of this rank: what the allocator handed out on CUDA, the process's peak RSS on CPU.

On CUDA the peak is reset after every log, so each logged value is the peak of its interval. A
process's peak RSS cannot be reset, so on CPU the value is the peak since the process started (it also
holds the interpreter and libraries: a few hundred MB that a GPU figure does not have).
"""

from __future__ import annotations

import resource
import sys

import torch

__all__ = ["peak_memory_bytes", "reset_peak_memory"]


def peak_memory_bytes(device: torch.device) -> int:
    """Bytes at this rank's peak: ``torch.cuda.max_memory_allocated`` on CUDA, else the peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak (CUDA only; the peak RSS of a process only grows)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
