"""Checkpoints resume across ZeRO stages and layouts, with weights and optimizer state.

A run trains 4 steps on one (tp, pp, dp, zero_stage), saves, and another run resumes it on a different
one for 4 more: stage 3 -> stage 0 and 0 -> 3, dp 2 -> 4, tp 2 -> 1, pp 2 -> 1. Losses and final weights
equal one process training 8 steps straight (dropout on: its masks do not depend on the layout).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from scaling.core.checkpoint import load_checkpoint, save_checkpoint
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.core.zero import gathered

from ..pipeline.tp_models import Loss, batches, model_specs
from .test_checkpoint import MICRO_PER_STEP, OPTIMIZER, _full_weights, _world


def _run(layout: dict[str, Any], stage: int, steps: range, save_dir: str, save: bool) -> dict[str, Any]:
    dp = layout.get("data_parallel_size", 1)
    topo = Topology(TopologyConfig(**layout, gradient_accumulation_steps=MICRO_PER_STEP // dp))
    config = OptimizerConfig.from_dict({**OPTIMIZER, "zero_stage": stage})
    module = ParallelModule(model_specs(topo, 2, 0.1), topo, Loss(topo), seed=3, sharding=config.sharding)
    optimizer = Optimizer.for_module(module, config)
    if not save and steps.start > 0:
        info = load_checkpoint(save_dir, module, optimizer)
        assert info.step == steps.start and info.optimizer_loaded
    losses = []
    n_micro = MICRO_PER_STEP // dp
    for step in steps:
        mine = batches(MICRO_PER_STEP, seed=200 + step)[topo.dp_rank * n_micro : (topo.dp_rank + 1) * n_micro]
        losses.append(module.train_step(mine, step=step).loss)
        optimizer.step(step)
    if save:
        save_checkpoint(save_dir, steps.stop, module, optimizer)
    weights = {
        n: (gathered(p.detach()).clone(), module.param_table[n].tp_split_dim)
        for n, p in module.named_parameters_canonical()
    }
    return {"coord": (topo.pp_rank, topo.dp_rank, topo.tp_rank), "losses": losses, "weights": weights}


@functools.cache
def _straight() -> dict[str, Any]:
    """One process training 8 steps straight at stage 0: the reference of every case (run once)."""
    return run_distributed(_run, 1, {}, 0, range(8), "never-saved", False, timeout_s=240)[0]


CASES = [
    ({"data_parallel_size": 2}, 3, {"data_parallel_size": 2}, 0),
    ({"data_parallel_size": 2}, 0, {"data_parallel_size": 4}, 3),
    ({"model_parallel_size": 2, "data_parallel_size": 2}, 3, {"data_parallel_size": 2}, 1),
    ({"pipe_parallel_size": 2, "data_parallel_size": 2}, 2, {"data_parallel_size": 2}, 3),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("saved", "saved_stage", "resumed", "resumed_stage"), CASES, ids=str)
def test_resume_across_zero_stages_and_layouts(
    tmp_path: Path, saved: dict[str, Any], saved_stage: int, resumed: dict[str, Any], resumed_stage: int
) -> None:
    straight = _straight()
    first = run_distributed(_run, _world(saved), saved, saved_stage, range(4), str(tmp_path), True, timeout_s=240)
    second = run_distributed(
        _run, _world(resumed), resumed, resumed_stage, range(4, 8), str(tmp_path), False, timeout_s=240
    )
    for r in first:
        torch.testing.assert_close(torch.stack(r["losses"]), torch.stack(straight["losses"][:4]), rtol=1e-6, atol=1e-6)
    for r in second:
        torch.testing.assert_close(torch.stack(r["losses"]), torch.stack(straight["losses"][4:]), rtol=1e-5, atol=1e-6)
    full = _full_weights(second)
    for name, (weight, _) in straight["weights"].items():
        torch.testing.assert_close(full[name], weight, rtol=1e-5, atol=1e-6, msg=name)
