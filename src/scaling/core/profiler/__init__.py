"""What a step costs and who is slow: the time split of a step, peak memory, FLOP/s and MFU, stragglers.

Everything here measures; nothing predicts (that is :mod:`scaling.core.planner`). The trainer measures
only on the steps it logs, so the hot path of every other step stays free of host-device syncs.
"""

from scaling.core.profiler.memory import peak_memory_bytes, reset_peak_memory
from scaling.core.profiler.step_timer import COMMUNICATION_PHASES, PHASES, StepTimer
from scaling.core.profiler.straggler import IntervalTimes, RankSample, StragglerReport, gather_rank_samples
from scaling.core.profiler.throughput import TokenFlops, peak_flops_for, throughput_metrics

__all__ = [
    "COMMUNICATION_PHASES",
    "PHASES",
    "IntervalTimes",
    "RankSample",
    "StepTimer",
    "StragglerReport",
    "TokenFlops",
    "gather_rank_samples",
    "peak_flops_for",
    "peak_memory_bytes",
    "reset_peak_memory",
    "throughput_metrics",
]
