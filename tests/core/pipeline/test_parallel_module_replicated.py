"""ParallelModule on pipeline x data parallel layouts equals one process running all micro-batches."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from scaling.core.nn.dropout import DropoutKey, dropout_key
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig

from .pipeline_models import loss_fn, make_batches, specs

VOCAB, HIDDEN, SEQ, MICRO, N_BLOCKS, SEED = 11, 8, 5, 2, 4, 1234


def reference(n_micro_total: int, dropout: float) -> dict[str, Any]:
    """Plain single-process PyTorch: build every layer, tie by hand, accumulate over all micro-batches."""
    layers = [spec.build() for spec in specs(N_BLOCKS, VOCAB, HIDDEN, dropout)]
    layers[-1].weight = layers[0].weight
    batches = make_batches(n_micro_total, MICRO, SEQ, VOCAB, seed=7)
    losses = []
    for micro, batch in enumerate(batches):
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
    return {"loss": torch.stack(losses).mean(), "grads": grads}


def _parallel(config: dict[str, Any], n_micro: int, dropout: float) -> dict[str, Any]:
    topo = Topology(TopologyConfig(**config, gradient_accumulation_steps=n_micro, micro_batch_size=MICRO))
    module = ParallelModule(specs(N_BLOCKS, VOCAB, HIDDEN, dropout), topo, loss_fn, seed=SEED)
    all_batches = make_batches(n_micro * topo.dp_size, MICRO, SEQ, VOCAB, seed=7)
    mine = all_batches[topo.dp_rank * n_micro : (topo.dp_rank + 1) * n_micro]
    result = module.train_step(mine)
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    # A tied parameter is registered under its first layer on this rank; name it under every tied layer here.
    for index in module.layers:
        layer = module.layers[index]
        if hasattr(layer, "weight") and isinstance(layer.weight, torch.nn.Parameter) and layer.weight.grad is not None:
            grads[f"layers.{index}.weight"] = layer.weight.grad.clone()
    return {"loss": result.loss, "metrics": result.metrics, "grads": grads}


LAYOUTS = [
    dict(pipe_parallel_size=1, data_parallel_size=1),
    dict(pipe_parallel_size=2, data_parallel_size=1),
    dict(pipe_parallel_size=1, data_parallel_size=2),
    dict(pipe_parallel_size=2, data_parallel_size=2),
    dict(pipe_parallel_size=2, data_parallel_size=1, pipe_schedule="gpipe"),
    dict(pipe_parallel_size=2, data_parallel_size=1, pipe_schedule="interleaved_1f1b", virtual_pipe_stages=2),
    dict(pipe_parallel_size=1, data_parallel_size=1, pipe_schedule="interleaved_1f1b", virtual_pipe_stages=2),
    dict(pipe_parallel_size=2, data_parallel_size=1, activation_checkpointing_type="every_layer"),
    dict(pipe_parallel_size=2, data_parallel_size=2, activation_checkpointing_type="every_pipe_stage"),
    dict(model_parallel_size=2, pipe_parallel_size=2, data_parallel_size=1, grad_reduce_bucket_mb=0.0001),
    dict(pipe_parallel_size=1, data_parallel_size=2, grad_reduce_bucket_mb=0.0001),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("config", LAYOUTS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_layouts_match_single_process(config: dict[str, Any]) -> None:
    n_micro, dropout = 4, 0.2
    world = config.get("model_parallel_size", 1) * config["pipe_parallel_size"] * config["data_parallel_size"]
    results = run_distributed(_parallel, world, config, n_micro, dropout, timeout_s=90)
    expected = reference(n_micro * config["data_parallel_size"], dropout)
    seen = set()
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["loss"], expected["loss"], rtol=1e-5, atol=1e-6, msg=f"loss on rank {rank}")
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, expected["grads"][name], rtol=1e-5, atol=1e-6, msg=f"{name} rank {rank}")
            seen.add(name)
    assert seen == set(expected["grads"]), f"gradients never checked: {set(expected['grads']) - seen}"
