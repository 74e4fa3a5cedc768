"""``Topology.single()`` means one rank even inside an initialised world: a reference model built in a rank
of a distributed test (or next to a job) must not reduce over the whole world."""

from __future__ import annotations

import torch

from scaling.core.testing import run_distributed
from scaling.core.topology import Topology
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.model.transformer import Transformer

ARCH = {"vocab_size": 128, "hidden_size": 32, "num_layers": 1, "num_attention_heads": 4, "sequence_length": 8}


def _loss_and_grad() -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    tokens = torch.randint(0, 128, (2, 9))
    model = Transformer(TransformerArchitectureConfig(**ARCH), Topology.single(), seed=1)
    loss = model({"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}).loss
    loss.backward()
    grad = model.layers[1].attention.dense.weight.grad
    assert grad is not None
    return loss.item(), grad.clone()


def test_a_single_process_model_inside_a_two_process_world_computes_what_it_computes_alone() -> None:
    alone = _loss_and_grad()
    for loss, grad in run_distributed(_loss_and_grad, 2, timeout_s=60):
        assert loss == alone[0]
        assert torch.equal(grad, alone[1])
