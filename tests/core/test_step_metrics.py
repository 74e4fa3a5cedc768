"""The trainer's honest metrics on logged steps: time split, FLOP/s, MFU/HFU, peak memory, ``mfu_device``.

A failure of the split test points at the step timer's phases (``scaling.core.profiler.step_timer``) or at
where the trainer marks them; of the MFU test, at ``scaling.core.profiler.throughput``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from examples.mlp_example.config import MLPConfig
from scaling.core.config import ConfigError
from scaling.core.data import DistributedDataLoader
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule
from scaling.core.pipeline.schedule import Backward, Forward, RecvActivation
from scaling.core.planner.devices import device_spec
from scaling.core.profiler import PHASES, StepTimer, TokenFlops, peak_flops_for
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.core.trainer import Trainer, TrainerConfig, TrainingContext

from .pipeline.tp_models import Loss, SampleWindows, model_specs

REPO = Path(__file__).resolve().parents[2]
FLOPS = TokenFlops(model=3.0e6, hardware=4.0e6)
SPLIT = [f"time/{p}_s" for p in ("data", "forward", "backward", "optimizer", "pipeline_wait", "grad_sync")]


def _train(layout: dict[str, Any], trainer: dict[str, Any]) -> dict[str, Any]:
    topo = Topology(TopologyConfig(**layout, micro_batch_size=2, global_batch_size=8))
    module = ParallelModule(model_specs(topo, 2, 0.0), topo, Loss(topo), seed=1)
    optimizer = Optimizer.for_module(
        module, OptimizerConfig.from_dict({"training_groups": [{"learning_rate_schedule": {"learning_rate": 1e-2}}]})
    )
    config = TrainerConfig.from_dict(trainer)
    data = DistributedDataLoader(SampleWindows(), topo, seed=3)
    run = Trainer(config, TrainingContext(config, topo), module, optimizer, data, flops=FLOPS)
    run.run()
    hook = getattr(module.instruction_hook, "__qualname__", "")  # the hang watchdog's heartbeat stays
    return {
        "history": run.history,
        "logging": run.is_logging_rank,
        "dtype": str(module.dtype),
        "hook_restored": "StepTimer" not in hook and "finish" not in vars(module.grad_sync),
    }


@pytest.mark.timeout(120)
def test_time_split_flops_and_mfu_on_logged_steps() -> None:
    trainer = {"train_iterations": 5, "log_interval": 2, "mfu_device": "h100"}
    results = run_distributed(_train, 2, {"pipe_parallel_size": 2}, trainer, timeout_s=100)
    (last,) = [r for r in results if r["logging"]]  # the last pipeline stage writes the metrics
    assert all(r["hook_restored"] for r in results)
    history = last["history"]
    assert [int(h["step"]) for h in history] == [1, 2, 4, 5]  # interval 2, the first and the last
    peak = device_spec("h100").flops(last["dtype"])
    for h in history:
        assert all(key in h for key in SPLIT), sorted(h)
        assert sum(h[key] for key in h if key.startswith("time/")) <= h["step_time_s"] + 1e-6
        assert h["time/forward_s"] > 0 and h["time/backward_s"] > 0 and h["time/optimizer_s"] > 0
        assert h["time/pipeline_wait_s"] > 0  # the last stage waits for the first stage's activations
        # MFU computed from the logged tokens/s and the table's peak, over the 2 devices of the run
        assert h["model_flops_per_token"] == FLOPS.model
        assert h["tflops_per_device"] == pytest.approx(FLOPS.model * h["tokens_per_s"] / 2 / 1e12, rel=1e-12)
        assert h["hardware_tflops_per_device"] == pytest.approx(FLOPS.hardware * h["tokens_per_s"] / 2 / 1e12)
        assert h["mfu"] == pytest.approx(FLOPS.model * h["tokens_per_s"] / 2 / peak, rel=1e-12)
        assert h["hfu"] == pytest.approx(h["mfu"] * 4 / 3, rel=1e-12)
        assert 0 < h["mfu"] < 1
        assert h["memory/peak_bytes"] >= max(h["memory/rank_0_peak_bytes"], h["memory/rank_1_peak_bytes"]) > 0
        assert h["memory/peak_rank"] in (0, 1)
        assert h["straggler/slowest_rank"] in (0, 1) and h["straggler/lag"] >= 0


@pytest.mark.timeout(60)
def test_one_stage_has_no_pipeline_wait_and_auto_has_no_mfu_on_cpu() -> None:
    (got,) = run_distributed(_train, 1, {}, {"train_iterations": 2}, timeout_s=50)
    assert got["hook_restored"]
    for h in got["history"]:
        assert h["time/pipeline_wait_s"] == 0  # no neighbouring stage to wait for
        assert h["time/forward_s"] > 0 and h["time/backward_s"] > 0
        assert sum(h[key] for key in h if key.startswith("time/")) <= h["step_time_s"] + 1e-6
        assert "tflops_per_device" in h and "mfu" not in h and "hfu" not in h  # a CPU has no table peak
        assert h["straggler/lag"] == 0 and h["straggler/slowest_rank"] == 0


def test_mfu_device_is_checked_when_the_config_loads() -> None:
    assert TrainerConfig.from_dict({"mfu_device": "H100"}).mfu_device == "H100"
    with pytest.raises(ConfigError, match=r"mfu_device: unknown device 'h1000'.*h100"):
        TrainerConfig.from_dict({"mfu_device": "h1000"})
    with pytest.raises(ConfigError, match=r"trainer\.mfu_device"):  # the dotted path inside a run's config
        MLPConfig.from_yaml(REPO / "examples/mlp_example/config.yml", ["trainer.mfu_device=tpu"])


def test_measured_peak_and_table_peak() -> None:
    cpu = torch.device("cpu")
    assert peak_flops_for("auto", cpu, torch.float32) is None
    assert peak_flops_for("a100", cpu, torch.bfloat16) == (312e12, "a100")
    measured = peak_flops_for("measured", cpu, torch.float32)
    assert measured is not None and measured[0] > 1e6 and "measured" in measured[1]


class _Module:
    """What the timer needs of a ParallelModule: an instruction hook and a grad sync with ``finish``."""

    class _Sync:
        def finish(self) -> None:
            pass

    def __init__(self, hook: Any) -> None:
        self.instruction_hook = hook
        self.grad_sync = self._Sync()


def test_step_timer_chains_the_previous_hook_and_restores_it() -> None:
    seen: list[Any] = []
    module = _Module(lambda step, instr: seen.append((step, instr)))
    previous = module.instruction_hook
    timer = StepTimer(torch.device("cpu"), time_every_step=False)
    with timer.attach(module):
        module.instruction_hook(0, Forward(0, 0))  # untimed: only the previous hook runs
        assert timer.stop_step() is None
        assert timer.start_step(True)
        for instr in (RecvActivation(0, 0), Forward(0, 0), Backward(0, 0)):
            module.instruction_hook(1, instr)
        module.grad_sync.finish()
        split = timer.stop_step()
    assert split is not None and set(split) == set(PHASES)
    assert all(v >= 0 for v in split.values()) and split["forward"] > 0
    assert [s for s, _ in seen] == [0, 1, 1, 1]  # the heartbeat saw every instruction, timed or not
    assert module.instruction_hook is previous and "finish" not in vars(module.grad_sync)
