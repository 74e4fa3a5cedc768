"""The central invariant: a tensor-parallel model on any (tp, pp, dp) layout gives the loss, every
gradient and the gradient norm of the same model run by one process (fp32, rtol 1e-5).

The reference is a plain loop over all micro-batches in a world of one, without ParallelModule. Each
parallel rank returns its gradient shards; they are reassembled with the parameter metadata and compared.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from scaling.core.nn import unshard
from scaling.core.nn.dropout import DropoutKey, dropout_key
from scaling.core.optimizer.clipping import global_grad_norm
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig

from .tp_models import Loss, batches, model_specs

N_BLOCKS, SEED, N_MICRO, DROPOUT = 4, 99, 4, 0.25
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _reference(n_micro_total: int) -> dict[str, Any]:
    topo = Topology(TopologyConfig())
    layers = [spec.build() for spec in model_specs(topo, N_BLOCKS, DROPOUT)]
    layers[-1].weight = layers[0].weight
    loss_fn = Loss(topo)
    losses = []
    for micro, batch in enumerate(batches(n_micro_total)):
        x: Any = batch
        for index, layer in enumerate(layers):
            with dropout_key(DropoutKey(SEED, 0, micro, index)):
                x = layer(x)
        loss, _ = loss_fn(x, batch)
        (loss / n_micro_total).backward()
        losses.append(loss.detach())
    grads = {}
    for index, layer in enumerate(layers):
        for name, p in layer.named_parameters():
            grads[f"layers.{index}.{name}"] = p.grad.clone()
    # Each weight once: the tied head weight is the embedding weight.
    norm_sq = sum(g.pow(2).sum() for n, g in grads.items() if n != f"layers.{N_BLOCKS + 1}.weight")
    eval_losses = []
    with torch.no_grad():
        for layer in layers:
            layer.eval()
        for batch in batches(n_micro_total):
            x = batch
            for layer in layers:
                x = layer(x)
            eval_losses.append(loss_fn(x, batch)[0])
    tokens = torch.stack([(b["targets"] != -100).sum().float() for b in batches(n_micro_total)]).mean()
    return {
        "loss": torch.stack(losses).mean(),
        "grads": grads,
        "norm": torch.sqrt(norm_sq),
        "eval_loss": torch.stack(eval_losses).mean(),
        "tokens": tokens,
    }


def _parallel(config: dict[str, Any]) -> dict[str, Any]:
    topo = Topology(TopologyConfig(**config, gradient_accumulation_steps=N_MICRO))
    module = ParallelModule(model_specs(topo, N_BLOCKS, DROPOUT), topo, Loss(topo), seed=SEED)
    mine = batches(N_MICRO * topo.dp_size)[topo.dp_rank * N_MICRO : (topo.dp_rank + 1) * N_MICRO]
    if config.get("pipe_partition_method") == "balanced":  # 6 layers of similar size: 3 per stage
        assert [len(r) for r in module.virtual_ranges] == [3, 3], module.virtual_ranges
    result = module.train_step(mine)
    grads: dict[str, Any] = {}
    for index in module.layers:
        for name, _ in module.layers[index].named_parameters(remove_duplicate=False):
            canonical = module.canonical_name(f"layers.{index}.{name}")
            grad = module.main_grad(canonical)
            assert grad is not None
            grads[f"layers.{index}.{name}"] = (grad.clone(), module.param_table[canonical].tp_split_dim)
    counted = [module.main_grad(n) for n in module.names_counted_in_norm()]
    norm = global_grad_norm([g for g in counted if g is not None], topo.model_group)
    evaluated = module.eval_step(mine)
    return {
        "coord": (topo.pp_rank, topo.dp_rank, topo.tp_rank),
        "loss": result.loss,
        "metrics": result.metrics,
        "grads": grads,
        "norm": norm,
        "eval_loss": evaluated.loss,
        "last_stage": topo.is_last_pipe_stage,
    }


def _assemble(results: list[dict[str, Any]], tp: int) -> dict[str, torch.Tensor]:
    """Full gradients from the dp=0 ranks; dp replicas and replicated tp copies must agree exactly."""
    shards: dict[str, dict[int, tuple[torch.Tensor, int | None]]] = {}
    for result in results:
        _pp, dp, tp_rank = result["coord"]
        for name, (grad, split) in result["grads"].items():
            if dp == 0:
                shards.setdefault(name, {})[tp_rank] = (grad, split)
    for result in results:  # data-parallel replicas hold identical averaged gradients
        _pp, dp, tp_rank = result["coord"]
        for name, (grad, _) in result["grads"].items():
            torch.testing.assert_close(grad, shards[name][tp_rank][0], rtol=0, atol=0, msg=f"{name} dp replica")
    full = {}
    for name, by_rank in shards.items():
        assert sorted(by_rank) == list(range(tp)), name
        split = by_rank[0][1]
        if split is None:
            for rank in range(1, tp):
                torch.testing.assert_close(by_rank[rank][0], by_rank[0][0], **TOL, msg=f"{name} tp copies differ")
            full[name] = by_rank[0][0]
        else:
            full[name] = unshard([by_rank[r][0] for r in range(tp)], split)
    return full


LAYOUTS = [
    {"model_parallel_size": tp, "pipe_parallel_size": pp, "data_parallel_size": dp}
    for tp, pp, dp in [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2)]
] + [
    {"pipe_parallel_size": 2, "pipe_schedule": "interleaved_1f1b", "virtual_pipe_stages": 2},
    {"model_parallel_size": 2, "pipe_parallel_size": 2, "pipe_schedule": "interleaved_1f1b", "virtual_pipe_stages": 2},
    {"model_parallel_size": 2, "sequence_parallel": True},
    {"model_parallel_size": 2, "pipe_parallel_size": 2, "data_parallel_size": 2, "sequence_parallel": True},
    {"model_parallel_size": 2, "pipe_parallel_size": 2, "activation_checkpointing_type": "every_layer"},
    {"model_parallel_size": 2, "data_parallel_size": 2, "activation_checkpointing_type": "every_pipe_stage"},
    {"pipe_parallel_size": 2, "data_parallel_size": 2, "pipe_schedule": "gpipe"},
    {"model_parallel_size": 2, "pipe_parallel_size": 2, "pipe_partition_method": "balanced"},
    {"pipe_parallel_size": 2, "pipe_partition_method": [1, 5]},
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("config", LAYOUTS, ids=lambda c: "-".join(f"{k.split('_')[0]}{v}" for k, v in c.items()))
def test_layout_matches_single_process(config: dict[str, Any]) -> None:
    tp = config.get("model_parallel_size", 1)
    dp = config.get("data_parallel_size", 1)
    world = tp * config.get("pipe_parallel_size", 1) * dp
    results = run_distributed(_parallel, world, config, timeout_s=150)
    expected = run_distributed(_reference, 1, N_MICRO * dp, timeout_s=60)[0]
    full = _assemble(results, tp)
    assert set(full) == set(expected["grads"]), set(expected["grads"]) ^ set(full)
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(full[name], grad, **TOL, msg=f"gradient of {name}")
    for result in results:
        torch.testing.assert_close(result["loss"], expected["loss"], **TOL, msg=f"loss on {result['coord']}")
        torch.testing.assert_close(result["norm"], expected["norm"], **TOL, msg=f"grad norm on {result['coord']}")
        torch.testing.assert_close(result["eval_loss"], expected["eval_loss"], **TOL, msg="eval loss")
        if result["last_stage"]:
            torch.testing.assert_close(result["metrics"]["tokens"], expected["tokens"], **TOL, msg="metrics")


def _too_many_stages() -> str:
    config = TopologyConfig(
        pipe_parallel_size=2, pipe_schedule="interleaved_1f1b", virtual_pipe_stages=2, gradient_accumulation_steps=2
    )
    topo = Topology(config)
    try:
        ParallelModule(model_specs(topo, 1, 0.0)[:3], topo, Loss(topo))
    except ValueError as exc:
        return str(exc)
    finally:
        dist.barrier()
    return "no error"


def test_more_stages_than_layers_is_rejected_clearly() -> None:
    messages = run_distributed(_too_many_stages, 2)
    assert all("cannot split 3 layers over 4 pipeline stages" in m for m in messages)
