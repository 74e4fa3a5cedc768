"""``scaling report`` on real runs: PNG plots and one HTML page that needs nothing beside it.

The module makes its runs once, concurrently: two ``scaling run``s of a small experiment (pure Python, one
process each) with learning rates 0.2 and 0.05 that log a skipped step, a spike and a non-finite gradient
norm (the first also logs MFU and peak memory, the second, like an older run, neither), and a
``scaling train``-style run of the MLP example (30 steps, its config kept as ``config.yml`` beside
``metrics.jsonl``, as a user would). A fourth run is the first one's folder as it is while still running:
its record says "running" and its ``metrics.jsonl`` ends half-way through a line.

Where a failure points:

* a run not found, or the wrong name or parameters: ``report/reading.py`` (``find_metrics``, ``read_run``);
* a wrong number in the final figures, or a missing mark: ``report/figures.py``;
* a PNG missing, or drawn for a metric no run has: ``report/plots.py``;
* an external reference or an image not embedded: ``report/html.py``;
* an exit code or message: ``report/command.py``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from scaling.cli.main import main
from scaling.core.logging import MetricsLogger
from scaling.core.logging.config import LoggerConfig
from scaling.experiment.report.command import MISSING_MATPLOTLIB, files_dir
from scaling.experiment.report.figures import Event, events, final_figures
from scaling.experiment.report.reading import read_metrics, read_run

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
MLP_CONFIG = REPO / "examples" / "mlp_example" / "config.yml"

EXPERIMENTS = '''
import math
import time

from scaling.experiment import experiment, param
from scaling.experiment.metrics import log_metrics


@experiment("fit", seed=0)
@param("lr", default=0.1, description="step size")
@param("steps", default=12, description="optimizer steps")
@param("device_metrics", default=False, description="log MFU and peak memory, as a newer trainer does")
def fit(params):
    """Least squares on ten points by gradient descent; step 6 is skipped (a spike), step 8's norm is NaN."""
    w = b = 0.0
    data = [(x / 10, 3 * x / 10 + 1) for x in range(10)]
    spikes = 0
    for step in range(1, params.steps + 1):
        start = time.perf_counter()
        gw = sum(2 * (w * x + b - y) * x for x, y in data) / len(data)
        gb = sum(2 * (w * x + b - y) for x, y in data) / len(data)
        skipped = step == 6
        spikes += skipped
        if not skipped:
            w, b = w - params.lr * gw, b - params.lr * gb
        loss = sum((w * x + b - y) ** 2 for x, y in data) / len(data)
        seconds = time.perf_counter() - start
        norm = float("nan") if step == 8 else math.hypot(gw, gb)
        log_metrics(step, loss=loss, grad_norm=norm, tokens_per_s=len(data) / seconds, skipped=int(skipped),
                    **{"lr/all": params.lr, "events/spikes": spikes})
        if params.device_metrics:
            log_metrics(step, mfu=0.25 + 0.01 * step, peak_memory_bytes=2**30 + step * 2**20)
        if step % 4 == 0:
            log_metrics(step, **{"eval/loss": loss * 1.1})
    return loss
'''


def _popen(command: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _mlp_run(log_dir: Path) -> subprocess.Popen[str]:
    """The MLP example for 30 steps into ``log_dir``, its config kept beside the metrics."""
    overrides = ["trainer.train_iterations=30", "trainer.eval_interval=10", f"logger.log_dir={log_dir}"]
    log_dir.mkdir(parents=True)
    config = yaml.safe_load(MLP_CONFIG.read_text())
    config["trainer"].update(train_iterations=30, eval_interval=10)
    (log_dir / "config.yml").write_text(yaml.safe_dump(config))
    options = [part for override in overrides for part in ("-o", override)]
    return _popen([sys.executable, "-m", "examples.mlp_example.run", str(MLP_CONFIG), *options], REPO)


def _experiment_run(project: Path, name: str, *params: str) -> subprocess.Popen[str]:
    """``scaling run fit --run-name NAME --param ...`` in ``project`` (written on first use)."""
    if not (project / "scaling.yml").exists():
        (project / "src").mkdir(parents=True)
        (project / "scaling.yml").write_text("name: reports\nexperiments:\n  - src/experiments.py\n")
        (project / "src" / "experiments.py").write_text(EXPERIMENTS)
    options = [part for param in params for part in ("--param", param)]
    command = [sys.executable, "-m", "scaling.cli.main", "run", "fit", "--nproc", "1", "--run-name", name, *options]
    return _popen(command, project / "src")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> run folder: "fit-lr0.2", "fit-lr0.05" (experiment runs), "mlp" (a train log dir), "live"."""
    root = tmp_path_factory.mktemp("report-runs")
    experiments = root / "project" / "runs" / "fit"
    folders = {"fit-lr0.2": experiments / "fit-lr0.2", "fit-lr0.05": experiments / "fit-lr0.05", "mlp": root / "mlp"}
    processes = [
        _experiment_run(root / "project", "fit-lr0.2", "lr=0.2", "device_metrics=true"),
        _experiment_run(root / "project", "fit-lr0.05", "lr=0.05"),
        _mlp_run(folders["mlp"]),
    ]
    for process in processes:
        out, _ = process.communicate(timeout=240)
        assert process.returncode == 0, out[-3000:]
    # The first run's folder while it was still running: the record as begin_attempt wrote it, half a line last.
    live = experiments / "live"
    shutil.copytree(folders["fit-lr0.2"], live)
    record = json.loads((live / "record.json").read_text())
    (live / "record.json").write_text(json.dumps({**record, "run_name": "live", "status": "running", "ended": None}))
    lines = (live / "metrics.jsonl").read_text().splitlines(keepends=True)
    (live / "metrics.jsonl").write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    folders["live"] = live
    return folders


class _References(HTMLParser):
    """Every tag with its attributes, to check what the page points at."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _References()
    parser.feed(page)
    return parser.tags


def test_report_of_real_runs_is_plots_and_one_self_contained_page(runs: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "out" / "report.html"
    # The console script, with a display backend asked for that is not there: the report must not look for one.
    env = {**ENV, "MPLBACKEND": "TkAgg", "DISPLAY": ":99"}
    command = [str(Path(sys.executable).with_name("scaling")), "report", *map(str, runs.values()), "-o", str(output)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr

    pngs = {path.stem: path.read_bytes() for path in sorted(files_dir(output).glob("*.png"))}
    assert set(pngs) == {"loss", "learning_rate", "grad_norm", "tokens_per_s", "samples_per_s", "mfu", "memory"}
    assert all(data.startswith(PNG_MAGIC) and len(data) > 1000 for data in pngs.values())

    page = output.read_text(encoding="utf-8")
    tags = _tags(page)
    images = [attrs["src"] or "" for tag, attrs in tags if tag == "img"]
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    embedded = {base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in images}
    assert embedded == set(pngs.values())  # the page shows exactly the files written beside it
    assert not [tag for tag, _ in tags if tag in ("script", "link", "iframe", "object", "embed", "base")]
    pointing = [attrs for _, attrs in tags if "href" in attrs or "src" in attrs]
    assert all("href" not in attrs and (attrs["src"] or "").startswith("data:") for attrs in pointing)
    assert "url(" not in page and "http" not in page and "@import" not in page

    for name in runs:
        assert f"<th>{name}</th>" in page  # a column per run in every table
    # Parameters: the experiments' params.json (the learning rates differ), the config kept beside the MLP run.
    assert '<tr class="differs"><th>lr</th><td>0.2</td><td>0.05</td><td>—</td><td>0.2</td></tr>' in page
    assert "<th>optimizer.training_groups.0.learning_rate_schedule.learning_rate</th><td>—</td><td>—</td>" in page
    assert 'id="final-figures"' in page
    assert "<th>status</th><td>completed</td><td>completed</td><td>—</td><td>running</td>" in page
    assert "live: 1 line(s) of metrics.jsonl left out" in page


def test_final_figures_and_marks_come_from_the_metrics(runs: dict[str, Path]) -> None:
    fit = read_run(runs["fit-lr0.2"])
    assert (fit.name, fit.kind) == ("fit-lr0.2", "experiment")
    assert fit.params == {"lr": 0.2, "steps": 12, "device_metrics": True}
    figures = final_figures(fit)
    assert figures.steps == 12 and figures.status == "completed" and figures.skipped_steps == 1
    assert figures.last_loss == fit.series["loss"].values[-1]
    assert figures.best_eval_loss == min(fit.series["eval/loss"].finite()) and figures.last_eval_loss is not None
    assert figures.mean_tokens_per_s is not None and figures.mean_tokens_per_s > 0
    assert figures.mean_mfu == pytest.approx(0.25 + 0.01 * 6.5)
    assert figures.peak_memory_bytes == 2**30 + 12 * 2**20
    assert events(fit) == [Event(6, "skipped"), Event(6, "spike")]
    assert fit.series["grad_norm"].values[7] is None  # the NaN that log_metrics wrote as "nan": a gap
    older = final_figures(read_run(runs["fit-lr0.05"]))
    assert older.mean_mfu is None and older.peak_memory_bytes is None

    live = read_run(runs["live"])
    assert live.unreadable_lines == 1 and live.status == "running"
    assert final_figures(live).steps == 12  # step 12's eval record was cut; its train record is whole

    mlp = read_run(runs["mlp"])
    assert mlp.kind == "train" and mlp.params["trainer.train_iterations"] == 30
    figures = final_figures(mlp)
    assert figures.steps == 30 and figures.status is None and figures.skipped_steps == 0
    assert figures.mean_tokens_per_s is None  # the MLP counts samples, not tokens: no table figure of zeros
    assert mlp.series["eval/loss"].steps == [10, 20, 30] and figures.last_eval_loss is not None


def test_plots_without_data_are_left_out(runs: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "older.html"
    stale = files_dir(output) / "mfu.png"  # from an earlier report of other runs into the same place
    stale.parent.mkdir()
    stale.write_bytes(PNG_MAGIC)
    assert main(["report", str(runs["fit-lr0.05"]), "-o", str(output)]) == 0
    assert sorted(p.stem for p in files_dir(output).iterdir()) == ["grad_norm", "learning_rate", "loss", "tokens_per_s"]
    page = output.read_text()
    assert "Model FLOPs" not in page and "Memory" not in page and "Samples" not in page and page.count("<img ") == 4


def test_null_values_are_gaps_and_half_written_lines_are_left_out(tmp_path: Path) -> None:
    """The trainer's logger writes NaN as null; a line still being written, or a crash's torn line, is skipped."""
    with MetricsLogger(LoggerConfig(log_dir=tmp_path)) as logger:
        logger.log(1, {"loss": 2.0, "grad_norm": 1.0})
        logger.log(2, {"loss": float("nan"), "grad_norm": 3.0})
    path = tmp_path / "metrics.jsonl"
    assert '"loss": null' in path.read_text()
    with path.open("a") as handle:
        handle.write('{"step": 3, "loss": 1.5, "gr{"step": 3, "loss": 1.5}\n{"step": 4, "loss": 1.')
    series, unreadable = read_metrics(path)
    assert series["loss"].steps == [1, 2] and series["loss"].values == [2.0, None]
    assert series["grad_norm"].values == [1.0, 3.0] and unreadable == 2
    assert "non_finite" not in series


def test_a_run_one_level_down_is_found_and_several_are_named(runs: dict[str, Path], tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    shutil.copytree(runs["mlp"], outer / "log")
    assert read_run(outer).path == outer / "log"
    shutil.copytree(runs["mlp"], outer / "other")
    with pytest.raises(ValueError, match="2 runs below it; pass them"):
        read_run(outer)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "missing: no such run directory"),
        ("empty", "empty: no metrics.jsonl (in it or one level down)"),
        ("under-a-file", "cannot write"),
        ("output-is-a-folder", "is a directory"),
    ],
)
def test_bad_input_is_one_line_naming_the_path_and_exit_2(
    case: str, expected: str, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("")
    run, output = runs["mlp"], tmp_path / "report.html"
    if case in ("missing", "empty"):
        run = tmp_path / case
    elif case == "under-a-file":
        output = tmp_path / "a-file" / "report.html"
    else:
        output = tmp_path
    assert main(["report", str(run), "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and err.startswith("scaling report: "), err
    assert (str(run) if case in ("missing", "empty") else str(output)) in err


def test_without_matplotlib_one_line_says_what_to_install(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert main(["report", str(runs["fit-lr0.2"]), "-o", str(tmp_path / "r.html")]) == 2
    assert capsys.readouterr().err == MISSING_MATPLOTLIB + "\n"
    assert not (tmp_path / "r.html").exists()


def test_help_says_what_a_run_dir_is_and_where_the_pngs_go(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["report", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: scaling report" in out and "metrics.jsonl" in out and "STEM_files/" in out
    assert "pip install 'scaling[report]'" in out
