"""Per-rank memory: the estimate the start-up line prints (a pure function of the parameter table,
ZeRO stage, precision and layout) and the CPU measurement that keeps it honest."""

from scaling.core.zero.memory.estimate import (
    MemoryEstimate,
    ParamSize,
    estimate_memory,
    format_memory_line,
    human_bytes,
    param_sizes,
)
from scaling.core.zero.memory.measure import MemoryMeasurement, live_tensor_bytes, measure_peak

__all__ = [
    "MemoryEstimate",
    "MemoryMeasurement",
    "ParamSize",
    "estimate_memory",
    "format_memory_line",
    "human_bytes",
    "live_tensor_bytes",
    "measure_peak",
    "param_sizes",
]
