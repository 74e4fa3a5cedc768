"""Incremental decoding through the KV cache computes the plain ``Transformer``'s logits; LoRA merges once.

All but the tensor-parallel test run in this process on ``Topology.single()`` (no process group), in
float32. The reference is always ``Transformer.forward`` on a whole, unpadded sequence (the training path:
causal mask, no cache); the decoding side is the same forward fed a left-padded prefill and then one token
at a time with ``kv_cache``. A failure in the decoding tests points at the cache path of
``model/transformer.py`` (slots, padding mask, the soft prompt's slots) or ``Attention.forward`` with
``CacheSlots``; in the bf16 test at ``finetuning/lora.py``'s merge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.transformer.convert.to_hf import _merge_lora
from scaling.transformer.finetuning.apply import finetuning_adapter
from scaling.transformer.finetuning.config import FinetuningConfig
from scaling.transformer.finetuning.lora import LoRALinear, merge_lora
from scaling.transformer.inference.generation import pad_left
from scaling.transformer.model import layers as layers_module
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.model.transformer import Transformer

ARCH = {
    "vocab_size": 60, "vocab_multiple": 16, "hidden_size": 32, "num_layers": 3, "num_attention_heads": 4,
    "num_kv_heads": 2, "intermediate_size": 64, "sequence_length": 64,
}  # fmt: skip
PROMPTS = [[3, 14, 15, 9, 26, 5, 35], [35, 8], [9, 7, 9, 3]]
CONTINUATIONS = [[11, 2, 40, 7, 7], [1, 59, 23, 4, 18], [30, 30, 6, 12, 44]]  # fed back one token at a time
FINETUNING = {"lora": {"rank": 4, "alpha": 8.0, "targets": ["query", "key_value", "dense", "up", "down"]},
              "adapters": {"bottleneck": 4}, "soft_prompt": {"tokens": 3}}  # fmt: skip
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}  # float32; the cache path reorders no sums, SDPA's blocks may


def _plain(seed: int = 5, topology: Topology | None = None) -> Transformer:
    """A model whose matrices have more spread than the init, so its logits tell tokens apart."""
    model = Transformer(TransformerArchitectureConfig.from_dict(ARCH), topology, seed=seed).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


def _adapted(model: Transformer) -> Transformer:
    """``model``'s layers with LoRA (unmerged), bottleneck adapters and a soft prompt, as finetuning builds them."""
    adapt = finetuning_adapter(FinetuningConfig.from_dict(FINETUNING), model.topology)
    layers = [adapt(layer, index) for index, layer in enumerate(model.layers)]
    tuned = Transformer(model.config, model.topology, layers=layers).eval()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():  # as if trained: LoRA B and adapter "up" start at zero
        for p in tuned.parameters():
            if p.requires_grad:  # finetuning froze everything else
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return tuned


def _full(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """The training path's logits ``[s, vocab]`` for one unpadded sequence."""
    with torch.no_grad():
        return model({"tokens": torch.tensor([tokens])}).logits[0]


def _decoded(model: Transformer, prompts: list[list[int]], continuations: list[list[int]]) -> list[torch.Tensor]:
    """Each row's logits ``[prompt + continuation, vocab]``: a left-padded prefill, then one token per call."""
    tokens, valid, positions = pad_left(prompts, torch.device("cpu"))
    rows, width = tokens.shape
    steps = len(continuations[0])
    cache = model.new_kv_cache(rows, width + steps)
    logits = []
    with torch.no_grad():
        batch: dict[str, Any] = {"tokens": tokens, "positions": positions, "valid": valid, "kv_cache": cache}
        logits.append(model(batch).logits)  # [b, width, vocab]
        following = torch.tensor(continuations)  # [b, steps]
        for step in range(steps):
            valid = torch.cat([valid, valid.new_ones(rows, 1)], dim=1)
            batch = {
                "tokens": following[:, step : step + 1], "positions": positions[:, -1:] + step + 1,
                "valid": valid, "kv_cache": cache, "cache_start": width + step,
            }  # fmt: skip
            logits.append(model(batch).logits)  # [b, 1, vocab]
    joined = torch.cat(logits, dim=1)  # [b, width + steps, vocab]
    return [joined[row, width - len(prompt) :] for row, prompt in enumerate(prompts)]


def test_cached_decoding_of_one_sequence_equals_the_full_forward() -> None:
    model = _plain()
    sequence = PROMPTS[0] + CONTINUATIONS[0]
    (decoded,) = _decoded(model, PROMPTS[:1], CONTINUATIONS[:1])
    expected = _full(model, sequence)
    assert decoded.shape == expected.shape == (len(sequence), model.config.padded_vocab_size)
    torch.testing.assert_close(decoded, expected, **TOLERANCE)
    assert expected.std(dim=-1).min() > 0.1  # logits that tell tokens apart: the comparison means something


def test_left_padded_batch_decodes_each_row_as_if_alone() -> None:
    model = _plain()
    decoded = _decoded(model, PROMPTS, CONTINUATIONS)
    for row, (prompt, continuation) in enumerate(zip(PROMPTS, CONTINUATIONS, strict=True)):
        torch.testing.assert_close(decoded[row], _full(model, prompt + continuation), **TOLERANCE, msg=f"row {row}")


def _on_tensor_parallel_ranks() -> dict[str, Any]:
    model = _plain(topology=Topology(TopologyConfig(model_parallel_size=2)))
    full = [_full(model, p + c) for p, c in zip(PROMPTS, CONTINUATIONS, strict=True)]  # this rank's vocab slice
    return {"decoded": _decoded(model, PROMPTS, CONTINUATIONS), "full": full, "rank": model.topology.tp_rank}


@pytest.mark.timeout(120)
def test_tensor_parallel_ranks_decode_like_the_full_forward_and_like_one_process() -> None:
    ranks = run_distributed(_on_tensor_parallel_ranks, 2, timeout_s=100)
    alone = _plain()
    for row, (prompt, continuation) in enumerate(zip(PROMPTS, CONTINUATIONS, strict=True)):
        for result in ranks:
            torch.testing.assert_close(result["decoded"][row], result["full"][row], **TOLERANCE)
        shards = [r["decoded"][row] for r in sorted(ranks, key=lambda r: r["rank"])]  # vocab split over ranks
        torch.testing.assert_close(torch.cat(shards, dim=-1), _full(alone, prompt + continuation), **TOLERANCE)


def test_last_only_and_hidden_states_are_the_forward_s_last_row_and_final_norm() -> None:
    model = _plain()
    tokens = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        full = model({"tokens": tokens}).logits
        last = model({"tokens": tokens}, last_only=True).logits
        hidden = model.hidden_states({"tokens": tokens})
    torch.testing.assert_close(last, full[:, -1:], **TOLERANCE)  # a one-row GEMM may round differently
    torch.testing.assert_close(nn.functional.linear(hidden, model.head.weight), full, **TOLERANCE)
    with pytest.raises(ValueError, match="last_only"):
        model({"tokens": tokens, "targets": tokens}, last_only=True)


def test_lora_adapters_and_soft_prompt_decode_like_the_full_forward() -> None:
    tuned = _adapted(_plain())
    assert tuned.prefix_slots == 3
    expected = [_full(tuned, p + c) for p, c in zip(PROMPTS, CONTINUATIONS, strict=True)]
    for row, got in enumerate(_decoded(tuned, PROMPTS, CONTINUATIONS)):  # LoRA still a separate branch
        torch.testing.assert_close(got, expected[row], **TOLERANCE, msg=f"unmerged, row {row}")
    base = _plain()
    assert not torch.allclose(_full(base, PROMPTS[0] + CONTINUATIONS[0]), expected[0], atol=1e-2)
    assert merge_lora(tuned) == 3 * 5  # 3 layers x 5 targets
    for row, got in enumerate(_decoded(tuned, PROMPTS, CONTINUATIONS)):  # LoRA folded into the weights
        torch.testing.assert_close(got, expected[row], **TOLERANCE, msg=f"merged, row {row}")


def test_rope_tables_and_mask_are_computed_once_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _plain()
    calls = {"rope": 0, "mask": 0}
    rotary, mask = layers_module.rotary_tables, layers_module.attention_mask

    def counted_rotary(*args: Any) -> Any:
        calls["rope"] += 1
        return rotary(*args)

    def counted_mask(*args: Any) -> Any:
        calls["mask"] += 1
        return mask(*args)

    monkeypatch.setattr(layers_module, "rotary_tables", counted_rotary)
    monkeypatch.setattr(layers_module, "attention_mask", counted_mask)
    with torch.no_grad():
        model({"tokens": torch.tensor([PROMPTS[0]])})
    assert calls == {"rope": 1, "mask": 1}, f"{model.config.num_layers} decoder layers: {calls}"
    with torch.no_grad():  # a decoder layer on its own (a pipeline stage) still computes its own tables
        model.layers[1]({"h": torch.zeros(1, 4, ARCH["hidden_size"]), "positions": torch.arange(4)[None]})
    assert calls == {"rope": 2, "mask": 2}


def test_bf16_lora_merge_is_one_rounding_shared_with_export() -> None:
    """The live merge (inference) and the export merge (to_hf) give the same bf16 weight, rounded once."""
    topology = Topology.single()
    model = _plain()
    adapt = finetuning_adapter(FinetuningConfig.from_dict({"lora": {"rank": 4, "alpha": 8.0}}), topology)
    layer = adapt(model.layers[1], 1).to(torch.bfloat16)
    lora = layer.attention.query
    assert isinstance(lora, LoRALinear)
    with torch.no_grad():
        lora.lora_b.copy_(1e-2 * torch.randn(lora.lora_b.shape, generator=torch.Generator().manual_seed(0)))
    w, a, b = (t.detach().clone() for t in (lora.base.weight, lora.lora_a, lora.lora_b))
    lora.merge()
    tensors = {"attention.query.weight": w, "attention.query.lora_a": a, "attention.query.lora_b": b}
    _merge_lora(tensors, lora.scaling, Path("layer.safetensors"))  # the path only names the file in errors
    assert torch.equal(lora.base.weight, tensors["attention.query.weight"])
    assert torch.equal(lora.base.weight, (w.float() + lora.scaling * (b.float() @ a.float())).to(torch.bfloat16))
    twice = w + lora.scaling * (b @ a)  # all in bf16: the product and the sum each rounded
    assert not torch.equal(twice, lora.base.weight)  # rounding twice does differ: the test can tell them apart
