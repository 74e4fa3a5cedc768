"""The straggler report in a real 2-rank data-parallel run: a rank made slow is named, a balanced run is not.

Both ranks sleep in the loss (so the step is dominated by a known amount of work and the noise of a busy
test machine stays small against it); in the slow run rank 1 sleeps longer. Rank 0 then waits for it in
the gradient all-reduce, which is communication, not busy time. A failure points at the busy time (the
step timer's communication phases) or at the report in ``scaling.core.profiler.straggler``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from scaling.core.data import DistributedDataLoader
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule
from scaling.core.profiler import RankSample, StragglerReport
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.core.trainer import Trainer, TrainerConfig, TrainingContext

from .pipeline.tp_models import Loss, SampleWindows, model_specs


class _SleepyLoss(Loss):
    """The tiny model's loss, after sleeping ``seconds[rank]`` (once per micro-batch)."""

    def __init__(self, topology: Topology, seconds: list[float]) -> None:
        super().__init__(topology)
        self.seconds = seconds[topology.global_rank]

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        time.sleep(self.seconds)
        return super().__call__(logits, batch)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _train(sleep_s: list[float]) -> dict[str, Any]:
    topo = Topology(TopologyConfig(data_parallel_size=2, micro_batch_size=2, global_batch_size=4))
    module = ParallelModule(model_specs(topo, 2, 0.0), topo, _SleepyLoss(topo, sleep_s), seed=1)
    optimizer = Optimizer.for_module(
        module, OptimizerConfig.from_dict({"training_groups": [{"learning_rate_schedule": {"learning_rate": 1e-2}}]})
    )
    config = TrainerConfig.from_dict({"train_iterations": 3, "log_interval": 3})
    data = DistributedDataLoader(SampleWindows(), topo, seed=3)
    lines = _Lines()
    logging.getLogger("scaling.trainer").addHandler(lines)
    run = Trainer(config, TrainingContext(config, topo), module, optimizer, data)
    run.run()
    return {"history": run.history, "warnings": [w for w in lines.lines if "straggler" in w], "rank": dist.get_rank()}


@pytest.mark.timeout(120)
def test_a_slow_rank_is_named_and_a_balanced_run_does_not_warn() -> None:
    slow = run_distributed(_train, 2, [0.02, 0.25], timeout_s=100)
    balanced = run_distributed(_train, 2, [0.1, 0.1], timeout_s=100)
    # the report steps, 1 and 3 (the first and the last = the interval): the same on both ranks
    for result in (*slow, *balanced):
        assert [int(h["step"]) for h in result["history"]] == [1, 3]
    for h in slow[0]["history"]:
        assert h["straggler/slowest_rank"] == 1
        # busy: ~0.25 s on rank 1, ~0.02 s on rank 0 (which waits ~0.23 s in the all-reduce); median 0.135
        assert h["straggler/lag"] > 0.5, h
        assert h["time/grad_sync_s"] > 0.1  # rank 0 blocked in the gradient reduction, not busy
    assert len(slow[0]["warnings"]) == 2 and "rank 1 is" in slow[0]["warnings"][0], slow[0]["warnings"]
    assert slow[1]["warnings"] == []  # only rank 0 says it
    for h in balanced[0]["history"]:
        assert h["straggler/lag"] < 0.2, h
    assert balanced[0]["warnings"] == []


def test_report_arithmetic() -> None:
    report = StragglerReport([RankSample(1.0, 0.5, 10), RankSample(1.0, 1.0, 30), RankSample(1.0, 0.4, 20)])
    assert report.slowest_rank == 1 and report.lag == pytest.approx(1.0)  # median busy 0.5
    assert report.peak_rank == 1
    assert report.warning(0.99) is not None and report.warning(1.0) is None
    assert "rank 1 is 100% slower" in str(report.warning(0.2))
    assert report.warning(0.2, min_excess_s=0.6) is None  # 0.5 s more than the median: below that floor
    assert report.metrics()["memory/peak_bytes"] == 30 and report.metrics()["memory/rank_2_peak_bytes"] == 20
    assert "memory/rank_0_peak_bytes" not in report.metrics(per_rank_limit=2)
    assert StragglerReport([RankSample(1.0, 1.0, 1)]).lag == 0
