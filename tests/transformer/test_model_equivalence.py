"""A tiny Llama-style model (GQA, tied embeddings, SwiGLU, RoPE, RMSNorm) gives the single-process loss and
gradients on every layout, including kv heads fewer than tp ranks, sequence parallelism, interleaving and
activation checkpointing. A second architecture with every other option on (LayerNorm with bias, GELU MLP,
explicit head_dim, derived MLP width, partial RoPE, projection biases, all four dropouts, untied head) does
the same on a few layouts: a mismatch there points at an option's tensor-parallel split or at dropout masks
that depend on the layout."""

from __future__ import annotations

import zlib
from typing import Any

import pytest
import torch

from scaling.core.nn import get_param_meta, shard, unshard
from scaling.core.nn.dropout import DropoutKey, dropout_key
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.model.layers import LanguageModelLoss, transformer_layer_specs

N_MICRO, SEQ, MICRO = 2, 8, 2
ARCH = {
    "vocab_size": 50, "vocab_multiple": 8, "hidden_size": 16, "num_layers": 2, "num_attention_heads": 4,
    "num_kv_heads": 2, "intermediate_size": 32, "weight_tying": True, "sequence_length": SEQ,
}  # fmt: skip
FULL_ARCH = {
    "vocab_size": 50, "vocab_multiple": 8, "hidden_size": 16, "num_layers": 2, "num_attention_heads": 4,
    "num_kv_heads": 2, "head_dim": 8, "mlp_factor": 3.0, "rotary_fraction": 0.5, "norm_type": "layer",
    "norm_bias": True, "mlp_type": "gelu", "attention_bias": True, "mlp_bias": True, "embedding_dropout": 0.1,
    "attention_dropout": 0.1, "attention_output_dropout": 0.1, "mlp_dropout": 0.1, "sequence_length": SEQ,
}  # fmt: skip


def _perturb(named: list[tuple[str, torch.nn.Parameter]], tp_rank: int, tp_size: int) -> None:
    """Add seeded noise (seeded by the name, the same on every layout) to the decoder and norm parameters:
    biases leave zero, norm weights leave one, and attention scores get large enough that the query and
    RoPE gradients stand well above the tolerance. A bias added on every tp rank or a slice taken from the
    wrong rank then changes the loss and gradients. The (possibly tied) embedding and head weights stay."""
    with torch.no_grad():
        for name, p in named:
            if not any(part in name for part in ("attention", "mlp", "norm")):
                continue
            split = get_param_meta(p).tp_split_dim
            full_shape = list(p.shape)
            if split is not None:
                full_shape[split] *= tp_size
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            full = 0.2 * torch.randn(full_shape, generator=g)
            p.add_(full if split is None else shard(full, split, tp_rank, tp_size))


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, 50, (MICRO, SEQ + 1), generator=g)
        mask = torch.ones(MICRO, SEQ)
        mask[0, :3] = 0  # a "prompt" excluded from the loss
        out.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask})
    return out


def _reference(arch: dict[str, Any], n_total: int) -> dict[str, Any]:
    topo = Topology(TopologyConfig())
    config = TransformerArchitectureConfig.from_dict(arch)
    layers = torch.nn.ModuleList(spec.build() for spec in transformer_layer_specs(config, topo, seed=5))
    if config.weight_tying:
        layers[-1].weight = layers[0].weight
    _perturb(
        [(f"layers.{i}.{name}", p) for i, layer in enumerate(layers) for name, p in layer.named_parameters()], 0, 1
    )
    loss_fn = LanguageModelLoss(topo)
    losses = []
    for micro, batch in enumerate(_batches(n_total)):
        x: Any = batch
        for index, layer in enumerate(layers):
            with dropout_key(DropoutKey(0, 0, micro, index)):
                x = layer(x)
        loss, _ = loss_fn(x, batch)
        (loss / n_total).backward()
        losses.append(loss.detach())
    grads = {}
    for index, layer in enumerate(layers):
        for name, p in layer.named_parameters():
            grads[f"layers.{index}.{name}"] = p.grad.clone()
    return {"loss": torch.stack(losses).mean(), "grads": grads}


def _parallel(arch: dict[str, Any], layout: dict[str, Any]) -> dict[str, Any]:
    topo = Topology(TopologyConfig(**layout, gradient_accumulation_steps=N_MICRO, micro_batch_size=MICRO))
    config = TransformerArchitectureConfig.from_dict(arch)
    module = ParallelModule(transformer_layer_specs(config, topo, seed=5), topo, LanguageModelLoss(topo))
    named = [(f"layers.{i}.{name}", p) for i in module.layers for name, p in module.layers[i].named_parameters()]
    _perturb(named, topo.tp_rank, topo.tp_size)
    mine = _batches(N_MICRO * topo.dp_size)[topo.dp_rank * N_MICRO : (topo.dp_rank + 1) * N_MICRO]
    result = module.train_step(mine)
    grads = {}
    for index in module.layers:
        for name, _ in module.layers[index].named_parameters():
            canonical = module.canonical_name(f"layers.{index}.{name}")
            grad = module.main_grad(canonical)
            assert grad is not None, canonical
            grads[f"layers.{index}.{name}"] = (grad.clone(), module.param_table[canonical].tp_split_dim)
    return {"coord": (topo.pp_rank, topo.dp_rank, topo.tp_rank), "loss": result.loss, "grads": grads}


LAYOUTS = [
    {"model_parallel_size": tp, "pipe_parallel_size": pp, "data_parallel_size": dp}
    for tp, pp, dp in [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2)]
] + [
    {"pipe_parallel_size": 2, "pipe_schedule": "interleaved_1f1b", "virtual_pipe_stages": 2},
    {"model_parallel_size": 2, "activation_checkpointing_type": "every_layer", "pipe_parallel_size": 2},
    {"model_parallel_size": 2, "sequence_parallel": True},
    {"model_parallel_size": 4},  # 2 kv heads over 4 ranks: replicated kv projections
]


def _layout_id(layout: dict[str, Any]) -> str:
    return "-".join(f"{k.split('_')[0]}{v}" for k, v in layout.items())


def _check_layout_matches_one_process(arch: dict[str, Any], layout: dict[str, Any]) -> None:
    tp, dp = layout.get("model_parallel_size", 1), layout.get("data_parallel_size", 1)
    world = tp * layout.get("pipe_parallel_size", 1) * dp
    results = run_distributed(_parallel, world, arch, layout, timeout_s=200)
    expected = run_distributed(_reference, 1, arch, N_MICRO * dp, timeout_s=100)[0]
    shards: dict[str, dict[int, tuple[torch.Tensor, int | None]]] = {}
    for r in results:
        torch.testing.assert_close(r["loss"], expected["loss"], rtol=1e-5, atol=1e-6)
        if r["coord"][1] == 0:
            for name, value in r["grads"].items():
                shards.setdefault(name, {})[r["coord"][2]] = value
    assert set(shards) == set(expected["grads"])
    for name, by_rank in shards.items():
        split = by_rank[0][1]
        full = by_rank[0][0] if split is None else unshard([by_rank[t][0] for t in range(tp)], split)
        torch.testing.assert_close(full, expected["grads"][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_transformer_layouts_match_one_process(layout: dict[str, Any]) -> None:
    _check_layout_matches_one_process(dict(ARCH), layout)


FULL_ARCH_LAYOUTS = [
    {"model_parallel_size": 2},
    {"pipe_parallel_size": 2, "activation_checkpointing_type": "every_layer"},
    {"model_parallel_size": 2, "pipe_parallel_size": 2, "data_parallel_size": 2, "sequence_parallel": True},
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", FULL_ARCH_LAYOUTS, ids=_layout_id)
def test_full_featured_architecture_layouts_match_one_process(layout: dict[str, Any]) -> None:
    _check_layout_matches_one_process(dict(FULL_ARCH), layout)


def _uneven_batches(n: int) -> list[dict[str, torch.Tensor]]:
    out = _batches(n)
    for i, batch in enumerate(out):
        batch["loss_mask"][:, : 1 + 2 * i] = 0  # every micro-batch has a different number of loss tokens
    return out


def _token_mean_reference(n_total: int) -> torch.Tensor:
    topo = Topology(TopologyConfig())
    config = TransformerArchitectureConfig.from_dict(ARCH)
    layers = torch.nn.ModuleList(spec.build() for spec in transformer_layer_specs(config, topo, seed=5))
    layers[-1].weight = layers[0].weight
    total, weighted = 0.0, torch.zeros(())
    for batch in _uneven_batches(n_total):
        x: Any = batch
        for layer in layers:
            x = layer(x)
        per_token = torch.nn.functional.cross_entropy(x.flatten(0, 1), batch["targets"].flatten(), reduction="none")
        weighted = weighted + (per_token * batch["loss_mask"].flatten()).sum()
        total += float(batch["loss_mask"].sum())
    return weighted / total


def _weighted_parallel(layout: dict[str, Any]) -> torch.Tensor:
    from scaling.transformer.model.layers import loss_tokens

    topo = Topology(TopologyConfig(**layout, gradient_accumulation_steps=N_MICRO, micro_batch_size=MICRO))
    config = TransformerArchitectureConfig.from_dict(ARCH)
    specs = transformer_layer_specs(config, topo, seed=5)
    module = ParallelModule(specs, topo, LanguageModelLoss(topo), weight_fn=loss_tokens)
    mine = _uneven_batches(N_MICRO * topo.dp_size)[topo.dp_rank * N_MICRO : (topo.dp_rank + 1) * N_MICRO]
    return module.train_step(mine).loss


@pytest.mark.parametrize(
    "layout", [{"data_parallel_size": 2, "pipe_parallel_size": 2}, {"data_parallel_size": 1}], ids=str
)
def test_uneven_loss_masks_average_over_tokens_like_one_process(layout: dict[str, Any]) -> None:
    world = layout.get("data_parallel_size", 1) * layout.get("pipe_parallel_size", 1)
    expected = run_distributed(_token_mean_reference, 1, N_MICRO * layout["data_parallel_size"])[0]
    for loss in run_distributed(_weighted_parallel, world, layout):
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
