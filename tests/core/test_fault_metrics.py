"""What a bad step leaves for debugging and accounting: per-layer gradient norms around the event (in the
ledger entry and the metrics records) and goodput that counts rollbacks and checkpoint stalls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from scaling.core.data import DistributedDataLoader
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule
from scaling.core.runner.goodput import GoodputClock, carried_losses
from scaling.core.runner.reports import RESTART_COUNT_ENV
from scaling.core.runner.restarts import JOB_START_ENV
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.core.trainer import Trainer, TrainerConfig, TrainingContext
from scaling.core.trainer.ledger import LEDGER_NAME

from .pipeline.tp_models import Loss, SampleWindows, model_specs

GLOBAL_BATCH = 4
BAD_LAYER = 2  # the second Block: layers are Embedding, Block, Block, Head


def _run(layout: dict[str, Any], trainer: dict[str, Any], position: int, factor: float) -> list[dict[str, float]]:
    """Train the tiny model; the gradients of layer ``BAD_LAYER`` only are multiplied by ``factor`` for the
    batch at data ``position``. Returns the metrics records."""
    topo = Topology(TopologyConfig(**layout, micro_batch_size=2, global_batch_size=GLOBAL_BATCH))
    module = ParallelModule(model_specs(topo, 2, 0.0), topo, Loss(topo), seed=1)
    schedule = {"learning_rate": 1e-2, "learning_rate_decay_style": "constant"}
    optimizer = Optimizer.for_module(
        module, OptimizerConfig.from_dict({"training_groups": [{"learning_rate_schedule": schedule}]})
    )
    config = TrainerConfig.from_dict(trainer)
    data = DistributedDataLoader(SampleWindows(), topo)
    run = Trainer(config, TrainingContext(config, topo), module, optimizer, data)
    bad_names = [r.name for r in module.param_table.values() if r.layer == BAD_LAYER]
    original = module.train_step

    def train_step(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if data.consumed - GLOBAL_BATCH == position:
            for name in bad_names:  # only the stage that holds the layer has names here
                grad = module.main_grad(name)
                assert grad is not None
                grad.mul_(factor)
        return result

    module.train_step = train_step  # type: ignore[method-assign]
    run.run()
    return run.history


def _consistent(record: dict[str, float]) -> None:
    lost = record["lost_to_restarts_s"] + record["lost_to_rollbacks_s"] + record["lost_to_checkpoints_s"]
    assert record["goodput"] == pytest.approx(1.0 - lost / record["wall_s"], abs=1e-9)


@pytest.mark.timeout(90)
def test_a_spike_in_one_layer_is_named_by_its_norms_and_the_rollback_and_saves_lower_goodput(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two pipeline stages (the layers' norms come from both); layer 2's gradients x1000 for the batch at
    # position 20 (step 6): a gradient-norm spike, rolled back to step 4 (synchronous saves every 2 steps).
    monkeypatch.delenv(JOB_START_ENV, raising=False)
    monkeypatch.delenv(RESTART_COUNT_ENV, raising=False)
    save = tmp_path / "ckpt"
    spikes = {"factor": 5.0, "window": 3, "on_grad_norm_spike": "rollback", "rollback_lr_steps": 0}
    trainer = {
        "train_iterations": 10,
        "save_dir": str(save),
        "save_interval": 2,
        "log_interval": 100,  # only the first and last step log by interval: the event forces the rest
        "spikes": {**spikes, "layer_norm_steps": 2},
    }
    results = run_distributed(_run, 2, {"pipe_parallel_size": 2}, trainer, 20, 1000.0, timeout_s=80)
    names = ["layers.0.Embedding", "layers.1.Block", "layers.2.Block"]  # the head's tied weight: at layer 0
    [entry] = [json.loads(line) for line in (save / LEDGER_NAME).read_text().splitlines()]
    assert (entry["step"], entry["position"], entry["event"]) == (6, 20, "grad_norm_spike")
    ring = entry["layer_grad_norms"]
    assert sorted(ring) == ["4", "5", "6"]  # the two steps before the event and the event's own
    assert all(sorted(norms) == names for norms in ring.values())
    assert all(v > 0 for norms in ring.values() for v in norms.values())
    grown = {name: ring["6"][name] / ring["5"][name] for name in names}
    assert grown["layers.2.Block"] > 300.0  # the injected layer stands out...
    assert all(grown[n] < 3.0 for n in names if n != "layers.2.Block")  # ...the others did not move
    for history in results:
        steps = [int(r["step"]) for r in history if "loss" in r]
        assert steps == [1, 6, 5, 6, 10]  # the event, the two executed steps after it (replays), the last
        with_norms = [int(r["step"]) for r in history if f"layer_grad_norm/{names[2]}" in r]
        assert with_norms == [6, 5, 6]
        event = next(r for r in history if r["step"] == 6.0)
        assert all(f"layer_grad_norm/{n}" in event for n in names)
        assert event[f"layer_grad_norm/{names[2]}"] == pytest.approx(ring["6"][names[2]])
        for record in history:
            _consistent(record)
        first, last = history[0], history[-1]
        assert first["lost_to_rollbacks_s"] == 0.0 and first["lost_to_checkpoints_s"] == 0.0
        assert last["events/rolled_back"] == 1.0
        assert last["lost_to_rollbacks_s"] > 0.0  # steps 5 and 6, trained again, and the reload
        assert last["lost_to_checkpoints_s"] > 0.0  # the saves of steps 2, 4 (twice reached: once), 6, 8
        assert last["lost_to_restarts_s"] == 0.0
        assert last["goodput"] < 1.0


def test_goodput_counts_rollbacks_from_the_checkpoint_and_save_stalls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(JOB_START_ENV, "100")
    monkeypatch.setenv(RESTART_COUNT_ENV, "0")
    clock = GoodputClock.for_attempt(None, 0, now=110.0)  # 10 s of start-up: not counted as lost
    clock.reached(4, now=120.0)  # step 4 and its save done
    clock.checkpointed(4)
    clock.reached(5, now=121.0)
    clock.reached(6, now=122.0)
    assert clock.rolled_back(4, now=125.0) == pytest.approx(5.0)  # steps 5, 6 and 3 s of reloading
    assert clock.rolled_back(4, now=126.0) == pytest.approx(1.0)  # again at once: from the last reload
    clock.checkpoints_s += 4.0
    metrics = clock.metrics(now=150.0)
    assert metrics["lost_to_rollbacks_s"] == pytest.approx(6.0) and metrics["lost_to_checkpoints_s"] == 4.0
    assert metrics["wall_s"] == 50.0 and metrics["goodput"] == pytest.approx(1.0 - 10.0 / 50.0)


def test_a_restarted_attempt_carries_the_rollback_and_checkpoint_losses_of_the_step_it_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The previous attempt logged steps 2 and 4 (the kill came later); the new one resumes from step 2: what
    # it had lost by step 2 is carried, what came after is part of the restart's own loss.
    metrics = tmp_path / "metrics.jsonl"
    records = [{"step": s, "wall_time": 100.0 + s, "restarts": 0, "lost_to_rollbacks_s": float(s),
                "lost_to_checkpoints_s": 0.5 * s} for s in (2, 4)]  # fmt: skip
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert carried_losses(metrics, 2, job_start=99.0) == (2.0, 1.0)
    assert carried_losses(metrics, 1, job_start=99.0) == (0.0, 0.0)
    monkeypatch.setenv(JOB_START_ENV, "99")
    monkeypatch.setenv(RESTART_COUNT_ENV, "1")
    clock = GoodputClock.for_attempt(tmp_path, 2, now=110.0)
    metrics_now = clock.metrics(now=120.0)
    assert (metrics_now["lost_to_rollbacks_s"], metrics_now["lost_to_checkpoints_s"]) == (2.0, 1.0)
    assert metrics_now["lost_to_restarts_s"] == pytest.approx(110.0 - 102.0)
    _consistent(metrics_now)
