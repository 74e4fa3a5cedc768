"""`scaling train` on a save directory that already holds a run: resume errors are one line, exit code 2.

One process, a tiny model, two steps saved once per module; each check is one more `scaling train`.
What must hold: a rerun of a finished run says so and rewrites nothing; fewer iterations than the
checkpoint's step, a model that does not fit the checkpoint, and a mistyped ``load_dir`` are refused
in one line naming what and where, before any step, with the checkpoints untouched.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from scaling.core.data import MemoryMapWriter

from .test_train_entry import _config

REPO = Path(__file__).resolve().parents[2]
SCALING = Path(sys.executable).with_name("scaling")


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run config whose two steps are trained and saved (in ``ckpt`` next to it)."""
    tmp_path = tmp_path_factory.mktemp("run")
    generator = torch.Generator().manual_seed(0)
    with MemoryMapWriter(tmp_path / "corpus", vocab_size=64) as writer:
        for _ in range(20):
            writer.add(torch.randint(0, 64, (40,), generator=generator).tolist())
    config = _config(tmp_path, tmp_path / "corpus")
    config["topology"] = {"micro_batch_size": 2, "gradient_accumulation_steps": 1}
    config["trainer"] = {"train_iterations": 2, "save_dir": str(tmp_path / "ckpt"), "load_dir": str(tmp_path / "ckpt")}
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump(config))
    first = _train(path)
    assert first.returncode == 0, first.stderr[-3000:]
    return path


def _train(config: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    command = [str(SCALING), "train", str(config), *[a for o in overrides for a in ("-o", o)]]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("scaling train: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.mark.timeout(200)
def test_rerun_of_a_finished_run_says_so_and_iterations_below_its_step_are_refused(finished_run: Path) -> None:
    checkpoints = finished_run.parent / "ckpt"
    before = _snapshot(checkpoints)
    again = _train(finished_run)
    assert again.returncode == 0, again.stderr[-3000:]
    said = [line for line in (again.stdout + again.stderr).splitlines() if "the run is complete" in line]
    assert len(said) == 1 and f"{checkpoints / 'global_step2'} is at step 2 = trainer.train_iterations" in said[0]
    assert "step 1/" not in again.stderr + again.stdout  # nothing trained
    assert "stopped at step" not in again.stderr + again.stdout  # complete, not interrupted
    below = _one_line_error(_train(finished_run, "trainer.train_iterations=1"))
    assert "trainer.train_iterations (1) is below the step of the checkpoint" in below and "(2)" in below
    assert _snapshot(checkpoints) == before


@pytest.mark.timeout(200)
def test_resume_errors_from_scaling_train_are_one_line_naming_what_and_where(finished_run: Path) -> None:
    checkpoints = finished_run.parent / "ckpt"
    before = _snapshot(checkpoints)
    wider = _one_line_error(_train(finished_run, "trainer.train_iterations=4", "architecture.hidden_size=32"))
    assert "parameter 'layers." in wider and "the checkpoint holds shape [" in wider
    assert "the model expects [" in wider and str(checkpoints / "global_step2") in wider
    typo = checkpoints.with_name("ckpt_typo")
    mistyped = _one_line_error(_train(finished_run, "trainer.train_iterations=4", f"trainer.load_dir={typo}"))
    assert f"trainer.load_dir {typo} holds no checkpoint" in mistyped and f"trainer.save_dir {checkpoints}" in mistyped
    a_file = checkpoints / "global_step2" / "manifest.json"
    not_a_dir = _one_line_error(_train(finished_run, f"trainer.save_dir={a_file}", f"trainer.load_dir={typo}"))
    assert not_a_dir.endswith(f"trainer.save_dir {a_file} is a file, not a directory")
    assert _snapshot(checkpoints) == before
