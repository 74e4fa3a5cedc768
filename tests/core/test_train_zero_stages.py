"""``scaling train`` with ``optimizer.zero_stage``: a stage-3 run on two processes trains like stage 0,
saves, and a stage-1 run resumes its checkpoint to the end as stage 0 trained straight; the start-up block
names the stage and the expected memory per rank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .processes import tiny_config

REPO = Path(__file__).resolve().parents[2]
TOPOLOGY = {"data_parallel_size": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "device": "cpu"}


def _train(config: Path, *overrides: str) -> str:
    scaling = Path(sys.executable).with_name("scaling")
    command = [str(scaling), "train", str(config)]
    for override in overrides:
        command += ["-o", override]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def _losses(log_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.timeout(600)
def test_stage_3_trains_like_stage_0_and_a_stage_1_run_resumes_it(tmp_path: Path) -> None:
    loop = {"train_iterations": 4, "log_interval": 1, "save_interval": 2}
    plain = tiny_config(tmp_path / "stage0", TOPOLOGY, {**loop, "save_dir": str(tmp_path / "stage0" / "ckpt")})
    sharded = tiny_config(tmp_path / "stage3", TOPOLOGY, {**loop, "save_dir": str(tmp_path / "stage3" / "ckpt")})
    _train(plain, "trainer.train_iterations=6")
    output = _train(sharded, "optimizer.zero_stage=3")
    assert "ZeRO stage 3" in output and "memory per rank (ZeRO-3, dp 2, float32)" in output
    reference = _losses(tmp_path / "stage0" / "logs")
    assert len(reference) == 6
    assert _losses(tmp_path / "stage3" / "logs") == pytest.approx(reference[:4], rel=1e-5)
    # The stage-3 checkpoint resumes at stage 1 and continues to step 6 as stage 0 trained straight.
    _train(
        sharded,
        "trainer.train_iterations=6",
        "optimizer.zero_stage=1",
        f"trainer.load_dir={tmp_path / 'stage3' / 'ckpt'}",
    )
    assert (tmp_path / "stage3" / "ckpt" / "latest").read_text() == "global_step6"
    assert _losses(tmp_path / "stage3" / "logs") == pytest.approx(_losses(tmp_path / "stage0" / "logs"), rel=1e-5)
