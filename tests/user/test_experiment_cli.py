"""Project commands end to end: ``scaling init``, ``experiments list``, ``run`` (records, resume), ``show-deploy-key``.

One scaffolded project (a git repository) is shared by the module: ``scaling init`` writes it and
``scaling run tiny`` trains it once on 2 local CPU processes (torchrun, ZeRO 3, offline); the other tests
read that run or copy it. Commands that start no processes are called in this process (``scaling.cli.main``)
to keep the module fast; those that launch run as subprocesses with timeouts.

Where a failure points:

* scaffold files, pins, refusal of a non-empty folder: ``scaffold.py`` and ``templates/``;
* a bad ``scaling.yml`` value: ``project.py`` (``ProjectConfig``, ``load_project_config``);
* the table, ``--help``: ``list_command.py``, ``describe.py``, ``run_command.experiment_help``;
* a bad ``--param`` that still created something: ``run_command.prepare_run`` runs after a write;
* record fields: ``records.begin_attempt``/``end_attempt``, ``provenance.py``; logs: ``rank_output.py``
  (every rank writes its own, rank 0 also the console) and ``worker.py``;
* resume starting from step 0: ``records.last_checkpoint`` or the worker's ``RunContext``;
* a signal not ending as ``preempted``: ``run_command._supervise``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from scaling.cli.main import main
from scaling.experiment import run_command
from scaling.experiment.project import ProjectConfig
from scaling.experiment.scaffold import BASE_IMAGE, init_project

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _scaling(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scaling.cli.main", *args],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def _git(root: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def _record(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / "record.json").read_text()))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("projects") / "demo"
    done = _scaling("init", str(root), cwd=root.parent)
    assert done.returncode == 0, done.stderr
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "scaffold")
    return root


@pytest.fixture(scope="module")
def first_run(project: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """``scaling run tiny`` on 2 processes, 4 steps, a checkpoint every 2: runs/tiny/first."""
    done = _scaling("run", "tiny", "--nproc", "2", "--run-name", "first", "--param", "steps=4", cwd=project / "src")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return project / "runs" / "tiny" / "first", done


# scaling init -----------------------------------------------------------------------------------------------


def test_init_writes_a_project_pinned_to_this_environment(project: Path) -> None:
    for name in ["scaling.yml", "src/experiments.py", "data/sample.json", "requirements.txt", "Dockerfile"]:
        assert (project / name).is_file(), name
    config = ProjectConfig.from_yaml(project / "scaling.yml")
    assert config.name == "demo" and config.experiments == ["src/experiments.py"] and config.hosts == ["localhost"]
    requirements = (project / "requirements.txt").read_text().split()
    assert f"scaling=={version('scaling')}" in requirements
    assert f"torch=={version('torch').split('+')[0]}" in requirements
    assert (project / "Dockerfile").read_text().splitlines()[2] == f"FROM {BASE_IMAGE}"
    assert ":" in BASE_IMAGE and "latest" not in BASE_IMAGE
    assert {"runs/", ".scaling/", "__pycache__/"} <= set((project / ".gitignore").read_text().splitlines())
    assert "scaling run tiny" in (project / "README.md").read_text()
    assert len(json.loads((project / "data" / "sample.json").read_text())) == 50


def test_init_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    done = _scaling("init", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "is not empty" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_bad_scaling_yml_value_is_one_line_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init_project(tmp_path / "p")
    config = tmp_path / "p" / "scaling.yml"
    config.write_text(config.read_text().replace("port: 22", "port: twenty-two"))
    assert main(["experiments", "list", "--project", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scaling.yml: port:" in err and "twenty-two" in err, err


# experiments list, run --help, bad params ---------------------------------------------------------------------


def test_experiments_list_shows_parameters_types_defaults_and_source(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["experiments", "list", "--project", str(project)]) == 0
    out = capsys.readouterr().out
    line = next(
        n
        for n, text in enumerate((project / "src/experiments.py").read_text().splitlines(), 1)
        if "@experiment(" in text
    )
    tiny = next(row for row in out.splitlines() if row.startswith("tiny "))
    assert f"src/experiments.py:{line}" in tiny and " steps " in tiny and " int " in tiny
    precision = next(row for row in out.splitlines() if " precision " in row)
    assert "one of: fp32|bf16" in precision and "fp32" in precision.split("bf16", 1)[1]
    lr = next(row for row in out.splitlines() if " lr " in row)
    assert " float " in lr and " 0.003 " in lr and "AdamW learning rate" in lr


def test_run_help_lists_the_experiments_own_parameters(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "tiny", "--help", "--project", str(project)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: scaling run tiny")
    for name in ["steps", "lr", "batch_size", "precision", "save_every"]:
        assert f"\n  {name} " in out, name
    assert "--run-name" in out and "--force-new" in out


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["--param", "steps=four"], "experiment 'tiny': parameter 'steps' got 'four'; expected an integer"),
        (["--param", "precision=fp8"], "parameter 'precision' got 'fp8'; expected one of 'fp32', 'bf16'"),
        (["--param", "epochs=1"], "experiment 'tiny': unknown parameter 'epochs'"),
        (["--param", "steps"], "--param 'steps': expected NAME=VALUE"),
        (["--run-name", "a/b"], "run name 'a/b'"),
    ],
)
def test_a_bad_value_is_one_line_and_creates_nothing(
    project: Path, capsys: pytest.CaptureFixture[str], given: list[str], expected: str
) -> None:
    before = sorted(p.relative_to(project) for p in project.rglob("*") if ".git" not in p.parts)
    assert main(["run", "tiny", *given, "--project", str(project)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    after = sorted(p.relative_to(project) for p in project.rglob("*") if ".git" not in p.parts)
    assert [p for p in after if p.parts[0] == "runs"] == [p for p in before if p.parts[0] == "runs"]


# scaling run: the record ----------------------------------------------------------------------------------------


def test_a_run_on_two_processes_is_recorded_with_logs_metrics_and_checkpoints(
    project: Path, first_run: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    run_dir, done = first_run
    record = _record(run_dir)
    assert record["experiment"] == "tiny" and record["run_name"] == "first"
    assert record["params"] == {"steps": 4, "lr": 0.003, "batch_size": 8, "precision": "fp32", "save_every": 2}
    assert json.loads((run_dir / "params.json").read_text()) == record["params"]
    assert record["seed"] == 0 and record["nproc"] == 2 and record["attempts"] == 1
    assert record["status"] == "completed" and record["exit_code"] == 0
    assert record["git"] == {"commit": _git(project, "rev-parse", "HEAD"), "dirty": False}
    assert record["command"] == ["scaling", "run", "tiny", "--nproc", "2", "--run-name", "first", "--param", "steps=4"]
    assert record["hosts"] and record["started"] <= record["ended"]
    assert "torch==" in (run_dir / "pip-freeze.txt").read_text()
    # every rank logs into its own file; the console shows rank 0 only
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank_{rank}.log").read_text()
        assert f"rank {rank}: start step 0 of 4" in log and f"rank {rank}: step 4  loss" in log, log
    assert "rank 0: step 4  loss" in done.stdout and "rank 1:" not in done.stdout + done.stderr
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    for step in (2, 4):
        assert (run_dir / "checkpoints" / f"global_step{step}" / "manifest.json").is_file()
    assert not (project / "runs" / "tiny" / "first-2").exists()


def test_a_completed_run_is_refused_and_force_new_starts_a_new_one_beside_it(
    project: Path,
    first_run: tuple[Path, subprocess.CompletedProcess[str]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_dir, _ = first_run
    before = (run_dir / "record.json").read_text()
    assert main(["run", "tiny", "--run-name", "first", "--project", str(project)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already completed" in err and "--force-new" in err, err
    assert (run_dir / "record.json").read_text() == before
    # --force-new: a new run directory first-2, started like any run (the processes faked here)
    launched: list[list[str]] = []

    def fake_supervise(command: list[str], cwd: Path) -> tuple[int, str]:
        launched.append(command)
        return 0, "completed"

    monkeypatch.setattr(run_command, "_supervise", fake_supervise)
    assert main(["run", "tiny", "--run-name", "first", "--force-new", "--nproc", "2", "--project", str(project)]) == 0
    new_dir = run_dir.with_name("first-2")
    assert _record(new_dir)["run_name"] == "first-2" and _record(new_dir)["attempts"] == 1
    assert _record(new_dir)["status"] == "completed" and (run_dir / "record.json").read_text() == before
    command = launched[0]
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert command[command.index("--run-dir") + 1] == str(new_dir)
    shutil.rmtree(new_dir)


def test_an_unfinished_run_resumes_from_its_last_checkpoint(
    project: Path, first_run: tuple[Path, subprocess.CompletedProcess[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    # A copy of the first run that crashed after saving step 2: step 4's checkpoint never got written.
    run_dir = first_run[0].with_name("crashed")
    shutil.copytree(first_run[0], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "global_step4")
    (run_dir / "checkpoints" / "latest").write_text("global_step2")
    record = {**_record(run_dir), "run_name": "crashed", "status": "failed", "exit_code": 1}
    (run_dir / "record.json").write_text(json.dumps(record))
    # a resumed run keeps its parameters: changing one is refused before anything starts
    assert main(["run", "tiny", "--run-name", "crashed", "--param", "steps=5", "--project", str(project)]) == 2
    assert "was started with steps=4" in capsys.readouterr().err
    done = _scaling("run", "tiny", "--nproc", "2", "--run-name", "crashed", cwd=project)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming (attempt 2) run crashed" in done.stdout
    resumed = _record(run_dir)
    assert resumed["attempts"] == 2 and resumed["status"] == "completed" and resumed["exit_code"] == 0
    assert [a["status"] for a in resumed["history"]] == ["completed", "completed"]  # the copied first, this one
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank_{rank}.log").read_text()
        first, second = log.split("--- attempt 2 of run crashed", 1)
        assert f"rank {rank}: start step 0 of 4" in first  # the earlier attempt's lines are kept
        assert f"rank {rank}: start step 2 of 4" in second and f"rank {rank}: step 1 " not in second
        assert f"rank {rank}: step 3  loss" in second and f"rank {rank}: step 4  loss" in second
    assert (run_dir / "checkpoints" / "global_step4" / "manifest.json").is_file()


def test_sigterm_stops_the_run_and_records_it_as_preempted(project: Path) -> None:
    run_dir = project / "runs" / "tiny" / "stopped"
    command = [sys.executable, "-m", "scaling.cli.main", "run", "tiny", "--run-name", "stopped", "--nproc", "1"]
    process = subprocess.Popen(
        [*command, "--param", "steps=100000"], cwd=project, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 90
        while not (run_dir / "logs" / "rank_0.log").exists():  # the worker has started
            assert process.poll() is None and time.monotonic() < deadline, "the run never started a worker"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=90)[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    record = _record(run_dir)
    assert record["status"] == "preempted" and record["exit_code"] == 128 + signal.SIGTERM
    assert "resume it with --run-name stopped" in output


def _processes_of(run_dir: Path) -> list[int]:
    """The live processes whose command line names ``run_dir`` (torchrun and its workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            named = entry.name.isdigit() and str(run_dir).encode() in (entry / "cmdline").read_bytes()
            if named and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":  # not a zombie
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_killing_the_launcher_stops_every_rank_and_frees_the_run(project: Path) -> None:
    from scaling.experiment.records import hold_run_lock

    run_dir = project / "runs" / "tiny" / "killed"
    command = [sys.executable, "-m", "scaling.cli.main", "run", "tiny", "--run-name", "killed", "--nproc", "1"]
    process = subprocess.Popen(
        [*command, "--param", "steps=100000"],
        cwd=project,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while not (run_dir / "logs" / "rank_0.log").exists():
            assert process.poll() is None and time.monotonic() < deadline, "the run never started a worker"
            time.sleep(0.2)
        assert _processes_of(run_dir)  # torchrun and the worker
        process.kill()  # SIGKILL: the launcher cannot pass anything on; the kernel's parent-death signal must
        process.wait()
        deadline = time.monotonic() + 60
        while _processes_of(run_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_of(run_dir) == []
    finally:
        for pid in _processes_of(run_dir):
            os.kill(pid, signal.SIGKILL)
    assert _record(run_dir)["status"] == "running"  # nobody lived to record the end...
    with hold_run_lock(run_dir):  # ...but the lock died with the launcher: the run can be resumed
        pass


# show-deploy-key ------------------------------------------------------------------------------------------------


def test_show_deploy_key_creates_the_key_once_and_prints_only_the_public_part(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "p"
    init_project(root)
    assert main(["show-deploy-key", "--project", str(root / "src")]) == 0
    printed = capsys.readouterr().out
    private, public = root / ".scaling" / "deploy_key", root / ".scaling" / "deploy_key.pub"
    assert printed == public.read_text().strip() + "\n"
    assert printed.startswith("ssh-ed25519 ") and printed.rstrip().endswith(" scaling-deploy-key")
    assert "PRIVATE" in private.read_text() and "PRIVATE" not in printed
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(private.parent.stat().st_mode) == 0o700
    ignore = (root / ".gitignore").read_text()
    assert ".scaling/" in ignore.splitlines()
    state = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (private, public, root / ".gitignore")}
    assert main(["show-deploy-key", "--project", str(root)]) == 0
    assert capsys.readouterr().out == printed
    assert state == {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in state}


def test_show_deploy_key_without_ssh_keygen_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    init_project(tmp_path / "p")
    monkeypatch.setattr(shutil, "which", lambda name: None)  # deploy_key looks it up through shutil
    assert main(["show-deploy-key", "--project", str(tmp_path / "p")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "ssh-keygen is not installed" in captured.err
    assert not (tmp_path / "p" / ".scaling" / "deploy_key").exists()
