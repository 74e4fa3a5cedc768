"""bf16 with fp32 master weights, fp16 with dynamic loss scaling, and optimizer-state resharding."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from scaling.core.config import ConfigError
from scaling.core.nn.precision import PrecisionConfig
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.layer_spec import LayerSpec
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.core.zero import gathered

from ..pipeline.tp_models import Loss, batches, model_specs

BF16_STEPS = 20
# Tolerances, per parameter tensor after 20 AdamW steps at lr 1e-2 (measured maxima on CPU in brackets):
# ||w_bf16 - w_fp32|| / ||w_fp32|| < 1.5e-2 [7.6e-3], and the same error over the size of the fp32 update
# ||w_fp32 - w_0|| < 5e-2 [2.5e-2]: bf16 compute perturbs the trajectory by a few percent of what training
# moved, it does not drift.
BF16_RELATIVE_TOLERANCE = 1.5e-2
BF16_UPDATE_TOLERANCE = 5e-2


def _precision(dtype: torch.dtype) -> PrecisionConfig:
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    return PrecisionConfig.from_dict({"precision": name})


def _train(dtype: torch.dtype, steps: int, lr: float) -> dict[str, torch.Tensor]:
    topo = Topology(TopologyConfig(data_parallel_size=dist.get_world_size(), gradient_accumulation_steps=2))
    module = ParallelModule(model_specs(topo, 2, 0.0), topo, Loss(topo), precision=_precision(dtype))
    config = {"gradient_clipping": 1.0, "training_groups": [{"learning_rate_schedule": {"learning_rate": lr}}]}
    optimizer = Optimizer.for_module(module, OptimizerConfig.from_dict(config))
    for step in range(steps):
        all_batches = batches(2 * topo.dp_size, seed=step)
        mine = all_batches[topo.dp_rank * 2 : (topo.dp_rank + 1) * 2]
        module.train_step(mine, step=step, loss_scale=optimizer.loss_scale)
        optimizer.step(step)
    return {n: p.detach().float().clone() for n, p in module.named_parameters_canonical()}


def _gradient_reduction(reduce_in_fp32: bool) -> dict[str, Any]:
    topo = Topology(TopologyConfig(data_parallel_size=dist.get_world_size(), gradient_accumulation_steps=2))
    precision = PrecisionConfig.from_dict({"precision": "bfloat16", "reduce_grads_in_fp32": reduce_in_fp32})
    module = ParallelModule(model_specs(topo, 2, 0.0), topo, Loss(topo), precision=precision)
    optimizer = Optimizer.for_module(module, OptimizerConfig.from_dict({"training_groups": [{}]}))
    mine = batches(2 * topo.dp_size, seed=0)[topo.dp_rank * 2 : (topo.dp_rank + 1) * 2]
    module.train_step(mine, step=0, loss_scale=optimizer.loss_scale)
    grads = {n: module.main_grad(n).clone() for n, _ in module.named_parameters_canonical()}  # type: ignore[union-attr]
    return {
        "no_scaler": optimizer.scaler is None and optimizer.loss_scale == 1.0,  # bf16 needs no loss scaling
        "dtypes": {str(g.dtype) for g in grads.values()},
        "grads": {n: g.float() for n, g in grads.items()},
    }


def test_bf16_runs_without_a_scaler_and_reduces_in_the_configured_dtype() -> None:
    fp32_reduce = run_distributed(_gradient_reduction, 2, True)
    bf16_reduce = run_distributed(_gradient_reduction, 2, False)
    assert all(r["no_scaler"] for r in fp32_reduce + bf16_reduce)
    assert fp32_reduce[0]["dtypes"] == {"torch.float32"} and bf16_reduce[0]["dtypes"] == {"torch.bfloat16"}
    for name, grad in fp32_reduce[0]["grads"].items():
        torch.testing.assert_close(fp32_reduce[1]["grads"][name], grad)  # every replica holds the same average
        torch.testing.assert_close(bf16_reduce[0]["grads"][name], grad, rtol=2e-2, atol=1e-3)  # bf16 rounding only


def test_bf16_with_fp32_masters_tracks_fp32() -> None:
    bf16 = run_distributed(_train, 2, torch.bfloat16, BF16_STEPS, 1e-2)[0]
    fp32 = run_distributed(_train, 2, torch.float32, BF16_STEPS, 1e-2)[0]
    initial = run_distributed(_train, 1, torch.float32, 0, 1e-2)[0]
    for name, weight in fp32.items():
        error = (bf16[name] - weight).norm()
        assert error / weight.norm() < BF16_RELATIVE_TOLERANCE, f"{name}: bf16 is {error / weight.norm():.2e} off"
        update = (weight - initial[name]).norm()
        assert error / update < BF16_UPDATE_TOLERANCE, f"{name}: bf16 error is {error / update:.2e} of the update"


class _Ones(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def _sum_loss(y: torch.Tensor, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return y.float().sum(), {}


def _tiny_updates(steps: int) -> dict[str, Any]:
    topo = Topology(TopologyConfig())
    module = ParallelModule([LayerSpec(_Ones)], topo, _sum_loss, precision=_precision(torch.bfloat16))
    config = {"gradient_clipping": 0, "training_groups": [{"learning_rate_schedule": {"learning_rate": 1e-4}}]}
    optimizer = Optimizer.for_module(module, OptimizerConfig.from_dict(config))
    bf16_only = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    plain = torch.optim.AdamW([bf16_only], lr=1e-4, weight_decay=0.0)
    after_one = None
    for step in range(steps):
        module.train_step([torch.ones(4)], step=step)
        optimizer.step(step)
        bf16_only.grad = torch.ones(4, dtype=torch.bfloat16)
        plain.step()
        if step == 0:
            after_one = (
                optimizer.parameter_state("layers.0.weight")["master"].clone(),
                module.layers["0"].weight.detach().clone(),
            )
    assert after_one is not None
    return {
        "master_after_one": after_one[0],
        "param_after_one": after_one[1],
        "param_after_all": module.layers["0"].weight.detach().clone(),
        "bf16_only_after_all": bf16_only.detach().clone(),
    }


def test_small_updates_accumulate_in_the_fp32_master() -> None:
    result = run_distributed(_tiny_updates, 1, 30)[0]
    # One step of 1e-4 is far below bf16's spacing near 1.0 (2^-8): the model weight cannot show it ...
    assert torch.equal(result["param_after_one"], torch.ones(4, dtype=torch.bfloat16))
    # ... but the fp32 master holds it,
    torch.testing.assert_close(result["master_after_one"], torch.full((4,), 1 - 1e-4), rtol=0, atol=1e-6)
    # and after 30 steps the accumulated 3e-3 reaches the bf16 weight, while a bf16-only AdamW lost every step.
    assert torch.all(result["param_after_all"] < 1.0)
    assert torch.equal(result["bf16_only_after_all"], torch.ones(4, dtype=torch.bfloat16))


class _Overflowing(Loss):
    """Makes rank 0's loss infinite at one step: its gradients overflow, and the all-reduce spreads it."""

    def __init__(self, topology: Topology, overflow_step: int) -> None:
        super().__init__(topology)
        self.step = 0
        self.overflow_step = overflow_step

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, metrics = super().__call__(logits, batch)
        if self.step == self.overflow_step and dist.get_rank() == 0:
            loss = loss * torch.tensor(float("inf"))
        return loss, metrics


def _fp16_run(overflow_step: int, steps: int) -> dict[str, Any]:
    topo = Topology(TopologyConfig(data_parallel_size=dist.get_world_size()))
    loss = _Overflowing(topo, overflow_step)
    module = ParallelModule(model_specs(topo, 1, 0.0), topo, loss, precision=_precision(torch.float16))
    config = {
        "training_groups": [{"learning_rate_schedule": {"learning_rate": 1e-3}}],
        "loss_scaler": {"initial_scale": 1024.0, "growth_interval": 2, "hysteresis": 1},
    }
    optimizer = Optimizer.for_module(module, OptimizerConfig.from_dict(config))
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("scaling.optimizer").addHandler(handler)
    scales, skipped, changed = [], [], []
    for step in range(steps):
        loss.step = step
        before = [p.detach().clone() for p in module.parameters()]
        module.train_step(batches(1, seed=step + dist.get_rank()), step=step, loss_scale=optimizer.loss_scale)
        result = optimizer.step(step)
        skipped.append(result.skipped)
        scales.append(optimizer.loss_scale)
        changed.append(any(not torch.equal(b, p) for b, p in zip(before, module.parameters(), strict=True)))
    return {"skipped": skipped, "scales": scales, "changed": changed, "logged": logged}


def test_fp16_overflow_skips_that_step_everywhere_and_the_scale_recovers() -> None:
    results = run_distributed(_fp16_run, 2, 1, 5)
    assert all(r["logged"] == ["step 1: gradient norm is nan, update skipped; loss scale 1024 -> 512"] for r in results)
    for result in results:  # every rank agrees, though only rank 0 overflowed
        assert result["skipped"] == [False, True, False, False, False]
        assert result["changed"] == [True, False, True, True, True]
        # 1024 -> overflow halves it -> two clean steps double it again.
        assert result["scales"] == [1024.0, 512.0, 512.0, 1024.0, 1024.0]


def _resumable(dp_layout: int, zero: bool, steps: range, state: list[dict[str, Any]] | None) -> dict[str, Any]:
    topo = Topology(TopologyConfig(data_parallel_size=dp_layout))
    n_micro = 4 // dp_layout
    config = OptimizerConfig.from_dict(
        {
            "zero": zero,
            "training_groups": [{"weight_decay": 0.1, "learning_rate_schedule": {"learning_rate": 1e-2}}],
        }
    )
    module = ParallelModule(model_specs(topo, 2, 0.0), topo, Loss(topo), sharding=config.sharding)
    optimizer = Optimizer.for_module(module, config)
    if state is not None:
        optimizer.load_shard_state_dicts(state)
    losses = []
    for step in steps:
        mine = batches(4, seed=50 + step)[topo.dp_rank * n_micro : (topo.dp_rank + 1) * n_micro]
        losses.append(module.train_step(mine, step=step).loss)
        optimizer.step(step)
    weights = {n: gathered(p.detach()).clone() for n, p in module.named_parameters_canonical()}
    return {"losses": losses, "weights": weights, "state": optimizer.shard_state_dict()}


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("saved_dp", "saved_zero", "resumed_dp", "resumed_zero"),
    [(2, True, 4, True), (2, True, 1, False), (4, True, 2, True)],
)
def test_sharded_state_reloads_on_another_data_parallel_size(
    saved_dp: int, saved_zero: bool, resumed_dp: int, resumed_zero: bool
) -> None:
    straight = run_distributed(_resumable, 1, 1, False, range(5), None)[0]
    first = run_distributed(_resumable, saved_dp, saved_dp, saved_zero, range(3), None)
    shards = [r["state"] for r in first]
    assert sum(s["slots"][0]["master"].numel() for s in shards) >= shards[0]["slots"][0]["numel"]
    second = run_distributed(_resumable, resumed_dp, resumed_dp, resumed_zero, range(3, 5), shards)
    losses = first[0]["losses"] + second[0]["losses"]
    torch.testing.assert_close(torch.stack(losses), torch.stack(straight["losses"]), rtol=1e-6, atol=1e-6)
    for name, weight in straight["weights"].items():
        torch.testing.assert_close(second[0]["weights"][name], weight, rtol=1e-6, atol=1e-6, msg=name)


def _bad_groups(groups: list[dict[str, Any]]) -> str:
    topo = Topology(TopologyConfig(pipe_parallel_size=dist.get_world_size()))
    module = ParallelModule(model_specs(topo, 2, 0.0), topo, Loss(topo))
    try:
        Optimizer.for_module(module, OptimizerConfig.from_dict({"training_groups": groups}))
    except ConfigError as exc:
        return str(exc)
    return "no error"


def test_group_patterns_are_checked_over_the_whole_pipeline() -> None:
    # layers.3 (the head) lives only on the last stage: the pattern is fine once counted over stages.
    groups = [{"name": "head", "parameters": ["layers.2.*"]}, {"name": "rest", "parameters": ["*"]}]
    assert run_distributed(_bad_groups, 2, groups) == ["no error", "no error"]
    typo = [{"name": "blocks", "parameters": ["layer.*"]}, {"name": "rest", "parameters": ["*"]}]
    for message in run_distributed(_bad_groups, 2, typo):
        assert (
            "optimizer.training_groups.0.parameters: pattern 'layer.*' of group 'blocks' matches no parameter"
            in message
        )
    missing = [{"name": "blocks", "parameters": ["layers.1.*", "layers.2.*"]}]
    messages = run_distributed(_bad_groups, 2, missing)
    assert any("parameter 'layers.0.weight' matches no group's patterns" in m for m in messages)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"training_groups": [{"learning_rate_schedule": {"learning_rate": -1}}]},
         "training_groups.0.learning_rate_schedule.learning_rate: Input should be greater than 0"),
        ({"training_groups": [{"learning_rate_schedule": {"learning_rate_warmup_steps": 50,
                                                          "learning_rate_decay_steps": 10}}]},
         "training_groups.0.learning_rate_schedule.learning_rate_warmup_steps: warm-up (50 steps) is longer"),
        ({"training_groups": [{"name": "a"}, {"name": "a"}]}, "training_groups: group names must be unique"),
        ({"training_groups": []}, "training_groups: at least one training group"),
        ({"beta2": 1.5}, "beta2: Input should be less than 1"),
    ],
)  # fmt: skip
def test_bad_optimizer_configs(config: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        OptimizerConfig.from_dict(config)
    assert fragment in str(info.value)
