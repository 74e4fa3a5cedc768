"""The report's PNG plots: one figure per metric, every run in it, so runs compare on the same axes.

Figures are drawn with matplotlib's object API (``matplotlib.figure.Figure`` on the Agg canvas), never
through ``pyplot``: no display is looked for, no global figure state is left behind, and the command works
on a node without X. A plot that no run has data for (MFU and memory in older runs) is left out rather
than drawn empty. Gaps (non-finite values) stay gaps: they are NaN to matplotlib, which breaks the line.

Events (:func:`scaling.experiment.report.figures.events`) are dotted vertical lines in the run's colour on
every plot, so a loss spike lines up with its gradient norm, and markers on the loss curve, one shape per kind.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg canvas, named: no backend is looked up
from matplotlib.figure import Figure

from scaling.experiment.report.figures import Event, events, memory_keys, throughput_key
from scaling.experiment.report.reading import Run, Series

__all__ = ["PLOT_NAMES", "Plot", "draw_plots"]

_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
_MARKERS = {"skipped": "x", "spike": "^", "rollback": "v", "non-finite": "X", "bad batch skipped": "s"}
_GIB = float(2**30)


@dataclass(frozen=True)
class Line:
    """One curve: a run's series under a label, dashed or not."""

    label: str
    series: Series
    run_index: int
    dashed: bool = False
    scale: float = 1.0


@dataclass(frozen=True)
class Plot:
    """A written plot: ``name`` is the file's stem, ``png`` its bytes (the page embeds them)."""

    name: str
    title: str
    path: Path
    png: bytes


def _loss_lines(runs: Sequence[Run]) -> list[Line]:
    lines = []
    for index, run in enumerate(runs):
        if "loss" in run.series:
            lines.append(Line(f"{run.name} loss", run.series["loss"], index))
        if "eval/loss" in run.series:
            lines.append(Line(f"{run.name} eval loss", run.series["eval/loss"], index, dashed=True))
    return lines


def _lr_lines(runs: Sequence[Run]) -> list[Line]:
    return [
        Line(f"{run.name} {name.removeprefix('lr/')}", series, index)
        for index, run in enumerate(runs)
        for name, series in sorted(run.series.items())
        if name.startswith("lr/")
    ]


def _key_lines(key: str, scale: float = 1.0) -> Callable[[Sequence[Run]], list[Line]]:
    def lines(runs: Sequence[Run]) -> list[Line]:
        return [
            Line(run.name, run.series[key], index, scale=scale) for index, run in enumerate(runs) if key in run.series
        ]

    return lines


def _throughput_lines(key: str) -> Callable[[Sequence[Run]], list[Line]]:
    """The runs whose throughput is counted in ``key``: tokens and samples per second never share an axis."""

    def lines(runs: Sequence[Run]) -> list[Line]:
        return [Line(run.name, run.series[key], index) for index, run in enumerate(runs) if throughput_key(run) == key]

    return lines


def _memory_lines(runs: Sequence[Run]) -> list[Line]:
    return [
        Line(f"{run.name} {name}", run.series[name], index, scale=1 / _GIB)
        for index, run in enumerate(runs)
        for name in memory_keys(run)
    ]


# name (file stem) -> (title, y label, the curves).
_PLOTS: dict[str, tuple[str, str, Callable[[Sequence[Run]], list[Line]]]] = {
    "loss": ("Loss and eval loss", "loss", _loss_lines),
    "learning_rate": ("Learning rate", "learning rate", _lr_lines),
    "grad_norm": ("Gradient norm", "grad norm", _key_lines("grad_norm")),
    "tokens_per_s": ("Tokens per second", "tokens/s", _throughput_lines("tokens_per_s")),
    "samples_per_s": ("Samples per second (no tokens)", "samples/s", _throughput_lines("samples_per_s")),
    "mfu": ("Model FLOPs utilisation", "MFU (% of peak)", _key_lines("mfu", scale=100.0)),  # logged as a fraction
    "memory": ("Memory", "GiB", _memory_lines),
}
PLOT_NAMES = tuple(_PLOTS)
# Plots whose values can span orders of magnitude (a warmup from 1e-6, a norm that blew up): a log axis then.
_LOG_WHEN_WIDE = frozenset({"learning_rate", "grad_norm"})
_WIDE = 50.0  # max / min over which a linear axis flattens the small values into one line


def _xy(series: Series, scale: float) -> tuple[list[int], list[float]]:
    return series.steps, [float("nan") if v is None else v * scale for v in series.values]


def _value_at(series: Series, step: int) -> float | None:
    """The series' value at ``step`` (the last one logged there), for placing an event's marker on the curve."""
    found = None
    for at, value in zip(series.steps, series.values, strict=True):
        if at == step and value is not None:
            found = value
    return found


def _mark_events(
    axes: Axes, runs: Sequence[Run], run_events: Sequence[list[Event]], shown: set[int], on_loss: bool
) -> None:
    """Mark the events of the runs ``shown`` (by index) in this plot; a run not in it gets no lines either."""
    labelled: set[str] = set()
    for index, (run, found) in enumerate(zip(runs, run_events, strict=True)):
        if index not in shown:
            continue
        colour = _COLOURS[index % len(_COLOURS)]
        for event in found:
            axes.axvline(event.step, color=colour, linestyle=":", linewidth=1, alpha=0.7)
            if not on_loss or "loss" not in run.series:
                continue
            y = _value_at(run.series["loss"], event.step)
            if y is None:
                continue
            label = event.kind if event.kind not in labelled else None
            labelled.add(event.kind)
            axes.scatter([event.step], [y], marker=_MARKERS.get(event.kind, "o"), s=60, color="black",
                         zorder=5, label=label)  # fmt: skip


def _draw(name: str, runs: Sequence[Run], run_events: Sequence[list[Event]]) -> tuple[str, bytes] | None:
    title, ylabel, pick = _PLOTS[name]
    lines = [line for line in pick(runs) if line.series.finite()]
    if not lines:
        return None
    figure = Figure(figsize=(7.0, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for line in lines:
        steps, values = _xy(line.series, line.scale)
        few = len(steps) <= 40  # sparse curves (eval loss, short runs) show their points
        axes.plot(steps, values, label=line.label, color=_COLOURS[line.run_index % len(_COLOURS)],
                  linestyle="--" if line.dashed else "-", marker="o" if few or line.dashed else None,
                  markersize=3, linewidth=1.5)  # fmt: skip
    _mark_events(axes, runs, run_events, {line.run_index for line in lines}, on_loss=name == "loss")
    values = [v * line.scale for line in lines for v in line.series.finite()]
    if name in _LOG_WHEN_WIDE and min(values) > 0 and max(values) / min(values) > _WIDE:
        axes.set_yscale("log")
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return title, buffer.getvalue()


def draw_plots(runs: Sequence[Run], out_dir: Path) -> list[Plot]:
    """Draw every plot some run has data for into ``out_dir/NAME.png``; returns them in the page's order.

    A plot of a previous report in ``out_dir`` that has no data now is removed, so the folder matches the page.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    run_events = [events(run) for run in runs]
    plots = []
    for name in PLOT_NAMES:
        path = out_dir / f"{name}.png"
        drawn = _draw(name, runs, run_events)
        if drawn is None:
            path.unlink(missing_ok=True)
            continue
        title, png = drawn
        path.write_bytes(png)
        plots.append(Plot(name, title, path, png))
    return plots
