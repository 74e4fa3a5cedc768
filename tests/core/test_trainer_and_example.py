"""The trainer (resume through it, SIGTERM saves and stops, metrics) and the MLP example end to end."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from examples.mlp_example.config import MLPConfig
from scaling.core.data import DistributedDataLoader
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.core.trainer import Trainer, TrainerConfig, TrainingContext

from .pipeline.tp_models import Loss, SampleWindows, model_specs

REPO = Path(__file__).resolve().parents[2]


def _train(
    layout: dict[str, Any], trainer: dict[str, Any], stop_at: int | None, signal_number: int = signal.SIGTERM
) -> dict[str, Any]:
    topo = Topology(TopologyConfig(**layout, micro_batch_size=2, global_batch_size=8))
    module = ParallelModule(model_specs(topo, 2, 0.1), topo, Loss(topo), seed=1)
    optimizer = Optimizer.for_module(
        module, OptimizerConfig.from_dict({"training_groups": [{"learning_rate_schedule": {"learning_rate": 1e-2}}]})
    )
    config = TrainerConfig.from_dict(trainer)
    data = DistributedDataLoader(SampleWindows(), topo, seed=3)
    run = Trainer(
        config,
        TrainingContext(config, topo),
        module,
        optimizer,
        data,
        eval_data=DistributedDataLoader(SampleWindows(), topo),
    )
    if stop_at is not None:  # a signal arrives in the middle of the run
        original = run.module.train_step

        def train_step(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("step") == stop_at and topo.global_rank == 0:  # only one rank is told
                os.kill(os.getpid(), signal_number)
            return original(*args, **kwargs)

        run.module.train_step = train_step  # type: ignore[method-assign]
    context = run.run()
    weights = {n: p.detach().clone() for n, p in module.named_parameters_canonical()}
    return {"step": context.step, "history": run.history, "weights": weights, "consumed": data.consumed}


def test_trainer_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    layout = {"pipe_parallel_size": 2}
    straight = run_distributed(_train, 2, layout, {"train_iterations": 8}, None)
    save = {"train_iterations": 4, "save_dir": str(tmp_path), "save_interval": 2, "keep_last_n_checkpoints": 1}
    run_distributed(_train, 2, layout, save, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step4", "latest"]
    resume = {
        "train_iterations": 8,
        "save_dir": str(tmp_path),
        "load_dir": str(tmp_path),
        "assert_checkpoint_loaded": True,
    }
    resumed = run_distributed(_train, 2, layout, resume, None)
    for a, b in zip(straight, resumed, strict=True):
        losses_a = [h["loss"] for h in a["history"] if "loss" in h]
        losses_b = [h["loss"] for h in b["history"] if "loss" in h]
        assert losses_b == losses_a[4:]
        assert b["consumed"] == a["consumed"]
        for name, weight in a["weights"].items():
            assert torch.equal(weight, b["weights"][name]), name
    logged = straight[1]["history"][0]
    for key in (
        "loss",
        "grad_norm",
        "grad_norm_clipped",
        "loss_scale",
        "step_time_s",
        "samples_per_s",
        "tokens_per_s",
        "lr/default",
    ):
        assert key in logged


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path: Path) -> None:
    results = run_distributed(_train, 1, {}, {"train_iterations": 50, "save_dir": str(tmp_path)}, 3)
    assert results[0]["step"] == 4  # the step in flight finishes, then the loop stops
    assert (tmp_path / "latest").read_text() == "global_step4"


def test_sigint_on_one_rank_stops_every_rank_after_a_save(tmp_path: Path) -> None:
    trainer = {"train_iterations": 50, "save_dir": str(tmp_path)}
    results = run_distributed(_train, 2, {"data_parallel_size": 2}, trainer, 2, signal.SIGINT)
    assert [r["step"] for r in results] == [3, 3]  # the ranks agree to stop after the step in flight
    assert (tmp_path / "latest").read_text() == "global_step3"


def test_missing_checkpoint_is_fatal_only_when_asked(tmp_path: Path) -> None:
    fresh = run_distributed(_train, 1, {}, {"train_iterations": 1, "load_dir": str(tmp_path)}, None)
    assert fresh[0]["step"] == 1
    with pytest.raises(Exception, match="no checkpoint at"):
        run_distributed(
            _train, 1, {}, {"train_iterations": 1, "load_dir": str(tmp_path), "assert_checkpoint_loaded": True}, None
        )


def test_example_config_loads_and_rejects_typos() -> None:
    config = MLPConfig.from_yaml(REPO / "examples/mlp_example/config.yml", ["topology.model_parallel_size=2"])
    assert config.topology.tp == 2 and config.topology.n_ranks == 2
    with pytest.raises(Exception, match="did you mean 'train_iterations'"):
        MLPConfig.from_yaml(REPO / "examples/mlp_example/config.yml", ["trainer.train_iteration=3"])


FOUR_PROCESSES = ["-o", "topology.model_parallel_size=2", "-o", "topology.pipe_parallel_size=2"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("layout", "target"),
    [
        ([], 0.90),  # the full default run (400 steps, ~15 s): the example's accuracy target
        ([*FOUR_PROCESSES, "-o", "trainer.train_iterations=60"], 0.5),  # shortened: far above chance (0.1)
    ],
    ids=["1 process, full run", "4 processes"],
)
def test_mlp_example_runs_end_to_end(tmp_path: Path, layout: list[str], target: float) -> None:
    command = [sys.executable, "-m", "examples.mlp_example.run", "examples/mlp_example/config.yml",
               "-o", "trainer.eval_interval=10", "-o", f"logger.log_dir={tmp_path}", *layout]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(result.stdout.strip().splitlines()[-1].split()[-1])
    assert accuracy >= target
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["test_accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert any("eval/loss" in r for r in records)
    # Progress while it trains: one line per log interval (10 steps), the first and the last step, once each
    # (however many processes), with eval loss where it evaluated.
    progress = re.findall(
        r"step (\d+)/(\d+) \| loss \d+\.\d{4} \| lr \S+ \| grad norm \S+ \| \S+ (?:tokens|samples)/s \| "
        r"\d+\.\d\d s/step \| ETA \d+:\d\d:\d\d( \| eval loss \d+\.\d\d)?",
        result.stdout + result.stderr,
    )
    total = int(progress[0][1])
    assert [int(step) for step, _, _ in progress] == sorted({1, *range(10, total + 1, 10), total})
    assert [bool(evaluated) for step, _, evaluated in progress] == [int(step) % 10 == 0 for step, _, _ in progress]
