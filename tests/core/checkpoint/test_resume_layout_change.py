"""Resuming on more or fewer data-parallel ranks continues the run exactly where it stopped.

The data position (samples consumed, seed) is one global value in the manifest, so every rank of the
new layout, including ranks the saved run did not have, starts at the same sample: the resumed steps
see the batches of the uninterrupted run and give its losses (within float tolerance: the mean over
data-parallel ranks is summed in another order). A failure points at a per-rank data position or a
rank that restarted its data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from scaling.core.data import DistributedDataLoader
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.core.trainer import Trainer, TrainerConfig, TrainingContext

from ..pipeline.tp_models import Loss, SampleWindows, model_specs


def _train(dp: int, trainer: dict[str, Any], old_format: bool = False) -> dict[str, Any]:
    topo = Topology(TopologyConfig(data_parallel_size=dp, micro_batch_size=2, global_batch_size=8))
    module = ParallelModule(model_specs(topo, 2, 0.0), topo, Loss(topo), seed=1)
    optimizer = Optimizer.for_module(
        module, OptimizerConfig.from_dict({"training_groups": [{"learning_rate_schedule": {"learning_rate": 1e-2}}]})
    )
    config = TrainerConfig.from_dict(trainer)
    data = DistributedDataLoader(SampleWindows(), topo, seed=3)
    seen: list[list[list[int]]] = []  # per step: the token rows this rank trained on
    original = data.next_batches

    def next_batches() -> Any:
        batches = original()
        seen.append([row.tolist() for b in batches for row in b["tokens"]])
        return batches

    data.next_batches = next_batches  # type: ignore[method-assign]
    run = Trainer(config, TrainingContext(config, topo), module, optimizer, data)
    if old_format:  # as checkpoints were written before the data position was global: one copy per rank
        rank_state = run._rank_state
        run._rank_state = lambda: {**rank_state(), "data_consumed": torch.tensor(data.consumed)}  # type: ignore[method-assign]
        run._run_state = lambda: None  # type: ignore[method-assign,assignment,return-value]
    run.run()
    return {"losses": [h["loss"] for h in run.history if "loss" in h], "seen": seen, "consumed": data.consumed}


def _global_batches(results: list[dict[str, Any]]) -> list[list[list[int]]]:
    """Per step, the rows of every rank together, sorted (which rank trains which rows may differ)."""
    return [sorted(row for r in results for row in r["seen"][step]) for step in range(len(results[0]["seen"]))]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("saved_on", "resumed_on"), [(1, 2), (2, 1)], ids=["1 -> 2 ranks", "2 -> 1 ranks"])
def test_resume_on_another_number_of_data_parallel_ranks_continues_the_data_and_the_losses(
    tmp_path: Path, saved_on: int, resumed_on: int
) -> None:
    straight = run_distributed(_train, 1, 1, {"train_iterations": 8, "log_interval": 1}, timeout_s=120)
    saving = {"train_iterations": 4, "save_dir": str(tmp_path), "log_interval": 1}
    run_distributed(_train, saved_on, saved_on, saving, timeout_s=120)
    resume = {**saving, "train_iterations": 8, "load_dir": str(tmp_path), "assert_checkpoint_loaded": True}
    resumed = run_distributed(_train, resumed_on, resumed_on, resume, timeout_s=120)
    assert _global_batches(resumed) == _global_batches(straight)[4:]
    for r in resumed:
        assert r["consumed"] == straight[0]["consumed"]
        torch.testing.assert_close(
            torch.tensor(r["losses"]), torch.tensor(straight[0]["losses"][4:]), rtol=1e-5, atol=1e-6
        )


@pytest.mark.timeout(240)
def test_checkpoints_with_a_per_rank_data_position_still_resume_on_more_ranks(tmp_path: Path) -> None:
    straight = run_distributed(_train, 1, 1, {"train_iterations": 6, "log_interval": 1}, timeout_s=120)
    saving = {"train_iterations": 3, "save_dir": str(tmp_path), "log_interval": 1}
    run_distributed(_train, 1, 1, saving, True, timeout_s=120)
    manifest = json.loads((tmp_path / "global_step3" / "manifest.json").read_text())
    assert manifest["run_state"] is None  # the old format indeed
    resume = {**saving, "train_iterations": 6, "load_dir": str(tmp_path), "assert_checkpoint_loaded": True}
    resumed = run_distributed(_train, 2, 2, resume, timeout_s=120)
    assert _global_batches(resumed) == _global_batches(straight)[3:]
