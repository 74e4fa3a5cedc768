"""Finetuning micro-batches are padded to their longest sample, not to ``sequence_length``, and the loss
and gradients are those of padding to ``sequence_length`` (padding carries no loss), on one process and
with pipeline (different widths per micro-batch travel between stages) or sequence-parallel layouts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.transformer.config import TransformerConfig
from scaling.transformer.data.datasets import FinetuningDataset
from scaling.transformer.data.tokenizer import Tokenizer
from scaling.transformer.data.train_tokenizer import train_bpe_tokenizer
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.model.layers import LanguageModelLoss, loss_tokens, transformer_layer_specs
from scaling.transformer.train import _datasets

SEQ = 64
ARCH = {
    "vocab_size": 320, "vocab_multiple": 64, "hidden_size": 16, "num_layers": 2, "num_attention_heads": 4,
    "num_kv_heads": 2, "intermediate_size": 32, "sequence_length": SEQ,
}  # fmt: skip
RECORDS = [  # two short samples, then two long ones: the two micro-batches have different widths
    {"prompt": "x =", "completion": " 1"},
    {"prompt": "a", "completion": " b"},
    {"messages": [{"role": "user", "content": "y?"}, {"role": "assistant", "content": "2"}]},
    {"prompt": "def add(a, b):", "completion": "\n    return a + b  # the sum of both arguments, returned"},
]


@pytest.fixture
def finetuning_files(tmp_path: Path) -> tuple[Path, Path]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\nclass Point:\n    self.x = x\n" * 50)
    tokenizer = tmp_path / "tokenizer.json"
    train_bpe_tokenizer([corpus], 300, tokenizer)
    jsonl = tmp_path / "ft.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return jsonl, tokenizer


def _dataset(jsonl: str, tokenizer: str, pad_multiple: int = 8) -> FinetuningDataset:
    return FinetuningDataset(jsonl, Tokenizer.from_file(tokenizer), SEQ, pad_multiple=pad_multiple)


def _to_sequence_length(batch: dict[str, torch.Tensor], pad: int) -> dict[str, torch.Tensor]:
    """The same micro-batch padded the old way, to ``sequence_length``."""
    extra = SEQ - batch["tokens"].shape[1]
    rows = batch["tokens"].shape[0]
    return {
        "tokens": torch.cat([batch["tokens"], torch.full((rows, extra), pad)], dim=1),
        "targets": torch.cat([batch["targets"], torch.full((rows, extra), pad)], dim=1),
        "loss_mask": torch.cat([batch["loss_mask"], torch.zeros(rows, extra)], dim=1),
        "positions": torch.arange(SEQ).expand(rows, SEQ),
    }


def test_collated_width_follows_the_longest_sample(finetuning_files: tuple[Path, Path]) -> None:
    jsonl, tokenizer = finetuning_files
    data = _dataset(str(jsonl), str(tokenizer))
    lengths = [len(data[i]["tokens"]) for i in range(len(data))]
    assert max(lengths[:2]) < 8 < max(lengths[2:]) < SEQ - 8  # the fixture's premise
    short, long = data.collate([data[0], data[1]]), data.collate([data[2], data[3]])
    assert short["tokens"].shape == (2, 8)  # rounded up to a multiple of 8, far below SEQ
    assert long["tokens"].shape[1] == -(-max(lengths[2:]) // 8) * 8
    for batch, items in ((short, [data[0], data[1]]), (long, [data[2], data[3]])):
        assert all(v.shape == batch["tokens"].shape for v in batch.values())
        for row, item in enumerate(items):
            n = len(item["tokens"])
            assert batch["tokens"][row, :n].tolist() == item["tokens"].tolist()
            assert batch["loss_mask"][row, n:].sum() == 0  # padding has no loss
        assert batch["positions"][0].tolist() == list(range(batch["tokens"].shape[1]))
    assert _dataset(str(jsonl), str(tokenizer), pad_multiple=24).collate([data[0]])["tokens"].shape == (1, 24)
    capped = FinetuningDataset(jsonl, Tokenizer.from_file(tokenizer), 10)
    assert capped.collate([capped[2]])["tokens"].shape == (1, 10)  # never wider than sequence_length


def test_sequence_parallel_pads_to_a_multiple_of_the_tensor_parallel_size(
    finetuning_files: tuple[Path, Path], tmp_path: Path
) -> None:
    jsonl, tokenizer = finetuning_files
    arch = {**ARCH, "num_attention_heads": 6, "num_kv_heads": 3, "hidden_size": 24, "vocab_multiple": 192}
    arch.update(intermediate_size=48, sequence_length=48)  # every split divisible by tp=3
    base = {
        "architecture": arch,
        "data": {"finetuning_jsonl": str(jsonl), "tokenizer": str(tokenizer), "validation_fraction": 0.5},
        "topology": {"micro_batch_size": 1, "gradient_accumulation_steps": 1, "data_parallel_size": 1},
    }
    config = TransformerConfig.from_dict(
        {**base, "topology": {**base["topology"], "model_parallel_size": 3, "sequence_parallel": True}}
    )
    train, _ = _datasets(config)
    assert train.collate([train[0]])["tokens"].shape[1] == 24  # lcm(8, 3)
    plain, _ = _datasets(TransformerConfig.from_dict(base))
    assert plain.collate([plain[0]])["tokens"].shape[1] == 8


def _step(layout: dict[str, Any], jsonl: str, tokenizer: str, to_sequence_length: bool) -> dict[str, Any]:
    topo = Topology(TopologyConfig(**layout, micro_batch_size=2, gradient_accumulation_steps=2))
    config = TransformerArchitectureConfig.from_dict(ARCH)
    module = ParallelModule(
        transformer_layer_specs(config, topo, seed=5), topo, LanguageModelLoss(topo), seed=5, weight_fn=loss_tokens
    )
    data = _dataset(jsonl, tokenizer)
    batches = [data.collate([data[0], data[1]]), data.collate([data[2], data[3]])]
    if to_sequence_length:
        batches = [_to_sequence_length(b, data.pad) for b in batches]
    result = module.train_step(batches)
    grads = {}
    if topo.world_size == 1:
        grads = {n: module.main_grad(n) for n, p in module.named_parameters_canonical() if p.requires_grad}
        grads = {n: g.clone() for n, g in grads.items() if g is not None}
    return {"loss": result.loss, "widths": [b["tokens"].shape[1] for b in batches], "grads": grads}


def test_padding_to_the_longest_sample_gives_the_loss_of_padding_to_sequence_length(
    finetuning_files: tuple[Path, Path],
) -> None:
    files = tuple(map(str, finetuning_files))
    padded = run_distributed(_step, 1, {}, *files, True)[0]
    tight = run_distributed(_step, 1, {}, *files, False)[0]
    assert padded["widths"] == [SEQ, SEQ] and tight["widths"][0] < tight["widths"][1] < SEQ
    torch.testing.assert_close(tight["loss"], padded["loss"], rtol=1e-5, atol=1e-6)
    assert tight["grads"].keys() == padded["grads"].keys()
    for name, grad in tight["grads"].items():
        torch.testing.assert_close(grad, padded["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    for layout in ({"pipe_parallel_size": 2}, {"model_parallel_size": 2, "sequence_parallel": True}):
        for rank in run_distributed(_step, 2, layout, *files, False):
            if rank["loss"] is not None:
                torch.testing.assert_close(rank["loss"], padded["loss"], rtol=1e-5, atol=1e-6)
