"""Transformer datasets (packed documents, finetuning masks) and `scaling train` launching its processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from scaling.core.config import ConfigError
from scaling.core.data import MemoryMapDataset, MemoryMapWriter
from scaling.transformer.config import TransformerConfig
from scaling.transformer.data.datasets import FinetuningDataset, PretrainingDataset
from scaling.transformer.data.tokenizer import Tokenizer

from .test_prepare_data import tokenizer_file  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]


def test_packed_windows_carry_document_ids_and_restarting_positions(tmp_path: Path) -> None:
    with MemoryMapWriter(tmp_path / "c", vocab_size=100) as writer:
        writer.add_all([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]])
    data = PretrainingDataset(MemoryMapDataset(tmp_path / "c"), sequence_length=4, document_masking=True)
    first = data[0]  # tokens 1 2 3 4 | targets 2 3 4 5
    assert first["tokens"].tolist() == [1, 2, 3, 4] and first["targets"].tolist() == [2, 3, 4, 5]
    assert first["document_ids"].tolist() == [0, 0, 0, 1]
    assert first["positions"].tolist() == [0, 1, 2, 0]
    second = data[1]  # tokens 5 6 7 8: the window starts inside document 1
    assert second["document_ids"].tolist() == [0, 1, 1, 1]
    assert second["positions"].tolist() == [1, 0, 1, 2]


def test_finetuning_masks_train_only_on_completions_and_assistant_turns(tmp_path: Path, tokenizer_file: Path) -> None:  # noqa: F811
    tokenizer = Tokenizer.from_file(tokenizer_file)
    path = tmp_path / "ft.jsonl"
    lines = [
        {"prompt": "def add(a, b):", "completion": " return a + b"},
        {"messages": [{"role": "user", "content": "x = [1"}, {"role": "assistant", "content": ", 2, 3]"}]},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    data = FinetuningDataset(path, tokenizer, sequence_length=32)
    sample = data[0]
    prompt_len = len(tokenizer.encode("def add(a, b):"))
    completion = tokenizer.encode(" return a + b")
    mask = sample["loss_mask"].tolist()
    assert mask[: prompt_len - 1] == [0.0] * (prompt_len - 1)  # predicting prompt tokens: no loss
    assert mask[prompt_len - 1 : prompt_len - 1 + len(completion) + 1] == [1.0] * (len(completion) + 1)  # + EOS
    assert sum(mask) == len(completion) + 1  # padding has no loss
    chat = data[1]
    learned = [t for t, m in zip(chat["targets"].tolist(), chat["loss_mask"].tolist(), strict=True) if m]
    assert tokenizer.decode(learned[:-1]) == ", 2, 3]\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(ValueError, match=rf"{bad}:1: expected 'prompt' and 'completion', or 'messages'"):
        FinetuningDataset(bad, tokenizer, 16)


def _config(tmp_path: Path, prefix: Path) -> dict[str, object]:
    return {
        "topology": {"data_parallel_size": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 1},
        "architecture": {"vocab_size": 64, "vocab_multiple": 64, "hidden_size": 16, "num_layers": 2,
                         "num_attention_heads": 4, "num_kv_heads": 2, "intermediate_size": 32, "sequence_length": 16},
        "trainer": {"train_iterations": 6, "log_interval": 1, "save_dir": str(tmp_path / "ckpt")},
        "optimizer": {"training_groups": [{"learning_rate_schedule": {"learning_rate": 0.01,
                                                                       "learning_rate_decay_style": "constant"}}]},
        "data": {"prefixes": [str(prefix)], "validation_fraction": 0.1},
        "logger": {"log_dir": str(tmp_path / "logs")},
    }  # fmt: skip


def test_bad_transformer_configs_name_the_field(tmp_path: Path) -> None:
    base = _config(tmp_path, tmp_path / "p")
    with pytest.raises(
        ConfigError, match=r"architecture\.num_attention_heads: num_attention_heads \(4\) must be divisible"
    ):
        TransformerConfig.from_dict({**base, "topology": {"model_parallel_size": 8}})
    with pytest.raises(ConfigError, match=r"data: Field required|data: required field is missing"):
        TransformerConfig.from_dict({k: v for k, v in base.items() if k != "data"})


@pytest.mark.timeout(300)
def test_scaling_train_launches_two_processes_and_the_loss_falls(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    with MemoryMapWriter(tmp_path / "corpus", vocab_size=64) as writer:
        for _ in range(40):  # a learnable language: counting modulo 64
            start = int(torch.randint(0, 64, (1,), generator=generator))
            writer.add([(start + i) % 64 for i in range(40)])
    config = tmp_path / "run.yml"
    config.write_text(yaml.safe_dump(_config(tmp_path, tmp_path / "corpus")))
    scaling = Path(sys.executable).with_name("scaling")
    result = subprocess.run([str(scaling), "train", str(config), "-o", "trainer.train_iterations=12"],
                            cwd=REPO, capture_output=True, text=True, timeout=280)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 0 prints the layout's budget from the planner before building the model (docs/planning.md)
    assert "plan for tp 1 pp 1 dp 2 ZeRO 0 ckpt off mbs 2 x 1 on cpu:" in result.stderr
    assert "memory per rank: parameters" in result.stderr
    # the resolved config beside the metrics, for `scaling report` (docs/report.md)
    saved = json.loads((tmp_path / "logs" / "config.json").read_text())
    assert saved["trainer"]["train_iterations"] == 12 and saved["topology"]["data_parallel_size"] == 2
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step12"

    # LoRA finetuning of that checkpoint through the same command: the base weights load, the LoRA factors
    # (absent from the base) keep their initialisation, and only they train.
    from safetensors.torch import load_file

    tuned = tmp_path / "lora"
    result = subprocess.run(
        [str(scaling), "train", str(config), "-o", f"trainer.load_dir={tmp_path / 'ckpt'}",
         "-o", "trainer.load=weights",
         "-o", "trainer.load_missing_weights=keep_initialised", "-o", f"trainer.save_dir={tuned}",
         "-o", "trainer.train_iterations=3", "-o", "finetuning.lora.rank=4"],
        cwd=REPO, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    base = load_file(tmp_path / "ckpt" / "global_step12" / "model" / "layer_00001.safetensors")
    after = load_file(tuned / "global_step3" / "model" / "layer_00001.safetensors")
    assert all(torch.equal(after[name], tensor) for name, tensor in base.items())  # frozen base weights
    assert after["attention.query.lora_b"].abs().sum() > 0  # LoRA B starts at zero and has trained
