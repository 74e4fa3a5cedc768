"""The preset classes as a user meets them: pretrained weights by path, fp32 masters under bf16 compute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from scaling.core.testing import run_distributed

PROBE = torch.tensor([[3, 17, 99, 260, 5, 41, 7, 300], [1, 2, 3, 4, 5, 6, 7, 8]])


def _hf_tiny(folder: Path) -> torch.Tensor:
    """A random Hugging Face Llama of the LlamaTiny shape, saved to ``folder``; returns its logits on PROBE."""
    from scaling.transformer.convert.hf_config import hf_config_from_architecture
    from scaling.transformer.presets import llama_architecture

    config = transformers.LlamaConfig(**hf_config_from_architecture(llama_architecture("tiny"), torch.float32))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    with torch.no_grad():
        logits: torch.Tensor = model(input_ids=PROBE).logits
    return logits


def _logits_of_pretrained(folder: str, zero_stage: int) -> torch.Tensor:
    from scaling.llama import LlamaTiny
    from scaling.transformer import plain_world

    torch.set_num_threads(1)
    plain_world.reset_plain_world()
    model = LlamaTiny(pretrained=folder, zero_stage=zero_stage, precision="fp32")
    with torch.no_grad():
        return model({"input_ids": PROBE}).float()


@pytest.mark.parametrize(("world", "zero_stage"), [(1, 0), (2, 3)])
def test_llama_tiny_from_a_hugging_face_folder_computes_its_logits(tmp_path: Path, world: int, zero_stage: int) -> None:
    expected = _hf_tiny(tmp_path / "hf")
    for logits in run_distributed(_logits_of_pretrained, world, str(tmp_path / "hf"), zero_stage, timeout_s=120):
        torch.testing.assert_close(logits[..., : expected.shape[-1]], expected, rtol=1e-4, atol=1e-4)


def test_a_pretrained_folder_of_another_shape_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    from scaling.llama import Llama7b

    _hf_tiny(tmp_path / "hf")
    with pytest.raises(ValueError, match="vocab_size=512"):
        Llama7b(pretrained=tmp_path / "hf")  # a 7B would take minutes to build: the check comes first


def _dtypes() -> tuple[set[torch.dtype], torch.dtype]:
    from scaling.llama import LlamaTiny
    from scaling.transformer import plain_world

    plain_world.reset_plain_world()
    model = LlamaTiny(zero_stage=3, precision="bf16")
    loss = model({"input_ids": PROBE, "labels": PROBE})
    loss.backward()
    grads = {p.grad.dtype for p in model.parameters() if p.grad is not None}
    return {p.dtype for p in model.parameters()} | grads, model(dict(input_ids=PROBE)).dtype


def test_bf16_computes_in_bf16_while_the_optimizer_sees_fp32_masters_and_gradients() -> None:
    masters, logits = run_distributed(_dtypes, 2, timeout_s=120)[0]
    assert masters == {torch.float32}
    assert logits == torch.bfloat16
