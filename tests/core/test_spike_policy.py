"""Bad steps beyond the default skip: spikes, the per-event policies (skip, rollback, abort), the bound on
events, and the bad-batch ledger that resumed and rolled-back runs honour.

Poison is keyed on the *data position* (samples consumed before the batch), not on the step: a batch that
is bad stays bad when replayed, so only the ledger can keep a replay from hitting it again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from scaling.core.config import ConfigError
from scaling.core.data import DistributedDataLoader
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.core.trainer import Trainer, TrainerConfig, TrainingContext, TrainingDiverged
from scaling.core.trainer.ledger import LEDGER_NAME, BadBatchLedger
from scaling.core.trainer.spikes import SpikeConfig, StepGuard

from .pipeline.tp_models import Loss, SampleWindows, model_specs

GLOBAL_BATCH = 4
LR = 1e-2


class _PoisonedAt(Loss):
    """The loss of the global batches at chosen data positions, on chosen global ranks, made bad.

    ``"loss"``: plus NaN (finite gradients); ``"grads"``: times NaN; ``"spike"``: times 100 (loss and
    gradients spike); ``"norm_spike"``: the gradients times 100 with the loss value unchanged.
    """

    def __init__(self, topology: Topology, poison: dict[int, str], ranks: set[int]) -> None:
        super().__init__(topology)
        self.poison, self.ranks = poison, ranks
        self.position = -1

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, metrics = super().__call__(logits, batch)
        how = self.poison.get(self.position)
        if how is not None and dist.get_rank() in self.ranks:
            if how == "loss":
                loss = loss + torch.tensor(float("nan"))
            elif how == "grads":
                loss = loss * torch.tensor(float("nan"))
            elif how == "spike":
                loss = loss * 100.0
            else:
                loss = loss + 99.0 * (loss - loss.detach())
        return loss, metrics


def _run(layout: dict[str, Any], trainer: dict[str, Any], poison: dict[int, str], ranks: list[int]) -> dict[str, Any]:
    """Train the tiny model with poisoned data positions; report what each executed step did."""
    topo = Topology(TopologyConfig(**layout, micro_batch_size=2, global_batch_size=GLOBAL_BATCH))
    loss = _PoisonedAt(topo, poison, set(ranks))
    module = ParallelModule(model_specs(topo, 1, 0.0), topo, loss, seed=1)
    schedule = {"learning_rate": LR, "learning_rate_decay_style": "constant"}
    optimizer_config = OptimizerConfig.from_dict({"training_groups": [{"learning_rate_schedule": schedule}]})
    optimizer = Optimizer.for_module(module, optimizer_config)
    config = TrainerConfig.from_dict(trainer)
    data = DistributedDataLoader(SampleWindows(), topo)
    run = Trainer(config, TrainingContext(config, topo), module, optimizer, data)
    positions: list[int] = []  # the data position of every executed step
    untouched: list[bool] = []  # per executed step: weights equal before and after the optimizer step
    original_train_step, original_step = module.train_step, optimizer.step

    def train_step(*args: Any, **kwargs: Any) -> Any:
        loss.position = data.consumed - GLOBAL_BATCH  # next_batches has moved past the batch just read
        positions.append(loss.position)
        return original_train_step(*args, **kwargs)

    def step(index: int, *args: Any) -> Any:
        before = [p.detach().clone() for p in module.parameters()]
        result = original_step(index, *args)
        untouched.append(all(torch.equal(b, p) for b, p in zip(before, module.parameters(), strict=True)))
        return result

    module.train_step = train_step  # type: ignore[method-assign]
    optimizer.step = step  # type: ignore[method-assign]
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("scaling.trainer").addHandler(handler)
    error = None
    try:
        run.run()
    except TrainingDiverged as exc:
        error = str(exc)
    finally:
        logging.getLogger("scaling.trainer").removeHandler(handler)
    finite = all(bool(torch.isfinite(p).all()) for p in module.parameters())
    return {
        "step": run.context.step,
        "history": run.history,
        "positions": positions,
        "untouched": untouched,
        "error": error,
        "finite": finite,
        "logged": logged,
    }


def _ledger(save_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (save_dir / LEDGER_NAME).read_text().splitlines()]


def _saved_steps(save_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("global_step")) for p in save_dir.glob("global_step*"))


SPIKES = {"factor": 5.0, "window": 3}


@pytest.mark.timeout(60)
def test_a_nan_loss_on_one_rank_aborts_every_rank_writes_the_ledger_and_publishes_no_checkpoint(
    tmp_path: Path,
) -> None:
    # Rank 1 of two data-parallel ranks has a NaN loss on the batch read for step 4 (position 12); the save
    # interval would publish step 4: abort comes first, and the last checkpoint stays step 2.
    save = tmp_path / "ckpt"
    trainer = {"train_iterations": 8, "save_dir": str(save), "save_interval": 2, "spikes": {"on_non_finite": "abort"}}
    results = run_distributed(_run, 2, {"data_parallel_size": 2}, trainer, {12: "loss"}, [1], timeout_s=60)
    for result in results:
        assert result["step"] == 4 and result["finite"]
        assert result["error"].startswith("training stopped: non-finite step at step 4 (loss nan")
        assert "'abort'" in result["error"] and "\n" not in result["error"]
    assert _saved_steps(save) == [2]
    [entry] = _ledger(save)
    assert (entry["step"], entry["position"], entry["event"], entry["global_batch"]) == (4, 12, "non_finite", 4)
    assert len(entry["samples"]) == GLOBAL_BATCH and entry["source"] == "SampleWindows"
    assert entry["loss"] != entry["loss"]  # NaN written as such


@pytest.mark.timeout(60)
def test_a_resumed_run_steps_over_the_ledgered_batch(tmp_path: Path) -> None:
    # The first run aborts at step 4 (position 12); the resumed one starts from step 2, replays step 3 and
    # then reads position 16 instead of 12 for step 4: the poison is never met again.
    save = tmp_path / "ckpt"
    trainer = {"train_iterations": 6, "save_dir": str(save), "save_interval": 2, "spikes": {"on_non_finite": "abort"}}
    first = run_distributed(_run, 1, {}, trainer, {12: "grads"}, [0], timeout_s=60)[0]
    assert first["error"] is not None and first["positions"] == [0, 4, 8, 12]
    resumed = dict(trainer, load_dir=str(save))
    second = run_distributed(_run, 1, {}, resumed, {12: "grads"}, [0], timeout_s=60)[0]
    assert second["error"] is None and second["step"] == 6
    assert second["positions"] == [8, 16, 20, 24]
    assert not any(second["untouched"])
    assert second["history"][-1]["events/ledger_skipped"] == 1.0
    assert second["history"][-1]["events/non_finite"] == 0.0
    assert len(_ledger(save)) == 1  # nothing new


@pytest.mark.timeout(60)
def test_nan_gradients_on_one_pipeline_stage_roll_back_lower_the_learning_rate_and_skip_the_batch(
    tmp_path: Path,
) -> None:
    # NaN gradients on the last stage at position 16 (step 5): both stages reload step 4, replay step 5 on
    # position 20, and train two steps at half the learning rate.
    save = tmp_path / "ckpt"
    spikes = {"on_non_finite": "rollback", "rollback_lr_factor": 0.5, "rollback_lr_steps": 2}
    trainer = {"train_iterations": 8, "save_dir": str(save), "save_interval": 4, "spikes": spikes}
    results = run_distributed(_run, 2, {"pipe_parallel_size": 2}, trainer, {16: "grads"}, [1], timeout_s=60)
    for result in results:
        assert result["error"] is None and result["step"] == 8 and result["finite"]
        assert result["positions"] == [0, 4, 8, 12, 16, 20, 24, 28, 32]
        assert result["untouched"] == [False] * 4 + [True] + [False] * 4
        steps = [h["step"] for h in result["history"]]
        assert steps == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # step 5 logged twice: the bad one, then the replay
        lrs = [h["lr/default"] for h in result["history"]]
        assert lrs == [LR] * 5 + [LR / 2, LR / 2, LR, LR]
        last = result["history"][-1]
        assert (last["events/rolled_back"], last["events/non_finite"], last["events/skipped"]) == (1.0, 1.0, 0.0)
    [entry] = _ledger(save)
    assert (entry["step"], entry["position"], entry["event"]) == (5, 16, "non_finite")
    assert _saved_steps(save) == [4, 8]


@pytest.mark.timeout(60)
def test_a_loss_spike_and_a_gradient_norm_spike_are_skipped_before_their_update() -> None:
    # Healthy steps fill the window of 3; then a loss spike (position 16) and a gradient-norm spike with an
    # unchanged loss (position 24): both updates are dropped, counted, and the run goes on.
    trainer = {"train_iterations": 10, "spikes": SPIKES}
    results = run_distributed(
        _run, 2, {"data_parallel_size": 2}, trainer, {16: "spike", 24: "norm_spike"}, [0], timeout_s=60
    )
    for result in results:
        assert result["error"] is None and result["step"] == 10
        assert result["untouched"] == [False] * 4 + [True, False, True] + [False] * 3
        last = result["history"][-1]
        assert (last["events/spikes"], last["events/skipped"], last["skipped_steps"]) == (2.0, 2.0, 2.0)
        assert [h["skipped"] for h in result["history"]][4:7] == [1.0, 0.0, 1.0]
    warnings = [m for m in results[0]["logged"] if "spike at step" in m]
    assert len(warnings) == 2 and warnings[0].startswith("loss spike at step 5 (loss ")
    assert warnings[1].startswith("grad-norm spike at step 7 (grad norm ")
    assert not [m for m in results[1]["logged"] if "spike at step" in m]  # rank 0 speaks for the run


@pytest.mark.timeout(60)
def test_a_spike_with_policy_abort_stops_the_run_and_one_with_rollback_replays_past_it(tmp_path: Path) -> None:
    aborted = run_distributed(
        _run, 1, {}, {"train_iterations": 8, "spikes": {**SPIKES, "on_loss_spike": "abort"}}, {16: "spike"}, [0],
        timeout_s=60,
    )[0]  # fmt: skip
    assert aborted["step"] == 5 and aborted["error"].startswith("training stopped: loss spike at step 5 (loss ")
    save = tmp_path / "ckpt"
    spikes = {**SPIKES, "on_grad_norm_spike": "rollback", "rollback_lr_steps": 0}
    trainer = {"train_iterations": 7, "save_dir": str(save), "save_interval": 3, "spikes": spikes}
    rolled = run_distributed(_run, 1, {}, trainer, {16: "norm_spike"}, [0], timeout_s=60)[0]
    assert rolled["error"] is None and rolled["step"] == 7
    assert rolled["positions"] == [0, 4, 8, 12, 16, 12, 20, 24, 28]  # back to step 3; step 5 on a fresh batch
    assert rolled["history"][-1]["events/rolled_back"] == 1.0
    assert [e["event"] for e in _ledger(save)] == ["grad_norm_spike"]


@pytest.mark.timeout(60)
def test_a_checkpoint_due_at_a_skipped_non_finite_step_holds_the_previous_finite_weights(tmp_path: Path) -> None:
    # The default policy skips the NaN step 4, which is also a save step: what is published is finite.
    save = tmp_path / "ckpt"
    trainer = {"train_iterations": 4, "save_dir": str(save), "save_interval": 2}
    result = run_distributed(_run, 1, {}, trainer, {12: "grads"}, [0], timeout_s=60)[0]
    assert result["error"] is None and result["untouched"] == [False, False, False, True]
    assert _saved_steps(save) == [2, 4]
    tensors = [t for f in (save / "global_step4").rglob("*.safetensors") for t in load_file(f).values()]
    assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
    assert [e["step"] for e in _ledger(save)] == [4]


@pytest.mark.timeout(60)
def test_too_many_events_in_the_window_stop_the_run_with_a_summary() -> None:
    trainer = {"train_iterations": 20, "spikes": {"max_events": 3, "event_window": 10}}
    poison = {0: "grads", 12: "loss", 40: "grads", 48: "grads"}  # steps 1 and 4, then 11 and 13
    result = run_distributed(_run, 1, {}, trainer, poison, [0], timeout_s=60)[0]
    assert result["step"] == 13
    assert result["error"] == (
        "training stopped: 3 bad steps within 10 steps (trainer.spikes.max_events = 3): 3 non finite; "
        "last: non-finite step at step 13 (loss nan, grad norm nan); 4 skipped, 0 rolled back"
    )


def test_default_policy_and_bad_combinations() -> None:
    config = TrainerConfig()
    assert config.spikes.on_non_finite == "skip" and config.spikes.factor is None
    with pytest.raises(ConfigError, match=r"spikes\.factor"):
        TrainerConfig.from_dict({"spikes": {"factor": 1.0}})
    with pytest.raises(ConfigError, match=r"rollback.* needs save_dir"):
        TrainerConfig.from_dict({"spikes": {"on_loss_spike": "rollback"}})
    ledger = BadBatchLedger(None, writer=False)
    with pytest.raises(ConfigError, match="not supported with fp16 loss scaling"):
        StepGuard(SpikeConfig(factor=3.0), ledger, loss_scaling=True, announce=False)
    StepGuard(SpikeConfig(factor=3.0, on_loss_spike="abort", on_grad_norm_spike="rollback"), ledger,
              loss_scaling=True, announce=False)  # fmt: skip


def test_the_ledger_drops_an_incomplete_last_entry_and_refuses_a_damaged_one(tmp_path: Path) -> None:
    entry = {"step": 3, "position": 8, "global_batch": 4, "seed": 0, "samples": [1, 2, 3, 4], "source": "x",
             "event": "loss_spike", "loss": 9.0, "grad_norm": 1.0, "threshold": 2.5}  # fmt: skip
    path = tmp_path / LEDGER_NAME
    path.write_text(json.dumps(entry) + "\n" + json.dumps(entry)[:20])
    assert [e.position for e in BadBatchLedger(path, writer=False).entries] == [8]
    path.write_text(json.dumps(entry)[:20] + "\n" + json.dumps(entry) + "\n")
    with pytest.raises(ConfigError, match=f"{LEDGER_NAME}:1: not a bad-batch ledger entry"):
        BadBatchLedger(path, writer=False)
