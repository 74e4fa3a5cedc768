"""The plain ``Transformer`` module: one process with no process group, and the engine's numbers on (1, 1, 1).

A failure of the first test points at a layer or communication pair that still needs torch.distributed
when there is none (``Topology.single()``); of the second, at a difference between chaining the layers in
``Transformer.forward`` and the engine's schedule (dropout keys, tied weights, the loss weighting).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.transformer import Transformer
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.model.layers import LanguageModelLoss, transformer_layer_specs

from .test_model_equivalence import ARCH, FULL_ARCH, _batches


def test_plain_transformer_trains_in_one_process_without_a_process_group() -> None:
    assert not dist.is_initialized()
    model = Transformer(TransformerArchitectureConfig.from_dict(ARCH), seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = _batches(1)[0]
    losses = []
    for _ in range(5):
        loss = model(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert not dist.is_initialized()  # nothing on the way created a world
    assert losses[-1] < losses[0] - 0.1, losses
    assert model.layers[0].weight is model.layers[-1].weight  # tied embedding and head: one Parameter
    assert model(batch).logits.shape == (*batch["tokens"].shape, model.config.padded_vocab_size)


def test_single_topology_refuses_more_than_one_rank() -> None:
    with pytest.raises(ValueError, match=r"Topology.single\(\) is one process, but the config has 2 ranks"):
        Topology.single(TopologyConfig(data_parallel_size=2))


def _engine_and_plain(arch: dict[str, Any]) -> dict[str, Any]:
    config = TransformerArchitectureConfig.from_dict(arch)
    topo = Topology(TopologyConfig(micro_batch_size=2, gradient_accumulation_steps=1))
    engine = ParallelModule(transformer_layer_specs(config, topo, seed=5), topo, LanguageModelLoss(topo), seed=5)
    plain = Transformer(config, Topology.single(), seed=5)
    batch = _batches(1)[0]
    result = engine.train_step([batch], step=3)
    output = plain(batch, step=3)
    output.loss.backward()
    engine_params = dict(engine.named_parameters_canonical())
    plain_params = dict(plain.named_parameters())
    return {
        "names": (sorted(engine_params), sorted(plain_params)),
        "weights": [torch.equal(engine_params[n], plain_params[n]) for n in plain_params],
        "loss": (result.loss, output.loss.detach()),
        "grads": {n: (_grad(engine, n), p.grad.clone()) for n, p in plain_params.items()},
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("arch", [ARCH, FULL_ARCH], ids=["llama", "every-option-with-dropout"])
def test_plain_transformer_equals_the_engine_on_one_process(arch: dict[str, Any]) -> None:
    (got,) = run_distributed(_engine_and_plain, 1, arch, timeout_s=100)
    engine_names, plain_names = got["names"]
    assert engine_names == plain_names  # the layout-free names of checkpoints
    assert all(got["weights"])  # the same initialisation
    assert torch.equal(*got["loss"]), got["loss"]  # the same forward, bit for bit (dropout keyed alike)
    for name, (engine_grad, plain_grad) in got["grads"].items():
        # The engine accumulates into an fp32 main-grad buffer scaled by the micro-batch's token share (1.0
        # here); the sum can differ from autograd's in the last bit only.
        torch.testing.assert_close(engine_grad, plain_grad, rtol=1e-6, atol=1e-7, msg=name)


def _grad(module: ParallelModule, name: str) -> torch.Tensor:
    grad = module.main_grad(name)
    assert grad is not None, name
    return grad.clone()
