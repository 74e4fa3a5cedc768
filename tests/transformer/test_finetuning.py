"""LoRA (tensor-parallel aware), BitFit and bottleneck adapters; loss masks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from scaling.core.nn import unshard
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.transformer.finetuning.apply import finetuning_adapter
from scaling.transformer.finetuning.config import FinetuningConfig
from scaling.transformer.finetuning.lora import merge_lora
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.model.layers import LanguageModelLoss, transformer_layer_specs

from .test_model_equivalence import ARCH, _batches

LORA = {"lora": {"rank": 4, "alpha": 8.0, "targets": ["query", "key_value", "dense", "gate", "up", "down"]}}


def _module(topo: Topology, finetuning: dict[str, Any] | None, arch: dict[str, Any] = ARCH) -> ParallelModule:
    config = TransformerArchitectureConfig.from_dict(arch)
    adapt = finetuning_adapter(FinetuningConfig.from_dict(finetuning), topo) if finetuning is not None else None
    return ParallelModule(transformer_layer_specs(config, topo, seed=5), topo, LanguageModelLoss(topo), adapt=adapt)


def _finetune(tp: int, finetuning: dict[str, Any], arch: dict[str, Any]) -> dict[str, Any]:
    topo = Topology(TopologyConfig(model_parallel_size=tp, gradient_accumulation_steps=2))
    base = _module(topo, None, arch)
    tuned = _module(topo, finetuning, arch)
    batches = _batches(2)
    base_loss = base.eval_step(batches).loss
    start_loss = tuned.eval_step(batches).loss
    before = {n: p.detach().clone() for n, p in tuned.named_parameters_canonical()}
    optimizer = Optimizer.for_module(
        tuned, OptimizerConfig.from_dict({"training_groups": [{"learning_rate_schedule": {"learning_rate": 1e-2}}]})
    )
    first = tuned.train_step(batches, step=0)
    grads = {
        n: (tuned.main_grad(n).clone(), tuned.param_table[n].tp_split_dim)  # type: ignore[union-attr]
        for n, p in tuned.named_parameters_canonical()
        if p.requires_grad
    }
    optimizer.step(0)
    for step in range(1, 3):
        tuned.train_step(batches, step=step)
        optimizer.step(step)
    changed = sorted(n for n, p in tuned.named_parameters_canonical() if not torch.equal(p, before[n]))
    unmerged = tuned.eval_step(batches).loss
    merged_count = merge_lora(tuned)
    merged = tuned.eval_step(batches).loss
    return {
        "base": base_loss, "start": start_loss, "first": first.loss, "changed": changed, "unmerged": unmerged,
        "merged": merged, "merged_count": merged_count, "grads": grads, "tp_rank": topo.tp_rank,
        "optimizer_params": sorted(n for slot in optimizer.slots for n in slot.names),
    }  # fmt: skip


def test_lora_starts_as_the_base_model_trains_only_adapters_and_merges_exactly() -> None:
    result = run_distributed(_finetune, 1, 1, LORA, ARCH)[0]
    torch.testing.assert_close(result["start"], result["base"], rtol=0, atol=0)  # B = 0: exactly the base model
    assert result["changed"] and all("lora_" in name for name in result["changed"])
    assert result["optimizer_params"] == result["changed"]  # frozen weights never reach the optimizer
    assert result["merged_count"] == 2 * 6  # 2 layers x 6 targets
    assert not torch.equal(result["unmerged"], result["start"])
    torch.testing.assert_close(result["merged"], result["unmerged"], rtol=1e-5, atol=1e-6)


def test_lora_on_two_tensor_parallel_ranks_equals_one_process() -> None:
    single = run_distributed(_finetune, 1, 1, LORA, ARCH)[0]
    pair = run_distributed(_finetune, 2, 2, LORA, ARCH)
    for r in pair:
        torch.testing.assert_close(r["first"], single["first"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["merged"], single["merged"], rtol=1e-5, atol=1e-6)
    for name, (grad, _split) in single["grads"].items():
        parts = [r["grads"][name] for r in sorted(pair, key=lambda r: r["tp_rank"])]
        full = parts[0][0] if parts[0][1] is None else unshard([p[0] for p in parts], parts[0][1])
        torch.testing.assert_close(full, grad, rtol=1e-5, atol=1e-6, msg=name)


def test_bitfit_trains_only_biases_and_adapters_start_as_identity() -> None:
    arch = {**ARCH, "attention_bias": True, "mlp_bias": True}
    bitfit = run_distributed(_finetune, 1, 1, {"bitfit": True}, arch)[0]
    assert bitfit["changed"] and all(name.endswith("bias") for name in bitfit["changed"])
    adapters = run_distributed(_finetune, 1, 1, {"adapters": {"bottleneck": 4}}, ARCH)[0]
    torch.testing.assert_close(adapters["start"], adapters["base"], rtol=0, atol=0)
    assert adapters["changed"] and all(".adapter." in name for name in adapters["changed"])


def _masked_loss() -> list[float]:
    topo = Topology(TopologyConfig())
    loss_fn = LanguageModelLoss(topo)
    logits = torch.randn(1, 4, 8)
    targets = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0]])  # a two-token prompt
    other = torch.tensor([[5, 6, 3, 4]])  # only prompt targets differ
    a, _ = loss_fn(logits, {"targets": targets, "loss_mask": mask})
    b, _ = loss_fn(logits, {"targets": other, "loss_mask": mask})
    full = torch.nn.functional.cross_entropy(logits[0, 2:], targets[0, 2:])
    return [float(a), float(b), float(full)]


def test_loss_masks_exclude_prompt_tokens() -> None:
    a, b, full = run_distributed(_masked_loss, 1)[0]
    assert a == pytest.approx(b) and a == pytest.approx(full, rel=1e-6)


def _adapter_checkpoint(base_dir: str, adapter_dir: str) -> dict[str, Any]:
    from scaling.core.checkpoint import load_checkpoint, save_checkpoint

    topo = Topology(TopologyConfig(gradient_accumulation_steps=2))
    base = _module(topo, None)
    save_checkpoint(base_dir, 1, base)
    tuned = _module(topo, LORA)
    load_checkpoint(base_dir, tuned, missing="keep_initialised")  # the LoRA factors are not in the base
    optimizer = Optimizer.for_module(
        tuned, OptimizerConfig.from_dict({"training_groups": [{"learning_rate_schedule": {"learning_rate": 1e-2}}]})
    )
    for step in range(2):
        tuned.train_step(_batches(2), step=step)
        optimizer.step(step)
    save_checkpoint(adapter_dir, 2, tuned, weights="trainable")
    expected = tuned.eval_step(_batches(2)).loss
    fresh = _module(topo, LORA)
    load_checkpoint(base_dir, fresh, missing="keep_initialised")
    load_checkpoint(adapter_dir, fresh, missing="keep_initialised")  # frozen base weights are not in it
    from pathlib import Path

    stored = sorted(p.name for p in (Path(adapter_dir) / "global_step2" / "model").iterdir())
    base_weights = dict(base.named_parameters_canonical())
    frozen_from_base = all(
        torch.equal(p, base_weights[n]) for n, p in fresh.named_parameters_canonical() if not p.requires_grad
    )
    return {
        "expected": expected,
        "restored": fresh.eval_step(_batches(2)).loss,
        "files": stored,
        "frozen_from_base": frozen_from_base,
        "names_kept": set(base_weights) <= {n for n, _ in fresh.named_parameters_canonical()},
    }


def test_adapter_weights_save_alone_and_load_on_top_of_the_base(tmp_path: Any) -> None:
    result = run_distributed(_adapter_checkpoint, 1, str(tmp_path / "base"), str(tmp_path / "adapter"))[0]
    torch.testing.assert_close(result["restored"], result["expected"], rtol=0, atol=0)
    assert result["files"] == ["layer_00001.safetensors", "layer_00002.safetensors"]  # no embedding or head
    assert result["names_kept"]  # wrapping a projection in LoRA does not rename its weights
    assert result["frozen_from_base"]  # so the base checkpoint really loaded into the adapted model


def _soft_prompt(layout: dict[str, Any]) -> dict[str, Any]:
    topo = Topology(TopologyConfig(**layout, gradient_accumulation_steps=2))
    module = _module(topo, {"soft_prompt": {"tokens": 3}})
    optimizer = Optimizer.for_module(
        module, OptimizerConfig.from_dict({"training_groups": [{"learning_rate_schedule": {"learning_rate": 5e-2}}]})
    )
    before = {n: p.detach().clone() for n, p in module.named_parameters_canonical()}
    losses = []
    for step in range(4):
        losses.append(module.train_step(_batches(2), step=step).loss)
        optimizer.step(step)
    changed = sorted(n for n, p in module.named_parameters_canonical() if not torch.equal(p, before[n]))
    return {"losses": torch.stack(losses), "changed": changed}


def test_soft_prompt_trains_only_the_prompt_on_any_layout() -> None:
    single = run_distributed(_soft_prompt, 1, {})[0]
    assert single["changed"] == ["layers.0.soft_prompt"]
    assert single["losses"][-1] < single["losses"][0]
    for layout, world in (({"model_parallel_size": 2}, 2), ({"pipe_parallel_size": 2}, 2)):
        for result in run_distributed(_soft_prompt, world, layout):
            torch.testing.assert_close(result["losses"], single["losses"], rtol=1e-5, atol=1e-6)
