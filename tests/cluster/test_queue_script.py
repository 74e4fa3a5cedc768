"""The batch script of a queued run, and `scaling queue submit` input checks: no Slurm needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scaling.cluster.queue.command import main
from scaling.cluster.queue.sbatch import JobSpec, render_script


def _spec(**changes: object) -> JobSpec:
    fields: dict = dict(
        job_name="train:r1", python="/venv/bin/python", project=Path("/p"), experiment="train",
        run_dir=Path("/p/runs/train/r1"), nodes=2, nproc_per_node=4,
    )  # fmt: skip
    fields.update(changes)
    return JobSpec(**fields)


def test_script_has_rendezvous_requeue_and_signal_lines() -> None:
    script = render_script(_spec(gpus_per_node=4, priority=5, time="01:00:00", signal_seconds=90))
    lines = script.splitlines()
    assert "#SBATCH --nodes=2" in lines
    assert "#SBATCH --ntasks-per-node=1" in lines
    assert "#SBATCH --requeue" in lines
    assert "#SBATCH --signal=B:USR1@90" in lines
    assert "#SBATCH --open-mode=append" in lines
    assert "#SBATCH --output=/p/runs/train/r1/slurm.out" in lines
    assert "#SBATCH --exclusive" in lines
    assert "#SBATCH --gpus-per-node=4" in lines
    assert "#SBATCH --nice=-5" in lines
    assert "#SBATCH --time=01:00:00" in lines
    step = next(line for line in lines if "torch.distributed.run" in line)
    for piece in (
        '--nnodes "$SLURM_NNODES"', "--nproc-per-node 4", "--rdzv-backend c10d",
        '--rdzv-endpoint "$FIRST_NODE:$RDZV_PORT"', "-m scaling.experiment.worker", "--run-dir /p/runs/train/r1",
    ):  # fmt: skip
        assert piece in step
    assert any(line.startswith("srun ") and "--ntasks-per-node=1" in line for line in lines)
    assert any(line.startswith("FIRST_NODE=$(scontrol show hostnames") for line in lines)
    assert any(line.startswith("trap ") and line.endswith(" USR1") for line in lines)
    assert any(line.startswith("trap ") and line.endswith(" TERM") for line in lines)
    assert "job_step end" in lines[-1] and '--signal "$SIGNAL"' in lines[-1]


def test_shared_asks_no_exclusive_and_gpus_are_optional() -> None:
    script = render_script(_spec(mode="shared", cpus_per_task=1))
    assert "--exclusive" not in script
    assert "--gpus-per-node" not in script
    assert "#SBATCH --cpus-per-task=1" in script.splitlines()
    assert "--nice" not in script


def test_script_quotes_paths() -> None:
    script = render_script(_spec(run_dir=Path("/p/runs/train/r 1")))
    assert "--run-dir '/p/runs/train/r 1'" in script


def _submit(project: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``scaling queue submit ARGS`` in this process (a subprocess would import torch again for each)."""
    code = main(["submit", *args, "--project", str(project)])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_cli_delegates_to_the_queue() -> None:
    command = [sys.executable, "-m", "scaling.cli.main", "queue", "--help"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "--nice=-P" in done.stdout, done.stderr
    for action in ("submit", "list", "status", "logs", "cancel"):
        assert action in done.stdout


def test_dry_run_prints_the_script_and_creates_nothing(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _submit(project, capsys, "mark", "--run-name", "dry", "--nodes", "2", "--shared", "--dry-run")
    done = subprocess.CompletedProcess([], code, out, err)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("#!/bin/bash\n")
    assert "#SBATCH --requeue" in done.stdout and "--rdzv-backend c10d" in done.stdout
    assert f"--run-dir {project.resolve()}/runs/mark/dry" in done.stdout
    assert not (project / "runs" / "mark" / "dry").exists()


def test_bad_input_is_one_line_and_exit_2(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args, words in (
        (["mark", "--param", "seconds=soon", "--dry-run"], "seconds"),
        (["mark", "--time", "90min", "--dry-run"], "--time '90min'"),
        (["mark", "--nodes", "0", "--dry-run"], "--nodes 0"),
        (["nosuch", "--dry-run"], "nosuch"),
    ):
        code, out, err = _submit(project, capsys, *args)
        assert code == 2, (args, out, err)
        assert words in err and len(err.strip().splitlines()) == 1, err
