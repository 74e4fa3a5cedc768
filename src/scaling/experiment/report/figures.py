"""What a run's metrics add up to: the final figures of the report's table and the events to mark on plots.

Pure functions of :class:`~scaling.experiment.report.reading.Run`, no plotting, so the numbers the page
shows are tested without matplotlib.

Events come from two places in a trainer's records: ``skipped`` is 1 on a logged step whose update was
dropped, and the ``events/*`` keys of ``scaling.core.trainer.spikes`` are running totals of this process,
so an event happened wherever one of them grew since the previous record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scaling.experiment.report.reading import Run, Series

__all__ = ["EVENT_KEYS", "Event", "FinalFigures", "events", "final_figures", "memory_keys", "throughput_key"]

# Running totals (scaling.core.trainer.spikes.SpikeGuard.metrics) -> the word the plot's legend uses.
EVENT_KEYS = {
    "events/skipped": "skipped",
    "events/spikes": "spike",
    "events/rolled_back": "rollback",
    "events/non_finite": "non-finite",
    "events/ledger_skipped": "bad batch skipped",
}
THROUGHPUT_KEYS = ("tokens_per_s", "samples_per_s")  # samples/s where a model has no tokens (the MLP example)


@dataclass(frozen=True)
class Event:
    """Something that happened at ``step`` of a run: ``kind`` is a value of :data:`EVENT_KEYS`."""

    step: int
    kind: str


@dataclass(frozen=True)
class FinalFigures:
    """One column of the report's table; ``None`` where the run logged nothing to compute it from."""

    last_loss: float | None
    last_eval_loss: float | None
    best_eval_loss: float | None
    steps: int | None
    mean_tokens_per_s: float | None
    mean_mfu: float | None
    peak_memory_bytes: float | None
    skipped_steps: int | None
    status: str | None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def memory_keys(run: Run) -> list[str]:
    """The run's memory metrics in bytes: ``peak_memory_bytes`` and the ``memory/*`` keys ending in ``bytes``.

    Per-rank keys (``memory/rank_3_peak_bytes``) are shown only when the run logged no total over the ranks,
    so a run of many ranks plots a few curves, not one per rank. Other ``memory/*`` keys (``memory/peak_rank``,
    which rank it was) are no amounts of memory.
    """
    names = [name for name in run.series if name == "peak_memory_bytes" or name.startswith("memory/")]
    amounts = sorted(name for name in names if name.endswith("bytes") and run.series[name].finite())
    totals = [name for name in amounts if "rank_" not in name]
    return totals or amounts


def throughput_key(run: Run) -> str | None:
    """``tokens_per_s`` when the run counted tokens, else ``samples_per_s``; a series of zeros counts nothing."""
    for name in THROUGHPUT_KEYS:
        series = run.series.get(name)
        if series is not None and any(value > 0 for value in series.finite()):
            return name
    return None


def _grew(series: Series) -> list[int]:
    """The steps at which a running total is larger than at the record before it (the first counts from 0)."""
    steps, previous = [], 0.0
    for step, value in zip(series.steps, series.values, strict=True):
        if value is None:
            continue
        if value > previous:
            steps.append(step)
        previous = value  # a restarted process counts from 0 again: no event, but the next rise is one
    return steps


def events(run: Run) -> list[Event]:
    """Every event of the run, by step; a step is marked once per kind."""
    found: set[Event] = set()
    skipped = run.series.get("skipped")
    if skipped is not None:
        steps = zip(skipped.steps, skipped.values, strict=True)
        found.update(Event(step, "skipped") for step, value in steps if value is not None and value >= 1)
    for key, kind in EVENT_KEYS.items():
        if key in run.series:
            found.update(Event(step, kind) for step in _grew(run.series[key]))
    return sorted(found, key=lambda event: (event.step, event.kind))


def _last(run: Run, name: str) -> float | None:
    series = run.series.get(name)
    return series.last() if series is not None else None


def _skipped_steps(run: Run) -> int | None:
    """The trainer's own count when it logged one (it sees steps between logged records), else marked records."""
    total = _last(run, "skipped_steps")
    if total is not None:
        return int(total)
    skipped = run.series.get("skipped")
    return sum(1 for value in skipped.finite() if value >= 1) if skipped is not None else None


def final_figures(run: Run) -> FinalFigures:
    """The table's figures of ``run``, from its metrics as read now (a run still writing shows so far)."""
    eval_losses = run.series["eval/loss"].finite() if "eval/loss" in run.series else []
    all_steps = [step for series in run.series.values() for step in series.steps]
    throughput = throughput_key(run)
    peaks = [max(run.series[name].finite()) for name in memory_keys(run)]
    return FinalFigures(
        last_loss=_last(run, "loss"),
        last_eval_loss=eval_losses[-1] if eval_losses else None,
        best_eval_loss=min(eval_losses) if eval_losses else None,
        steps=max(all_steps) if all_steps else None,
        mean_tokens_per_s=_mean(run.series["tokens_per_s"].finite()) if throughput == "tokens_per_s" else None,
        mean_mfu=_mean(run.series["mfu"].finite()) if "mfu" in run.series else None,
        peak_memory_bytes=max(peaks) if peaks else None,
        skipped_steps=_skipped_steps(run),
        status=run.status,
    )
