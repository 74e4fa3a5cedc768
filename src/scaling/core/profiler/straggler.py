"""The straggler report: which rank holds the others up, and by how much.

In a synchronous run every rank's *step* time is about the same: the fast ranks wait for the slow one in
the collectives. What differs is the *busy* time, the step minus the time blocked on communication
(:data:`~scaling.core.profiler.step_timer.COMMUNICATION_PHASES`): the slow rank is busy all step, the
others are not. So the report compares busy times: ``lag = slowest busy / median busy - 1``.

Every ``log_interval`` the trainer gathers, in one small all-gather over the world, each rank's mean step
time and mean busy time over the interval and its peak memory. It is a collective, so it runs only on
the steps every rank knows to be log steps (the interval, the first and the last step), never on the
steps logged because of an event.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["IntervalTimes", "RankSample", "StragglerReport", "gather_rank_samples"]


class IntervalTimes:
    """This rank's step and busy seconds since the last report (busy only from the timed steps)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._step_s = self._busy_s = 0.0
        self._steps = self._timed = 0

    def add(self, step_s: float, busy_s: float | None) -> None:
        self._step_s += step_s
        self._steps += 1
        if busy_s is not None:
            self._busy_s += busy_s
            self._timed += 1

    def mean_step_s(self) -> float:
        return self._step_s / self._steps if self._steps else 0.0

    def mean_busy_s(self) -> float:
        """Mean busy seconds of the timed steps; the mean step time when none was timed."""
        return self._busy_s / self._timed if self._timed else self.mean_step_s()


@dataclass(frozen=True)
class RankSample:
    """What one rank reports: its mean step and busy seconds over the interval and its peak bytes."""

    step_s: float
    busy_s: float
    peak_bytes: int


@dataclass(frozen=True)
class StragglerReport:
    """The gathered samples, indexed by global rank, and what they say."""

    samples: list[RankSample]

    @property
    def slowest_rank(self) -> int:
        """The rank with the longest busy time (the lowest rank among equals)."""
        return max(range(len(self.samples)), key=lambda r: (self.samples[r].busy_s, -r))

    @property
    def lag(self) -> float:
        """Slowest busy time over the median busy time, minus 1 (0 for one rank or an idle median)."""
        median = statistics.median(s.busy_s for s in self.samples)
        if median <= 0:
            return 0.0
        return self.samples[self.slowest_rank].busy_s / median - 1.0

    @property
    def peak_rank(self) -> int:
        return max(range(len(self.samples)), key=lambda r: (self.samples[r].peak_bytes, -r))

    def warning(self, threshold: float, min_excess_s: float = 0.01) -> str | None:
        """The line rank 0 logs when the slowest rank lags by more than ``threshold``, else None.

        A lag of less than ``min_excess_s`` per step is not reported whatever its ratio: on steps of a few
        milliseconds (tests, toy models) that much is the OS scheduler, not a slow rank.
        """
        lag = self.lag
        rank = self.slowest_rank
        sample = self.samples[rank]
        median = statistics.median(s.busy_s for s in self.samples)
        if lag <= threshold or sample.busy_s - median < min_excess_s:
            return None
        return (
            f"straggler: rank {rank} is {lag:.0%} slower than the median rank (busy {sample.busy_s:.3f} s/step "
            f"against {median:.3f} s; threshold {threshold:.0%}): the other ranks wait for it"
        )

    def metrics(self, per_rank_limit: int = 16) -> dict[str, float]:
        """``straggler/*`` and ``memory/*`` keys; per-rank peaks only up to ``per_rank_limit`` ranks."""
        peak = self.peak_rank
        out = {
            "straggler/slowest_rank": float(self.slowest_rank),
            "straggler/lag": self.lag,
            "memory/peak_bytes": float(self.samples[peak].peak_bytes),
            "memory/peak_rank": float(peak),
        }
        if len(self.samples) <= per_rank_limit:
            out.update({f"memory/rank_{r}_peak_bytes": float(s.peak_bytes) for r, s in enumerate(self.samples)})
        return out


def gather_rank_samples(sample: RankSample, device: torch.device) -> StragglerReport:
    """Every rank's sample (collective over the default group; one all-gather of three numbers each)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return StragglerReport([sample])
    mine = torch.tensor([sample.step_s, sample.busy_s, float(sample.peak_bytes)], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    rows = torch.stack(gathered).cpu().tolist()
    return StragglerReport([RankSample(step_s=r[0], busy_s=r[1], peak_bytes=int(r[2])) for r in rows])
