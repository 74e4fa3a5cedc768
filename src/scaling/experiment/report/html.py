"""The report page: one HTML file that needs nothing beside it.

Runs stand side by side as the columns of three tables (the runs, their final figures, their parameters),
and the plots follow with every run on the same axes. Images are embedded as ``data:image/png;base64`` and
the style sheet is inline, so the page can be mailed, attached to an issue or opened from a CI artifact
offline: it references no file, script or URL. Everything taken from a run (names, paths, parameter values)
is HTML-escaped, since a parameter may hold any string.

The parameters table lists first the rows in which the runs differ (highlighted), then, folded away, the
rows they share: a ``scaling train`` config has hundreds of fields, of which a comparison needs a few.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from datetime import datetime
from html import escape

from scaling.experiment.report.figures import FinalFigures, final_figures
from scaling.experiment.report.plots import Plot
from scaling.experiment.report.reading import Run

__all__ = ["render_page"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.differs td { background: #fff6d5; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #a15c00; }
"""

_MISSING = "—"


def _number(value: float | int | None, form: str = "{:.4f}") -> str:
    return _MISSING if value is None else form.format(value)


def _percent(value: float | None) -> str:
    return _MISSING if value is None else f"{value * 100:.1f} %"  # the trainer logs MFU as a fraction


def _gib(value: float | None) -> str:
    return _MISSING if value is None else f"{value / 2**30:.2f} GiB"


# Row label -> how a run's final figures show in it.
_FIGURE_ROWS: list[tuple[str, Callable[[FinalFigures], str]]] = [
    ("status", lambda f: f.status or _MISSING),
    ("steps", lambda f: _number(f.steps, "{:d}")),
    ("last loss", lambda f: _number(f.last_loss)),
    ("last eval loss", lambda f: _number(f.last_eval_loss)),
    ("best eval loss", lambda f: _number(f.best_eval_loss)),
    ("mean tokens/s", lambda f: _number(f.mean_tokens_per_s, "{:,.0f}")),
    ("mean MFU", lambda f: _percent(f.mean_mfu)),
    ("peak memory", lambda f: _gib(f.peak_memory_bytes)),
    ("skipped steps", lambda f: _number(f.skipped_steps, "{:d}")),
]


def _header(runs: Sequence[Run], first: str) -> str:
    cells = "".join(f"<th>{escape(run.name)}</th>" for run in runs)
    return f"<tr><th>{escape(first)}</th>{cells}</tr>"


def _row(label: str, cells: Sequence[str], *, numeric: bool = False, css: str = "") -> str:
    kind = ' class="num"' if numeric else ""
    row_class = f' class="{css}"' if css else ""
    body = "".join(f"<td{kind}>{escape(cell)}</td>" for cell in cells)
    return f"<tr{row_class}><th>{escape(label)}</th>{body}</tr>"


def _runs_table(runs: Sequence[Run]) -> str:
    def field(run: Run, key: str) -> str:
        value = run.record.get(key) if run.record is not None else None
        return _MISSING if value is None else str(value)

    rows = [
        _row("folder", [str(run.path) for run in runs]),
        _row("kind", [run.kind for run in runs]),
        _row("experiment", [field(run, "experiment") for run in runs]),
        _row("seed", [field(run, "seed") for run in runs]),
        _row("started", [field(run, "started") for run in runs]),
        _row("ended", [field(run, "ended") for run in runs]),
        _row("attempts", [field(run, "attempts") for run in runs]),
    ]
    return f"<table>{_header(runs, 'run')}{''.join(rows)}</table>"


def _figures_table(runs: Sequence[Run]) -> str:
    figures = [final_figures(run) for run in runs]
    rows = [_row(label, [show(f) for f in figures], numeric=label != "status") for label, show in _FIGURE_ROWS]
    return f'<table id="final-figures">{_header(runs, "final figures")}{"".join(rows)}</table>'


def _value(value: object) -> str:
    if value is None:
        return _MISSING
    return str(value).lower() if isinstance(value, bool) else str(value)  # true/false, as JSON and YAML write them


def _params_table(runs: Sequence[Run]) -> str:
    keys = list(dict.fromkeys(key for run in runs for key in run.params))  # as the runs list them, first run first
    if not keys:
        return "<p>No run has recorded parameters (for a <code>scaling train</code> run, keep its config as " \
               "<code>config.yml</code> beside <code>metrics.jsonl</code>).</p>"  # fmt: skip
    differ: list[tuple[str, list[str]]] = []
    same: list[tuple[str, list[str]]] = []
    for key in keys:
        cells = [_value(run.params[key]) if key in run.params else _MISSING for run in runs]
        (differ if len(set(cells)) > 1 else same).append((key, cells))
    header = _header(runs, "parameter")
    parts = []
    if differ or len(runs) == 1:
        shown = differ if len(runs) > 1 else same
        rows = "".join(_row(key, cells, css="differs" if len(runs) > 1 else "") for key, cells in shown)
        parts.append(f'<table id="parameters">{header}{rows}</table>')
    if same and len(runs) > 1:
        rows = "".join(_row(key, cells) for key, cells in same)
        what = f"{len(same)} parameters the same in every run"
        parts.append(f"<details><summary>{what}</summary><table>{header}{rows}</table></details>")
    return "".join(parts)


def _notes(runs: Sequence[Run]) -> str:
    notes = [
        f"<p class=note>{escape(run.name)}: {run.unreadable_lines} line(s) of metrics.jsonl left out (not complete "
        "or not JSON: a run still writing leaves its last line so).</p>"
        for run in runs
        if run.unreadable_lines
    ]
    return "".join(notes)


def _figure(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(plot.title)}">'
        f"<figcaption>{escape(plot.title)} ({escape(plot.path.name)})</figcaption></figure>"
    )


def render_page(runs: Sequence[Run], plots: Sequence[Plot], title: str = "scaling report") -> str:
    """The whole page as a string (see the module docstring)."""
    when = datetime.now().astimezone().isoformat(timespec="seconds")
    names = ", ".join(run.name for run in runs)
    plots_html = "".join(_figure(plot) for plot in plots) or "<p>No run has logged a metric to plot yet.</p>"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}: {escape(names)}</title>'
        f"<style>{_STYLE}</style></head><body>\n"
        f"<h1>{escape(title)}</h1><p>{len(runs)} run(s), read {escape(when)}.</p>\n"
        f"{_notes(runs)}"
        f"<h2>Runs</h2>{_runs_table(runs)}\n"
        f"<h2>Final figures</h2>{_figures_table(runs)}\n"
        f"<h2>Parameters</h2>{_params_table(runs)}\n"
        f'<h2>Plots</h2><div class="plots">{plots_html}</div>\n'
        "</body></html>\n"
    )
