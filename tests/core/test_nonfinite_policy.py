"""The training loop's policy for steps it cannot trust: non-finite ones are skipped, counted, and stop the
run when they do not end; fp16 overflows follow the loss scaler; a gradient norm stuck at 0 is warned about."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from scaling.core.data import DistributedDataLoader
from scaling.core.nn.precision import PrecisionConfig
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.core.trainer import Trainer, TrainerConfig, TrainingContext, TrainingDiverged

from .pipeline.tp_models import Loss, SampleWindows, model_specs
from .test_console_output import REPO, _tiny_run


class _Poisoned(Loss):
    """The loss of chosen steps, on chosen global ranks, made non-finite or zero.

    ``"loss"`` adds a NaN constant: the loss is NaN but the gradients stay finite (only the loss check can
    see it). ``"grads"`` multiplies by NaN: loss and gradients are NaN. ``"zero"`` multiplies by 0: a finite
    loss with a gradient of exactly 0.
    """

    def __init__(self, topology: Topology, how: str, steps: set[int], ranks: set[int]) -> None:
        super().__init__(topology)
        self.how, self.steps, self.ranks = how, steps, ranks
        self.step = 0

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, metrics = super().__call__(logits, batch)
        if self.step in self.steps and dist.get_rank() in self.ranks:
            if self.how == "loss":
                loss = loss + torch.tensor(float("nan"))
            elif self.how == "grads":
                loss = loss * torch.tensor(float("nan"))
            else:
                loss = loss * 0.0
        return loss, metrics


def _run(
    layout: dict[str, Any],
    trainer: dict[str, Any],
    how: str,
    steps: list[int],
    ranks: list[int],
    precision: str = "float32",
    scaler: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the tiny model with poisoned steps (0-based step index); report what each step did."""
    topo = Topology(TopologyConfig(**layout, micro_batch_size=2, global_batch_size=4))
    loss = _Poisoned(topo, how, set(steps), set(ranks))
    module = ParallelModule(
        model_specs(topo, 1, 0.0), topo, loss, seed=1, precision=PrecisionConfig.from_dict({"precision": precision})
    )
    optimizer_config: dict[str, Any] = {"training_groups": [{"learning_rate_schedule": {"learning_rate": 1e-2}}]}
    if scaler is not None:
        optimizer_config["loss_scaler"] = scaler
    optimizer = Optimizer.for_module(module, OptimizerConfig.from_dict(optimizer_config))
    config = TrainerConfig.from_dict(trainer)
    data = DistributedDataLoader(SampleWindows(), topo)
    run = Trainer(config, TrainingContext(config, topo), module, optimizer, data)
    untouched: dict[int, bool] = {}  # step -> weights and Adam state equal before and after the optimizer step
    original_train_step, original_step = module.train_step, optimizer.step

    def train_step(*args: Any, **kwargs: Any) -> Any:
        loss.step = kwargs["step"]
        return original_train_step(*args, **kwargs)

    def step(index: int, *args: Any) -> Any:
        before = [p.detach().clone() for p in module.parameters()]
        state = [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()]
        result = original_step(index, *args)
        after_state = list(optimizer.state.values())
        untouched[index] = (
            all(torch.equal(b, p) for b, p in zip(before, module.parameters(), strict=True))
            and len(state) == len(after_state)
            and all(
                all(torch.equal(v, s[k]) for k, v in old.items()) for old, s in zip(state, after_state, strict=True)
            )
        )
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
    return {
        "step": run.context.step,
        "history": run.history,
        "untouched": [untouched[i] for i in sorted(untouched)],
        "error": error,
        "warnings": [m for m in logged if "gradient norm is exactly 0" in m],
        "skip_warnings": [m for m in logged if " skipped: loss " in m],
        "scale": optimizer.loss_scale,
    }


def test_a_non_finite_loss_on_one_rank_skips_that_step_on_every_rank_and_counts_it() -> None:
    # The loss turns NaN on rank 1 only, at step index 2, while its gradients stay finite: only the loss
    # check sees it, and the data-parallel average carries it to rank 0, so both ranks skip together.
    trainer = {"train_iterations": 5, "log_interval": 1}
    results = run_distributed(_run, 2, {"data_parallel_size": 2}, trainer, "loss", [2], [1])
    for result in results:
        assert result["error"] is None and result["step"] == 5
        assert result["untouched"] == [False, False, True, False, False]  # weights and Adam state kept at step 3
        skipped = [h["skipped"] for h in result["history"] if "skipped" in h]
        assert skipped == [0.0, 0.0, 1.0, 0.0, 0.0]
        assert [h["skipped_steps"] for h in result["history"] if "skipped_steps" in h] == [0, 0, 1, 1, 1]
    # One line about it, from rank 0 only, numbered as the console and the metrics number steps.
    assert results[0]["skip_warnings"] == [
        "step 3 skipped: loss nan, gradient norm 1.7 (1 in a row; 5 in a row stop the run)"
    ]
    assert results[1]["skip_warnings"] == []


def test_consecutive_non_finite_steps_stop_the_run_on_every_rank_with_one_line() -> None:
    # NaN gradients from step index 1 on, on the last pipeline stage: the first stage sees them through the
    # global norm, and both stages stop after max_consecutive_skips in a row.
    trainer = {"train_iterations": 20, "max_consecutive_skips": 3, "log_interval": 10}
    results = run_distributed(_run, 2, {"pipe_parallel_size": 2}, trainer, "grads", list(range(1, 20)), [1])
    for result in results:
        assert result["step"] == 4  # steps 2, 3 and 4 skipped: the third in a row stops the run
        last = result["history"][-1]  # the step that stops the run is logged although off the log interval
        assert (last["step"], last["skipped"], last["skipped_steps"]) == (4, 1.0, 3)
        assert result["untouched"] == [False, True, True, True]
        assert result["error"] is not None and "\n" not in result["error"]
        assert result["error"].startswith("training diverged: 3 steps in a row (2-4) had a non-finite loss")
        assert "trainer.max_consecutive_skips" in result["error"]


def test_isolated_non_finite_steps_never_stop_the_run() -> None:
    trainer = {"train_iterations": 8, "max_consecutive_skips": 2}
    result = run_distributed(_run, 1, {}, trainer, "grads", [1, 3, 5], [0])[0]
    assert result["error"] is None and result["step"] == 8
    assert result["history"][-1]["skipped_steps"] == 3


def test_fp16_overflows_follow_the_scaler_and_only_the_minimum_scale_stops_the_run() -> None:
    # Overflowing from step index 1 on: with fp16 the scaler halves 4 -> 2 -> 1 (skips that do not count
    # toward max_consecutive_skips = 2), then an overflow at its minimum scale stops the run.
    trainer = {"train_iterations": 20, "max_consecutive_skips": 2}
    scaler = {"initial_scale": 4.0, "min_scale": 1.0, "hysteresis": 1, "factor": 2.0}
    result = run_distributed(_run, 1, {}, trainer, "grads", list(range(1, 20)), [0], "float16", scaler)[0]
    assert result["step"] == 4 and result["scale"] == 1.0
    assert result["error"] is not None and "\n" not in result["error"]
    assert result["error"].startswith("training diverged at step 4: the gradients overflow even at the fp16 loss")
    assert "minimum scale (1;" in result["error"]


def test_a_gradient_norm_stuck_at_zero_is_warned_about_once_naming_the_steps() -> None:
    trainer = {"train_iterations": 10}
    result = run_distributed(_run, 1, {}, trainer, "zero", list(range(3, 9)), [0])[0]
    assert result["error"] is None and result["step"] == 10
    assert result["warnings"] == [
        "the gradient norm is exactly 0 at steps 4-6: nothing is learning (saturated activations, e.g. from a far "
        "too large learning rate, or no trainable parameter reached by the loss)"
    ]


@pytest.mark.timeout(300)
def test_scaling_train_stops_a_diverged_run_with_one_line_and_exit_code_1(tmp_path: Path) -> None:
    # A learning rate of 1e30 makes the weights overflow on the next forward: every later step is non-finite
    # on both pipeline stages, and after max_consecutive_skips in a row the run stops, nothing saved.
    config = _tiny_run(tmp_path, {"train_iterations": 30, "max_consecutive_skips": 3,
                                  "save_dir": str(tmp_path / "ckpt"), "save_interval": 10})  # fmt: skip
    scaling = Path(sys.executable).with_name("scaling")
    learning_rate = "optimizer.training_groups.0.learning_rate_schedule.learning_rate=1e30"
    result = subprocess.run([str(scaling), "train", str(config), "-o", learning_rate],
                            cwd=REPO, capture_output=True, text=True, timeout=280)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    diverged = [line for line in output.splitlines() if "training diverged: 3 steps in a row (2-4)" in line]
    assert len(diverged) == 1, output[-3000:]
    assert "Traceback" not in output
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").glob("global_step*"))
