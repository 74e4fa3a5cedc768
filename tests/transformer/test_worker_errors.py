"""An error inside the workers reaches the user once, with its rank and cause; exit code 2 for bad input.

Real launches (`scaling launch` -> agent/torchrun -> 2 ranks) of a small script in which one rank raises and
the other waits in a collective for it (and so fails too, secondarily). Before, each rank printed its own
traceback and torchrun added its summary (ChildFailedError, "Root Cause"), with exit code 1 for everything.
The launcher-side checks (`scaling train` refusing bad input before any worker starts) are tested last.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from tests.core.processes import REPO, SCALING, tiny_run

from scaling.core.runner.reports import WorkerReport
from scaling.core.runner.worker import BAD_INPUT_ERRORS, run_as_worker

_SCRIPT = """
import os, sys
import torch.distributed as dist
from scaling.core.data import DataFileError
from scaling.core.runner.worker import run_as_worker
from scaling.core.topology import TopologyConfig, init_distributed

def body():
    topology = init_distributed(TopologyConfig(data_parallel_size=2, device="cpu"))
    if topology.global_rank == int(sys.argv[1]):
        if sys.argv[2] == "data":
            raise DataFileError("corpus.bin holds 10 tokens, corpus.idx says 12 (truncated?)")
        raise RuntimeError("boom in a worker")
    dist.barrier()  # waits for the failing rank: fails once it is gone
    return 0

raise SystemExit(run_as_worker(body, "test-script", int(os.environ["RANK"])))
"""


def _launch(tmp_path: Path, failing_rank: int, kind: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "fail.py"
    script.write_text(_SCRIPT)
    config = tmp_path / "launch.yml"
    config.write_text(yaml.safe_dump({
        "runner": {"script": str(script), "module": False, "script_args": [str(failing_rank), kind]},
        "topology": {"data_parallel_size": 2, "device": "cpu"},
    }))  # fmt: skip
    return subprocess.run([str(SCALING), "launch", str(config)], cwd=REPO, capture_output=True, text=True,
                          timeout=150)  # fmt: skip


@pytest.mark.timeout(180)
def test_bad_input_in_a_worker_is_one_line_with_its_rank_and_exit_code_2(tmp_path: Path) -> None:
    result = _launch(tmp_path, failing_rank=1, kind="data")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines == ["rank 1: corpus.bin holds 10 tokens, corpus.idx says 12 (truncated?)"], output


@pytest.mark.timeout(180)
def test_a_bug_in_a_worker_shows_its_traceback_once_and_exits_1(tmp_path: Path) -> None:
    result = _launch(tmp_path, failing_rank=0, kind="bug")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert output.count("Traceback") == 1 and output.count("RuntimeError: boom in a worker") == 2, output
    assert output.rstrip().endswith("rank 0 failed: RuntimeError: boom in a worker"), output
    assert "ChildFailedError" not in output and "Root Cause" not in output


def test_reports_from_collectives_come_after_a_rank_s_own_error(tmp_path: Path) -> None:
    from scaling.core.runner.agent import summarize_failure

    own = WorkerReport(1, 2, "data: missing file x.bin", "", time=20.0, collective=False)
    lost_peer = WorkerReport(0, 1, "DistBackendError: Connection closed by peer", "tb", time=10.0, collective=True)
    assert summarize_failure([lost_peer, own], {0: (1, 10), 1: (2, 20)}) == ("rank 1: data: missing file x.bin", 2)
    # A rank killed without a word (kill -9, out of memory) explains more than its peers' lost connections...
    assert summarize_failure([lost_peer], {0: (1, 10), 1: (-9, 10)}) == ("rank 1 was killed by SIGKILL", 1)
    # ...unless torchrun killed it later, stopping the world after the collective failed (a stopped rank).
    message, code = summarize_failure([lost_peer], {0: (1, 10), 1: (-9, 40)})
    assert message.startswith("rank 0 failed in a collective: DistBackendError: Connection closed") and code == 1


def test_bad_input_tuple_is_config_checkpoint_and_data_errors(tmp_path: Path) -> None:
    from scaling.core.checkpoint import CheckpointError
    from scaling.core.config import ConfigError
    from scaling.core.data import DataFileError

    assert set(BAD_INPUT_ERRORS) == {ConfigError, CheckpointError, DataFileError}

    def bad() -> int:
        raise CheckpointError("checkpoint ckpt/global_step3: manifest.json is missing")

    assert run_as_worker(bad, "prog", 0) == 2


def _train(config: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    argv = [str(SCALING), "train", str(config), *[a for o in overrides for a in ("-o", o)]]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=100,
                          env={**os.environ, **(env or {})})  # fmt: skip


def _one_line_before_launch(result: subprocess.CompletedProcess[str]) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "rank" not in output  # no worker started: nothing was logged by a rank
    return lines[0]


@pytest.mark.timeout(120)
def test_missing_data_file_is_refused_before_launch_in_one_line(tmp_path: Path) -> None:
    config = tiny_run(tmp_path)
    line = _one_line_before_launch(_train(config, f"data.prefixes=[{tmp_path / 'nothing'}]"))
    assert "nothing" in line, line


@pytest.mark.timeout(120)
def test_save_dir_that_is_a_file_is_refused_before_launch_in_one_line(tmp_path: Path) -> None:
    config = tiny_run(tmp_path)
    (tmp_path / "a_file").write_text("not a directory")
    line = _one_line_before_launch(_train(config, f"trainer.save_dir={tmp_path / 'a_file'}"))
    assert "trainer.save_dir" in line and "a_file" in line, line


@pytest.mark.timeout(120)
def test_device_cuda_without_a_gpu_is_refused_before_launch_in_one_line(tmp_path: Path) -> None:
    config = tiny_run(tmp_path)
    result = _train(config, "topology.device=cuda", env={"CUDA_VISIBLE_DEVICES": ""})  # no GPU, on any machine
    line = _one_line_before_launch(result)
    assert "topology.device" in line and "cuda" in line, line


@pytest.mark.timeout(120)
def test_generate_tensor_parallel_with_a_missing_checkpoint_is_one_line_before_launch(tmp_path: Path) -> None:
    argv = [str(SCALING), "generate", str(tmp_path / "nothing"), "--tensor-parallel", "2", "--prompt", "hi"]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=100)
    line = _one_line_before_launch(result)
    assert line.startswith("scaling generate: ") and "nothing" in line, line


@pytest.mark.timeout(240)
def test_shape_mismatch_on_resume_in_the_workers_is_one_error_line_with_its_rank_and_exit_2(tmp_path: Path) -> None:
    """Found only once the ranks build their model: reported by the launcher, once, naming the rank."""
    config = tiny_run(tmp_path)
    assert _train(config, "trainer.train_iterations=2").returncode == 0
    resume = [f"trainer.load_dir={tmp_path / 'ckpt'}", "trainer.train_iterations=4"]
    result = _train(config, *resume, "architecture.intermediate_size=48")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    errors = [line for line in output.splitlines() if "the checkpoint holds shape" in line]
    assert len(errors) == 1 and errors[0].startswith("rank "), output
    assert "[32, 16]" in errors[0] and "[48, 16]" in errors[0]
    assert "Traceback" not in output and "ChildFailedError" not in output


def test_reports_of_an_earlier_attempt_never_explain_a_restarted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun restarts the workers (runner.max_restarts) under one launcher: only the last attempt counts."""
    from scaling.core.runner.reports import (
        REPORT_DIR_ENV,
        RESTART_COUNT_ENV,
        done_ranks,
        read_reports,
        report_dir,
        write_done,
        write_report,
    )

    monkeypatch.setenv(REPORT_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(RESTART_COUNT_ENV, "0")
    first = report_dir()
    assert first is not None
    write_report(first, WorkerReport(1, 2, "data/old.bin is truncated", "", 1.0, False))
    write_done(first, 0)
    monkeypatch.setenv(RESTART_COUNT_ENV, "1")
    second = report_dir()
    assert second is not None and second != first
    assert read_reports(tmp_path) == [] and done_ranks(tmp_path) == set()  # the new attempt said nothing yet
    write_report(second, WorkerReport(0, 1, "RuntimeError: out of memory", "Traceback ...", 2.0, False))
    assert [r.message for r in read_reports(tmp_path)] == ["RuntimeError: out of memory"]
